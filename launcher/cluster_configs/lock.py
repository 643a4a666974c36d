"""The exact versions clusters install: a pip constraints file made from the tested environment.

Cluster nodes install the project's dependencies on every start; with
ranges (``torch>=2.4``) each start may get versions nobody tested. The lock
pins the project's dependencies, Ray's ``default`` extra and boto3 (the AWS
cluster launcher), and everything they pull in, at the versions installed
where the tests pass::

    ringleader clusters lock            # rewrites clusters/requirements.lock

It is a constraints file (``pip install -c``): it fixes versions without
asking for anything to be installed. Local build tags are dropped
(``torch 2.13.0+cpu`` pins ``torch==2.13.0``) so a GPU node gets the CUDA
wheel of the tested version. It carries no hashes: the test machine's
wheels (a CPU torch, one platform) are not the files a GPU node downloads,
and ``--require-hashes`` would reject those.
"""

from __future__ import annotations

import importlib.metadata as md
import platform
import re
import tomllib
from pathlib import Path

from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

REPO_ROOT = Path(__file__).resolve().parents[2]
LOCK_PATH = REPO_ROOT / "clusters" / "requirements.lock"
LOCK_RELPATH = "clusters/requirements.lock"
EXTRA_ROOTS = ("ray[default]", "boto3")
"""Installed on cluster nodes besides the project's own dependencies."""
_PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s;#]+)")


def project_dependencies() -> list[Requirement]:
    """The ``[project] dependencies`` of pyproject.toml."""
    deps = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    return [Requirement(d) for d in deps]


def installed_closure(roots: list[Requirement]) -> dict[str, str]:
    """Canonical name -> installed version of ``roots`` and everything they require here.

    Raises
    ------
    LookupError
        A required distribution is not installed (the environment is not the tested one).
    """
    env = default_environment()
    pins: dict[str, str] = {}
    todo = [(r, frozenset(r.extras)) for r in roots]
    seen: set[tuple[str, frozenset[str]]] = set()
    while todo:
        req, extras = todo.pop()
        name = canonicalize_name(req.name)
        if (name, extras) in seen:
            continue
        seen.add((name, extras))
        try:
            dist = md.distribution(req.name)
        except md.PackageNotFoundError:
            raise LookupError(f"{req.name} is required but not installed; install the project (pip install -e .) first") from None
        pins[name] = dist.version.split("+")[0]
        for line in dist.requires or []:
            sub = Requirement(line)
            applies = sub.marker is None or any(sub.marker.evaluate(dict(env, extra=e)) for e in (extras or {""}))
            if applies:
                todo.append((sub, frozenset(sub.extras)))
    return dict(sorted(pins.items()))


def generate() -> str:
    """The lock file's text for this environment."""
    roots = project_dependencies() + [Requirement(r) for r in EXTRA_ROOTS]
    pins = installed_closure(roots)
    head = [
        "# Exact versions the tests pass with; cluster nodes install with `pip install -c` this file.",
        "# Regenerate in the tested environment: `ringleader clusters lock` (then re-render clusters/*.yaml).",
        f"# Python {platform.python_version()}; roots: project dependencies, {', '.join(EXTRA_ROOTS)}.",
    ]
    return "\n".join(head + [f"{name}=={version}" for name, version in pins.items()]) + "\n"


def read(path: Path = LOCK_PATH) -> dict[str, str]:
    """Canonical name -> pinned version of a lock file."""
    return parse(Path(path).read_text())


def parse(text: str) -> dict[str, str]:
    """Canonical name -> pinned version of every ``name==version`` line."""
    pins = {}
    for line in text.splitlines():
        m = _PIN.match(line.strip())
        if m:
            pins[canonicalize_name(m.group(1))] = m.group(2)
    return pins


def text(path: Path = LOCK_PATH) -> str:
    return Path(path).read_text()
