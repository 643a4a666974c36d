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
        hf/                         the stage's model, input of the next stage
        niah/                       needle-in-a-haystack results, for a stage with ``niah:``
        done.json                   written last: the stage finished

A run directory on shared storage is what lets ranks on several hosts write
one checkpoint and the next stage read it. Every file but the appended ones
(metrics.jsonl, rank logs, event files) is written atomically (temporary
name, then rename).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from topology.errors import ConfigError
from topology.model import write_atomic
from trainer.progress import METRICS_JSONL
from trainer.ranklog import LOGS_DIR
from trainer.tracking import TENSORBOARD_DIR


# Files of a stage directory (the stage's output_dir, see Recipe.stage_configs).
TOPOLOGY_JSON, TOPOLOGY_HTML, PLAN_JSON, STAGE_JSON = "topology.json", "topology.html", "plan.json", "stage.json"
DONE_JSON = "done.json"
SHOWN = (TOPOLOGY_HTML, PLAN_JSON, METRICS_JSONL, LOGS_DIR, "checkpoints", "hf", TENSORBOARD_DIR, "niah")
"""What ``layout`` lists of a stage directory, in this order, when present."""


def default_run_dir(base: str | Path, recipe_name: str) -> Path:
    """``BASE/NAME-YYYYmmdd-HHMMSS``: a fresh directory per run unless one is given."""
    return Path(base) / f"{recipe_name}-{time.strftime('%Y%m%d-%H%M%S')}"


@dataclass(frozen=True)
class RunDir:
    """Paths of one run; ``create`` makes the root and copies the recipe in."""

    root: Path

    @classmethod
    def create(cls, root: str | Path, recipe_path: str | Path) -> "RunDir":
        rd = cls(Path(root).resolve())
        try:
            rd.root.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ConfigError(f"run directory {rd.root} cannot be created ({exc.strerror}); pass a writable --run-dir") from None
        copy = rd.root / "recipe.yaml"
        if Path(recipe_path).resolve() != copy:
            write_atomic(copy, Path(recipe_path).read_bytes())
        return rd


def append_event(stage_dir: str | Path, event: dict[str, Any]) -> None:
    """Add one JSON line to the stage's metrics.jsonl.

    The controller writes only while no rank runs (retries happen after the
    group is torn down), so it never interleaves with rank 0's lines.
    """
    path = Path(stage_dir) / METRICS_JSONL
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        f.write(json.dumps({"time": time.time(), **event}) + "\n")


def read_metrics(stage_dir: str | Path) -> list[dict[str, Any]]:
    """Every line of the stage's metrics.jsonl (steps and events)."""
    path = Path(stage_dir) / METRICS_JSONL
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def mark_done(stage_dir: str | Path, result: dict[str, Any]) -> None:
    write_atomic(Path(stage_dir) / DONE_JSON, json.dumps(result, indent=1) + "\n")


def finished(stage_dir: str | Path) -> dict[str, Any] | None:
    """The stage's result if it completed in an earlier run of this run directory."""
    path = Path(stage_dir) / DONE_JSON
    return json.loads(path.read_text()) if path.exists() else None


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
