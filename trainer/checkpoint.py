"""A stage's two kinds of checkpoint: resumable DeepSpeed state, and the HF model it hands on.

``<output_dir>/checkpoints/`` holds DeepSpeed checkpoints (``engine.save_checkpoint``:
ZeRO-partitioned weights and optimizer state, one file per rank, so the
directory must be on storage every host sees) tagged ``step<N>``. DeepSpeed
writes the ``latest`` file only after a tag is complete, so a run killed
mid-save resumes from the previous one. Samples are a function of the step
(``trainer.data.sample_index``), so restoring the step restores the data position.

``<output_dir>/hf/`` is the stage's result: ``save_pretrained`` (with the
stage's RoPE theta in its config) plus the tokenizer, for the next stage's
``init_from`` and for evaluation. It appears all at once: it is written as
``hf.tmp-XXXX`` and renamed.
"""

from __future__ import annotations

import logging
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)

KEEP = 2
"""DeepSpeed checkpoints kept per stage (the newest); older ones are deleted after a save."""
TAG = re.compile(r"^step(\d+)$")


def checkpoint_dir(output_dir: str | Path) -> Path:
    return Path(output_dir) / "checkpoints"


def latest_step(output_dir: str | Path) -> int | None:
    """Optimizer step of the newest complete checkpoint, or None."""
    latest = checkpoint_dir(output_dir) / "latest"
    if not latest.is_file():
        return None
    match = TAG.match(latest.read_text().strip())
    return int(match.group(1)) if match else None


def save(engine: Any, output_dir: str | Path, step: int, tokens: int) -> None:
    """Collective: every rank writes its shard of step ``step``; rank 0 prunes old tags."""
    root = checkpoint_dir(output_dir)
    engine.save_checkpoint(str(root), tag=f"step{step}", client_state={"step": step, "tokens": tokens})
    if dist.get_rank() == 0:
        tags = sorted((int(m.group(1)), p) for p in root.iterdir() if (m := TAG.match(p.name)) and p.is_dir())
        for _, old in tags[:-KEEP]:
            shutil.rmtree(old, ignore_errors=True)
    dist.barrier()


def resume(engine: Any, output_dir: str | Path) -> tuple[int, int]:
    """Load the newest checkpoint into ``engine`` (collective); returns (step, tokens), (0, 0) if none."""
    if latest_step(output_dir) is None:
        return 0, 0
    path, client = engine.load_checkpoint(str(checkpoint_dir(output_dir)))
    if path is None:
        return 0, 0
    log.info("resumed from %s", path)
    return int(client["step"]), int(client["tokens"])


def gathered_state_dict(module: torch.nn.Module) -> dict[str, torch.Tensor] | None:
    """The full state dict on CPU at rank 0 (None elsewhere); collective under ZeRO-3.

    Gathers one module's parameters at a time, so no rank ever holds the
    whole model on its accelerator; without ZeRO-3 the gather is a no-op.
    Parameters only: Llama's one buffer (RoPE frequencies) is not persistent
    and is rebuilt from the config on load.
    """
    import deepspeed

    rank = dist.get_rank()
    state: dict[str, torch.Tensor] = {}
    for prefix, sub in module.named_modules():
        params = list(sub.named_parameters(prefix=prefix, recurse=False))
        with deepspeed.zero.GatheredParameters([p for _, p in params], modifier_rank=None):
            if rank == 0:
                state.update((name, p.detach().to("cpu", copy=True)) for name, p in params)
    return state if rank == 0 else None


def export_hf(module: Any, tokenizer: Any, output_dir: str | Path) -> Path:
    """Write ``<output_dir>/hf`` atomically from a (possibly ZeRO-3) model; collective."""
    state = gathered_state_dict(module)
    final = Path(output_dir) / "hf"
    if dist.get_rank() == 0:
        tmp = Path(tempfile.mkdtemp(prefix="hf.tmp-", dir=output_dir))
        try:
            module.save_pretrained(tmp, state_dict=state)
            tokenizer.save_pretrained(tmp)
            if final.exists():
                old = Path(tempfile.mkdtemp(prefix="hf.old-", dir=output_dir))
                final.replace(old / "hf")
                tmp.replace(final)
                shutil.rmtree(old, ignore_errors=True)
            else:
                tmp.replace(final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        log.info("saved HF model to %s", final)
    dist.barrier()
    return final
