"""Typed, range-checked config fields, shared by the recipe and the stage config.

A config is a plain dataclass whose fields carry their constraint in the
annotation::

    @dataclass
    class StageConfig:
        seq_len: PositiveInt
        lr: PositiveFloat = 2e-5
        checkpoint_every: Count = 0

``validate(StageConfig, raw, source)`` checks a whole mapping with pydantic
(``TypeAdapter`` over the dataclass, nested dataclasses included) and
raises one ``ConfigError`` holding every problem, one line each, e.g.
``recipe.yaml: stage 'b': lr is 'fast'; input should be a valid number``.
Code that builds a dataclass directly (from values already checked) skips
the field checks; ``__post_init__`` keeps the checks that span fields.
"""

from __future__ import annotations

import dataclasses
import functools
import re
import typing
from typing import Annotated, Any, Union

from pydantic import AfterValidator, BeforeValidator, ConfigDict, Field, Strict, StrictBool, TypeAdapter, ValidationError, with_config
from typing_extensions import TypedDict  # pydantic reads typing's TypedDict only from Python 3.12

from topology.errors import ConfigError

PositiveInt = Annotated[int, Strict(), Field(ge=1)]
"""A whole number >= 1 (``True`` and ``2.0`` are refused)."""
Count = Annotated[int, Strict(), Field(ge=0)]
"""A whole number >= 0: retries, a checkpoint interval (0: never)."""
Seed = Annotated[int, Strict(), Field(ge=0, lt=2**32)]
"""A random seed: a whole number that numpy and torch both take."""


def _not_bool(value: Any) -> Any:
    if isinstance(value, bool):  # YAML's yes/no/true/false: never a number someone meant
        raise ValueError("input should be a number, not true or false")
    return value


FiniteFloat = Annotated[float, BeforeValidator(_not_bool), Field(allow_inf_nan=False)]
"""A finite number (YAML's ``1e-3``, read as text, is accepted as the number; ``true`` is not 1)."""
PositiveFloat = Annotated[FiniteFloat, Field(gt=0)]
"""A finite number > 0."""

NonNegative = Union[Count, Annotated[FiniteFloat, Field(ge=0)]]
"""A finite number >= 0, kept as written: a whole number stays an int (DeepSpeed's sizes are ints)."""


@with_config(ConfigDict(extra="allow"))
class _ZeroKeys(TypedDict, total=False):
    stage: Annotated[int, Strict(), Field(ge=0, le=3)]
    stage3_max_live_parameters: NonNegative
    reduce_bucket_size: NonNegative
    overlap_comm: StrictBool
    contiguous_gradients: StrictBool


@with_config(ConfigDict(extra="allow"))
class _Component(TypedDict, total=False):
    type: str
    params: dict[str, Any]


@with_config(ConfigDict(extra="allow"))
class _Precision(TypedDict, total=False):
    enabled: StrictBool


@with_config(ConfigDict(extra="allow"))
class DeepSpeedKeys(TypedDict, total=False):
    """DeepSpeed's JSON config as a recipe or stage gives it: the keys ringleader reads itself have their types
    checked here, before anything starts (a string where a mapping belongs would otherwise fail in the sizing
    or in every rank); every other key passes through to DeepSpeed, which checks it when the stage starts."""

    zero_optimization: _ZeroKeys
    optimizer: _Component
    scheduler: _Component
    bf16: _Precision
    fp16: _Precision
    gradient_clipping: NonNegative
    train_batch_size: PositiveInt
    train_micro_batch_size_per_gpu: PositiveInt
    gradient_accumulation_steps: PositiveInt
    steps_per_print: PositiveInt


_SAFE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


def _path_component(value: str) -> str:
    if not _SAFE_NAME.fullmatch(value) or ".." in value:
        raise ValueError("it must be usable as a directory name: 1-64 letters, digits, '.', '_' or '-', "
                         "starting with a letter or digit")
    return value


PathName = Annotated[str, BeforeValidator(lambda v: str(v) if type(v) is int else v), AfterValidator(_path_component)]
"""A name that becomes a directory (stage names): never a path, never outside its parent. YAML's ``name: 256`` is "256"."""

T = typing.TypeVar("T")


@functools.lru_cache(maxsize=None)
def _adapter(cls: type) -> TypeAdapter:
    # Unknown keys are errors (a typo must not pass as a default). Pydantic reads this from the
    # dataclass itself, and nested dataclasses inherit it.
    cls.__pydantic_config__ = ConfigDict(extra="forbid")
    return TypeAdapter(cls)


def validate(cls: type[T], raw: Any, source: str) -> T:
    """``raw`` (a mapping) as a ``cls`` instance, every field checked; raises ``ConfigError`` listing every problem.

    Parameters
    ----------
    cls
        A dataclass whose field annotations carry the constraints (see the types above).
    raw
        The mapping as read from YAML or JSON.
    source
        Prefix of each error line (the file, say).
    """
    try:
        return _adapter(cls).validate_python(raw)
    except ValidationError as exc:
        raise ConfigError("\n".join(error_lines(exc, cls, raw, source))) from None


def error_lines(exc: ValidationError, cls: type, raw: Any, source: str) -> list[str]:
    """One line per field that is wrong (a union's alternatives merged into one line), in input order."""
    by_field: dict[tuple, list[dict[str, Any]]] = {}
    for err in exc.errors(include_url=False):
        loc = tuple(p for p in err["loc"] if isinstance(p, int) or _is_field_name(p))
        by_field.setdefault(loc, []).append(err)
    return [_line(loc, errs, cls, raw, source) for loc, errs in by_field.items()]


def _is_field_name(part: str) -> bool:
    """Loc parts that name a field; the rest name a union member (``constrained-int``, ``ThetaRule``, ``int``)."""
    return part.isidentifier() and part.islower() and part not in ("int", "float", "str", "bool", "dict", "list")


def _line(loc: tuple, errs: list[dict[str, Any]], cls: type, raw: Any, source: str) -> str:
    where, path = _where(loc, raw)
    prefix = f"{source}: " + (f"{where}: " if where else "")
    first = errs[0]
    error = (first.get("ctx") or {}).get("error")
    if isinstance(error, ConfigError):  # a __post_init__ check spanning fields: its message names the place
        return f"{source}: {error}"
    field = ".".join(str(p) for p in path)
    if first["type"] == "missing":
        return f"{prefix}'{field}' is missing"
    if first["type"] in ("unexpected_keyword_argument", "extra_forbidden"):
        known = _known_keys(cls, loc[:-1])
        parent = ".".join(str(p) for p in path[:-1])
        return f"{prefix}{parent + ': ' if parent else ''}unknown key {path[-1]!r}" + (f"; known keys are {', '.join(known)}" if known else "")
    messages = list(dict.fromkeys(_message(e) for e in errs))
    if not field:
        return f"{prefix}{' or '.join(messages)}"
    return f"{prefix}{field} is {_short(first['input'])}; {' or '.join(messages)}"


def _message(err: dict[str, Any]) -> str:
    msg = err["msg"].removeprefix("Value error, ")
    return msg[0].lower() + msg[1:]


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _where(loc: tuple, raw: Any) -> tuple[str, tuple]:
    """``("stages", 1, "lr")`` -> ``("stage 'b'", ("lr",))``: list items named by their ``name`` if they have one."""
    where: list[str] = []
    path: list[Any] = []
    node = raw
    i = 0
    while i < len(loc):
        part = loc[i]
        child = node.get(part) if isinstance(node, dict) and isinstance(part, str) else None
        if isinstance(part, str) and i + 1 < len(loc) and isinstance(loc[i + 1], int) and isinstance(child, list):
            index = loc[i + 1]
            item = child[index] if index < len(child) else None
            name = item.get("name") if isinstance(item, dict) else None
            label = part[:-1] if part.endswith("s") else part
            where.append(f"{label} {str(name)!r}" if isinstance(name, (str, int)) else f"{part}[{index}]")
            path.clear()
            node, i = item, i + 2
            continue
        path.append(part)
        node, i = child, i + 1
    return ": ".join(where), tuple(path)


def _known_keys(cls: type, loc: tuple) -> list[str]:
    """Field names of the dataclass found at ``loc`` inside ``cls`` (list indices skipped)."""
    for part in loc:
        if isinstance(part, int) or not dataclasses.is_dataclass(cls):
            continue
        cls = _dataclass_in(typing.get_type_hints(cls).get(part))
    return sorted(f.name for f in dataclasses.fields(cls) if f.init) if dataclasses.is_dataclass(cls) else []


def _dataclass_in(hint: Any) -> Any:
    """The dataclass inside ``list[X]``, ``X | None``, ``float | X``; None if there is none."""
    if dataclasses.is_dataclass(hint):
        return hint
    for arg in typing.get_args(hint):
        found = _dataclass_in(arg)
        if found is not None:
            return found
    return None
