"""Memory per GPU of one training stage: will it fit before a GPU-hour is spent?

The estimate is a sum of terms, each a plain formula of the model shape, the
tokens a GPU holds and the parallel layout, so the dry run can print every
term beside the GPU's memory. ``P`` is the parameter count, ``N`` the world
size, ``c = seq_len / cp`` the tokens per GPU, ``h`` the hidden size, ``q``
and ``kv`` the query and key/value widths (heads x head dim), ``I`` the MLP
width, ``V`` the vocabulary, ``L`` the layers.

Model states, DeepSpeed ZeRO-3 with bf16 and fp32 master weights, sharded
over the whole world (every rank holds 1/N of each):

* weights ``2P/N``, gradients ``2P/N``, optimizer ``12P/N`` (fp32 master
  copy, Adam's first and second moments).

Activations, bf16, with activation checkpointing at each decoder layer:

* checkpoints: each layer's input hidden state, ``c * h * 2`` bytes x ``L``;
* one layer's working set while it is recomputed and differentiated: the
  tensors autograd saves for one HF Llama layer, per token
  ``16h + 4q + 4kv + 8I`` bytes (each RMSNorm keeps its input in fp32, the
  normalised and the scaled input in bf16; attention keeps RoPE'd q and k,
  v, the output and its fp32 log-sum-exp; the MLP keeps gate, up, their
  activation and product), checked against autograd's saved tensors in
  tests/test_memory.py, plus the MLP's gradients in flight (``4I``);
* ring buffers: backward is the peak, with the K/V block in use and the
  one arriving (double buffering, bf16) plus the dK/dV blocks travelling in
  fp32 (also double buffered), ``c * kv * (2*2*2 + 2*2*4)`` bytes, and the
  fp32 output/log-sum-exp accumulator of the online softmax ``c * q * 4``;
  Ulysses adds its all-to-all copies of q, k, v and the output;
* logits: ``tokens * V * 14`` bytes: bf16 logits, their fp32 copy, the fp32
  log-softmax cross-entropy saves and the fp32 gradient. The trainer makes
  logits in chunks of ``trainer.model.loss.LOGITS_CHUNK_BYTES`` of fp32 (about
  2K tokens for Llama-3) and recomputes each in backward, so ``tokens`` is
  that chunk, not ``c``.

Runtime buffers:

* ZeRO-3 gathers at most ``stage3_max_live_parameters`` parameters (bf16)
  at a time and reduces gradients in buckets of ``reduce_bucket_size``
  (bf16), both DeepSpeed config keys (defaults 1e9 and 5e8);
* a fixed allowance for the CUDA context and NCCL's buffers
  (``runtime_overhead_gb``).

A stage fits when the total stays under ``usable_fraction`` of the GPU's
memory: the rest is left to allocator fragmentation and what the terms miss.

Without activation checkpointing every layer keeps its working set.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from transformers import AutoConfig

from topology.cost import LLAMA3_8B, ModelShape
from topology.errors import ConfigError
from topology.network.model import GpuSpec
from trainer.config import ModelConfig
from trainer.model.hf_config import tiny_config
from trainer.model.loss import LOGITS_CHUNK_BYTES

BF16, FP32 = 2, 4
GB = 1e9

DEEPSPEED_ZERO3_DEFAULTS = {"stage3_max_live_parameters": 1_000_000_000, "reduce_bucket_size": 500_000_000}
"""DeepSpeed 0.19's defaults for the ZeRO-3 buffer sizes (``zero_optimization`` keys)."""


@dataclass(frozen=True)
class MemoryAssumptions:
    """What the estimate assumes about the trainer and the runtime."""

    activation_checkpointing: bool = True
    """Checkpoint each decoder layer's input and recompute the layer in backward."""
    loss_chunk_bytes: int | None = LOGITS_CHUNK_BYTES
    """fp32 logits bytes the loss makes at once (the trainer's chunk); None: all of a GPU's tokens at once."""
    runtime_overhead_gb: float = 1.5
    """CUDA context and NCCL buffers."""
    usable_fraction: float = 0.9
    """Share of the GPU's memory the estimate may fill; the rest covers fragmentation and misses."""


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes per GPU, term by term, against the GPU's memory."""

    weights: float
    grads: float
    optimizer: float
    checkpoints: float
    layer_working: float
    ring_buffers: float
    logits: float
    zero_buffers: float
    overhead: float
    capacity: float
    """The GPU's memory in bytes."""
    usable: float
    """The part of ``capacity`` a stage may plan to fill."""

    TERMS = ("weights", "grads", "optimizer", "checkpoints", "layer_working", "ring_buffers", "logits", "zero_buffers", "overhead")
    LABELS = {
        "weights": "weights (bf16, ZeRO-3)",
        "grads": "gradients (bf16, ZeRO-3)",
        "optimizer": "optimizer (fp32 + Adam)",
        "checkpoints": "layer checkpoints",
        "layer_working": "layer recompute",
        "ring_buffers": "ring buffers",
        "logits": "logits + loss",
        "zero_buffers": "ZeRO-3 buffers",
        "overhead": "CUDA/NCCL overhead",
    }

    @property
    def total(self) -> float:
        return sum(getattr(self, t) for t in self.TERMS)

    @property
    def fits(self) -> bool:
        return self.total <= self.usable

    @property
    def fraction(self) -> float:
        return self.total / self.capacity

    def to_dict(self) -> dict[str, float]:
        out = {f.name: getattr(self, f.name) for f in fields(self)}
        out["total"] = self.total
        return out


def intermediate_size(model: Any) -> int:
    """MLP width: the model's ``intermediate`` if it has one, else solved from the parameter count.

    A Llama layer holds ``h*q + 2*h*kv + q*h`` attention, ``3*h*I`` MLP and
    ``2h`` norm parameters; the untied embedding and LM head ``2*V*h``, the
    final norm ``h``. Llama-3-8B (8.03e9) gives 14336.
    """
    given = getattr(model, "intermediate", None) or getattr(model, "intermediate_size", None)
    if given:
        return int(given)
    h, q, kv = model.hidden, model.n_q_heads * model.head_dim, model.n_kv_heads * model.head_dim
    per_layer_rest = 2 * h * q + 2 * h * kv + 2 * h
    mlp = (model.params - 2 * model.vocab * h - h) / model.layers - per_layer_rest
    return max(1, round(mlp / (3 * h)))


def layer_saved_bytes(model: Any) -> int:
    """Bytes per token that autograd saves for one HF Llama decoder layer in bf16 (weights excluded)."""
    h, q, kv, inter = model.hidden, model.n_q_heads * model.head_dim, model.n_kv_heads * model.head_dim, intermediate_size(model)
    norms = 2 * (FP32 * h + BF16 * h + BF16 * h + FP32)  # fp32 input, normalised, scaled (the next linear's input), rstd
    attention = BF16 * (2 * q + 2 * kv) + FP32 * model.n_q_heads + 2 * BF16 * model.head_dim  # q, out, k, v, lse, cos/sin
    mlp = BF16 * 4 * inter  # gate, up, act(gate), act(gate) * up
    return norms + attention + mlp


def estimate_memory(
    model: Any,
    seq_len: int,
    gpus: int,
    cp: int,
    ulysses: int = 1,
    gpu: GpuSpec = GpuSpec(),
    deepspeed: dict[str, Any] | None = None,
    assumptions: MemoryAssumptions = MemoryAssumptions(),
) -> MemoryEstimate:
    """Peak memory per GPU of one training step.

    Parameters
    ----------
    model : ModelShape
        ``layers, hidden, n_q_heads, n_kv_heads, head_dim, vocab, params`` (``topology.cost``).
    seq_len : int
        Tokens of one sequence.
    gpus : int
        World size; ZeRO-3 shards model states over all of it.
    cp : int
        GPUs per sequence (ring x ulysses); each holds ``seq_len / cp`` tokens.
    ulysses : int
        Ulysses degree inside ``cp``.
    gpu : GpuSpec
        Gives the capacity (``memory_gb``).
    deepspeed : dict, optional
        DeepSpeed config; its ``zero_optimization`` bucket sizes replace the defaults.
    assumptions : MemoryAssumptions

    Returns
    -------
    MemoryEstimate
        Bytes per term; ``total``, ``fraction`` of ``gpu.memory_gb``, and whether it ``fits``.

    Raises
    ------
    ConfigError
        If ``cp`` does not divide ``gpus`` or ``seq_len``.

    Examples
    --------
    >>> from types import SimpleNamespace as NS
    >>> tiny = NS(layers=1, hidden=8, n_q_heads=2, n_kv_heads=1, head_dim=4, vocab=16, params=10_000)
    >>> m = estimate_memory(tiny, seq_len=64, gpus=4, cp=2)
    >>> m.weights, m.optimizer, m.checkpoints
    (5000.0, 30000.0, 512.0)
    """
    if cp < 1 or gpus % cp or seq_len % cp or cp % ulysses:
        raise ConfigError(f"ring size {cp} must divide gpus ({gpus}) and seq_len ({seq_len}), and ulysses ({ulysses}) must divide it")
    zero = {**DEEPSPEED_ZERO3_DEFAULTS, **((deepspeed or {}).get("zero_optimization") or {})}
    p, c = float(model.params), seq_len // cp
    h, q, kv = model.hidden, model.n_q_heads * model.head_dim, model.n_kv_heads * model.head_dim
    layer = c * (layer_saved_bytes(model) + BF16 * 2 * intermediate_size(model))
    if assumptions.activation_checkpointing:
        checkpoints, working = c * h * BF16 * model.layers, layer
    else:
        checkpoints, working = 0.0, layer * model.layers
    ring = 0.0
    if cp // ulysses > 1:
        ring = c * kv * (2 * 2 * BF16 + 2 * 2 * FP32) + c * (q + model.n_q_heads) * FP32
    if ulysses > 1:
        ring += c * (2 * q + 2 * kv) * BF16
    chunk = assumptions.loss_chunk_bytes
    loss_tokens = min(c, max(1, chunk // (FP32 * model.vocab))) if chunk else c
    live = min(float(zero["stage3_max_live_parameters"]), p)
    return MemoryEstimate(
        weights=BF16 * p / gpus,
        grads=BF16 * p / gpus,
        optimizer=3 * FP32 * p / gpus,
        checkpoints=float(checkpoints),
        layer_working=float(working),
        ring_buffers=float(ring),
        logits=float(loss_tokens * model.vocab * (BF16 + 3 * FP32)),
        zero_buffers=BF16 * (live + min(float(zero["reduce_bucket_size"]), p)),
        overhead=assumptions.runtime_overhead_gb * GB,
        capacity=gpu.memory_gb * GB,
        usable=assumptions.usable_fraction * gpu.memory_gb * GB,
    )


CHECKPOINT_SHARD_BYTES = 5e9
"""Size of one safetensors file of an HF checkpoint (``save_pretrained``'s default ``max_shard_size``)."""


def startup_host_bytes(params: float, ranks_per_host: int, world: int, zero3: bool,
                       shard_bytes: float = CHECKPOINT_SHARD_BYTES) -> float:
    """Host memory one host needs while its ranks build the model (bf16 weights).

    * Built whole (below ZeRO-3): every rank holds all weights before
      DeepSpeed partitions them, ``ranks_per_host * 2P``.
    * Built into ZeRO-3 partitions (``trainer.engine.zero3_construction``):
      each rank allocates its partition only, ``2P/N``, while the checkpoint
      is read one file at a time through memory maps whose pages the host's
      ranks share: ``min(shard, 2P) + ranks_per_host * 2P/N``.

    >>> round(startup_host_bytes(8.03e9, 8, 8, zero3=False) / 1e9)  # Llama-3-8B, one g6e host, built whole
    128
    >>> round(startup_host_bytes(8.03e9, 8, 8, zero3=True) / 1e9)  # the same, built into partitions
    21
    """
    weights = BF16 * float(params)
    if not zero3:
        return ranks_per_host * weights
    return min(shard_bytes, weights) + ranks_per_host * weights / world


def cpu_state_bytes(params: float, ranks_per_host: int, world: int, zero_stage: int) -> float:
    """Host memory the ranks of one host hold while they train on CPU slots (fp32, Adam).

    Weights, gradients and the two moments take 4, 4 and 8 bytes a
    parameter; ZeRO partitions them over the world from its stage on
    (1: the moments; 2: the gradients too; 3: the weights too).

    >>> round(cpu_state_bytes(1e9, 2, 2, zero_stage=3) / 1e9)  # 1B parameters, both ranks on one host
    16
    >>> round(cpu_state_bytes(1e9, 2, 2, zero_stage=0) / 1e9)
    32
    """
    p = float(params)
    per_rank = sum(FP32 * k * p / (world if zero_stage >= stage else 1) for k, stage in ((1, 3), (1, 2), (2, 1)))
    return ranks_per_host * per_rank


@dataclass(frozen=True)
class LlamaShape(ModelShape):
    """A ModelShape that also knows its MLP width (tiny and local models need not follow Llama-3-8B's)."""

    intermediate: int = 0


def model_shape(model_cfg: ModelConfig) -> tuple[ModelShape, str]:
    """The shape of the recipe's model without downloading anything, and where it came from.

    A tiny config or a local directory's ``config.json`` is read; a hub name is
    looked up in the local HF cache only; Llama-3-8B's shape is the fallback
    (the recipes this project ships start from it).
    """
    if model_cfg.tiny is not None:
        return _shape(tiny_config(model_cfg.tiny), "tiny"), "the recipe's tiny config"
    try:
        config = AutoConfig.from_pretrained(model_cfg.path, local_files_only=True)
    except (OSError, ValueError):
        return LLAMA3_8B, f"{model_cfg.path}: config not available offline, assuming Llama-3-8B"
    return _shape(config, Path(model_cfg.path).name), f"{model_cfg.path}/config.json"


def _shape(config: Any, name: str) -> LlamaShape:
    h, layers, inter, vocab = config.hidden_size, config.num_hidden_layers, config.intermediate_size, config.vocab_size
    n_q = config.num_attention_heads
    n_kv = getattr(config, "num_key_value_heads", None) or n_q
    d = getattr(config, "head_dim", None) or h // n_q
    per_layer = h * n_q * d + 2 * h * n_kv * d + n_q * d * h + 3 * h * inter + 2 * h
    embeddings = vocab * h * (1 if getattr(config, "tie_word_embeddings", False) else 2)
    return LlamaShape(name=name, layers=layers, hidden=h, n_q_heads=n_q, n_kv_heads=n_kv, head_dim=d, vocab=vocab,
                      params=embeddings + layers * per_layer + h, intermediate=inter)
