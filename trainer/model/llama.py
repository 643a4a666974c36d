"""Build the stage's HF Llama: from the previous stage, from a pretrained model, or tiny and random.

Each stage of progressive training changes two settings of the model it
starts from: RoPE theta (``config.rope_parameters``) and the context length
(``max_position_embeddings``). Both are written into the config *before* the
model is built, because HF Llama computes its rotary inverse frequencies
``1 / theta^(2i/d)`` once, at construction, into a non-persistent buffer: a
checkpoint never carries them, so the new theta takes effect on load.

Under ZeRO-3 a pretrained model (or the previous stage's) is loaded inside
``trainer.engine.zero3_construction``: each rank allocates only its
partition of every parameter and the weights load straight into
partitions. Otherwise, and for a random tiny model, the model is built
whole on each rank and ``deepspeed.initialize`` partitions it.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedConfig, PreTrainedModel, PreTrainedTokenizerBase

from topology.errors import ConfigError, first_line
from topology.files import write_atomic
from trainer.config import ModelConfig
from trainer.engine import zero3_construction
from trainer.model.hf_config import check_sizes, check_vocab, tiny_config

log = logging.getLogger(__name__)


def set_rope(config: Any, rope_theta: float, seq_len: int, rope_parameters: dict[str, Any] | None = None) -> None:
    """Write a stage's theta and context length into an HF config (in place).

    The base model's RoPE type and parameters (e.g. ``llama3`` frequency
    scaling) stay as they are and the stage's theta is set within them;
    ``rope_parameters`` (the recipe's, given explicitly) replace them.
    """
    params = rope_parameters if rope_parameters is not None else getattr(config, "rope_parameters", None)
    params = dict(params or {})
    params.setdefault("rope_type", "default")
    params["rope_theta"] = float(rope_theta)
    config.rope_parameters = params
    config.max_position_embeddings = int(seq_len)


def legacy_rope_fields(rope_parameters: dict[str, Any]) -> dict[str, Any]:
    """``rope_theta`` and ``rope_scaling`` at the top level of config.json, for readers before ``rope_parameters``.

    transformers 4.x reads theta from ``rope_theta`` and the scaling from
    ``rope_scaling`` (None for plain RoPE); transformers 5 reads ``rope_scaling``
    with ``rope_theta`` as the same parameters, so both agree on the stage's theta.

    >>> legacy_rope_fields({"rope_type": "llama3", "factor": 8.0, "rope_theta": 1e6})
    {'rope_theta': 1000000.0, 'rope_scaling': {'rope_type': 'llama3', 'factor': 8.0}}
    >>> legacy_rope_fields({"rope_type": "default", "rope_theta": 1e6})
    {'rope_theta': 1000000.0, 'rope_scaling': None}
    """
    scaling = {k: v for k, v in rope_parameters.items() if k != "rope_theta"}
    return {"rope_theta": float(rope_parameters["rope_theta"]),
            "rope_scaling": None if scaling.get("rope_type", "default") == "default" else scaling}


def write_rope_compat(hf_dir: str | Path) -> None:
    """Add ``legacy_rope_fields`` to ``hf_dir/config.json`` (replaced atomically)."""
    path = Path(hf_dir) / "config.json"
    config = json.loads(path.read_text())
    config.update(legacy_rope_fields(config["rope_parameters"]))
    write_atomic(path, json.dumps(config, indent=2, sort_keys=True) + "\n")


def resolve_source(model_cfg: ModelConfig, init_from: str | None) -> str | None:
    """Directory or hub name the weights come from (None: a random tiny model); checks local paths."""
    if init_from is not None:
        if not (Path(init_from) / "config.json").is_file():
            raise ConfigError(f"init_from {init_from!r} holds no HF model (no config.json); run the previous stage first or fix the path")
        return init_from
    if model_cfg.path is None:
        return None
    path = Path(model_cfg.path).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise ConfigError(f"model.path {model_cfg.path!r} has no config.json; point it at an HF model directory")
        return str(path)
    if model_cfg.path.startswith((".", "/", "~")):
        raise ConfigError(f"model.path {model_cfg.path!r} does not exist; give a local directory or a hub name")
    return model_cfg.path


def build_model(model_cfg: ModelConfig, rope_theta: float, seq_len: int, init_from: str | None = None,
                tokenizer: PreTrainedTokenizerBase | None = None, seed: int = 0,
                dtype: torch.dtype = torch.float32, ds_config: dict[str, Any] | None = None) -> PreTrainedModel:
    """The model a stage trains.

    Parameters
    ----------
    model_cfg
        ``path`` (local directory or hub name) or ``tiny`` (LlamaConfig keyword arguments).
    rope_theta, seq_len
        The stage's RoPE theta and sequence length, written into the config.
    init_from
        The previous stage's HF directory; takes precedence over ``model_cfg``.
    tokenizer
        Fills a tiny config's missing ``vocab_size`` and its bos/eos/pad ids.
    seed
        Seeds the random weights of a tiny model.
    dtype
        Parameter dtype (bf16 on CUDA; fp32 on CPU).
    ds_config
        The stage's DeepSpeed config: under ZeRO-3 a pretrained model loads
        straight into partitions (``trainer.engine.zero3_construction``). A
        random tiny model is built whole, so its seed alone fixes its weights.

    Raises
    ------
    ConfigError
        A missing path, a model that cannot be loaded, or a tiny vocabulary
        smaller than the tokenizer's.
    """
    source = resolve_source(model_cfg, init_from)
    config = _config_from(source, model_cfg, tokenizer)
    set_rope(config, rope_theta, seq_len, model_cfg.rope_parameters)
    if source is None:
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    else:
        try:
            with zero3_construction(ds_config or {}):
                model = AutoModelForCausalLM.from_pretrained(source, config=config, dtype=dtype)
        except (OSError, ValueError) as exc:
            raise ConfigError(f"cannot load model {source!r} ({first_line(exc)}); give a local HF directory or a cached hub name") from None
    if tokenizer is not None:
        check_vocab(model.get_input_embeddings().num_embeddings, tokenizer)
    return model


def load_config(model_cfg: ModelConfig, init_from: str | None = None,
                tokenizer: PreTrainedTokenizerBase | None = None, local_only: bool = False) -> PreTrainedConfig:
    """The HF config the stage's model is built from (before the stage's RoPE settings).

    Cheap (no weights), so a stage reads it to check its shape before starting,
    and the launcher (``local_only``: a local directory or the local HF cache,
    no download) before Ray starts.
    """
    return _config_from(resolve_source(model_cfg, init_from), model_cfg, tokenizer, local_only)


def _config_from(source: str | None, model_cfg: ModelConfig, tokenizer: PreTrainedTokenizerBase | None,
                 local_only: bool = False) -> PreTrainedConfig:
    if source is None:
        return tiny_config(model_cfg.tiny or {}, tokenizer)
    try:
        config = AutoConfig.from_pretrained(source, local_files_only=local_only)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot load model config {source!r} ({first_line(exc)}); give a local HF directory "
                          "or a hub name in the local HF cache (huggingface-cli download NAME)") from None
    check_sizes(config, f"model {source!r}")
    return config


def enable_activation_checkpointing(model: PreTrainedModel) -> None:
    """Recompute every decoder layer in backward (torch's non-reentrant checkpoint).

    transformers 5.2x calls it ``activation_checkpointing_enable`` and keeps the
    old name ``gradient_checkpointing_enable`` as a deprecated alias until v6;
    earlier 5.x releases (5.17 among them) have only the old name.
    """
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def rotary_inv_freq(model: PreTrainedModel) -> torch.Tensor:
    """The rotary inverse frequencies the model actually uses (for checks)."""
    return model.model.rotary_emb.inv_freq
