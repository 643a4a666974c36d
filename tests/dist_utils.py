"""Run a function on N spawned CPU processes that share a gloo process group.

Tests of distributed code use real ``torch.distributed`` with the gloo
backend: each rank is its own process, exactly as under torchrun, so
collectives, point-to-point sends and group creation run for real.

    from dist_utils import run_distributed

    def body(rank, world_size, n):
        t = torch.full((n,), float(rank))
        dist.all_reduce(t)
        return t

    results = run_distributed(body, 4, 3)   # one entry per rank, rank order

``fn`` must be defined at module level (it is pickled by name). An exception
on any rank is re-raised here with that rank's traceback; the other ranks are
terminated, so no process is left hanging.

Ranks start from a fork server that has imported torch, transformers,
DeepSpeed and the trainer once (``PRELOAD``): a fresh interpreter per rank
would spend about 10 s of a 2-core machine's CPU on those imports, every
time. The server forks from a single thread, before any process group or
Ray connection exists, so each rank still starts clean.
"""

from __future__ import annotations

import datetime
import os
import tempfile
import time
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from ray_utils import free_port
from trainer.engine import end_rank_process

__all__ = ["run_distributed"]

PRELOAD = ["torch", "torch.distributed", "transformers", "deepspeed", "trainer.stage", "trainer.attention.ring_attention"]
"""Modules the fork server imports once; every rank it forks starts with them loaded."""
mp.set_forkserver_preload(PRELOAD)


def _worker(rank: int, fn: Callable[..., Any], world_size: int, port: int, out_dir: str, timeout: float, args: tuple) -> None:
    # The torchrun variables, so code under test that reads them sees a normal launch.
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size,
                            timeout=datetime.timedelta(seconds=timeout))
    try:
        result = fn(rank, world_size, *args)
        torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()
    end_rank_process(0)  # a failure above is raised to the parent instead, with its traceback


def run_distributed(fn: Callable[..., Any], world_size: int, *args: Any, timeout: float = 120.0) -> list[Any]:
    """Call ``fn(rank, world_size, *args)`` on ``world_size`` spawned gloo ranks.

    Parameters
    ----------
    fn
        Module-level function; runs inside an initialised default process
        group (gloo, CPU). Its return value must be picklable (tensors are fine).
    world_size
        Number of processes.
    *args
        Extra picklable arguments passed to every rank.
    timeout
        Seconds for the whole run; also the process group's collective
        timeout, so a rank stuck in a collective fails instead of hanging.

    Returns
    -------
    list
        ``fn``'s return value per rank, in rank order.

    Raises
    ------
    torch.multiprocessing.ProcessRaisedException
        When a rank raised; the message carries that rank's traceback.
    TimeoutError
        When the ranks did not finish within ``timeout`` (all are terminated).
    """
    with tempfile.TemporaryDirectory(prefix="dist-test-") as out_dir:
        ctx = mp.start_processes(_worker, args=(fn, world_size, free_port(), out_dir, timeout, args),
                                 nprocs=world_size, join=False, start_method="forkserver")
        deadline = time.monotonic() + timeout
        try:
            while not ctx.join(timeout=max(0.1, min(1.0, deadline - time.monotonic()))):
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{getattr(fn, '__name__', fn)} on {world_size} ranks did not finish in {timeout:.0f}s")
        finally:
            for proc in ctx.processes:
                if proc.is_alive():
                    proc.terminate()
                    proc.join(5)
        return [torch.load(os.path.join(out_dir, f"rank{r}.pt"), weights_only=False) for r in range(world_size)]
