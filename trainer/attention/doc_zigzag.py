"""Per-document zigzag: the balanced layout of packed documents over a ring.

The whole-sequence zigzag (``trainer.attention.zigzag``) balances plain
causal attention, but under a document mask a rank's work is the sum over
its tokens of their position *within their document*, and documents fall
unevenly on the ``2R`` chunks: the busiest rank can do several times the mean.
Zigzagging every document on its own balances each document, so the sum
balances too (ring-flash-attn's ``zigzag_ring_flash_attn_varlen_func``
layout): document ``d`` is cut into ``2R`` contiguous chunks and ring rank
``r`` holds chunks ``r`` and ``2R-1-r`` of every document, document after
document, each document's two chunks in position order.

Lengths need not divide by ``2R``. A document of ``L = 2R q + m`` tokens has
``2R`` chunks of ``q`` tokens plus ``m`` extra tokens, one each to ``m``
consecutive slots of the cycle (rank 0 first chunk, rank 0 second chunk,
rank 1 first chunk, ...), with one cursor running on over the documents of
the row. The row's length is a multiple of ``2R``, so the extras go round
the cycle a whole number of times and every rank holds exactly ``seq / R``
tokens. Dealing them to a rank's two chunks in turn keeps the zigzag's
pairing within a document (an early extra token with a late one), so even
documents shorter than ``2R`` tokens balance. With every length a multiple
of ``2R`` there are no extras, and the layout is ring-flash-attn's; one
document covering the row is exactly the whole-sequence zigzag.

The ring schedule keeps the zigzag form, per document (``step_blocks``):

* step 0, the local block: one causal square per document, its two chunks;
* a block from a lower ring rank ``src``: its first chunk of each document
  precedes both of ours, its second follows them: all our rows of the
  document against the source's first chunk;
* a block from a higher ring rank: both its chunks lie between ours: our
  second chunk against both of the source's chunks.
"""

from __future__ import annotations

import numpy as np
import torch

from trainer.attention.documents import Block


class RowLayout:
    """Per-document zigzag of one packed row over a ring of ``ring`` ranks.

    Attributes
    ----------
    sizes
        ``[docs, 2R]`` tokens of chunk ``j`` of each document.
    starts
        ``[docs, 2R]`` global position of each chunk's first token.
    offsets
        ``[docs, 2R]`` the same within its document.
    """

    def __init__(self, cu: tuple[int, ...], ring: int) -> None:
        cu_np = np.asarray(cu, dtype=np.int64)
        lengths = np.diff(cu_np)
        if cu_np[-1] % (2 * ring):
            raise ValueError(f"row of {cu_np[-1]} tokens does not split over 2 * ring ({2 * ring}) chunks")
        self.ring = ring
        base, extra = np.divmod(lengths, 2 * ring)
        cursor = (np.cumsum(extra) - extra) % (2 * ring)  # the cycle slot of the document's first extra token
        first = (2 * np.arange(ring)[None, :] - cursor[:, None]) % (2 * ring)  # each chunk's place in the deal
        sizes = np.repeat(base[:, None], 2 * ring, axis=1)
        sizes[:, :ring] += first < extra[:, None]
        sizes[:, ring:] += ((first + 1) % (2 * ring) < extra[:, None])[:, ::-1]  # second chunks: 2R-1-r, reversed
        self.sizes = sizes
        self.starts = cu_np[:-1, None] + np.cumsum(sizes, axis=1) - sizes
        self.offsets = self.starts - cu_np[:-1, None]  # chunk start within its document

    def pair(self, rank: int) -> tuple[np.ndarray, np.ndarray]:
        """Tokens of each document in ring rank ``rank``'s first and second chunk."""
        return self.sizes[:, rank], self.sizes[:, 2 * self.ring - 1 - rank]

    def local_starts(self, rank: int) -> np.ndarray:
        """Buffer row where each document's tokens start on ring rank ``rank``."""
        a, b = self.pair(rank)
        return np.cumsum(a + b) - (a + b)

    def indices(self, rank: int) -> np.ndarray:
        """Global positions ring rank ``rank`` holds, in buffer order (``seq / R`` of them)."""
        j = (rank, 2 * self.ring - 1 - rank)
        starts, sizes = self.starts[:, j].reshape(-1), self.sizes[:, j].reshape(-1)
        return np.repeat(starts - (np.cumsum(sizes) - sizes), sizes) + np.arange(sizes.sum())

    def work(self) -> np.ndarray:
        """Query-key pairs each ring rank attends, ``[R]``: a token at document offset ``t`` attends ``t + 1`` keys."""
        n, o = self.sizes, self.offsets
        chunk = (n * o + n * (n + 1) // 2).sum(axis=0)
        return chunk[:self.ring] + chunk[::-1][:self.ring]

    def step_spans(self, me: int, step: int) -> np.ndarray:
        """``[n, 4]`` buffer rows ``(q start, q stop, k start, k stop)`` of the non-empty blocks of ``step_blocks``."""
        src = (me - step) % self.ring
        a, b = self.pair(me)
        mine = self.local_starts(me)
        if step == 0:
            spans = (mine, mine + a + b, mine, mine + a + b)
        elif src < me:
            theirs = self.local_starts(src)
            spans = (mine, mine + a + b, theirs, theirs + self.sizes[:, src])
        else:
            theirs = self.local_starts(src)
            sa, sb = self.pair(src)
            spans = (mine + a, mine + a + b, theirs, theirs + sa + sb)
        q0, q1, k0, k1 = spans
        return np.stack(spans, axis=1)[(q1 > q0) & (k1 > k0)]

    def step_blocks(self, me: int, step: int, batch: slice = slice(None)) -> list[Block]:
        """The blocks ring rank ``me`` computes at ring step ``step``: at most one per document (module docstring).

        >>> [(b.q, b.k, b.causal) for b in RowLayout((0, 8), 2).step_blocks(0, 1)]
        [(slice(2, 4, None), slice(0, 4, None), False)]
        """
        return [Block(batch, slice(a0, a1), slice(b0, b1), step == 0)
                for a0, a1, b0, b1 in self.step_spans(me, step).tolist()]


def stack_indices(rows: list[RowLayout], ring_rank: int, ulysses: int = 1, ulysses_rank: int = 0) -> torch.Tensor:
    """Global positions one rank holds, per row: ``[batch, seq / (R * U)]``.

    The ring rank's buffer is cut into ``U`` contiguous pieces, one per rank of
    its ulysses group (as in ``trainer.attention.zigzag.zigzag_indices``).

    >>> stack_indices([RowLayout((0, 3, 8), ring=2)], ring_rank=0).tolist()
    [[0, 2, 3, 7]]
    """
    held = np.stack([row.indices(ring_rank) for row in rows])
    piece = held.shape[1] // ulysses
    return torch.from_numpy(held[:, ulysses_rank * piece:(ulysses_rank + 1) * piece].copy())
