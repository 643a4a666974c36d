"""HF model configs checked before anything is built: a recipe's ``model.tiny``, a loaded config's sizes.

The launcher's estimates (``ringleader run --dry-run``) and the rank that
builds the model read a tiny config through the same check, so a bad size
fails as one line wherever it is first read, never as a traceback from
inside transformers or a division by zero in an estimate.
"""

from __future__ import annotations

from typing import Any

from huggingface_hub.errors import StrictDataclassError
from transformers import LlamaConfig, PreTrainedTokenizerBase

from topology.errors import ConfigError

MODEL_SIZES = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
               "head_dim", "vocab_size")
"""Config fields that must be whole numbers >= 1; torch would fail on them only once a rank builds the model."""


def check_sizes(values: Any, where: str) -> None:
    """Raise a one-line ConfigError unless every size ``values`` has (a config or a mapping) is a whole number >= 1."""
    get = values.get if isinstance(values, dict) else lambda k: getattr(values, k, None)
    bad = [f"{k} is {v!r}" for k in MODEL_SIZES if (v := get(k)) is not None and (type(v) is not int or v < 1)]
    if bad:
        raise ConfigError(f"{where}: {', '.join(bad)}; sizes must be whole numbers >= 1")


def check_vocab(vocab_size: int, tokenizer: PreTrainedTokenizerBase) -> None:
    if vocab_size < len(tokenizer):
        raise ConfigError(f"model vocabulary ({vocab_size}) is smaller than the tokenizer's ({len(tokenizer)}); "
                          "raise vocab_size or use the model's own tokenizer")


def tiny_config(kwargs: Any, tokenizer: PreTrainedTokenizerBase | None = None) -> LlamaConfig:
    """A recipe's ``model.tiny`` as a LlamaConfig (vocabulary and special tokens from ``tokenizer`` when given)."""
    if not isinstance(kwargs, dict):
        raise ConfigError(f"model.tiny is {kwargs!r}; give LlamaConfig's keyword arguments as a mapping")
    kwargs = dict(kwargs)
    if tokenizer is not None:
        kwargs.setdefault("vocab_size", len(tokenizer))
        kwargs.setdefault("bos_token_id", tokenizer.bos_token_id)
        kwargs.setdefault("eos_token_id", tokenizer.eos_token_id)
        kwargs.setdefault("pad_token_id", tokenizer.pad_token_id)
    check_sizes(kwargs, "model.tiny")  # before LlamaConfig, which divides by some of them
    if tokenizer is not None:
        check_vocab(kwargs["vocab_size"], tokenizer)
    try:
        config = LlamaConfig(**kwargs)
    except (TypeError, ValueError, ArithmeticError, StrictDataclassError) as exc:
        reason = " ".join(line.strip() for line in str(exc).splitlines() if line.strip())
        raise ConfigError(f"model.tiny is not a valid LlamaConfig ({reason})") from None
    check_sizes(config, "model.tiny")  # the sizes LlamaConfig derives (head_dim) too
    return config

