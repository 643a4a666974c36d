"""Each rank's log file, and a console that shows only what the operator needs.

A rank writes ``<stage dir>/logs/rank-<k>.log``: every Python log record
(the trainer's, DeepSpeed's, transformers', torch's), every warning, and,
unless ``verbose``, everything the process writes to stdout and stderr,
C++ extensions included (file descriptors 1 and 2 point at the log, as with
torchrun's ``--redirects 3 --log-dir``). That keeps DeepSpeed's accelerator
notice, its op-builder lines, torch's FutureWarnings and HF's progress bars
off the console while nothing is lost. With ``verbose`` the streams stay
where they were, so the console shows it all as well.

    with rank_logging(cfg.output_dir, rank, console=rank == 0):
        run_stage(cfg, plan)
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import warnings
from pathlib import Path
from typing import Iterator

LOGS_DIR = "logs"
"""Rank logs of a stage, in its output_dir."""


def rank_log_path(output_dir: str | Path, rank: int) -> Path:
    return Path(output_dir) / LOGS_DIR / f"rank-{rank}.log"


@contextlib.contextmanager
def rank_logging(output_dir: str | Path, rank: int, console: bool = False, verbose: bool = False) -> Iterator[Path]:
    """Route this process's logs, warnings and (unless ``verbose``) stdout/stderr into its rank log.

    Parameters
    ----------
    output_dir : the stage directory; the log is ``logs/rank-<rank>.log`` in it (appended: retries add to it).
    rank : this process's global rank.
    console : also show the trainer's own lines (stage start, steps, events) on the console this process
        started with, as ``[rank k] ...``; for torchrun's rank 0. Ray workers leave it off: the
        launcher shows progress itself.
    verbose : leave stdout and stderr on the console (third-party output shows there too).
    """
    path = rank_log_path(output_dir, rank)
    path.parent.mkdir(parents=True, exist_ok=True)
    root, trainer = logging.getLogger(), logging.getLogger("trainer")
    handlers: list[tuple[logging.Logger, logging.Handler]] = []
    saved_fds: list[tuple[int, int]] = []
    old = (root.level, trainer.level)
    console_stream = None
    filters = warnings.catch_warnings()
    filters.__enter__()
    try:
        # torch marks collectives DeepSpeed calls on every step as deprecated: once is enough.
        warnings.filterwarnings("once", category=FutureWarning)
        to_file = logging.FileHandler(path, encoding="utf-8")
        to_file.setFormatter(logging.Formatter(f"%(asctime)s rank {rank} %(levelname)s %(name)s: %(message)s"))
        handlers.append((root, to_file))
        if console:
            # The console's stderr (where logging writes by default) as it was before the redirect below.
            console_stream = os.fdopen(os.dup(sys.stderr.fileno()), "w", buffering=1, encoding="utf-8")
            shown = logging.StreamHandler(console_stream)
            shown.setFormatter(logging.Formatter(f"[rank {rank}] %(message)s"))
            shown.addFilter(lambda record: not record.name.startswith("trainer.rank"))
            handlers.append((trainer, shown))
        for logger, handler in handlers:
            logger.addHandler(handler)
        root.setLevel(logging.INFO)
        trainer.setLevel(logging.INFO)
        if not verbose:
            logging.captureWarnings(True)  # with verbose they print to stderr, as they always did
            _quiet_third_party()
            log_file = open(path, "ab", buffering=0)
            try:
                for fd, stream in ((1, sys.stdout), (2, sys.stderr)):
                    stream.flush()
                    saved_fds.append((fd, os.dup(fd)))
                    os.dup2(log_file.fileno(), fd)
            finally:
                log_file.close()
        yield path
    finally:
        for fd, copy in saved_fds:
            for stream in (sys.stdout, sys.stderr):
                with contextlib.suppress(Exception):
                    stream.flush()
            os.dup2(copy, fd)
            os.close(copy)
        logging.captureWarnings(False)
        filters.__exit__(None, None, None)
        for logger, handler in handlers:
            logger.removeHandler(handler)
            handler.close()
        root.setLevel(old[0])
        trainer.setLevel(old[1])
        if console_stream is not None:
            console_stream.close()


def _quiet_third_party() -> None:
    """Progress bars redraw with carriage returns: in a log file they are noise, and nobody watches them."""
    with contextlib.suppress(Exception):
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
