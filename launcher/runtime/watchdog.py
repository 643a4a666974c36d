"""The stage watchdog: steps that stop coming end the attempt, which is retried like a failed worker.

A rank that dies is seen by Ray at once; a rank that hangs is not. Its
peers wait in their next collective until ``collective_timeout`` (30
minutes by default) fails them, and a rank stuck outside any collective
(a file-system read, a deadlocked loader) may never fail at all. The
controller sees every optimizer step of rank 0 (a step needs every rank),
so it bounds the wait for the next one by what the stage has shown::

    bound = max(factor x slowest step so far, floor)

Before the first step the stage loads its model, builds the DeepSpeed
engine and resumes a checkpoint, so the bound is ``max(factor x predicted
step, startup)``, the prediction being the plan's (on GPUs). ``floor``
must cover the slowest thing that happens between two steps and has not
been seen yet: a checkpoint save (minutes for a ZeRO-3 model of 8B
parameters). After the last step the watchdog stands down: the HF export
and the stage-end evaluation are bounded by the collective timeout alone.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Callable

from launcher.runtime.workers import WorkerFailure


@dataclass(frozen=True)
class WatchdogPolicy:
    """How long a stage may go without completing a step."""

    factor: float = 10.0
    """Multiple of the slowest step seen so far."""
    floor_s: float = 600.0
    """Never less than this between two steps (covers a checkpoint save)."""
    startup_s: float = 1800.0
    """Never less than this before the first step (model load, engine, resume)."""


class StageStalled(WorkerFailure):
    """No step completed within the watchdog's bound; the attempt is torn down and retried."""

    def __init__(self, cause: str):
        RuntimeError.__init__(self, cause)
        self.rank, self.cause, self.node_id = None, cause, None


class Watchdog:
    """Feed it rank 0's step metrics (``step``); call ``check`` often: it raises ``StageStalled`` when overdue."""

    def __init__(self, policy: WatchdogPolicy, steps: int, predicted_step_s: float | None = None,
                 clock: Callable[[], float] = time.monotonic):
        self.policy, self.steps, self.predicted, self.clock = policy, steps, predicted_step_s, clock
        self.last = clock()
        self.slowest: float | None = None
        """Longest time between two consecutive steps seen (the first step's startup not counted)."""
        self.steps_seen = 0
        self.done = False

    @property
    def bound(self) -> float:
        p = self.policy
        if self.slowest is None:
            return max(p.factor * (self.predicted or 0.0), p.startup_s)
        return max(p.factor * self.slowest, p.floor_s)

    def step(self, metrics: dict[str, Any]) -> None:
        """One metrics record of rank 0; events without a ``step`` are ignored."""
        if "step" not in metrics:
            return
        now = self.clock()
        if self.steps_seen:  # the first step's wait is startup, not a step
            self.slowest = max(self.slowest or 0.0, now - self.last)
        self.steps_seen += 1
        self.last = now
        self.done = metrics["step"] >= self.steps

    def check(self) -> None:
        if self.done:
            return
        waited = self.clock() - self.last
        if waited > self.bound:
            what = (f"{self.policy.factor:g} x slowest step {self.slowest:.1f} s, floor {self.policy.floor_s:g} s"
                    if self.slowest is not None else f"startup {self.policy.startup_s:g} s")
            raise StageStalled(f"stage watchdog: no step completed in {waited:.0f} s (bound {self.bound:.0f} s: {what}); "
                               "a rank hangs")
