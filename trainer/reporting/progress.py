"""Per-step reporting of a stage: one line format for every console, metrics.jsonl, and the trackers.

The trainer (``StepReporter``, every rank) and the launcher (``StageProgress``,
the job's driver) show steps the same way: a tqdm bar on a terminal, and
elsewhere (``ray job submit``, log files, where a bar redrawn with carriage
returns turns into one unreadable line) one line per step::

    [1k] step 3/8 loss 5.4120 tokens/s 1,843 elapsed 4.1s ETA 6.8s
"""

from __future__ import annotations

import json
import logging
import resource
import sys
import time
from pathlib import Path
from typing import Any, Callable, TextIO

import torch
import torch.distributed as dist

from trainer.attention import ring_comm

log = logging.getLogger("trainer.stage")

METRICS_JSONL = "metrics.jsonl"
"""A stage's metrics file in its output_dir: one JSON object per step (rank 0) or event."""

NOT_SHOWN = frozenset({"event", "stage", "time", "rank"})
"""Keys of an event that its console line leaves out (they are in the line's context)."""


# ------------------------------------------------------------------ formatting
def format_seconds(s: float) -> str:
    """``42.0s``, ``3m07s`` or ``2h05m``: short enough for a log line."""
    if s < 60:
        return f"{s:.1f}s"
    if s < 3600:
        return f"{int(s // 60)}m{int(s % 60):02d}s"
    return f"{int(s // 3600)}h{int(s % 3600 // 60):02d}m"


def eta_seconds(step: int, steps: int, elapsed_s: float, first_step: int = 0) -> float | None:
    """Time left if the remaining steps go as fast as the ones since ``first_step`` (where this attempt resumed)."""
    done = step - first_step
    if done <= 0 or elapsed_s <= 0:
        return None
    return elapsed_s / done * max(steps - step, 0)


def step_line(m: dict[str, Any], first_step: int = 0) -> str:
    """One step's metrics dict as the console line (the only step format there is)."""
    eta = eta_seconds(m["step"], m["steps"], m.get("elapsed_s", 0.0), first_step)
    return (
        f"[{m['stage']}] step {m['step']}/{m['steps']} loss {m['loss']:.4f} "
        f"tokens/s {m.get('tokens_per_s', 0):,.0f} elapsed {format_seconds(m.get('elapsed_s', 0.0))}"
        + (f" ETA {format_seconds(eta)}" if eta is not None else "")
    )


def rank_line(m: dict[str, Any]) -> str:
    """A rank's own figures of one step, for its rank log: what differs from rank to rank."""
    return (f"[{m['stage']}] rank {m['rank']} step {m['step']}: step time {m['step_time_s']:.3f}s, "
            f"ring comm wait {m['ring_comm_s']:.3f}s, peak memory {m['peak_memory_gib']:.2f} GiB")


def event_line(stage: str, m: dict[str, Any]) -> str:
    """Something that is not a step (a stage-end evaluation, a retry) as one line."""
    return f"[{stage}] {m['event']}: " + " ".join(f"{k} {v}" for k, v in m.items() if k not in NOT_SHOWN)


class StageProgress:
    """Shows a stage's steps as they arrive; ``update`` takes the trainer's metrics dicts."""

    def __init__(self, stage: str, steps: int, start_step: int = 0, stream: TextIO | None = None, bar: bool | None = None):
        self.stage, self.steps, self.start_step = stage, steps, start_step
        self.stream = stream or sys.stdout
        self._bar = None
        if self.stream.isatty() if bar is None else bar:
            from tqdm import tqdm

            self._bar = tqdm(total=steps, initial=start_step, desc=f"stage {stage}", unit="step", file=self.stream, dynamic_ncols=True)

    def update(self, m: dict[str, Any]) -> None:
        if "event" in m:
            self.note(event_line(self.stage, m))
            return
        if self._bar is not None:
            self._bar.set_postfix(loss=f"{m['loss']:.4f}", tok_s=f"{m.get('tokens_per_s', 0):,.0f}", refresh=False)
            self._bar.update(max(m["step"] - self._bar.n, 0))
        else:
            print(step_line(m, self.start_step), file=self.stream, flush=True)

    def note(self, text: str) -> None:
        """A line that must not tear the bar (retries, warnings)."""
        if self._bar is not None:
            self._bar.write(text)
        else:
            print(text, file=self.stream, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def __enter__(self) -> "StageProgress":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


# ------------------------------------------------------------------ measuring
def peak_memory_gib(device: torch.device) -> float:
    """Peak memory since the last call: CUDA allocations on a GPU, the process's peak RSS on CPU."""
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        return peak / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


class StepReporter:
    """Turns each optimizer step into one metrics dict, on every rank, and shows and records it.

    Every rank measures its own step time, ring communication wait and peak
    memory; one small all-gather per step gives rank 0 the slowest and the
    fastest rank, so its line in ``<output_dir>/metrics.jsonl`` speaks for
    all. Each rank logs its own figures (``rank_line``), which its rank log keeps.

    A line of metrics.jsonl::

        {"time": 1764601200.5, "rank": 0, "stage": "1k", "step": 3, "steps": 8, "loss": 5.41,
         "lr": 2e-05, "tokens": 6144, "tokens_per_s": 10240.0, "elapsed_s": 1.9,
         "step_time_s": 0.6, "step_time_max_s": 0.61, "step_time_min_s": 0.58, "slowest_rank": 2,
         "ring_comm_s": 0.1, "ring_comm_max_s": 0.12, "peak_memory_gib": 1.3, "peak_memory_max_gib": 1.3}

    plus ``predicted_step_time_s`` when the plan predicted one for this
    device. ``tokens`` counts the stage's tokens up to and including
    ``step`` (resumed steps included); ``tokens_per_s`` is this step's rate.
    """

    def __init__(self, stage: str, steps: int, first_step: int, tokens_per_step: int, output_dir: str | Path,
                 rank: int, on_metrics: Callable[[dict[str, Any]], None] | None = None,
                 device: torch.device | None = None, predicted_step_s: float | None = None,
                 trackers: Any = None) -> None:
        self.stage, self.steps, self.first_step = stage, steps, first_step
        self.tokens_per_step = tokens_per_step
        self.rank, self.on_metrics = rank, on_metrics
        self.device = device or torch.device("cpu")
        self.predicted_step_s = predicted_step_s
        self.trackers = trackers
        self.path = Path(output_dir) / METRICS_JSONL
        if dist.is_initialized():
            dist.barrier()  # the first step's clock starts together on every rank (trackers start on rank 0 only)
        self.start = self.last = time.perf_counter()
        ring_comm.take_wait_seconds()  # what the model's set-up waited is not a step's
        self.progress = None
        if rank == 0 and sys.stderr.isatty():
            self.progress = StageProgress(stage, steps, first_step, stream=sys.stderr)

    def step(self, step: int, loss: float, lr: float) -> dict[str, Any]:
        """Report optimizer step ``step`` (1-based) on every rank (a collective) and return its metrics."""
        now = time.perf_counter()
        seconds, self.last = now - self.last, now
        comm, memory = ring_comm.take_wait_seconds(), peak_memory_gib(self.device)
        everyone = _gather([seconds, comm, memory], self.device)
        slowest = max(range(len(everyone)), key=lambda r: everyone[r][0])
        metrics = {
            "time": time.time(), "rank": self.rank, "stage": self.stage, "step": step, "steps": self.steps,
            "loss": loss, "lr": lr, "tokens": step * self.tokens_per_step,
            "tokens_per_s": self.tokens_per_step / max(everyone[slowest][0], 1e-9), "elapsed_s": now - self.start,
            "step_time_s": seconds, "step_time_max_s": everyone[slowest][0],
            "step_time_min_s": min(e[0] for e in everyone), "slowest_rank": slowest,
            "ring_comm_s": comm, "ring_comm_max_s": max(e[1] for e in everyone),
            "peak_memory_gib": memory, "peak_memory_max_gib": max(e[2] for e in everyone),
        }
        if self.predicted_step_s is not None:
            metrics["predicted_step_time_s"] = self.predicted_step_s
        _rank_log.info("%s", rank_line(metrics))
        if self.trackers is not None:
            self.trackers.log_step(metrics)
        if self.rank == 0:
            self._append(metrics)
            if self.progress is not None:
                self.progress.update(metrics)
            else:
                log.info("%s", step_line(metrics, self.first_step))
        if self.on_metrics is not None:
            self.on_metrics(metrics)
        return metrics

    def event(self, event: dict[str, Any]) -> None:
        """Record something that is not a step (a stage-end evaluation, say) beside the steps."""
        event = {"time": time.time(), "rank": self.rank, **event}
        if self.trackers is not None:
            self.trackers.log_event(event)
        if self.rank == 0:
            self._append(event)
            line = event_line(self.stage, event)
            self.progress.note(line) if self.progress is not None else log.info("%s", line)
        if self.on_metrics is not None:
            self.on_metrics(event)

    def _append(self, record: dict[str, Any]) -> None:
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")

    def close(self) -> None:
        if self.progress is not None:
            self.progress.close()


_rank_log = logging.getLogger("trainer.rank")
"""Every rank's own step figures: kept in its rank log, never on the console."""


def _gather(values: list[float], device: torch.device) -> list[list[float]]:
    """``values`` of every rank, in rank order (one all-gather; just ours without a process group)."""
    mine = torch.tensor(values, dtype=torch.float64, device=device)
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return [mine.tolist()]
    out = [torch.empty_like(mine) for _ in range(dist.get_world_size())]
    dist.all_gather(out, mine)
    return [t.tolist() for t in out]
