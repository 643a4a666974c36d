"""Typed configuration of one training stage, as the trainer receives it.

A ``StageConfig`` is self-contained and JSON-serialisable: the launcher writes
one per stage beside the plan, and ``python -m trainer.stage --config
stage.json --plan plan.json`` (under torchrun or a Ray worker) runs it.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from topology.errors import ConfigError
from topology.model import load_data, write_atomic

DEFAULT_DEEPSPEED: dict[str, Any] = {
    "zero_optimization": {"stage": 3, "overlap_comm": True, "contiguous_gradients": True},
    "gradient_clipping": 1.0,
    "optimizer": {"type": "AdamW", "params": {"lr": 2e-5, "betas": [0.9, 0.95], "eps": 1e-8, "weight_decay": 0.0}},
    "steps_per_print": 1_000_000,
}
"""DeepSpeed's own JSON keys. The trainer fills batch sizes, accumulation,
precision (bf16 on CUDA, fp32 on CPU) and the learning rate from the stage."""


@dataclass
class ModelConfig:
    """Which model to start from."""

    path: str | None = None
    """Local directory or hub name of an HF causal LM (e.g. meta-llama/Meta-Llama-3-8B-Instruct)."""
    tiny: dict[str, Any] | None = None
    """LlamaConfig keyword arguments for a randomly initialised model (demos, tests)."""
    tokenizer: str | None = None
    """Local directory or hub name of the tokenizer; defaults to ``path``; a tiny
    model without one gets a byte-level tokenizer built locally."""
    base_theta: float = 500_000.0
    """RoPE theta the model was trained with (Llama-3: 500000)."""
    base_len: int = 8192
    """Context length the model was trained at (Llama-3: 8192)."""
    head_dim: int = 128

    def __post_init__(self) -> None:
        if (self.path is None) == (self.tiny is None):
            raise ConfigError("model: give exactly one of 'path' (local dir or hub name) or 'tiny' (a LlamaConfig dict)")


@dataclass
class DataConfig:
    """Where training samples come from."""

    path: str | None = None
    """A directory or file of documents: .txt, .jsonl (field 'text' or 'messages') or .parquet."""
    synthetic: dict[str, Any] | None = None
    """Instead of ``path``: a corpus generated here, ``{retrieval: {...RetrievalCorpus fields}}``
    (``trainer.synthetic``), the same on every rank."""
    kind: str = "pretrain"
    """``pretrain``: pack documents to the sequence length (SlimPajama style);
    ``chat``: UltraChat-style message lists through the chat template."""
    upsample_long: bool = True
    """Oversample documents longer than ``long_doc_tokens`` when packing, as in long-context data recipes."""
    long_doc_tokens: int = 4096
    seed: int = 0

    def __post_init__(self) -> None:
        if self.kind not in ("pretrain", "chat"):
            raise ConfigError(f"data.kind is {self.kind!r}; use 'pretrain' or 'chat'")
        if (self.path is None) == (self.synthetic is None):
            raise ConfigError("data: give exactly one of 'path' (documents on disk) or 'synthetic' (e.g. {retrieval: {documents: 3000}})")
        if self.synthetic is not None:
            from trainer.synthetic import corpus_spec

            corpus_spec(self.synthetic)  # unknown generators and fields fail at load, before any rank starts


@dataclass
class StageConfig:
    """One stage of progressive training, every value resolved."""

    name: str
    seq_len: int
    rope_theta: float
    batch: int
    """Sequences in flight per optimizer micro-step = rings = data-parallel size."""
    steps: int
    gpus: int
    model: ModelConfig
    data: DataConfig
    output_dir: str
    """Where this stage writes checkpoints/ (DeepSpeed, resumable) and hf/ (the final model)."""
    grad_accum: int = 1
    lr: float = 2e-5
    ulysses: int = 1
    checkpoint_every: int = 0
    """Save a resumable DeepSpeed checkpoint every N optimizer steps (0: only at the end)."""
    init_from: str | None = None
    """HF checkpoint of the previous stage; None starts from ``model``."""
    activation_checkpointing: bool = True
    deepspeed: dict[str, Any] = field(default_factory=lambda: json.loads(json.dumps(DEFAULT_DEEPSPEED)))
    seed: int = 0
    niah: dict[str, Any] | None = None
    """Needle-in-a-haystack settings (``trainer.niah.evaluate.NiahConfig`` fields) to evaluate
    the stage's HF model with, on the same ranks, once the stage has trained."""

    @property
    def cp(self) -> int:
        """GPUs per sequence (the recipe's ring size)."""
        return self.gpus // self.batch

    @property
    def tokens_per_step(self) -> int:
        return self.seq_len * self.batch * self.grad_accum

    def __post_init__(self) -> None:
        if isinstance(self.model, dict):
            self.model = ModelConfig(**self.model)
        if isinstance(self.data, dict):
            self.data = DataConfig(**self.data)
        where = f"stage {self.name!r}"
        for name in ("seq_len", "batch", "steps", "gpus", "grad_accum", "ulysses"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"{where}: {name} is {value!r}; it must be a whole number >= 1")
        if self.gpus % self.batch:
            raise ConfigError(f"{where}: batch ({self.batch}) must divide gpus ({self.gpus}): ring size = gpus / batch")
        if self.cp % self.ulysses:
            raise ConfigError(f"{where}: ulysses ({self.ulysses}) must divide the ring size gpus/batch ({self.cp})")
        if self.seq_len % (2 * self.cp):
            raise ConfigError(f"{where}: seq_len ({self.seq_len}) must be divisible by 2 * ring size ({2 * self.cp}) for zigzag sharding")
        if not self.rope_theta > 0:
            raise ConfigError(f"{where}: rope_theta is {self.rope_theta!r}; it must be positive")
        if not self.lr > 0:
            raise ConfigError(f"{where}: lr is {self.lr!r}; it must be positive")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "stage config") -> "StageConfig":
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ConfigError(f"{source}: unknown field(s) {', '.join(sorted(unknown))}")
        try:
            return cls(**data)
        except TypeError as exc:
            raise ConfigError(f"{source}: {exc}") from None

    def save(self, path: str | os.PathLike) -> None:
        write_atomic(path, json.dumps(self.to_dict(), indent=1) + "\n")

    @classmethod
    def load(cls, path: str | os.PathLike) -> "StageConfig":
        return cls.from_dict(load_data(path), source=str(path))
