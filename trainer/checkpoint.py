"""A stage's two kinds of checkpoint: resumable DeepSpeed state, and the HF model it hands on.

``<output_dir>/checkpoints/`` holds DeepSpeed checkpoints (``engine.save_checkpoint``:
ZeRO-partitioned weights and optimizer state, one file per rank, so the
directory must be on storage every host sees) tagged ``step<N>``. DeepSpeed
writes the ``latest`` file only after a tag is complete, so a run killed
mid-save resumes from the previous one. Samples are a function of the step
(``trainer.data.sample_index``), so restoring the step restores the data position.

A stage that lost a host may go on with fewer ranks (``min_gpus``). ZeRO
shards are cut for the world size that wrote them, so such a resume first
converts the checkpoint to DeepSpeed's universal format (one file per
parameter and optimizer moment, under ``checkpoints/universal/``, deleted
once loaded) and loads that: weights and Adam moments survive the re-partition.

``<output_dir>/hf/`` is the stage's result: ``save_pretrained`` (with the
stage's RoPE theta in its config) plus the tokenizer, for the next stage's
``init_from`` and for evaluation. It appears all at once: it is written as
``hf.tmp-XXXX`` and renamed.
"""

from __future__ import annotations

import contextlib
import io
import logging
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from trainer.engine import agree
from trainer.modeling import write_rope_compat

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


def saved_world_size(tag_dir: str | Path) -> int:
    """Ranks that wrote a checkpoint (one ZeRO optimizer shard each; 0 without ZeRO, whose state is not partitioned)."""
    return len(list(Path(tag_dir).glob("*_optim_states.pt")))


def save(engine: Any, output_dir: str | Path, step: int, tokens: int, dp: int | None = None, cp: int | None = None) -> None:
    """Collective: every rank writes its shard of step ``step``; rank 0 prunes old tags.

    The layout (world size, dp, cp) goes into the client state, so a reader
    can tell which shape of job wrote it.
    """
    root = checkpoint_dir(output_dir)
    client = {"step": step, "tokens": tokens, "world_size": dist.get_world_size(), "dp": dp, "cp": cp}
    engine.save_checkpoint(str(root), tag=f"step{step}", client_state=client)
    if dist.get_rank() == 0:
        tags = sorted((int(m.group(1)), p) for p in root.iterdir() if (m := TAG.match(p.name)) and p.is_dir())
        for _, old in tags[:-KEEP]:
            shutil.rmtree(old, ignore_errors=True)
    dist.barrier()


def resume(engine: Any, output_dir: str | Path) -> tuple[int, int]:
    """Load the newest checkpoint into ``engine`` (collective); returns (step, tokens), (0, 0) if none.

    A checkpoint written by another number of ranks is re-partitioned
    through the universal format first (see the module docstring).
    """
    step = latest_step(output_dir)
    if step is None:
        return 0, 0
    root = checkpoint_dir(output_dir)
    saved, world = saved_world_size(root / f"step{step}"), dist.get_world_size()
    if saved and saved != world:
        path, client = _load_resharded(engine, root, f"step{step}", saved)
    else:
        path, client = engine.load_checkpoint(str(root))
    if path is None:
        return 0, 0
    log.info("resumed from %s", path)
    return int(client["step"]), int(client["tokens"])


def _load_resharded(engine: Any, root: Path, tag: str, saved: int) -> tuple[Any, dict[str, Any]]:
    """Rank 0 converts ``tag`` to the universal format; every rank loads its new partition from it."""
    universal, error = root / "universal", None
    if dist.get_rank() == 0:
        log.warning("checkpoint %s was written by %d ranks, this run has %d: re-partitioning its weights and optimizer "
                    "state through DeepSpeed's universal checkpoint format", tag, saved, dist.get_world_size())
        shutil.rmtree(universal, ignore_errors=True)  # a conversion left half done by a killed run
        try:
            to_universal(root / tag, universal / tag)
        except Exception as exc:  # any failure must reach every rank, not leave them waiting at a barrier
            error = f"checkpoint {root / tag} could not be re-partitioned for {dist.get_world_size()} ranks ({type(exc).__name__}: {exc})"
    agree(error)
    # DeepSpeed reads this switch only while loading; the engine goes on saving ordinary ZeRO checkpoints.
    engine._config.load_universal_checkpoint = True
    try:
        loaded = engine.load_checkpoint(str(universal), tag=tag)
    finally:
        engine._config.load_universal_checkpoint = False
    dist.barrier()
    if dist.get_rank() == 0:
        shutil.rmtree(universal, ignore_errors=True)
    return loaded


def to_universal(tag_dir: Path, out_dir: Path) -> None:
    """DeepSpeed's ``ds_to_universal`` in this process (no worker pool: it may run inside a Ray actor).

    ``inject_missing_state`` adds the universal-checkpoint metadata that
    only Megatron-style clients save; its progress output is kept off the logs.
    """
    import argparse

    from deepspeed.checkpoint import ds_to_universal

    args = argparse.Namespace(input_folder=str(tag_dir), output_folder=str(out_dir), num_extract_workers=1,
                              num_merge_workers=1, keep_temp_folder=False, strict=True, inject_missing_state=True)
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        ds_to_universal.main(args)


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
            write_rope_compat(tmp)
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
