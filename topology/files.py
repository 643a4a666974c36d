"""Reading and writing the project's YAML and JSON files: one-line errors in, whole files out.

Topologies, plans, profiles, calibrations, recipes and run records all go
through these, so a bad file reads as ``<path>: <what is wrong>`` and a
reader never sees half of a file being written. Kept apart from the network
model so that a rank, which only reads its plan, does not import networkx.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import yaml

from topology.errors import ConfigError, first_line


def load_data(path: str | os.PathLike) -> Any:
    """Read a YAML or JSON file with a one-line ConfigError on any problem."""
    p = Path(path)
    if p.is_dir():
        raise ConfigError(f"{p} is a directory; give the path of a file")
    if not p.is_file():
        raise ConfigError(f"{p}: file not found; check the path")
    try:
        text = p.read_text()
        return json.loads(text) if p.suffix == ".json" else yaml.safe_load(text)
    except (yaml.YAMLError, json.JSONDecodeError, UnicodeDecodeError) as exc:
        first = first_line(exc)
        raise ConfigError(f"{p}: not valid {'JSON' if p.suffix == '.json' else 'YAML'} ({first})") from None


def dump_text(data: Any, path: str | os.PathLike) -> str:
    if str(path).endswith(".json"):
        return json.dumps(data, indent=1) + "\n"
    return yaml.safe_dump(data, sort_keys=False, width=120)


def check_writable(path: str | os.PathLike) -> None:
    """Raise a one-line ConfigError unless ``path`` can be written as a file (missing folders are made):
    commands call it before their work, so a bad ``-o`` costs nothing."""
    p = Path(path)
    if p.is_dir():
        raise ConfigError(f"{p} is a directory; give a file name to write, such as {p / 'out.json'}")
    parent = p.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise ConfigError(f"cannot write {p}: {parent} is a file, not a folder; choose another path")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ConfigError(f"cannot write {p}: no permission to write in {parent}; choose another path")


def write_atomic(path: str | os.PathLike, content: str | bytes) -> None:
    """Write to a temporary file beside ``path`` and rename: readers never see half a file."""
    p = Path(path)
    check_writable(p)
    try:
        p.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=p.parent, prefix=f".{p.name}.", suffix=".tmp")
    except OSError as exc:
        raise ConfigError(f"cannot write {p}: {exc.strerror or exc}; choose another path") from None
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(content.encode() if isinstance(content, str) else content)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; a saved file should read like any other
        os.replace(tmp, p)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
