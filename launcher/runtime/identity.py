"""Run identity: what each stage's result depends on, recorded in its directory.

Every stage directory holds ``identity.json``: the stage's settings that
change what it trains (model, data, seq_len, theta, steps, lr, batch,
accumulation, DeepSpeed config, seed, ...) and a fingerprint, a SHA-256 of
those settings chained to the previous stage's fingerprint (a stage starts
from the previous stage's model, so a change there changes every stage after).

Settings that leave the result alone are not part of it: where files go,
checkpoint cadence, the parallel layout (``gpus`` and ``ulysses``: a stage
may resume on fewer ranks), timeouts, and the stage-end evaluation. Data is
identified by its path, not its bytes.

A rerun on the same run directory compares the recipe's stages with the
recorded ones. Unchanged stages are skipped when done and resumed
otherwise; a changed stage is refused unless ``--restart-from`` names it or
an earlier stage, and then that stage and all after it are redone (their
old directories are moved aside under ``replaced/``).
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from topology.errors import ConfigError
from trainer import storage
from trainer.config import StageConfig

IDENTITY_JSON = "identity.json"
REPLACED = "replaced"
NOT_RESULT_FIELDS = frozenset({"name", "output_dir", "init_from", "checkpoint_every", "keep_checkpoints", "gpus", "ulysses",
                               "activation_checkpointing", "niah", "collective_timeout"})
"""StageConfig fields that do not change what a stage trains (a new field counts unless listed here)."""


@dataclass(frozen=True)
class Identity:
    """One stage's result-changing settings and its chained fingerprint."""

    settings: dict[str, Any]
    fingerprint: str

    def to_dict(self) -> dict[str, Any]:
        return {"fingerprint": self.fingerprint, "settings": self.settings}


def identities(configs: list[StageConfig]) -> list[Identity]:
    """The identity of each stage in order, each chained to the one before."""
    out: list[Identity] = []
    previous = ""
    for cfg in configs:
        settings = {k: v for k, v in cfg.to_dict().items() if k not in NOT_RESULT_FIELDS}
        blob = json.dumps({"after": previous, "settings": settings}, sort_keys=True, default=str)
        previous = hashlib.sha256(blob.encode()).hexdigest()
        out.append(Identity(json.loads(json.dumps(settings, default=str)), previous))
    return out


def recorded(stage_dir: str | Path) -> Identity | None:
    """The identity a stage directory was made with (None: the stage never started)."""
    raw = storage.read_bytes(storage.join(str(stage_dir), IDENTITY_JSON))
    if raw is None:
        return None
    data = json.loads(raw)
    return Identity(data.get("settings", {}), data.get("fingerprint", ""))


def record(stage_dir: str | Path, identity: Identity) -> None:
    """Write the stage's identity (before anything else of the stage is written)."""
    storage.write_bytes(storage.join(str(stage_dir), IDENTITY_JSON), json.dumps(identity.to_dict(), indent=1, sort_keys=True) + "\n")


def changes(old: dict[str, Any], new: dict[str, Any], prefix: str = "") -> list[str]:
    """``["seq_len 256 -> 512", "deepspeed.zero_optimization.stage 3 -> 2"]``: leaves that differ."""
    out = []
    for key in sorted(set(old) | set(new), key=str):
        a, b = old.get(key, "(unset)"), new.get(key, "(unset)")
        if isinstance(a, dict) and isinstance(b, dict):
            out += changes(a, b, f"{prefix}{key}.")
        elif a != b:
            out.append(f"{prefix}{key} {_short(a)} -> {_short(b)}")
    return out


def _short(value: Any) -> str:
    text = json.dumps(value, default=str)
    return text if len(text) <= 40 else text[:37] + "..."


def stages_to_redo(configs: list[StageConfig], restart_from: str | None = None, run_dir: str | Path = "") -> list[int]:
    """Indices of stages whose directories must be cleared before the run; raises if a changed stage is not among them.

    Raises
    ------
    ConfigError
        A stage differs from the one recorded in the run directory and
        ``restart_from`` does not name it or an earlier stage (the line names
        the changed fields), or ``restart_from`` names no stage.
    """
    names = [c.name for c in configs]
    start = len(configs)
    if restart_from is not None:
        if restart_from not in names:
            raise ConfigError(f"--restart-from {restart_from!r} names no stage; stages are {', '.join(names)}")
        start = names.index(restart_from)
    for i, (cfg, ident) in enumerate(zip(configs, identities(configs))):
        if i >= start:
            break
        old = recorded(cfg.output_dir)
        if old is not None and old.fingerprint != ident.fingerprint:
            what = ", ".join(changes(old.settings, ident.settings)) or "a stage before it changed"
            raise ConfigError(f"stage {cfg.name!r} differs from the one run in {run_dir or Path(cfg.output_dir).parent} ({what}); "
                              f"rerun with --restart-from {cfg.name} to redo it and the stages after it, or use a new --run-dir")
    return [i for i in range(start, len(configs)) if storage.kind(configs[i].output_dir) != "missing"]


def move_aside(run_dir: str | Path, stage_dirs: list[str | Path]) -> Path | None:
    """Move stage directories (and the old recipe.yaml) to ``RUN_DIR/replaced/TIMESTAMP/``; returns that folder."""
    if not stage_dirs:
        return None
    if storage.is_uri(run_dir):
        raise ConfigError(f"--restart-from moves earlier output aside, which an object store cannot do in one step; "
                          f"start a new --run-dir instead of {run_dir}")
    dest = Path(run_dir) / REPLACED / time.strftime("%Y%m%d-%H%M%S")
    dest.mkdir(parents=True, exist_ok=True)
    old_recipe = Path(run_dir) / "recipe.yaml"
    if old_recipe.exists():
        old_recipe.rename(dest / "recipe.yaml")
    for d in stage_dirs:
        Path(d).rename(dest / Path(d).name)
    return dest
