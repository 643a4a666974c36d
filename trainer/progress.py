"""Per-step reporting of a stage: a tqdm bar on a terminal, log lines otherwise, and metrics.jsonl.

Only rank 0 reports; every rank still hands its metrics to ``on_metrics``.
"""

from __future__ import annotations

import datetime
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any, Callable

from tqdm import tqdm

log = logging.getLogger("trainer.stage")

METRICS_JSONL = "metrics.jsonl"
"""A stage's metrics file in its output_dir: one JSON object per step (rank 0) or event."""


class StepReporter:
    """Turns each optimizer step into one metrics dict and shows it.

    The dict (also one line of ``<output_dir>/metrics.jsonl``)::

        {"stage": "1k", "step": 3, "steps": 8, "loss": 5.41, "tokens": 6144,
         "tokens_per_s": 10240.0, "elapsed_s": 1.9, "lr": 2e-05}

    ``tokens`` counts the stage's tokens up to and including ``step``
    (resumed steps included); ``tokens_per_s`` is this step's rate.
    """

    def __init__(self, stage: str, steps: int, first_step: int, tokens_per_step: int, output_dir: str | Path,
                 rank: int, on_metrics: Callable[[dict[str, Any]], None] | None = None) -> None:
        self.stage, self.steps, self.first_step = stage, steps, first_step
        self.tokens_per_step = tokens_per_step
        self.rank, self.on_metrics = rank, on_metrics
        self.path = Path(output_dir) / METRICS_JSONL
        self.start = self.last = time.perf_counter()
        self.bar = None
        if rank == 0 and sys.stderr.isatty():
            self.bar = tqdm(total=steps, initial=first_step, desc=f"stage {stage}", unit="step", dynamic_ncols=True)

    def step(self, step: int, loss: float, lr: float) -> dict[str, Any]:
        """Report optimizer step ``step`` (1-based) and return its metrics."""
        now = time.perf_counter()
        seconds, self.last = now - self.last, now
        metrics = {
            "stage": self.stage, "step": step, "steps": self.steps, "loss": loss,
            "tokens": step * self.tokens_per_step, "tokens_per_s": self.tokens_per_step / max(seconds, 1e-9),
            "elapsed_s": now - self.start, "lr": lr,
        }
        if self.rank == 0:
            self._append(metrics)
            if self.bar is not None:
                self.bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{metrics['tokens_per_s']:,.0f}")
                self.bar.update(1)
            else:
                eta = (now - self.start) / (step - self.first_step) * (self.steps - step)
                log.info("stage %s | step %d/%d | loss %.4f | %s tok/s | ETA %s", self.stage, step, self.steps, loss,
                         f"{metrics['tokens_per_s']:,.0f}", datetime.timedelta(seconds=round(eta)))
        if self.on_metrics is not None:
            self.on_metrics(metrics)
        return metrics

    def event(self, event: dict[str, Any]) -> None:
        """Record something that is not a step (a stage-end evaluation, say) beside the steps."""
        if self.rank == 0:
            self._append(event)
            log.info("stage %s | %s", self.stage, " | ".join(f"{k} {v}" for k, v in event.items() if k != "stage"))
        if self.on_metrics is not None:
            self.on_metrics(event)

    def _append(self, record: dict[str, Any]) -> None:
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
