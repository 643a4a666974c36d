"""A stage's two kinds of checkpoint: resumable DeepSpeed state, and the HF model it hands on.

``<output_dir>/checkpoints/`` holds DeepSpeed checkpoints (ZeRO-partitioned
weights and optimizer state, one file per rank) tagged ``step<N>``. The
output directory is a shared path or an object store URI (``trainer.storage``).

Commit protocol of one tag (``save``)::

    every rank   DeepSpeed writes its files into a local staging directory,
                 then puts each file into the tag (fsync + rename on POSIX,
                 upload on an object store) and records its size and CRC-32
    all ranks    gather those records: the barrier. A rank that died or
                 failed to write stops the tag here, uncommitted
    rank 0       writes <tag>/manifest.json (every file, size, checksum),
                 then ``latest`` (atomically), then deletes all but the
                 newest ``keep`` complete tags

DeepSpeed's own ``latest`` (a plain ``open('w')`` by rank 0, with no barrier
after the other ranks' shards) is never written. A tag counts only with a
manifest whose files are all there with their sizes and checksums; samples
are a function of the step (``trainer.data.sample_index``), so restoring
the step restores the data position.

``resume`` tries the tags newest first and skips (with a log line and a
``checkpoint_skipped`` event) any whose manifest is missing or whose files
are missing, short or changed: the manifest, not ``latest``, is what makes
a tag count (``latest`` is for people and DeepSpeed's own tools). Ranks
check a share of the files each and agree on the outcome. On an object store
each host downloads a tag once, before it is checked.

A stage that lost a host may go on with fewer ranks (``min_gpus``). ZeRO
shards are cut for the world size that wrote them, so such a resume first
converts the checkpoint to DeepSpeed's universal format (one file per
parameter and optimizer moment, under ``checkpoints/universal/``, deleted
once loaded) and loads that: weights and Adam moments survive the re-partition.
Only a complete tag is converted: a missing shard is damage, not a smaller world.

``<output_dir>/hf`` is the stage's result: ``save_pretrained`` (with the
stage's RoPE theta in its config) plus the tokenizer, for the next stage's
``init_from`` and for evaluation. Each export is a new ``hf-step<N>-<id>/``
directory; ``hf`` then points at it in one atomic step (a symlink replaced
by ``os.replace`` on POSIX, a one-line object on an object store), so a
reader always finds a whole model under ``hf``.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import re
import secrets
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from trainer import storage
from trainer.engine import agree, import_deepspeed
from trainer.model.llama import write_rope_compat

log = logging.getLogger(__name__)

KEEP = 2
"""Complete DeepSpeed checkpoints kept per stage by default (the newest); older tags are deleted after a save."""
TAG = re.compile(r"^step(\d+)$")
MANIFEST = "manifest.json"
LATEST = "latest"


@dataclass
class Resumed:
    """What ``resume`` restored."""

    step: int = 0
    tokens: int = 0
    skipped: list[dict[str, Any]] = field(default_factory=list)
    """One ``checkpoint_skipped`` event per damaged or incomplete tag passed over."""


def checkpoint_dir(output_dir: str | os.PathLike) -> str:
    return storage.join(output_dir, "checkpoints")


def _tags(root: str) -> list[tuple[int, str]]:
    """(step, tag) of every tag directory under ``root``, newest first."""
    return sorted(((int(m.group(1)), n) for n in storage.children(root) if (m := TAG.match(n))), reverse=True)


def _manifest(root: str, tag: str) -> dict[str, Any] | None:
    data = storage.read_bytes(storage.join(root, tag, MANIFEST))
    try:
        manifest = json.loads(data) if data else None
    except ValueError:
        return None
    return manifest if isinstance(manifest, dict) and isinstance(manifest.get("files"), dict) else None


def latest_step(output_dir: str | os.PathLike) -> int | None:
    """Step of the newest committed checkpoint (one with a manifest), or None; files are not checked here."""
    root = checkpoint_dir(output_dir)
    named = (storage.read_bytes(storage.join(root, LATEST)) or b"").decode(errors="replace").strip()
    if TAG.match(named) and _manifest(root, named) is not None:
        return int(named[4:])
    return next((step for step, tag in _tags(root) if _manifest(root, tag) is not None), None)


def saved_world_size(tag_dir: str | Path) -> int:
    """Ranks that wrote a checkpoint (one ZeRO optimizer shard each; 0 without ZeRO, whose state is not partitioned)."""
    return len(list(Path(tag_dir).glob("*_optim_states.pt")))


def save(engine: Any, output_dir: str | os.PathLike, step: int, tokens: int, dp: int | None = None, cp: int | None = None,
         keep: int = KEEP) -> None:
    """Collective: write and commit tag ``step<step>`` (see the module docstring); keep ``keep`` complete tags.

    The layout (world size, dp, cp) goes into the client state and the
    manifest, so a reader can tell which shape of job wrote it.

    Raises
    ------
    RuntimeError
        On every rank alike when any rank could not write its files; the tag stays uncommitted.
    """
    root, tag = checkpoint_dir(output_dir), f"step{step}"
    rank, world = dist.get_rank(), dist.get_world_size()
    staging = storage.work_dir(str(output_dir)) / "checkpoints" / ".staging" / f"rank{rank}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    client = {"step": step, "tokens": tokens, "world_size": world, "dp": dp, "cp": cp}
    if rank == 0:
        # What an earlier attempt left under this tag (uncommitted, or committed but damaged, since this run
        # resumed from an older one) goes first: a stale shard must not pass for one of this save's.
        storage.remove(storage.join(root, tag))
    # DeepSpeed's barrier at the start of save_checkpoint orders that removal before any rank's put_file.
    engine.save_checkpoint(str(staging), tag=tag, client_state=client, save_latest=False)
    files: dict[str, dict[str, Any]] = {}
    error = None
    try:
        for f in sorted(p for p in (staging / tag).rglob("*") if p.is_file()):
            rel = f.relative_to(staging / tag).as_posix()
            files[rel] = {"size": f.stat().st_size, "crc32": storage.checksum(f), "rank": rank}
            storage.put_file(f, storage.join(root, tag, rel))
    except OSError as exc:
        error = f"rank {rank} could not write checkpoint {tag} to {root}: {exc}"
    shutil.rmtree(staging, ignore_errors=True)
    gathered: list[Any] = [None] * world
    dist.all_gather_object(gathered, (error, files))  # the barrier: every rank's files are in place, or an error
    errors = [e for e, _ in gathered if e]
    if errors:
        raise RuntimeError(errors[0])
    if rank == 0:
        every = {rel: meta for _, part in gathered for rel, meta in part.items()}
        manifest = {**client, "tag": tag, "files": every}
        storage.write_bytes(storage.join(root, tag, MANIFEST), json.dumps(manifest, indent=1) + "\n")
        storage.write_bytes(storage.join(root, LATEST), tag)
        _prune(root, keep)
    dist.barrier()


def _prune(root: str, keep: int) -> None:
    """Delete tags older than the ``keep`` newest complete ones, and every uncommitted tag."""
    complete = 0
    for _, tag in _tags(root):
        if complete < keep and _manifest(root, tag) is not None:
            complete += 1
            continue
        storage.remove(storage.join(root, tag))


def resume(engine: Any, output_dir: str | os.PathLike) -> Resumed:
    """Load the newest complete checkpoint into ``engine`` (collective); a fresh start if there is none.

    A checkpoint written by another number of ranks is re-partitioned
    through the universal format first (see the module docstring).
    """
    root, out = checkpoint_dir(output_dir), Resumed()
    rank, world = dist.get_rank(), dist.get_world_size()
    order: list[Any] = [None]
    if rank == 0:
        order[0] = [tag for _, tag in _tags(root)]
    dist.broadcast_object_list(order, src=0)
    for tag in order[0]:
        local, manifest, problem = _fetch(root, tag, str(output_dir), rank, world)
        problems: list[Any] = [None] * world
        dist.all_gather_object(problems, problem)
        problem = next((p for p in problems if p), None)
        if problem is None:
            out.step, out.tokens = _load(engine, local, manifest, str(output_dir))
            log.info("resumed from %s", storage.join(root, tag))
            _drop_downloads(str(output_dir))
            return out
        if rank == 0:
            log.warning("checkpoint %s skipped: %s; trying an older one", storage.join(root, tag), problem)
        out.skipped.append({"event": "checkpoint_skipped", "tag": tag, "reason": problem})
    return out


def _drop_downloads(output_dir: str) -> None:
    """Collective: once every rank has loaded, the first rank of each host deletes its downloaded copies."""
    dist.barrier()
    if storage.is_uri(output_dir) and int(os.environ.get("LOCAL_RANK", "0")) == 0:
        for copy in (storage.work_dir(output_dir) / "checkpoints").glob(".download-*"):
            shutil.rmtree(copy, ignore_errors=True)


def _fetch(root: str, tag: str, output_dir: str, rank: int, world: int) -> tuple[Path | None, dict | None, str | None]:
    """A local directory holding ``tag`` (downloaded once per host from an object store) and what is wrong with it, if anything.

    Every rank checks every file's size and the checksums of its share of the files.
    """
    try:
        manifest = _manifest(root, tag)
        if manifest is None:
            return None, None, f"no readable {MANIFEST} (the save did not finish on every rank)"
        stamp = f"{storage.checksum_bytes(json.dumps(manifest, sort_keys=True).encode())}"
        local = storage.download_dir(storage.join(root, tag),
                                     storage.work_dir(output_dir) / "checkpoints" / f".download-{stamp}" / tag)
        files = sorted(manifest["files"].items())
        for i, (rel, meta) in enumerate(files):
            path = local / rel
            if not path.is_file():
                return None, None, f"{rel} is missing"
            if path.stat().st_size != meta["size"]:
                return None, None, f"{rel} has {path.stat().st_size} bytes, the manifest says {meta['size']}"
            if i % world == rank and storage.checksum(path) != meta["crc32"]:
                return None, None, f"{rel} does not match its checksum"
        return local, manifest, None
    except OSError as exc:
        return None, None, f"unreadable ({exc})"


def _load(engine: Any, local: Path, manifest: dict[str, Any], output_dir: str) -> tuple[int, int]:
    """Load a checked tag; the world size that wrote it is the manifest's count of ZeRO optimizer shards."""
    tag = manifest["tag"]
    saved, world = sum(rel.endswith("_optim_states.pt") for rel in manifest["files"]), dist.get_world_size()
    if saved and saved != world:
        path, client = _load_resharded(engine, local.parent, tag, saved, output_dir)
    else:
        path, client = engine.load_checkpoint(str(local.parent), tag=tag)
    if path is None:
        raise RuntimeError(f"DeepSpeed could not load checkpoint {local}")
    return int(client["step"]), int(client["tokens"])


def _load_resharded(engine: Any, root: Path, tag: str, saved: int, output_dir: str) -> tuple[Any, dict[str, Any]]:
    """One rank per copy of the checkpoint converts ``tag`` to the universal format; every rank loads its new partition."""
    universal, error = root / "universal", None
    # A shared directory is converted once; downloaded copies once per host.
    converts = dist.get_rank() == 0 if storage.local_path(output_dir) else int(os.environ.get("LOCAL_RANK", "0")) == 0
    if converts:
        if dist.get_rank() == 0:
            log.warning("checkpoint %s was written by %d ranks, this run has %d: re-partitioning its weights and "
                        "optimizer state through DeepSpeed's universal checkpoint format", tag, saved, dist.get_world_size())
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
    if converts:
        shutil.rmtree(universal, ignore_errors=True)
    return loaded


def to_universal(tag_dir: Path, out_dir: Path) -> None:
    """DeepSpeed's ``ds_to_universal`` in this process (no worker pool: it may run inside a Ray actor).

    ``inject_missing_state`` adds the universal-checkpoint metadata that
    only Megatron-style clients save; its progress output is kept off the logs.
    """
    import argparse

    import_deepspeed()
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
    deepspeed = import_deepspeed()
    rank = dist.get_rank()
    state: dict[str, torch.Tensor] = {}
    for prefix, sub in module.named_modules():
        params = list(sub.named_parameters(prefix=prefix, recurse=False))
        with deepspeed.zero.GatheredParameters([p for _, p in params], modifier_rank=None):
            if rank == 0:
                state.update((name, p.detach().to("cpu", copy=True)) for name, p in params)
    return state if rank == 0 else None


def export_hf(module: Any, tokenizer: Any, output_dir: str | os.PathLike, step: int) -> str:
    """Write the model as a new ``hf-step<N>-<id>`` version and point ``<output_dir>/hf`` at it; collective.

    Returns the pointer's location (``<output_dir>/hf``), which readers
    follow (``trainer.storage.local_model``). Older versions are deleted
    once the pointer has moved.
    """
    state = gathered_state_dict(module)
    output_dir = str(output_dir)
    pointer = storage.join(output_dir, storage.HF_POINTER)
    if dist.get_rank() == 0:
        version = f"hf-step{step}-{secrets.token_hex(3)}"
        work = storage.work_dir(output_dir)
        tmp = Path(tempfile.mkdtemp(prefix=f".{version}.", dir=work))
        try:
            module.save_pretrained(tmp, state_dict=state)
            write_rope_compat(tmp)
            tokenizer.save_pretrained(tmp)
            storage.put_dir(tmp, storage.join(output_dir, version))
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        storage.switch_pointer(output_dir, version)
        for old in storage.children(output_dir):
            if old.startswith("hf-") and old != version:
                storage.remove(storage.join(output_dir, old))
        log.info("saved HF model to %s (%s)", pointer, version)
    dist.barrier()
    return pointer
