"""Documents to token ids: ``[BOS] + text + [EOS]``, or a conversation with its loss mask.

The same functions serve the in-process reader and the Ray Data prepare
step, so a prepared store holds exactly the tokens a rank would have made.
"""

from __future__ import annotations

import hashlib
from typing import Any

import numpy as np
from transformers import PreTrainedTokenizerBase

from topology.errors import ConfigError


def document_tokens(tokenizer: PreTrainedTokenizerBase, texts: list[str]) -> list[list[int]]:
    """Each document as ``[BOS] + tokens + [EOS]`` (BOS only if the tokenizer has one)."""
    head = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    encoded = tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else []
    return [head + ids + [tokenizer.eos_token_id] for ids in encoded]


def segment_tokens(tokenizer: PreTrainedTokenizerBase, segments: list[tuple[str, bool]]) -> tuple[list[int], list[bool]]:
    """``[BOS] + tokens + [EOS]`` of a document given as ``(text, learned)`` pieces, and which tokens are learned.

    Each piece is tokenised on its own, so a learned span never shares a token
    with the text around it (a byte tokenizer gives the same ids as the whole text).
    """
    ids = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    learn = [False] * len(ids)
    for text, learned in segments:
        piece = tokenizer(text, add_special_tokens=False)["input_ids"]
        ids += piece
        learn += [learned] * len(piece)
    return ids + [tokenizer.eos_token_id], learn + [False]


def conversation_tokens(tokenizer: PreTrainedTokenizerBase, messages: list[dict[str, str]]) -> tuple[list[int], list[bool]]:
    """Token ids of one conversation and which of them are assistant tokens (learned).

    Renders growing prefixes of the conversation with the chat template, so
    it works with any template that renders a prefix as a prefix (Llama-3's
    does); an assistant turn is what its message adds after the generation prompt.
    """
    def render(msgs: list[dict[str, str]], prompt: bool = False) -> list[int]:
        text = tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=prompt)
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    ids: list[int] = []
    learn: list[bool] = []
    for i, message in enumerate(messages):
        if message["role"] == "assistant":
            prompt = render(messages[:i], prompt=True)
            _extend(ids, learn, prompt, False)
        full = render(messages[:i + 1])
        _extend(ids, learn, full, message["role"] == "assistant")
    return ids, learn


def tokenize_documents(tokenizer: PreTrainedTokenizerBase, docs: list[Any], kind: str) -> list[tuple[np.ndarray, np.ndarray | None]]:
    """``(token ids uint32, learned-mask bool or None)`` per document of ``kind``.

    A pretrain document that is a list of ``(text, learned)`` pieces rather than
    a string (``trainer.data.synthetic`` with ``loss: answers``) carries its mask too.
    """
    if kind == "chat" or (docs and not isinstance(docs[0], str)):
        out = []
        for doc in docs:
            ids, learn = conversation_tokens(tokenizer, doc) if kind == "chat" else segment_tokens(tokenizer, doc)
            out.append((np.asarray(ids, dtype=np.uint32), np.asarray(learn, dtype=np.bool_)))
        return out
    return [(np.asarray(ids, dtype=np.uint32), None) for ids in document_tokens(tokenizer, docs)]


def tokenizer_fingerprint(tokenizer: PreTrainedTokenizerBase) -> str:
    """A hash of everything that decides token ids: vocabulary, merges, normalisation, special tokens, chat template."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    body = backend.to_str() if backend is not None else repr(sorted(tokenizer.get_vocab().items()))
    parts = [type(tokenizer).__name__, body, str(tokenizer.chat_template), str(tokenizer.bos_token_id), str(tokenizer.eos_token_id)]
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()[:16]


def _extend(ids: list[int], learn: list[bool], rendered: list[int], flag: bool) -> None:
    if rendered[:len(ids)] != ids:
        raise ConfigError("the chat template does not render a conversation's prefix as its prefix; "
                          "use a template like Llama-3's to build chat samples")
    learn.extend([flag] * (len(rendered) - len(ids)))
    ids.extend(rendered[len(ids):])
