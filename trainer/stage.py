"""Run one stage of progressive long-context training on this process group.

Every rank runs the same code: it joins the process group from torchrun's
variables (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT), builds
its parallel groups from the plan, and trains the stage's model with zigzag
ring attention inside HF Llama and DeepSpeed ZeRO, resuming from the stage's
newest checkpoint if there is one. At the end ``<output_dir>/hf`` holds the
model with the stage's RoPE theta, for the next stage's ``init_from``.

One machine, 4 processes (4 GPUs, or gloo on CPU)::

    torchrun --nproc_per_node 4 -m trainer.stage --config stage.json --plan plan.json

Several machines (same files on shared storage), on each host::

    torchrun --nnodes 4 --nproc_per_node 8 --rdzv-backend c10d --rdzv-endpoint HEAD:29400 \\
        -m trainer.stage --config stage.json --plan plan.json

The ringleader launcher does the same from Ray workers, with ranks in the
plan's order. Bad input ends every rank with one line
``ringleader: error: ...`` and exit status 2, before any group is created.
"""

from __future__ import annotations

import argparse
import logging
import sys
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist

from topology.errors import ConfigError
from topology.planning.plan import Plan
from trainer import checkpoint, storage
from trainer.config import COLLECTIVE_TIMEOUT_S, StageConfig
from trainer.data import build_dataset, sample_index
from trainer.engine import agree, deepspeed_config, end_rank_process, init_process_group, make_engine, zero_stage
from trainer.groups import ParallelGroups
from trainer.model.loss import ShardLoss, loss_scale
from trainer.model.llama import build_model, enable_activation_checkpointing, load_config
from trainer.reporting.progress import METRICS_JSONL, StepReporter
from trainer.reporting.ranklog import rank_logging
from trainer.reporting.tracking import open_trackers, plan_figures
from trainer.tokenizer import load_tokenizer
from trainer.attention.documents import Documents, drop_cross_document_labels
from trainer.attention.ulysses import kv_heads_for_ulysses
from trainer.attention.zigzag import IGNORE_INDEX, local_indices, shard

log = logging.getLogger("trainer.stage")


@dataclass
class StageResult:
    """What a finished stage hands on."""

    hf_dir: str
    """The HF model (and tokenizer) the next stage starts from."""
    final_loss: float
    """Mean token loss of the last optimizer step (nan if the stage had no step left to run)."""
    steps: int
    tokens: int
    resumed_from: int | None
    """Optimizer step of the checkpoint this run resumed from (None: a fresh start)."""


def check_inputs(cfg: StageConfig, plan: Plan, world_size: int) -> None:
    """Raise ConfigError for a stage that cannot run on this plan and process group."""
    if plan.world_size != world_size:
        raise ConfigError(f"plan world_size ({plan.world_size}) != process group size ({world_size}); re-plan for {world_size} GPUs")
    if (plan.dp, plan.cp, plan.ulysses) != (cfg.batch, cfg.cp, cfg.ulysses):
        raise ConfigError(f"plan shape dp={plan.dp} cp={plan.cp} ulysses={plan.ulysses} does not match stage {cfg.name!r} "
                          f"(batch={cfg.batch}, ring size={cfg.cp}, ulysses={cfg.ulysses}); re-plan the stage")
    config = load_config(cfg.model, cfg.init_from)
    kv_heads_for_ulysses(config.num_attention_heads, config.num_key_value_heads or config.num_attention_heads, cfg.ulysses)


def load_inputs(cfg: StageConfig, plan: Plan) -> tuple[StageConfig, Any, Any]:
    """Check the stage's input on every rank (a collective) and load its tokenizer and dataset.

    Returns the config with the previous stage's model made local to this host (downloaded once
    per host from an object store), the tokenizer and the dataset. Raises ConfigError on every
    rank alike when any rank's input is wrong, before anything is written.
    """
    init_process_group(cfg.collective_timeout)
    tokenizer = dataset = None
    try:
        cfg = replace(cfg, init_from=storage.local_model(cfg.init_from))
        check_inputs(cfg, plan, dist.get_world_size())
        tokenizer = load_tokenizer(cfg.model, cfg.init_from)
        dataset = build_dataset(cfg.data, tokenizer, cfg.seq_len, cfg.seed)
        error = None
    except ConfigError as exc:
        error = str(exc)
    agree(error)
    return cfg, tokenizer, dataset


def run_stage(cfg: StageConfig, plan: Plan, on_metrics: Callable[[dict[str, Any]], None] | None = None,
              inputs: tuple[StageConfig, Any, Any] | None = None) -> StageResult:
    """Train one stage on the default process group (joined from torchrun's variables if needed).

    Parameters
    ----------
    cfg
        The stage, every value resolved.
    plan
        Rank placement and parallel shape; its world size must be the process group's.
    on_metrics
        Called on every rank after each optimizer step with that step's
        metrics dict (see ``trainer.reporting.progress.StepReporter``).
    inputs
        ``load_inputs``'s (config, tokenizer, dataset), when the caller checked the input first.

    Raises
    ------
    ConfigError
        On every rank alike, before any parallel group exists, when the
        input is wrong on any rank (paths, plan shape, sequence length, data).
    """
    device = init_process_group(cfg.collective_timeout)
    rank, world = dist.get_rank(), dist.get_world_size()
    cfg, tokenizer, dataset = inputs or load_inputs(cfg, plan)
    groups = ParallelGroups.from_plan(plan, timeout_s=cfg.collective_timeout)
    cuda = device.type == "cuda"
    ds_config = deepspeed_config(cfg, cuda)
    work = storage.work_dir(cfg.output_dir)  # the stage directory itself, or this host's copy of an object store's
    work.mkdir(parents=True, exist_ok=True)
    if rank == 0:
        _pull_metrics(cfg.output_dir, work)

    model = build_model(cfg.model, cfg.rope_theta, cfg.seq_len, cfg.init_from, tokenizer=tokenizer, seed=cfg.seed,
                        dtype=torch.bfloat16 if cuda else torch.float32, ds_config=ds_config)
    model.set_attn_implementation(_attention(groups, cfg.data.document_mask))
    model.config.use_cache = False
    if cfg.activation_checkpointing:
        enable_activation_checkpointing(model)
    engine = make_engine(ShardLoss(model), ds_config, device, cfg.collective_timeout)

    resumed = checkpoint.resume(engine, cfg.output_dir)
    first_step, tokens = resumed.step, resumed.tokens
    if rank == 0:
        log.info("stage %s: %d ranks (dp %d x ring %d x ulysses %d), seq_len %d, theta %.4g, ZeRO-%d, attention %s, %s",
                 cfg.name, world, plan.dp, plan.ring, plan.ulysses, cfg.seq_len, cfg.rope_theta, zero_stage(ds_config),
                 model.config._attn_implementation, f"resuming at step {first_step}" if first_step else "fresh start")
    trackers = open_trackers(cfg.tracking, cfg.name, str(work), rank, _tracked_params(cfg))
    trackers.log_stage(first_step, plan_figures(plan, predictions=cuda))
    # The plan predicts one micro-step (one sequence per ring) on the topology's GPU model.
    predicted = plan.cost.get("step_time_s") if cuda and plan.cost else None
    reporter = StepReporter(cfg.name, cfg.steps, first_step, cfg.tokens_per_step, work, rank, on_metrics,
                            device=device, predicted_step_s=predicted * cfg.grad_accum if predicted else None,
                            trackers=trackers)
    for event in resumed.skipped:
        reporter.event({**event, "stage": cfg.name})
    positions = local_indices(cfg.seq_len, groups)[None].to(device)
    loss = float("nan")
    try:
        for step in range(first_step, cfg.steps):
            loss = _train_step(engine, dataset, groups, cfg, plan.dp, step, positions, device)
            reporter.step(step + 1, loss, float(engine.get_lr()[0]))
            tokens = (step + 1) * cfg.tokens_per_step
            last = step + 1 == cfg.steps
            if last or (cfg.checkpoint_every and (step + 1) % cfg.checkpoint_every == 0):
                checkpoint.save(engine, cfg.output_dir, step + 1, tokens, dp=plan.dp, cp=plan.cp, keep=cfg.keep_checkpoints)
                if rank == 0:
                    _push_metrics(cfg.output_dir, work)
        hf_dir = checkpoint.export_hf(model, tokenizer, cfg.output_dir, tokens // cfg.tokens_per_step)
        if cfg.niah is not None:
            _evaluate_niah(cfg, hf_dir, groups, reporter, device)
    finally:
        reporter.close()
        trackers.close()
    if rank == 0:
        _push_metrics(cfg.output_dir, work)
    return StageResult(hf_dir, loss, cfg.steps, tokens, first_step or None)


def _pull_metrics(output_dir: str, work: Path) -> None:
    """An object store's metrics.jsonl becomes this host's working copy (rank 0 appends, ``_push_metrics`` publishes)."""
    if storage.is_uri(output_dir):
        (work / METRICS_JSONL).write_bytes(storage.read_bytes(storage.join(output_dir, METRICS_JSONL)) or b"")


def _push_metrics(output_dir: str, work: Path) -> None:
    if storage.is_uri(output_dir):
        storage.write_bytes(storage.join(output_dir, METRICS_JSONL), (work / METRICS_JSONL).read_bytes())


def _tracked_params(cfg: StageConfig) -> dict[str, Any]:
    """The stage's settings as trackers record them (W&B config, MLflow params)."""
    return {"stage": cfg.name, "seq_len": cfg.seq_len, "rope_theta": cfg.rope_theta, "gpus": cfg.gpus, "batch": cfg.batch,
            "ring": cfg.cp, "ulysses": cfg.ulysses, "grad_accum": cfg.grad_accum, "steps": cfg.steps, "lr": cfg.lr,
            "init_from": cfg.init_from, "output_dir": cfg.output_dir}


def _evaluate_niah(cfg: StageConfig, hf_dir: str, groups: ParallelGroups, reporter: StepReporter,
                   device: torch.device) -> None:
    """The stage-end needle-in-a-haystack step: the saved model, on the stage's own ring."""
    from trainer.niah.evaluate import NiahConfig, evaluate_checkpoint

    result = evaluate_checkpoint(storage.local_model(hf_dir), NiahConfig(**cfg.niah), groups=groups,
                                 out_dir=storage.work_dir(cfg.output_dir) / "niah", device=device)
    if dist.get_rank() == 0 and storage.is_uri(cfg.output_dir):
        storage.put_dir(storage.work_dir(cfg.output_dir) / "niah", storage.join(cfg.output_dir, "niah"))
    reporter.event({"event": "niah", "stage": cfg.name, "average": result.average,
                    "token_accuracy": result.token_accuracy, "cells": len(result.cells)})


def _attention(groups: ParallelGroups, document_mask: bool = False) -> str:
    """Ring attention when a sequence spans ranks or documents are masked; torch's SDPA otherwise."""
    if len(groups.cp_ranks) == 1 and not document_mask:
        return "sdpa"
    from trainer.attention.hf_attention import register_ring_attention

    return register_ring_attention(groups)


def _train_step(engine: Any, dataset: Any, groups: ParallelGroups, cfg: StageConfig, dp: int, step: int,
                positions: torch.Tensor, device: torch.device) -> float:
    """One optimizer step (``grad_accum`` micro-steps); returns the global batch's mean token loss."""
    micro = [_micro_batch(dataset[sample_index(step, m, groups.dp_rank, dp, cfg.grad_accum)], cfg, groups, positions, device)
             for m in range(cfg.grad_accum)]
    # Labelled tokens of the whole global batch: every rank's shards of every micro-step.
    count = torch.tensor(float(sum(int((b["labels"] != IGNORE_INDEX).sum()) for b in micro)), device=device)
    dist.all_reduce(count)
    scale = loss_scale(dist.get_world_size(), cfg.grad_accum, int(count.item()))
    total = torch.zeros((), device=device)
    for batch in micro:
        loss_sum, _ = engine(batch["input_ids"], batch["positions"], batch["labels"], batch["documents"])
        engine.backward(loss_sum * scale)
        engine.step()
        total += loss_sum.detach().float()
    dist.all_reduce(total)
    return float(total.item() / max(count.item(), 1.0))


def _micro_batch(sample: dict[str, torch.Tensor], cfg: StageConfig, groups: ParallelGroups, positions: torch.Tensor,
                 device: torch.device) -> dict[str, Any]:
    """This rank's shard of one sample, with its document boundaries when ``data.document_mask`` is on.

    Under a document mask every document is zigzagged on its own (balanced
    ring work): ids, labels (shifted on the whole sample) and positions are
    sharded by the documents' layout, the one the attention computes in.
    """
    labels, documents = sample["labels"][None], None
    if cfg.data.document_mask:
        doc_ids = sample["doc_ids"][None]
        documents = Documents.from_doc_ids(doc_ids)
        labels = drop_cross_document_labels(labels, doc_ids)
        whole = documents.positions() if cfg.data.restart_positions else torch.arange(cfg.seq_len)[None]
        positions = shard(whole, groups, documents=documents).to(device)
    return {"input_ids": shard(sample["input_ids"][None], groups, documents=documents).to(device),
            "labels": shard(labels, groups, documents=documents).to(device), "positions": positions, "documents": documents}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m trainer.stage", description="Run one training stage on this process group.")
    parser.add_argument("--config", required=True, help="stage config (JSON, StageConfig.save)")
    parser.add_argument("--plan", required=True, help="plan (JSON or YAML, Plan.save)")
    parser.add_argument("--verbose", action="store_true", help="third-party output (DeepSpeed, torch warnings) on the console "
                        "too, not only in <output_dir>/logs/rank-<k>.log")
    args = parser.parse_args(argv)
    owns_group = not dist.is_initialized()
    try:
        try:
            cfg, plan, error = StageConfig.load(args.config), Plan.load(args.plan), None
        except ConfigError as exc:
            cfg = plan = None
            error = str(exc)
        init_process_group(cfg.collective_timeout if cfg else COLLECTIVE_TIMEOUT_S)
        agree(error)
        inputs = load_inputs(cfg, plan)  # bad input stops here, before the rank log is written
        rank = dist.get_rank()
        with rank_logging(storage.work_dir(cfg.output_dir), rank, console=rank == 0, verbose=args.verbose):
            result = run_stage(cfg, plan, inputs=inputs)
        if rank == 0:
            print(f"stage {cfg.name} done: {asdict(result)}", flush=True)
        return 0
    except ConfigError as exc:
        print(f"ringleader: error: {exc}", file=sys.stderr, flush=True)
        return 2
    finally:
        if owns_group and dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    end_rank_process(main())
