"""Tokenizers: the user's (local directory or hub name) or a byte-level one built here.

A tiny model for demos and tests has no tokenizer of its own, and tests may
never download one, so ``byte_tokenizer()`` builds one locally with the
``tokenizers`` library: the 256 byte values plus Llama-3's special tokens and
a Llama-3 style chat template. It needs no training data, so every stage and
every rank builds the same one, and it round-trips any UTF-8 text exactly.
The stage saves it beside its HF checkpoint, so the next stage and the
needle-in-a-haystack evaluation load it from there like any other tokenizer.
"""

from __future__ import annotations

import logging
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast
from transformers.convert_slow_tokenizer import bytes_to_unicode

from topology.errors import ConfigError, first_line
from trainer.config import ModelConfig

log = logging.getLogger(__name__)

BOS, EOS, PAD = "<|begin_of_text|>", "<|end_of_text|>", "<|finetune_right_pad_id|>"
HEADER_START, HEADER_END, EOT = "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"
SPECIAL_TOKENS = [BOS, EOS, PAD, HEADER_START, HEADER_END, EOT]

CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] + '<|eot_id|>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
"""Llama-3's layout: a header per turn, each turn closed by ``<|eot_id|>``."""


def byte_tokenizer() -> PreTrainedTokenizerFast:
    """A 262-token byte-level tokenizer: ids 0-255 are bytes, then the special tokens.

    Returns
    -------
    PreTrainedTokenizerFast
        With ``bos_token``, ``eos_token``, ``pad_token`` and a chat template;
        ``decode(encode(text)) == text`` for any string.
    """
    # GPT-2's printable stand-in for each byte (what ByteLevel emits); id == byte value.
    vocab = {symbol: byte for byte, symbol in bytes_to_unicode().items()}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(SPECIAL_TOKENS)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD,
                                   model_max_length=1 << 30, clean_up_tokenization_spaces=False)
    fast.chat_template = CHAT_TEMPLATE
    return fast


def load_tokenizer(model_cfg: ModelConfig, init_from: str | None = None) -> PreTrainedTokenizerBase:
    """The tokenizer a stage trains with.

    Order: the previous stage's checkpoint (``init_from``) when it holds one,
    then ``model.tokenizer``, then ``model.path``; a ``tiny`` model with
    neither gets ``byte_tokenizer()``.

    Raises
    ------
    ConfigError
        When a named tokenizer is neither a local directory nor a hub name
        that can be loaded (offline runs need it in the local cache).
    """
    if init_from and (Path(init_from) / "tokenizer_config.json").is_file():
        return tokenizer_by_name(init_from)
    return tokenizer_by_name(model_cfg.tokenizer or model_cfg.path)


def tokenizer_by_name(source: str | None) -> PreTrainedTokenizerBase:
    """The tokenizer at a local directory or hub name; ``None`` is ``byte_tokenizer()``.

    Raises
    ------
    ConfigError
        When ``source`` is neither a local directory nor a loadable hub name.
    """
    if source is None:
        return byte_tokenizer()
    local = Path(source).expanduser()
    if not local.exists() and source.startswith((".", "/", "~")):
        raise ConfigError(f"tokenizer path {source!r} does not exist; give a local directory or a hub name")
    try:
        tok = AutoTokenizer.from_pretrained(str(local) if local.exists() else source)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot load tokenizer {source!r} ({first_line(exc)}); give a local directory or a cached hub name") from None
    if tok.pad_token is None:
        # Llama-3 ships no pad token; padding positions carry no loss, so any id will do.
        tok.pad_token = tok.eos_token
    if tok.chat_template is None:
        log.info("tokenizer %s has no chat template; using the Llama-3 layout", source)
        tok.chat_template = CHAT_TEMPLATE
    return tok
