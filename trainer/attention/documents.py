"""Document masks for packed samples, and the blocks each zigzag ring step computes under them.

A packed sample concatenates whole documents. With a document mask a token
attends only to earlier tokens of its own document (block-diagonal causal
attention, the Llama 3 pretraining practice); without one it attends to every
earlier token of the sample. ``Documents`` holds the boundaries as
``cu_seqlens`` (flash-attention's name): document ``i`` of batch element
``b`` covers global positions ``[cu_seqlens[b][i], cu_seqlens[b][i+1])``.

Two layouts place the tokens on the ring (``Documents.layout``):

* ``document`` (the default): every document zigzagged on its own
  (``trainer.attention.doc_zigzag``), which keeps the work balanced across
  ring ranks under any mix of document lengths;
* ``sequence``: the whole-sequence zigzag sharding of unmasked attention
  (``trainer.attention.zigzag``), kept for comparison; the rest of this
  docstring describes its schedule.

Under ``sequence``, ring rank ``r`` holds chunks ``r`` and ``2R-1-r`` of
``2R``. Documents are contiguous in positions and a rank's
buffer is sorted by position, so each document's local tokens are one
contiguous run of the buffer (a document present in both chunks covers the
end of the first and the start of the second). That gives the ring schedule's
three kinds of step a simple form (``step_blocks``):

* step 0, the local block: one causal square per document present;
* a block from a lower ring rank (its first chunk precedes both of ours, its
  second follows them): only a document that starts in that chunk and reaches
  into ours is shared, so at most one dense rectangle, or nothing;
* a block from a higher ring rank (both its chunks lie between ours): only the
  document that runs into our second chunk from before it, so again at most
  one dense rectangle, or nothing.

Blocks with nothing to attend are skipped: with many short documents, most
off-diagonal steps compute nothing while their K/V still pass on. One
document covering the sample reproduces plain causal zigzag ring attention
exactly (one square, then full half-blocks), so both cases run the same code.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field
from typing import Literal, NamedTuple

import numpy as np
import torch

from trainer.attention.zigzag import check_seq_len, zigzag_indices


class Block(NamedTuple):
    """One dense attention block of a ring step: local query rows ``q`` against rows ``k`` of the K/V block held.

    A named tuple: a micro-batch of many short documents makes about
    ``documents x R`` of them per rank, so they must be cheap to build.
    """

    batch: slice
    q: slice
    k: slice
    causal: bool


@dataclass(frozen=True)
class Documents:
    """Document boundaries of the packed sequences of one micro-batch (global positions).

    ``cu_seqlens[b]`` starts at 0, ends at the sequence length and increases
    strictly: one entry per document start, plus the end.
    """

    cu_seqlens: tuple[tuple[int, ...], ...]
    layout: Literal["document", "sequence"] = "document"
    """How tokens are placed on the ring: ``document`` zigzags each document
    (balanced work), ``sequence`` zigzags the whole row (see the module docstring)."""

    def __post_init__(self) -> None:
        if self.layout not in ("document", "sequence"):
            raise ValueError(f"layout must be 'document' or 'sequence', got {self.layout!r}")
        lengths = {cu[-1] for cu in self.cu_seqlens}
        if not self.cu_seqlens or len(lengths) != 1:
            raise ValueError(f"every batch element needs boundaries of one common length, got {sorted(lengths)}")
        for cu in self.cu_seqlens:
            if cu[0] != 0 or any(a >= b for a, b in zip(cu, cu[1:])):
                raise ValueError(f"cu_seqlens must start at 0 and increase strictly, got {cu[:8]}...")

    @classmethod
    def from_doc_ids(cls, doc_ids: torch.Tensor, layout: Literal["document", "sequence"] = "document") -> "Documents":
        """From per-token document indices ``[batch, seq]`` or ``[seq]`` (non-decreasing along the sequence).

        >>> Documents.from_doc_ids(torch.tensor([0, 0, 0, 1, 2, 2])).cu_seqlens
        ((0, 3, 4, 6),)
        """
        ids = np.asarray(doc_ids.detach().cpu().reshape(-1, doc_ids.shape[-1]))
        if (np.diff(ids, axis=1) < 0).any():
            raise ValueError("doc_ids must be non-decreasing along the sequence")
        rows = []
        for row in ids:
            starts = np.flatnonzero(np.diff(row)) + 1
            rows.append((0, *starts.tolist(), len(row)))
        return cls(tuple(rows), layout)

    @property
    def batch(self) -> int:
        return len(self.cu_seqlens)

    @property
    def seq_len(self) -> int:
        return self.cu_seqlens[0][-1]

    def positions(self) -> torch.Tensor:
        """RoPE position ids ``[batch, seq]`` that restart at 0 at every document start.

        >>> Documents(((0, 3, 5),)).positions().tolist()
        [[0, 1, 2, 0, 1]]
        """
        rows = []
        for cu in self.cu_seqlens:
            cu_np = np.asarray(cu)
            starts = np.repeat(cu_np[:-1], np.diff(cu_np))
            rows.append(np.arange(cu[-1]) - starts)
        return torch.from_numpy(np.stack(rows)).long()

    def doc_ids(self) -> torch.Tensor:
        """Per-token document index ``[batch, seq]`` (the inverse of ``from_doc_ids``)."""
        return torch.from_numpy(np.stack([np.repeat(np.arange(len(cu) - 1), np.diff(cu)) for cu in self.cu_seqlens]))

    def check_covers(self, batch: int, seq_len: int) -> None:
        """Raise ValueError unless these are the boundaries of ``batch`` rows of ``seq_len`` tokens."""
        if self.batch != batch or self.seq_len != seq_len:
            raise ValueError(f"documents cover {self.batch} x {self.seq_len} tokens, attention got {batch} x {seq_len}")

    def local_indices(self, ring: int, ring_rank: int, ulysses: int = 1, ulysses_rank: int = 0) -> torch.Tensor:
        """Global positions one rank holds, per row ``[batch, seq / (R * U)]``, in the order it holds them."""
        if self.layout == "sequence":
            return zigzag_indices(self.seq_len, ring, ring_rank, ulysses, ulysses_rank).expand(self.batch, -1)
        check_seq_len(self.seq_len, ring * ulysses)
        cache = _ring_cache(self, ring)
        key = (ring_rank, ulysses, ulysses_rank)
        if key not in cache.indices:
            from trainer.attention.doc_zigzag import stack_indices

            cache.indices[key] = stack_indices(cache.layouts, ring_rank, ulysses, ulysses_rank)
        return cache.indices[key]

    def blocks(self, ring: int, me: int, step: int) -> list[Block]:
        """The blocks of every row that ring rank ``me`` computes at ring step ``step`` (worked out once, kept)."""
        cache = _ring_cache(self, ring)
        if (me, step) not in cache.blocks:
            if self.layout == "sequence":
                blocks = [blk for b, cu in enumerate(self.cu_seqlens) for blk in step_blocks(cu, ring, me, step, slice(b, b + 1))]
            else:
                blocks = [blk for b, row in enumerate(cache.layouts) for blk in row.step_blocks(me, step, slice(b, b + 1))]
            cache.blocks[(me, step)] = blocks
        return cache.blocks[(me, step)]

    def packed(self, ring: int, me: int, step: int, device: torch.device) -> "Packed":
        """``pack_blocks`` of ``blocks(ring, me, step)`` on ``device`` (worked out once, kept)."""
        cache = _ring_cache(self, ring)
        key = (me, step, str(device))
        if key not in cache.packed:
            if self.layout == "sequence":
                cache.packed[key] = pack_blocks(self.blocks(ring, me, step), device)
            else:  # straight from the layouts' spans: no Block per document
                spans = [row.step_spans(me, step) for row in cache.layouts]
                rows = np.concatenate([np.full(len(sp), b) for b, sp in enumerate(spans)])
                cache.packed[key] = pack_spans(rows, np.concatenate(spans), device)
        return cache.packed[key]

    def rank_work(self, ring: int) -> np.ndarray:
        """Query-key pairs each ring rank attends, summed over rows, ``[R]`` (the work a layout balances).

        Closed form: a token at offset ``t`` in its document attends ``t + 1`` keys,
        so a rank's work is the sum of that over the tokens it holds.
        """
        if self.layout == "document":
            return sum(row.work() for row in _ring_cache(self, ring).layouts)
        keys = (self.positions() + 1).numpy().reshape(self.batch, 2 * ring, -1).sum(axis=(0, 2))
        return keys[:ring] + keys[::-1][:ring]

    def mask(self) -> torch.Tensor:
        """The dense ``[batch, seq, seq]`` boolean mask (True: may attend); for references and tests only."""
        ids = self.doc_ids()
        seq = self.seq_len
        causal = torch.ones(seq, seq, dtype=torch.bool).tril()
        return causal & (ids[:, :, None] == ids[:, None, :])


def _local_run(start: int, stop: int, rank: int, ring: int, chunk: int) -> tuple[int, int]:
    """Buffer rows ``[a, b)`` that ring rank ``rank`` holds of global positions ``[start, stop)`` (empty: a == b)."""
    rows = []
    for offset, c in ((0, rank), (chunk, 2 * ring - 1 - rank)):
        lo, hi = max(start, c * chunk), min(stop, (c + 1) * chunk)
        if lo < hi:
            rows += [offset + lo - c * chunk, offset + hi - c * chunk]
    return (rows[0], rows[-1]) if rows else (0, 0)


def _docs_in(cu: tuple[int, ...], start: int, stop: int) -> range:
    """Indices of the documents that overlap global positions ``[start, stop)``."""
    first = bisect.bisect_right(cu, start) - 1
    last = bisect.bisect_left(cu, stop)
    return range(first, last)


def step_blocks(cu: tuple[int, ...], ring: int, me: int, step: int, batch: slice = slice(None)) -> list[Block]:
    """The blocks ring rank ``me`` computes at ring step ``step`` for one packed sequence.

    Parameters
    ----------
    cu
        Document boundaries of the sequence (``Documents.cu_seqlens[b]``);
        ``(0, seq_len)`` is one document: plain causal attention.
    ring, me, step
        Ring size, this rank's ring rank, and the step: the K/V block held
        then is ring rank ``(me - step) % ring``'s.
    batch
        Batch rows the blocks apply to.

    Returns
    -------
    list of Block
        Step 0: a causal square per document present, tiling the local rows.
        Other steps: at most one dense rectangle (see the module docstring).

    Examples
    --------
    Two ranks, 8 tokens, documents [0, 3) and [3, 8); rank 0 holds positions 0, 1, 6, 7:

    >>> [(b.q.start, b.q.stop, b.k.start, b.k.stop, b.causal) for b in step_blocks((0, 3, 8), 2, 0, 0)]
    [(0, 2, 0, 2, True), (2, 4, 2, 4, True)]
    >>> [(b.q.start, b.q.stop, b.k.start, b.k.stop) for b in step_blocks((0, 3, 8), 2, 0, 1)]
    [(2, 4, 1, 4)]

    Notes
    -----
    ``O(log n + k)`` for ``n`` documents of which ``k`` overlap this rank's chunks.
    """
    seq = cu[-1]
    chunk = seq // (2 * ring)
    src = (me - step) % ring
    if step == 0:
        blocks = []
        for c in (me, 2 * ring - 1 - me):
            for d in _docs_in(cu, c * chunk, (c + 1) * chunk):
                a, b = _local_run(cu[d], cu[d + 1], me, ring, chunk)
                if not blocks or blocks[-1].q.start != a:  # a document in both chunks is one run
                    blocks.append(Block(batch, slice(a, b), slice(a, b), True))
        return blocks
    if src < me:
        # Keys: the source's first chunk; the document that reaches from it into our first chunk.
        d = bisect.bisect_right(cu, me * chunk) - 1
        keys = (max(cu[d], src * chunk), min(cu[d + 1], (src + 1) * chunk))
        if keys[0] >= keys[1]:
            return []
        q = _local_run(cu[d], cu[d + 1], me, ring, chunk)
        return [Block(batch, slice(*q), slice(keys[0] - src * chunk, keys[1] - src * chunk), False)]
    # Queries: our second chunk; the document that runs into it from the source's chunks.
    second = 2 * ring - 1 - me
    d = bisect.bisect_right(cu, second * chunk) - 1
    k = _local_run(cu[d], cu[d + 1], src, ring, chunk)
    if k[0] >= k[1]:
        return []
    q_stop = min(cu[d + 1], (second + 1) * chunk) - second * chunk + chunk
    return [Block(batch, slice(chunk, q_stop), slice(*k), False)]


def schedule(documents: Documents | None, batch: int, seq_len: int, ring: int, me: int, step: int) -> list[Block]:
    """The blocks of a whole micro-batch: one set for all rows without documents, one per row with them."""
    if documents is None:
        return step_blocks((0, seq_len), ring, me, step)
    documents.check_covers(batch, seq_len)
    return documents.blocks(ring, me, step)


@dataclass
class _RingCache:
    """A ``Documents``' per-document layouts for one ring size, and the blocks and indices worked out from them.

    Every layer of a model asks for the same blocks at every ring step, so
    they are worked out once per micro-batch (a ``Documents`` lives for one).
    """

    layouts: list
    blocks: dict = field(default_factory=dict)
    indices: dict = field(default_factory=dict)
    packed: dict = field(default_factory=dict)


def _ring_cache(documents: Documents, ring: int) -> _RingCache:
    caches = documents.__dict__.setdefault("_caches", {})  # frozen fields; the cache lives beside them
    if ring not in caches:
        from trainer.attention.doc_zigzag import RowLayout  # it builds on Block, defined here

        rows = [RowLayout(cu, ring) for cu in documents.cu_seqlens] if documents.layout == "document" else []
        caches[ring] = _RingCache(rows)
    return caches[ring]


@dataclass(frozen=True)
class Packed:
    """One ring step's one-row blocks packed for a single varlen call.

    Block ``i``'s query rows are ``(q_row, q_col)[cu_q[i]:cu_q[i+1]]`` of the
    ``[batch, seq]`` buffer, its key rows likewise; ``cu_*`` are int32.
    """

    q_row: torch.Tensor
    q_col: torch.Tensor
    cu_q: torch.Tensor
    max_q: int
    k_row: torch.Tensor
    k_col: torch.Tensor
    cu_k: torch.Tensor
    max_k: int

    @property
    def count(self) -> int:
        """Blocks packed (0: the step has nothing to attend)."""
        return len(self.cu_q) - 1


def pack_blocks(blocks: list[Block], device: torch.device) -> Packed:
    """The ``Packed`` form of one-row blocks (``Block.batch`` one row each, as ``Documents.blocks`` gives them).

    >>> blocks = [Block(slice(0, 1), slice(2, 4), slice(0, 1), False), Block(slice(1, 2), slice(0, 1), slice(1, 3), False)]
    >>> p = pack_blocks(blocks, "cpu")
    >>> p.q_row.tolist(), p.q_col.tolist(), p.cu_q.tolist(), p.k_col.tolist(), p.cu_k.tolist()
    ([0, 0, 1], [2, 3, 0], [0, 2, 3], [0, 1, 2], [0, 1, 3])
    """
    if any(blk.batch.start is None or blk.batch.stop - blk.batch.start != 1 for blk in blocks):
        raise ValueError("varlen packing takes blocks of one row each")
    rows = np.array([blk.batch.start for blk in blocks], dtype=np.int64)
    spans = np.array([(b.q.start, b.q.stop, b.k.start, b.k.stop) for b in blocks], dtype=np.int64).reshape(-1, 4)
    return pack_spans(rows, spans, device)


def pack_spans(rows: np.ndarray, spans: np.ndarray, device: torch.device) -> Packed:
    """``Packed`` from each block's batch row and its ``(q start, q stop, k start, k stop)`` rows ``[n, 4]``."""

    def side(start: np.ndarray, stop: np.ndarray) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
        n = stop - start
        cu = np.concatenate([[0], np.cumsum(n)])
        col = np.repeat(start - cu[:-1], n) + np.arange(cu[-1])
        return (torch.from_numpy(np.repeat(rows, n)).to(device), torch.from_numpy(col).to(device),
                torch.from_numpy(cu).to(device=device, dtype=torch.int32), int(n.max(initial=0)))

    return Packed(*side(spans[:, 0], spans[:, 1]), *side(spans[:, 2], spans[:, 3]))


def block_work(blocks: list[Block]) -> int:
    """Query-key pairs the blocks attend (a causal square counts its lower triangle): the work measure."""
    work = 0
    for blk in blocks:
        nq, nk = blk.q.stop - blk.q.start, blk.k.stop - blk.k.start
        work += nq * (nq + 1) // 2 if blk.causal else nq * nk
    return work


def drop_cross_document_labels(labels: torch.Tensor, doc_ids: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """Labels with the prediction from each document's last token into the next document ignored.

    Under a document mask the last token of a document (its EOS) cannot see
    the next document, so its label (that document's first token) is noise.
    ``labels`` and ``doc_ids`` are ``[..., seq]`` of the whole sequence.

    >>> drop_cross_document_labels(torch.tensor([5, 6, 7, 8]), torch.tensor([0, 0, 1, 1])).tolist()
    [5, -100, 7, 8]
    """
    labels = labels.clone()
    labels[..., :-1][doc_ids[..., 1:] != doc_ids[..., :-1]] = ignore_index
    return labels
