"""Training samples of one fixed length, packed from local documents.

Long-context data recipes (SlimPajama packing with per-length upsampling, as
in Fu et al. 2024, "Data Engineering for Scaling Language Models to 128K
Context") build every sample by concatenating whole documents, each closed
by EOS, into one token stream and cutting it into ``seq_len + 1`` token
pieces: inputs are a piece's first ``seq_len`` tokens and labels its last
``seq_len``, so labels are shifted on the whole sequence before any
context-parallel sharding and no label is lost at a shard boundary.

* ``pretrain``: documents from .txt files (one document per file), .jsonl
  (field ``text``) or .parquet (column ``text``). Documents longer than
  ``long_doc_tokens`` are repeated (``upsample_factor``) so long-range
  dependencies are seen more often.
* ``chat``: UltraChat-style records (field/column ``messages``: a list of
  ``{role, content}``) rendered by the tokenizer's chat template; labels are
  ``-100`` except on assistant turns, so only replies are learned.

Sample ``i`` is a pure function of ``(documents, seed, i)``: a resumed run
reading sample ``i`` gets the same tokens as an uninterrupted one. Indices
past one epoch wrap around with a fresh permutation per epoch.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import PreTrainedTokenizerBase

from topology.errors import ConfigError
from trainer.config import DataConfig
from trainer.attention.zigzag import IGNORE_INDEX

SUFFIXES = (".txt", ".jsonl", ".parquet")
MAX_UPSAMPLE = 4
"""Most copies of one long document in a pass over the corpus."""


def upsample_factor(n_tokens: int, long_doc_tokens: int) -> int:
    """Copies of a document in one pass: ``ceil(n / long_doc_tokens)`` for long ones, at most ``MAX_UPSAMPLE``.

    >>> [upsample_factor(n, 4096) for n in (100, 4096, 4097, 10_000, 10**6)]
    [1, 1, 2, 3, 4]
    """
    return 1 if n_tokens <= long_doc_tokens else min(MAX_UPSAMPLE, math.ceil(n_tokens / long_doc_tokens))


def sample_index(step: int, micro: int, dp_rank: int, dp: int, grad_accum: int) -> int:
    """Which sample a data-parallel rank reads at (optimizer step, micro-step).

    The global batch of step ``k`` is samples ``k*A*D .. (k+1)*A*D - 1`` for any
    split of it into ``A`` accumulation micro-steps of ``D`` rings, so plans
    that differ only in that split train on the same data.
    """
    return (step * grad_accum + micro) * dp + dp_rank


def read_documents(path: str | Path, kind: str = "pretrain") -> list[Any]:
    """Documents (strings) or conversations (message lists) under ``path``, in file-name order.

    A directory contributes its top-level files with a known suffix.
    """
    root = Path(path)
    if not root.exists():
        raise ConfigError(f"data.path {str(path)!r} does not exist; point it at a directory or file of documents")
    files = sorted(p for p in root.iterdir() if p.is_file() and p.suffix in SUFFIXES) if root.is_dir() else [root]
    field = "messages" if kind == "chat" else "text"
    docs: list[Any] = []
    for f in files:
        if f.suffix == ".txt" and kind == "pretrain":
            docs.append(f.read_text(encoding="utf-8"))
        elif f.suffix == ".jsonl":
            for n, line in enumerate(f.read_text(encoding="utf-8").splitlines(), 1):
                if line.strip():
                    docs.append(_field(_json(line, f, n), field, f"{f}:{n}"))
        elif f.suffix == ".parquet":
            docs.extend(_parquet(f, field))
        elif f.suffix not in SUFFIXES:
            raise ConfigError(f"data.path {str(f)!r}: unknown file type; use .txt, .jsonl or .parquet")
    if kind == "chat":
        for i, conv in enumerate(docs):
            _check_conversation(conv, f"{path} (conversation {i})")
    if not docs:
        raise ConfigError(f"data.path {str(path)!r} holds no {kind} documents ({', '.join(SUFFIXES)}"
                          f"{'' if kind == 'pretrain' else ' with messages'})")
    return docs


def _json(line: str, f: Path, n: int) -> Any:
    try:
        return json.loads(line)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{f}:{n}: not valid JSON ({exc.msg})") from None


def _field(record: Any, field: str, where: str) -> Any:
    if not isinstance(record, dict) or field not in record:
        raise ConfigError(f"{where}: record has no {field!r} field; pretrain data needs 'text', chat data 'messages'")
    return record[field]


def _parquet(f: Path, field: str) -> list[Any]:
    import pyarrow.parquet as pq

    if field not in pq.read_schema(f).names:
        raise ConfigError(f"{f}: no {field!r} column; pretrain data needs 'text', chat data 'messages'")
    return pq.read_table(f, columns=[field]).column(field).to_pylist()


def _check_conversation(conv: Any, where: str) -> None:
    ok = isinstance(conv, list) and conv and all(
        isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str) for m in conv)
    if not ok:
        raise ConfigError(f"{where}: messages must be a non-empty list of {{role, content}} strings")


def document_tokens(tokenizer: PreTrainedTokenizerBase, texts: list[str]) -> list[list[int]]:
    """Each document as ``[BOS] + tokens + [EOS]`` (BOS only if the tokenizer has one)."""
    head = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    encoded = tokenizer(texts, add_special_tokens=False)["input_ids"]
    return [head + ids + [tokenizer.eos_token_id] for ids in encoded]


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


def _extend(ids: list[int], learn: list[bool], rendered: list[int], flag: bool) -> None:
    if rendered[:len(ids)] != ids:
        raise ConfigError("the chat template does not render a conversation's prefix as its prefix; "
                          "use a template like Llama-3's to build chat samples")
    learn.extend([flag] * (len(rendered) - len(ids)))
    ids.extend(rendered[len(ids):])


class PackedDataset:
    """Samples of ``seq_len`` tokens cut from one shuffled token stream.

    Parameters
    ----------
    tokens
        The stream (documents already ordered, each closed by EOS).
    seq_len
        Tokens per sample; each sample reads ``seq_len + 1`` stream tokens.
    learn
        Per stream token: whether predicting it carries loss (None: all do).
    seed
        Orders samples within each epoch.
    """

    def __init__(self, tokens: np.ndarray, seq_len: int, learn: np.ndarray | None = None, seed: int = 0) -> None:
        self.seq_len = seq_len
        self.seed = seed
        self.num_samples = len(tokens) // (seq_len + 1)
        if self.num_samples < 1:
            raise ConfigError(f"data holds {len(tokens)} tokens, fewer than one sample of {seq_len + 1}; add documents or shorten the stage")
        self.tokens = torch.from_numpy(np.asarray(tokens, dtype=np.int64))
        self.learn = None if learn is None else torch.from_numpy(np.asarray(learn, dtype=np.bool_))
        self._order: tuple[int, np.ndarray] | None = None

    def __len__(self) -> int:
        """Samples in one epoch; indices beyond it wrap around in a new order."""
        return self.num_samples

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        """``input_ids`` and ``labels`` (both ``[seq_len]``) of sample ``index >= 0``."""
        epoch, i = divmod(int(index), self.num_samples)
        j = int(self._epoch_order(epoch)[i])
        start = j * (self.seq_len + 1)
        piece = self.tokens[start:start + self.seq_len + 1]
        labels = piece[1:].clone()
        if self.learn is not None:
            labels[~self.learn[start + 1:start + self.seq_len + 1]] = IGNORE_INDEX
        return {"input_ids": piece[:-1].clone(), "labels": labels}

    def _epoch_order(self, epoch: int) -> np.ndarray:
        """The sample order of one epoch, kept for the next call (a step reads consecutive samples)."""
        if self._order is None or self._order[0] != epoch:
            self._order = (epoch, np.random.default_rng([self.seed, epoch]).permutation(self.num_samples))
        return self._order[1]


def build_dataset(data_cfg: DataConfig, tokenizer: PreTrainedTokenizerBase, seq_len: int, seed: int = 0) -> PackedDataset:
    """The stage's dataset from ``data_cfg`` (see the module docstring).

    Documents are ordered by a permutation seeded by ``(data_cfg.seed, seed)``;
    when one pass holds less than a sample, passes repeat (new order each).
    """
    if data_cfg.synthetic is not None:
        from trainer.synthetic import synthetic_documents

        docs = synthetic_documents(data_cfg.synthetic)
    else:
        docs = read_documents(data_cfg.path, data_cfg.kind)
    if data_cfg.kind == "chat":
        pieces = [conversation_tokens(tokenizer, conv) for conv in docs]
        repeats = [1] * len(pieces)
    else:
        pieces = [(ids, None) for ids in document_tokens(tokenizer, docs)]
        repeats = [upsample_factor(len(ids), data_cfg.long_doc_tokens) if data_cfg.upsample_long else 1 for ids, _ in pieces]
    pool = np.repeat(np.arange(len(pieces)), repeats)
    total = sum(len(pieces[i][0]) for i in pool)
    passes = max(1, math.ceil((seq_len + 1) / total))
    rng = np.random.default_rng([data_cfg.seed, seed])
    order = np.concatenate([rng.permutation(pool) for _ in range(passes)])
    tokens = np.concatenate([np.asarray(pieces[i][0], dtype=np.int64) for i in order])
    learn = None
    if data_cfg.kind == "chat":
        learn = np.concatenate([np.asarray(pieces[i][1], dtype=np.bool_) for i in order])
    return PackedDataset(tokens, seq_len, learn, seed=int(rng.integers(1 << 31)))
