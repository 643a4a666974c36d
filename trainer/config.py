"""Typed configuration of one training stage, as the trainer receives it.

A ``StageConfig`` is self-contained and JSON-serialisable: the launcher writes
one per stage beside the plan, and ``python -m trainer.stage --config
stage.json --plan plan.json`` (under torchrun or a Ray worker) runs it.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from topology.errors import ConfigError
from topology.files import load_data, write_atomic
from trainer.schema import Count, DeepSpeedKeys, PathName, PositiveFloat, PositiveInt, Seed, validate
from trainer.reporting.tracking import TrackingConfig

DEFAULT_DEEPSPEED: dict[str, Any] = {
    "zero_optimization": {"stage": 3, "overlap_comm": True, "contiguous_gradients": True},
    "gradient_clipping": 1.0,
    "optimizer": {"type": "AdamW", "params": {"lr": 2e-5, "betas": [0.9, 0.95], "eps": 1e-8, "weight_decay": 0.0}},
    "steps_per_print": 1_000_000,
}
"""DeepSpeed's own JSON keys. The trainer fills batch sizes, accumulation,
precision (bf16 on CUDA, fp32 on CPU) and the learning rate from the stage."""

COLLECTIVE_TIMEOUT_S = 1800.0
"""torchrun's default: a ZeRO-3 checkpoint of a large model takes minutes; a dead rank is noticed through Ray long before."""


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
    base_theta: PositiveFloat = 500_000.0
    """RoPE theta the model was trained with (Llama-3: 500000)."""
    base_len: PositiveInt = 8192
    """Context length the model was trained at (Llama-3: 8192)."""
    head_dim: PositiveInt = 128
    rope_parameters: dict[str, Any] | None = None
    """RoPE type and parameters replacing the base model's (e.g. ``{rope_type: default}``
    drops llama3 frequency scaling); None keeps the base model's. Each stage sets theta within them."""

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
    (``trainer.data.synthetic``), the same on every rank."""
    kind: Literal["pretrain", "chat"] = "pretrain"
    """``pretrain``: pack documents to the sequence length (SlimPajama style);
    ``chat``: UltraChat-style message lists through the chat template."""
    upsample_long: bool = True
    """Oversample documents longer than ``long_doc_tokens`` when packing, as in long-context data recipes."""
    long_doc_tokens: PositiveInt = 4096
    seed: Seed = 0
    document_mask: bool = False
    """Attend only within each packed document (block-diagonal causal attention,
    the Llama 3 practice); also drops the label that crosses from one document
    into the next, and zigzags every document over the ring on its own so ring
    ranks do equal work. False: every token attends to the whole sample before it."""
    restart_positions: bool = False
    """RoPE positions restart at 0 at every document start (needs ``document_mask``);
    False: positions run over the whole sample."""
    whole_documents: bool = False
    """Never cut a document that fits in one sample across two: when the next documents do not
    fit in what is left of a sample, the rest is padding (never learned) and they start the next
    one (Ding et al. 2024, "Fewer Truncations Improve Language Modeling"). A question whose
    answer sits in the previous sample only teaches guessing; longer documents are still cut,
    starting at a sample's start. False: one continuous stream, cut every ``seq_len + 1`` tokens."""
    on_bad_record: Literal["error", "skip"] = "error"
    """A record that cannot be a document (not UTF-8, no text, empty, malformed conversation):
    ``error`` refuses the data naming file and record; ``skip`` leaves it out and counts it."""
    store: str | None = None
    """A prepared token store (``ringleader data prepare``) the ranks read instead of tokenising
    ``path``; the launcher sets it before a stage starts."""

    def __post_init__(self) -> None:
        if self.restart_positions and not self.document_mask:
            raise ConfigError("data.restart_positions needs data.document_mask: true (positions restart per masked document)")
        if (self.path is None) == (self.synthetic is None):
            raise ConfigError("data: give exactly one of 'path' (documents on disk) or 'synthetic' (e.g. {retrieval: {documents: 3000}})")
        if self.synthetic is not None:
            from trainer.data.synthetic import corpus_spec

            corpus_spec(self.synthetic)  # unknown generators and fields fail at load, before any rank starts


@dataclass
class StageConfig:
    """One stage of progressive training, every value resolved."""

    name: PathName
    seq_len: PositiveInt
    rope_theta: PositiveFloat
    batch: PositiveInt
    """Sequences in flight per optimizer micro-step = rings = data-parallel size."""
    steps: PositiveInt
    gpus: PositiveInt
    model: ModelConfig
    data: DataConfig
    output_dir: str
    """Where this stage writes checkpoints/ (DeepSpeed, resumable) and hf/ (the final model)."""
    grad_accum: PositiveInt = 1
    lr: PositiveFloat = 2e-5
    ulysses: PositiveInt = 1
    checkpoint_every: Count = 0
    """Save a resumable DeepSpeed checkpoint every N optimizer steps (0: only at the end)."""
    keep_checkpoints: PositiveInt = 2
    """Complete DeepSpeed checkpoints kept (the newest); a damaged newest one falls back to the one before."""
    init_from: str | None = None
    """HF checkpoint of the previous stage; None starts from ``model``."""
    activation_checkpointing: bool = True
    deepspeed: DeepSpeedKeys = field(default_factory=lambda: json.loads(json.dumps(DEFAULT_DEEPSPEED)))
    seed: Seed = 0
    niah: dict[str, Any] | None = None
    """Needle-in-a-haystack settings (``trainer.niah.evaluate.NiahConfig`` fields) to evaluate
    the stage's HF model with, on the same ranks, once the stage has trained."""
    collective_timeout: PositiveFloat = COLLECTIVE_TIMEOUT_S
    """Seconds any torch.distributed collective (and the rendezvous) may wait before it fails the rank."""
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    """Where the stage's metrics go besides metrics.jsonl (TensorBoard, W&B, MLflow, Ray metrics)."""

    @property
    def cp(self) -> int:
        """GPUs per sequence (the recipe's ring size)."""
        return self.gpus // self.batch

    @property
    def tokens_per_step(self) -> int:
        return self.seq_len * self.batch * self.grad_accum

    def __post_init__(self) -> None:
        """Checks that span fields; each field's own type and range are in its annotation."""
        if isinstance(self.model, dict):  # built in code from plain mappings (tests, notebooks)
            self.model = validate(ModelConfig, self.model, "model")
        if isinstance(self.data, dict):
            self.data = validate(DataConfig, self.data, "data")
        if isinstance(self.tracking, dict):
            self.tracking = TrackingConfig.from_dict(self.tracking, f"stage {self.name!r}: tracking")
        where = f"stage {self.name!r}"
        if self.gpus % self.batch:
            raise ConfigError(f"{where}: batch ({self.batch}) must divide gpus ({self.gpus}): ring size = gpus / batch")
        if self.cp % self.ulysses:
            raise ConfigError(f"{where}: ulysses ({self.ulysses}) must divide the ring size gpus/batch ({self.cp})")
        if self.seq_len % (2 * self.cp):
            raise ConfigError(f"{where}: seq_len ({self.seq_len}) must be divisible by 2 * ring size ({2 * self.cp}) for zigzag sharding")
        for part in ("optimizer", "scheduler"):  # a recipe's block is merged over the defaults first, which name one
            if part in self.deepspeed and not isinstance(self.deepspeed[part].get("type"), str):
                raise ConfigError(f"{where}: deepspeed.{part} names no 'type'; give DeepSpeed's name for it, e.g. "
                                  f"{'AdamW' if part == 'optimizer' else 'WarmupCosineLR'}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "stage config") -> "StageConfig":
        """A stage config from JSON, every field type- and range-checked (all problems in one ConfigError)."""
        return validate(cls, data, source)

    def save(self, path: str | os.PathLike) -> None:
        write_atomic(path, json.dumps(self.to_dict(), indent=1) + "\n")

    @classmethod
    def load(cls, path: str | os.PathLike) -> "StageConfig":
        return cls.from_dict(load_data(path), source=str(path))
