"""The run directory: everything one ``ringleader run`` leaves behind.

Layout (stage directories are the stages' ``output_dir``, so the trainer
writes its checkpoints and metrics into the same place)::

    RUN_DIR/
      recipe.yaml                   the recipe as submitted
      stage0-NAME/
        topology.json               what the plan was made on (measured profile)
        topology.html               the topology and the plan's rings, drawn
        plan.json                   rank -> (host, gpu), groups, predicted cost
        stage.json                  the resolved StageConfig the ranks ran
        metrics.jsonl               one JSON object per step (rank 0, with every rank's max/min) and per retry
        logs/rank-<k>.log           each rank's log: its own step figures, third-party output, warnings
        tensorboard/                TensorBoard event files (``tensorboard --logdir RUN_DIR``)
        checkpoints/                resumable DeepSpeed checkpoints
          step<N>/manifest.json       a tag's files, sizes and checksums: written once every rank's are in
          latest                      the newest committed tag
        hf-step<N>-<id>/            the stage's model, input of the next stage
        hf                          points at it (a symlink; a one-line object on an object store)
        niah/                       needle-in-a-haystack results, for a stage with ``niah:``
        logs/rank-<k>.log           each rank's log (third-party output too, unless --verbose)
        tensorboard/                event files (the recipe's ``tracking:``)
        done.json                   written last: the stage finished

A run directory on shared storage (a path every host mounts, or an object
store URI, see ``trainer.storage``) is what lets ranks on several hosts
write one checkpoint and the next stage read it; ``check_shared`` proves it
before a stage starts. Every file but the appended ones (metrics.jsonl, rank
logs, event files) is written atomically (temporary name, then rename; an
object is published whole).
"""

from __future__ import annotations

import json
import secrets
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from topology.errors import ConfigError
from trainer import storage
from trainer.reporting.progress import METRICS_JSONL
from trainer.reporting.ranklog import LOGS_DIR
from trainer.reporting.tracking import TENSORBOARD_DIR


# Files of a stage directory (the stage's output_dir, see Recipe.stage_configs).
TOPOLOGY_JSON, TOPOLOGY_HTML, PLAN_JSON, STAGE_JSON = "topology.json", "topology.html", "plan.json", "stage.json"
DONE_JSON = "done.json"
SHOWN = (TOPOLOGY_HTML, PLAN_JSON, METRICS_JSONL, LOGS_DIR, "checkpoints", "hf", TENSORBOARD_DIR, "niah")
"""What ``layout`` lists of a stage directory, in this order, when present."""


def default_run_dir(base: str | Path, recipe_name: str) -> str:
    """``BASE/NAME-YYYYmmdd-HHMMSS``: a fresh directory per run unless one is given."""
    return storage.join(base, f"{recipe_name}-{time.strftime('%Y%m%d-%H%M%S')}")


@dataclass(frozen=True)
class RunDir:
    """Location of one run (a path or an object store URI); ``create`` makes the root and copies the recipe in."""

    root: str

    @classmethod
    def create(cls, root: str | Path, recipe_path: str | Path) -> "RunDir":
        rd = cls(storage.normalize(root))
        copy = storage.join(rd.root, "recipe.yaml")
        try:
            if storage.local_path(copy) is None or Path(recipe_path).resolve() != Path(copy):
                storage.write_bytes(copy, Path(recipe_path).read_bytes())
        except OSError as exc:
            raise ConfigError(f"run directory {rd.root} cannot be written ({getattr(exc, 'strerror', None) or exc}); "
                              "pass a writable --run-dir") from None
        return rd


def append_event(stage_dir: str | Path, event: dict[str, Any]) -> None:
    """Add one JSON line to the stage's metrics.jsonl.

    The controller writes only while no rank runs (retries happen after the
    group is torn down), so it never interleaves with rank 0's lines.
    """
    storage.append_line(storage.join(stage_dir, METRICS_JSONL), json.dumps({"time": time.time(), **event}))


def read_metrics(stage_dir: str | Path) -> list[dict[str, Any]]:
    """Every line of the stage's metrics.jsonl (steps and events)."""
    data = storage.read_bytes(storage.join(stage_dir, METRICS_JSONL)) or b""
    return [json.loads(line) for line in data.decode().splitlines() if line.strip()]


def mark_done(stage_dir: str | Path, result: dict[str, Any]) -> None:
    storage.write_bytes(storage.join(stage_dir, DONE_JSON), json.dumps(result, indent=1) + "\n")


def finished(stage_dir: str | Path) -> dict[str, Any] | None:
    """The stage's result if it completed in an earlier run of this run directory."""
    data = storage.read_bytes(storage.join(stage_dir, DONE_JSON))
    return json.loads(data) if data is not None else None


def check_shared(root: str, read_on_hosts: Callable[[str], dict[str, bytes | None]]) -> None:
    """Prove that every host of a stage sees the run directory: the driver writes a token, each host reads it.

    ``read_on_hosts(location)`` returns, per host, the bytes that host read
    there (None: nothing). A path that is local to each host, or an object
    store a host cannot reach, is refused before any rank trains.

    Raises
    ------
    ConfigError
        Naming the hosts that do not see the token and what to use instead.
    """
    token = secrets.token_hex(16).encode()
    where = storage.join(root, f".visible-{token[:12].decode()}")
    storage.write_bytes(where, token)
    try:
        seen = read_on_hosts(where)
    finally:
        storage.remove(where)
    blind = sorted(host for host, data in seen.items() if data != token)
    if blind:
        fix = ("check that each host has the object store's credentials and endpoint (AWS_* variables, instance role)"
               if storage.is_uri(root) else "mount one shared filesystem (NFS, EFS, FSx for Lustre) at this path on every "
               "host, or pass an object store URI such as --run-dir s3://BUCKET/runs/NAME")
        raise ConfigError(f"run directory {root} is not visible from host(s) {', '.join(blind)}; {fix}")


def layout(root: str | Path, stage_dirs: list[str | Path]) -> list[str]:
    """Where a run's files are: one line per stage with what it holds, then how to open TensorBoard.

    ::

        stage0-256: topology.html plan.json metrics.jsonl logs/ (2 ranks) checkpoints/ hf/ tensorboard/
    """
    lines = []
    for d in map(Path, stage_dirs):
        if not d.exists():
            continue
        shown = []
        for name in SHOWN:
            path = d / name
            if path.is_dir():
                shown.append(f"{name}/" + (f" ({len(list(path.glob('rank-*.log')))} ranks)" if name == LOGS_DIR else ""))
            elif path.exists():
                shown.append(name)
        lines.append(f"  {d.name}: " + " ".join(shown))
    if any((Path(d) / TENSORBOARD_DIR).is_dir() for d in stage_dirs):
        lines.append(f"  tensorboard --logdir {root}")
    return lines
