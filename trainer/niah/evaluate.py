"""Needle in a haystack: can the model find one number anywhere in a long context?

For every context length and needle depth, a prompt is built from a text
haystack with one needle sentence holding a random number (seeded per cell),
the question at the end and then the answer (``trainer.niah.prompts``).

The model is scored teacher-forced: one forward pass over the whole prompt,
and the cell counts as found only if the argmax at every answer position is
the answer's token (all of the number's tokens right). The prompt is plain
text, no chat template, so base and chat models are scored alike.

Contexts longer than ``shard_above`` tokens run sharded over a ring: every
rank of a context-parallel group holds its zigzag share of the tokens and
the trainer's ring attention computes the causal attention across ranks.
Shorter contexts run whole on one process, spread over all ranks. The model
must be whole on every rank (load the stage's ``hf/`` directory), not
ZeRO-partitioned: ``evaluate_checkpoint`` loads it on each rank.

    ringleader niah runs/llama3-8b-4194k/stage4-4191K/hf --ring 8 -o niah/
"""

from __future__ import annotations

import json
import logging
import sys
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from tqdm import tqdm

from topology.errors import ConfigError, first_line
from topology.files import write_atomic
from trainer.config import ModelConfig
from trainer.schema import FiniteFloat, PositiveInt, Seed, validate
from trainer.niah.prompts import PromptBuilder, load_haystack
from trainer.tokenizer import load_tokenizer
from trainer.attention.zigzag import local_indices

log = logging.getLogger(__name__)

DEFAULT_HAYSTACK = Path(__file__).resolve().parents[2] / "clusters" / "data" / "corpus"
"""The demo corpus: plain-text essays written for this project."""


MAX_CELLS = 10_000
"""Most context lengths one evaluation may hold: each is a set of prompts through the model."""


@dataclass
class NiahConfig:
    """The grid of (context length, needle depth) cells and where the haystack comes from."""

    max_len: PositiveInt = 4_194_200
    """Longest context, in tokens (prompt and answer included)."""
    min_len: PositiveInt = 100
    len_interval: PositiveInt = 260_000
    """Lengths are min_len, min_len + interval, ... and max_len."""
    depth_interval: FiniteFloat = 0.2
    """Depths are 0, interval, 2 x interval, ... 1 (fractions of the haystack before the needle)."""
    digits: PositiveInt = 8
    """Digits of the needle's random number."""
    haystack: str = str(DEFAULT_HAYSTACK)
    """Directory of plain-text files (.txt), read in name order and repeated as needed."""
    shard_above: PositiveInt = 131_072
    """Contexts longer than this run sharded over the ring; shorter ones on one process."""
    seed: Seed = 0

    def __post_init__(self) -> None:
        """What spans fields; each field's own type and range are checked by ``from_dict``."""
        if self.max_len < self.min_len:
            raise ConfigError(f"max length ({self.max_len}) is below min length ({self.min_len}); "
                              "raise --max-len or lower --min-len")
        if (self.max_len - self.min_len) // self.len_interval >= MAX_CELLS:
            raise ConfigError(f"lengths {self.min_len} to {self.max_len} every {self.len_interval} make more than "
                              f"{MAX_CELLS} lengths; raise len_interval")
        if not 0 < self.depth_interval <= 1:
            raise ConfigError(f"depth interval {self.depth_interval} is outside (0, 1]; "
                              "depths are fractions of the context, e.g. 0.2")
        if self.digits > 18:
            raise ConfigError(f"digits is {self.digits}; use at most 18")

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "niah", base_dir: str | Path | None = None) -> "NiahConfig":
        """A recipe stage's ``niah:`` mapping (or the CLI's flags), every field checked, each problem a line
        prefixed with ``source``; a relative haystack is relative to ``base_dir`` (the recipe's)."""
        unknown = set(data) - {f.name for f in fields(cls)}
        if unknown:
            known = ", ".join(f.name for f in fields(cls))
            raise ConfigError(f"{source}: unknown key(s) {', '.join(sorted(unknown))}; known keys are {known}")
        data = dict(data)
        if base_dir is not None and isinstance(data.get("haystack"), str) and not Path(data["haystack"]).is_absolute():
            data["haystack"] = str(Path(base_dir) / data["haystack"])
        return validate(cls, data, source)

    def lengths(self) -> list[int]:
        out = list(range(self.min_len, self.max_len + 1, self.len_interval))
        return out if out[-1] == self.max_len else out + [self.max_len]

    def depths(self) -> list[float]:
        n = int(round(1 / self.depth_interval, 9))
        out = [round(i * self.depth_interval, 6) for i in range(n + 1)]
        return out if out[-1] >= 1 else out + [1.0]


@dataclass
class Cell:
    """One scored (length, depth) prompt."""

    length: int
    depth: float
    number: str
    needle_at: int
    """Token position where the needle sentence starts."""
    correct: bool = False
    tokens_correct: int = 0
    answer_tokens: int = 0
    predicted: str = ""
    """What the model's argmax reads as at the answer positions."""
    sharded: bool = False
    seconds: float = 0.0


@dataclass
class NiahResult:
    cells: list[Cell]
    config: NiahConfig
    model: str = ""
    ring: int = 1
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def average(self) -> float:
        """Fraction of cells whose number came out exactly."""
        return sum(c.correct for c in self.cells) / max(1, len(self.cells))

    @property
    def token_accuracy(self) -> float:
        return sum(c.tokens_correct for c in self.cells) / max(1, sum(c.answer_tokens for c in self.cells))

    def to_dict(self) -> dict[str, Any]:
        return {"model": self.model, "ring": self.ring, "average": self.average, "token_accuracy": self.token_accuracy,
                "config": asdict(self.config), "meta": self.meta, "cells": [asdict(c) for c in self.cells]}


# ------------------------------------------------------------------ scoring
def score_answer(predictions: torch.Tensor, answer: list[int]) -> tuple[bool, int]:
    """Exact match of a teacher-forced answer.

    Parameters
    ----------
    predictions : torch.Tensor
        Logits ``[n, vocab]`` at the positions that predict each answer token
        (position ``t - 1`` predicts token ``t``), or predicted ids ``[n]``.
    answer : list of int
        The answer's token ids.

    Returns
    -------
    (bool, int)
        Whether every answer token is the argmax, and how many are.
    """
    pred = predictions.argmax(-1) if predictions.is_floating_point() else predictions
    if pred.shape != (len(answer),):
        raise ValueError(f"expected predictions for {len(answer)} answer tokens, got shape {tuple(predictions.shape)}")
    hits = int((pred.cpu() == torch.tensor(answer)).sum())
    return hits == len(answer), hits


# ------------------------------------------------------------------ evaluation
@torch.no_grad()
def predict_answer(model: Any, ids: torch.Tensor, positions: torch.Tensor, first: int, n: int) -> torch.Tensor:
    """Argmax ids at global positions ``first .. first+n-1`` among the ``positions`` this rank holds; -1 elsewhere.

    Only the hidden states at those positions go through the LM head, so a
    long context never materialises its full ``[tokens, vocab]`` logits.
    """
    hidden = model.base_model(input_ids=ids[None], position_ids=positions[None], use_cache=False).last_hidden_state[0]
    keep = (positions >= first) & (positions < first + n)
    pred = torch.full((n,), -1, dtype=torch.long, device=ids.device)
    if bool(keep.any()):
        pred[positions[keep] - first] = model.get_output_embeddings()(hidden[keep]).argmax(-1)
    return pred


def run_niah(model: Any, tokenizer: Any, config: NiahConfig, groups: Any = None, out_dir: str | Path | None = None,
             model_name: str = "", progress: bool = True) -> NiahResult:
    """Score every (length, depth) cell; with ``groups`` (ParallelGroups) every rank must call it.

    Long cells (``> config.shard_above``) go to the context-parallel groups in
    turn, each cell sharded over one group's ranks with ring attention; short
    cells go to single ranks in turn. Every rank returns the full result;
    rank 0 writes ``niah.json`` and ``niah.png`` to ``out_dir`` when given.
    """
    builder = PromptBuilder(tokenizer, load_haystack(config.haystack), config.digits, config.seed)
    builder.build(config.min_len, 0.0)  # fails now, not mid-run, if the shortest context is too short
    grid = [(length, depth) for length in config.lengths() for depth in config.depths()]
    rank, world = (dist.get_rank(), dist.get_world_size()) if groups is not None else (0, 1)
    cp = len(groups.cp_ranks) if groups is not None else 1
    long = [c for c in grid if cp > 1 and c[0] > config.shard_above]
    short = [c for c in grid if c not in long]
    mine = [(c, True) for c in long[groups.dp_rank :: world // cp]] if long else []
    mine += [(c, False) for c in short[rank::world]]
    local_impl = model.config._attn_implementation
    ring_impl = None
    if long:
        from trainer.attention.hf_attention import register_ring_attention  # HF modeling code: not for NiahConfig's users

        ring_impl = register_ring_attention(groups)
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    done: list[Cell] = []
    show = progress and rank == 0
    bar = _progress_bar(len(mine), show)
    for i, ((length, depth), sharded) in enumerate(mine):
        start = time.perf_counter()
        prompt = builder.build(length, depth)
        ids, answer = prompt.ids, prompt.answer
        cell = Cell(length=length, depth=depth, number=prompt.number, needle_at=prompt.needle_at)
        first, n = length - len(answer) - 1, len(answer)
        if sharded:
            # Zigzag needs 2 x cp equal chunks; padding at the end changes nothing before it (causal).
            padded = -(-length // (2 * cp)) * (2 * cp)
            full = torch.tensor(ids + [pad] * (padded - length), device=device)
            positions = local_indices(padded, groups).to(device)
            model.set_attn_implementation(ring_impl)
            pred = predict_answer(model, full[positions], positions, first, n)
            dist.all_reduce(pred, op=dist.ReduceOp.MAX, group=groups.cp_group)
            model.set_attn_implementation(local_impl)
        else:
            pred = predict_answer(model, torch.tensor(ids, device=device), torch.arange(length, device=device), first, n)
        cell.correct, cell.tokens_correct = score_answer(pred, answer)
        cell.answer_tokens, cell.sharded = n, sharded
        cell.predicted = tokenizer.decode([t for t in pred.tolist() if t >= 0])
        cell.seconds = time.perf_counter() - start
        if not sharded or groups.cp_rank == 0:
            done.append(cell)
        if bar is not None:
            bar.update(1)
        elif show:
            log.info("niah %d/%d: %d tokens, depth %.2f: %s (%d/%d answer tokens), %.0f tokens/s", i + 1, len(mine), length,
                     depth, "found" if cell.correct else "missed", cell.tokens_correct, n, length / cell.seconds)
    if bar is not None:
        bar.close()
    if groups is not None:
        gathered: list[list[Cell]] = [[] for _ in range(world)]
        dist.all_gather_object(gathered, done)
        done = [c for part in gathered for c in part]
    result = NiahResult(sorted(done, key=lambda c: (c.length, c.depth)), config, model_name, cp,
                        {"world_size": world, "attention": ring_impl or local_impl})
    if out_dir is not None and rank == 0:
        write_results(result, out_dir)
    return result


def _progress_bar(total: int, show: bool) -> tqdm | None:
    """A bar on a terminal; elsewhere (Ray job logs) one log line per cell instead."""
    return tqdm(total=total, desc="niah", unit="cell") if show and sys.stderr.isatty() else None


def write_results(result: NiahResult, out_dir: str | Path) -> tuple[Path, Path]:
    """``niah.json`` (every cell and the average) and ``niah.png`` (the heatmap), each written atomically."""
    from trainer.niah.plot import plot_heatmap  # matplotlib, only where results are written

    out = Path(out_dir)
    write_atomic(out / "niah.json", json.dumps(result.to_dict(), indent=1) + "\n")
    plot_heatmap(result, out / "niah.png")
    return out / "niah.json", out / "niah.png"


def load_eval_model(model_dir: str, device: torch.device) -> Any:
    """A saved causal LM, whole, for evaluation: bf16 on GPU, fp32 on CPU."""
    from transformers import AutoModelForCausalLM

    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    try:
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype, attn_implementation="sdpa")
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot load model {model_dir!r} ({first_line(exc)}); give an HF model directory or a cached hub name") from None
    return model.to(device).eval()


def evaluate_checkpoint(model_dir: str, config: NiahConfig, groups: Any = None, out_dir: str | Path | None = None,
                        device: torch.device | None = None) -> NiahResult:
    """Load ``model_dir`` (a stage's ``hf/``) and its tokenizer on this rank and run ``run_niah``.

    The stage-end step of a recipe with ``niah:`` calls this on every rank
    after training, with the stage's ``ParallelGroups``.
    """
    if device is None:
        device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    tokenizer = load_tokenizer(ModelConfig(path=model_dir))
    return run_niah(load_eval_model(model_dir, device), tokenizer, config, groups=groups, out_dir=out_dir, model_name=model_dir)
