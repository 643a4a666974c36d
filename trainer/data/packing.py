"""Training samples of one fixed length, packed from a token store's index.

Long-context data recipes (SlimPajama packing with per-length upsampling, as
in Fu et al. 2024, "Data Engineering for Scaling Language Models to 128K
Context") build every sample by concatenating whole documents, each closed
by EOS, into one token stream and cutting it into ``seq_len + 1`` token
windows: inputs are a window's first ``seq_len`` tokens and labels its last
``seq_len``, so labels are shifted on the whole sequence before any
context-parallel sharding and no label is lost at a shard boundary.

The stream is never built. Its layout (which document copy starts where)
comes from the document lengths alone; a sample reads only the documents
its window overlaps, from the store's memory-mapped shards.

* Documents longer than ``long_doc_tokens`` are repeated (``upsample_factor``)
  so long-range dependencies are seen more often, and no two copies of one
  document ever share a window (``spread_copies``): a model that sees a
  passage twice in one context can learn to copy instead of to predict.
* Chat conversations carry a learned mask; labels are ``-100`` except on
  assistant tokens.
* With ``whole_documents``, a document that fits in a sample is never cut
  across two: the stream gets padding (unlearned) at the end of a sample
  instead, and documents just behind in the order fill what they can of it.

Sample ``i`` is a pure function of ``(store, data options, seed, i)``: a
resumed run reading sample ``i`` gets the same tokens as an uninterrupted
one. Indices past one epoch wrap around with a fresh permutation per epoch.
"""

from __future__ import annotations

import itertools
import math
from collections import deque
from dataclasses import dataclass

import numpy as np
import torch

from topology.errors import ConfigError
from trainer.attention.zigzag import IGNORE_INDEX
from trainer.config import DataConfig
from trainer.data.store import TokenStore

MAX_UPSAMPLE = 4
"""Most copies of one long document in a pass over the corpus."""
LOOKAHEAD = 64
"""Documents ``place_whole_documents`` looks ahead in the order for one that fits a sample's rest."""
PAD_ID = 0
"""Token of the padding after the last document of a sample (never learned, never attended
to by a document: it only ever follows them)."""


def upsample_factor(n_tokens: int, long_doc_tokens: int) -> int:
    """Copies of a document in one pass: ``ceil(n / long_doc_tokens)`` for long ones, at most ``MAX_UPSAMPLE``.

    >>> [upsample_factor(n, 4096) for n in (100, 4096, 4097, 10_000, 10**6)]
    [1, 1, 2, 3, 4]
    """
    return 1 if n_tokens <= long_doc_tokens else min(MAX_UPSAMPLE, math.ceil(n_tokens / long_doc_tokens))


def upsample_factors(lengths: np.ndarray, data_cfg: DataConfig) -> np.ndarray:
    """``upsample_factor`` of every document (all 1 for chat or with ``upsample_long`` off)."""
    if data_cfg.kind == "chat" or not data_cfg.upsample_long:
        return np.ones(len(lengths), dtype=np.int64)
    return np.clip(-(-lengths // data_cfg.long_doc_tokens), 1, MAX_UPSAMPLE).astype(np.int64)


def sample_index(step: int, micro: int, dp_rank: int, dp: int, grad_accum: int) -> int:
    """Which sample a data-parallel rank reads at (optimizer step, micro-step).

    The global batch of step ``k`` is samples ``k*A*D .. (k+1)*A*D - 1`` for any
    split of it into ``A`` accumulation micro-steps of ``D`` rings, so plans
    that differ only in that split train on the same data.
    """
    return (step * grad_accum + micro) * dp + dp_rank


def spread_copies(order: np.ndarray, lengths: np.ndarray, window: int) -> tuple[np.ndarray, int]:
    """Reorder ``order`` so no window of the stream holds two copies of one document.

    Parameters
    ----------
    order
        Document numbers in stream order (a shuffled pass; long documents
        appear several times).
    lengths
        Tokens per document number.
    window
        Stream tokens per sample (``seq_len + 1``); windows start at multiples of it.

    Returns
    -------
    order, dropped
        The new order and how many copies were left out because no place
        was left for them at the end of the pass.

    Notes
    -----
    Greedy and stable: walk the order; a copy whose previous copy ends in
    the window where it would start waits, and every placement retries the
    waiting copies first, in order. Only documents with several copies are
    tracked. ``O(n * w)`` for ``w`` copies waiting at once (few: copies are
    a small share of a shuffled pass).

    >>> spread_copies(np.array([0, 0, 1, 2]), np.array([3, 3, 3]), window=4)
    (array([0, 1, 0, 2]), 0)
    """
    counts = np.bincount(order, minlength=len(lengths))
    if counts.max(initial=0) < 2:
        return order, 0
    repeated = counts > 1
    last_window: dict[int, int] = {}
    out: list[int] = []
    waiting: list[int] = []
    pos = 0

    def place(d: int) -> None:
        nonlocal pos
        out.append(d)
        pos += int(lengths[d])
        if repeated[d]:
            last_window[d] = (pos - 1) // window

    for d in order.tolist():
        if not waiting and last_window.get(d, -1) < pos // window:
            place(d)
            continue
        waiting.append(d)
        i = 0
        while i < len(waiting):
            if last_window.get(waiting[i], -1) < pos // window:
                place(waiting.pop(i))
                i = 0
            else:
                i += 1
    return np.asarray(out, dtype=order.dtype), len(waiting)


def place_whole_documents(order: np.ndarray, lengths: np.ndarray, window: int,
                          repeated: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Stream positions at which no document that fits in a window is cut by a window boundary.

    Parameters
    ----------
    order
        Document numbers in stream order.
    lengths
        Tokens per document number.
    window
        Stream tokens per sample (``seq_len + 1``); windows start at multiples of it.
    repeated
        Per document number, whether it has several copies in a pass: no window
        may then hold two of them (as ``spread_copies`` keeps it).

    Returns
    -------
    order, starts
        The documents in their new order and where each starts.

    Notes
    -----
    Greedy: the first of the next ``LOOKAHEAD`` documents that fits in the
    window's rest goes next; when none fits, the rest is padding. A document
    longer than a window starts at a window's start, and a fresh window always
    takes the next document (a copy's window is behind it), so every document
    is placed. Linear in the documents for a fixed look-ahead; the padding is
    small when documents are short next to the window and about half a
    document per window when they are not.

    >>> place_whole_documents(np.array([0, 1, 2]), np.array([3, 3, 1]), window=4)
    (array([0, 2, 1]), array([0, 3, 4]))
    """
    pending = deque(order.tolist())
    out: list[int] = []
    starts: list[int] = []
    last_window: dict[int, int] = {}
    pos = 0
    while pending:
        room, here = window - pos % window, pos // window
        i = next((k for k, d in enumerate(itertools.islice(pending, LOOKAHEAD))
                  if (lengths[d] <= room or room == window) and last_window.get(d, -1) < here), None)
        if i is None:  # nothing fits: the rest of this window is padding
            pos += room
            continue
        d = pending[i]
        del pending[i]
        out.append(d)
        starts.append(pos)
        pos += int(lengths[d])
        if repeated is not None and repeated[d]:
            last_window[d] = (pos - 1) // window
    return np.asarray(out, dtype=order.dtype), np.asarray(starts, dtype=np.int64)


def stream_layout(lengths: np.ndarray, data_cfg: DataConfig, seq_len: int,
                  seed: int) -> tuple[np.ndarray, np.ndarray, int, int]:
    """Document order of the stream, where each document starts, the sample-order seed and the copies dropped.

    Documents are ordered by a permutation seeded by ``(data_cfg.seed, seed)``;
    when one pass holds less than a sample, passes repeat (new order each),
    and only then can one window hold a document twice.
    """
    pool = np.repeat(np.arange(len(lengths)), upsample_factors(lengths, data_cfg))
    total = int(lengths[pool].sum())
    window = seq_len + 1
    passes = max(1, math.ceil(window / max(total, 1)))
    rng = np.random.default_rng([data_cfg.seed, seed])
    if data_cfg.whole_documents:
        perms = np.concatenate([rng.permutation(pool) for _ in range(passes)])
        order, starts = place_whole_documents(perms, lengths, window, np.bincount(pool, minlength=len(lengths)) > 1)
        return order, starts, int(rng.integers(1 << 31)), 0
    parts, dropped = [], 0
    for _ in range(passes):
        part, lost = spread_copies(rng.permutation(pool), lengths, window)
        parts.append(part)
        dropped += lost
    order = np.concatenate(parts)
    ends = np.cumsum(lengths[order])
    return order, ends - lengths[order], int(rng.integers(1 << 31)), dropped


class PackedDataset:
    """Samples of ``seq_len`` tokens cut from the packed stream of a ``TokenStore``.

    Each sample is a dict of int64 ``[seq_len]`` tensors: ``input_ids``,
    ``labels`` (next tokens; ``-100`` where not learned) and ``doc_ids``
    (for each input token, the number of its document within the sample,
    0 for the first, non-decreasing; a document cut at the sample's start is 0).
    """

    def __init__(self, store: TokenStore, seq_len: int, data_cfg: DataConfig, seed: int = 0) -> None:
        self.store, self.seq_len = store, seq_len
        lengths = store.lengths
        self.order, self.starts, self.seed, self.dropped_copies = stream_layout(lengths, data_cfg, seq_len, seed)
        self.ends = self.starts + lengths[self.order]
        total = int(self.ends[-1]) if len(self.ends) else 0
        self.num_samples = total // (seq_len + 1)
        if self.num_samples < 1:
            raise ConfigError(f"data holds {total} tokens, fewer than one sample of {seq_len + 1}; add documents or shorten the stage")
        self._order: tuple[int, np.ndarray] | None = None

    def __len__(self) -> int:
        """Samples in one epoch; indices beyond it wrap around in a new order."""
        return self.num_samples

    @property
    def stream_tokens(self) -> int:
        return int(self.ends[-1])

    def window(self, j: int) -> tuple[np.ndarray, np.ndarray | None, np.ndarray]:
        """Tokens, learned mask (chat, padding) and document number of stream window ``j`` (``seq_len + 1`` tokens).

        Padding (only ever at a window's end, with ``whole_documents``) is a document of its own, never learned.
        """
        size = self.seq_len + 1
        a, b = j * size, (j + 1) * size
        first = int(np.searchsorted(self.ends, a, side="right"))
        last = int(np.searchsorted(self.starts, b, side="left")) - 1
        tokens = np.full(size, PAD_ID, dtype=np.int64)
        learn = np.zeros(size, dtype=np.bool_)
        docs = np.full(size, max(last - first + 1, 0), dtype=np.int64)
        for k in range(first, last + 1):
            start = int(self.starts[k])
            lo, hi = max(a, start) - start, min(b, int(self.ends[k])) - start
            ids, mask = self.store.read(int(self.order[k]), lo, hi)
            at = start + lo - a
            tokens[at:at + hi - lo] = ids
            learn[at:at + hi - lo] = True if mask is None else mask
            docs[at:at + hi - lo] = k - first
        padded = int(self.ends[last]) < b if last >= first else True
        return tokens, learn if (self.store.has_learn or padded) else None, docs

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        """``input_ids``, ``labels`` and ``doc_ids`` (all ``[seq_len]``) of sample ``index >= 0``."""
        epoch, i = divmod(int(index), self.num_samples)
        tokens, learn, docs = self.window(int(self._epoch_order(epoch)[i]))
        piece = torch.from_numpy(tokens)
        labels = piece[1:].clone()
        if learn is not None:
            labels[~torch.from_numpy(learn[1:])] = IGNORE_INDEX
        return {"input_ids": piece[:-1].clone(), "labels": labels, "doc_ids": torch.from_numpy(docs[:-1].copy())}

    def _epoch_order(self, epoch: int) -> np.ndarray:
        """The sample order of one epoch, kept for the next call (a step reads consecutive samples)."""
        if self._order is None or self._order[0] != epoch:
            self._order = (epoch, np.random.default_rng([self.seed, epoch]).permutation(self.num_samples))
        return self._order[1]


@dataclass(frozen=True)
class StreamStats:
    """What packing a store for one stage yields, from its index alone (for the dry run)."""

    documents: int
    stream_tokens: int
    """Tokens of one pass with long documents upsampled."""
    long_documents: int
    """Documents longer than a quarter of the sequence length."""
    long_share: float
    """Share of the stream's (so of an average sample's) tokens from those documents."""


def stream_stats(lengths: np.ndarray, data_cfg: DataConfig, seq_len: int) -> StreamStats:
    lengths = np.asarray(lengths, dtype=np.int64)
    copies = lengths * upsample_factors(lengths, data_cfg)
    long = lengths > seq_len // 4
    total = int(copies.sum())
    return StreamStats(len(lengths), total, int(long.sum()), float(copies[long].sum() / total) if total else 0.0)
