"""Stage progress in the job log: a tqdm bar on a terminal, plain lines otherwise.

``ray job submit`` and log files are not terminals, and a bar redrawn with
carriage returns turns them into one unreadable line, so there each step
becomes a line such as::

    [1k] step 3/8 loss 5.412 tokens/s 1,843 elapsed 4.1s ETA 6.8s
"""

from __future__ import annotations

import sys
from typing import Any, TextIO


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
    """One metrics dict (trainer's {stage, step, steps, loss, tokens_per_s, elapsed_s}) as a line."""
    eta = eta_seconds(m["step"], m["steps"], m.get("elapsed_s", 0.0), first_step)
    return (
        f"[{m['stage']}] step {m['step']}/{m['steps']} loss {m['loss']:.4f} "
        f"tokens/s {m.get('tokens_per_s', 0):,.0f} elapsed {format_seconds(m.get('elapsed_s', 0.0))}"
        + (f" ETA {format_seconds(eta)}" if eta is not None else "")
    )


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
        if "event" in m:  # not a step: a stage-end evaluation, say
            self.note(f"[{self.stage}] " + " ".join(f"{k} {v}" for k, v in m.items() if k not in ("event", "stage")) + f" ({m['event']})")
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
