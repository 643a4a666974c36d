"""Files as a hand edit gets them wrong, for tests that every reader refuses them in one line.

``mangled(forms)`` draws one of ``forms`` (name -> a file's parsed data)
with one or two of its fields dropped, repeated (list items) or set to a
``WRONG`` value, and says what it changed.
"""

from __future__ import annotations

import copy
from typing import Any, Iterator

from hypothesis import strategies as st

WRONG = [None, "x", "0", -1, 0, 1.5, float("nan"), float("inf"), 1e300, [], {}, [1], {"a": 1}, True, 10**30]
"""Values a hand-edited file gets wrong: missing, the wrong type, out of range, absurd."""


def _places(obj: Any, path: tuple = ()) -> Iterator[tuple[Any, Any, tuple]]:
    """Every (parent, key, path) of a nested mapping/list."""
    items = obj.items() if isinstance(obj, dict) else enumerate(obj) if isinstance(obj, list) else ()
    for key, value in items:
        yield obj, key, path + (key,)
        yield from _places(value, path + (key,))


@st.composite
def mangled(draw, forms: dict[str, Any]) -> tuple[str, Any, list[tuple[str, tuple]]]:
    """(form name, its data changed, [(how, path)]) for one of ``forms``."""
    form = draw(st.sampled_from(sorted(forms)))
    data = copy.deepcopy(forms[form])
    changes = []
    for _ in range(draw(st.integers(1, 2))):
        places = list(_places(data))
        if not places:
            break
        parent, key, path = draw(st.sampled_from(places))
        how = draw(st.sampled_from(["drop", "repeat", "set"]))
        if how == "drop":
            del parent[key]
        elif how == "repeat" and isinstance(parent, list):
            parent.append(copy.deepcopy(parent[key]))
        else:
            parent[key] = copy.deepcopy(draw(st.sampled_from(WRONG)))  # a later change may edit it: never WRONG's own
            how = f"set to {parent[key]!r}"
        changes.append((how, path))
    return form, data, changes
