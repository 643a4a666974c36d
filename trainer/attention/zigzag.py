"""Zigzag sharding of one sequence over its context-parallel ranks.

With causal attention, token ``t`` attends to ``t + 1`` keys, so cutting the
sequence into ``R`` contiguous pieces leaves the last ring rank with almost
twice the average work. Zigzag cuts it into ``2R`` chunks and gives ring rank
``r`` chunks ``r`` and ``2R-1-r``: one early, one late, the same work on every
rank (the layout of ring-flash-attn's ``zigzag_ring_flash_attn_func``).

With Ulysses degree ``U`` (USP), ``cp = R * U`` ranks share the sequence:
ring rank ``r``'s zigzag pair (``s / R`` tokens) is cut into ``U`` contiguous
pieces, one per rank of its ulysses group, so the all-to-all inside that
group puts the pair back together in order (and splits the heads instead).

Everything here works on global token positions: position ids for RoPE are
the indices themselves, and labels are shifted on the whole sequence before
sharding so the token after each shard boundary is not lost.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.distributed as dist

from topology.errors import ConfigError
from trainer.groups import ParallelGroups

if TYPE_CHECKING:
    from trainer.attention.documents import Documents

IGNORE_INDEX = -100
"""Label of positions that carry no loss (PyTorch's cross_entropy default)."""


def check_seq_len(seq_len: int, cp: int) -> None:
    """Raise ConfigError unless ``seq_len`` splits into ``2 * cp`` equal chunks."""
    if cp < 1 or seq_len < 1 or seq_len % (2 * cp):
        raise ConfigError(f"sequence length {seq_len} is not divisible by 2 * context-parallel size ({2 * cp}); "
                          f"use a multiple of {2 * max(cp, 1)}")


def zigzag_indices(seq_len: int, ring: int, ring_rank: int, ulysses: int = 1, ulysses_rank: int = 0) -> torch.Tensor:
    """Global token positions held by one rank, in the order it holds them.

    Parameters
    ----------
    seq_len
        Tokens in the whole sequence; a multiple of ``2 * ring * ulysses``.
    ring, ring_rank
        Ring degree ``R`` and this rank's place in its ring.
    ulysses, ulysses_rank
        Ulysses degree ``U`` and this rank's place in its ulysses group.

    Returns
    -------
    torch.LongTensor
        ``seq_len / (R * U)`` increasing positions; also the RoPE position ids.

    Examples
    --------
    >>> zigzag_indices(8, ring=2, ring_rank=0).tolist()
    [0, 1, 6, 7]
    >>> zigzag_indices(8, ring=2, ring_rank=1).tolist()
    [2, 3, 4, 5]
    >>> zigzag_indices(8, ring=2, ring_rank=0, ulysses=2, ulysses_rank=1).tolist()
    [6, 7]
    """
    check_seq_len(seq_len, ring * ulysses)
    if not (0 <= ring_rank < ring and 0 <= ulysses_rank < ulysses):
        raise ValueError(f"rank (ring {ring_rank}, ulysses {ulysses_rank}) outside the grid ({ring} x {ulysses})")
    chunk = seq_len // (2 * ring)
    pair = torch.cat([torch.arange(ring_rank * chunk, (ring_rank + 1) * chunk),
                      torch.arange((2 * ring - 1 - ring_rank) * chunk, (2 * ring - ring_rank) * chunk)])
    piece = pair.numel() // ulysses
    return pair[ulysses_rank * piece:(ulysses_rank + 1) * piece]


def local_indices(seq_len: int, groups: ParallelGroups) -> torch.Tensor:
    """``zigzag_indices`` for this rank of ``groups``."""
    return zigzag_indices(seq_len, groups.ring_size, groups.ring_rank, groups.ulysses_size, groups.ulysses_rank)


def shard(tensor: torch.Tensor, groups: ParallelGroups, dim: int = 1, documents: Documents | None = None) -> torch.Tensor:
    """This rank's zigzag shard of a whole-sequence tensor (input ids, labels, positions...).

    With ``documents`` the shard follows their layout (``Documents.local_indices``:
    per document under a document mask), row by row along ``dim`` 1.
    """
    if documents is None:
        index = local_indices(tensor.shape[dim], groups).to(tensor.device)
        return tensor.index_select(dim, index)
    if dim != 1:
        raise ValueError(f"sharding by documents works on [batch, seq, ...] tensors (dim 1), got dim {dim}")
    index = documents.local_indices(groups.ring_size, groups.ring_rank, groups.ulysses_size, groups.ulysses_rank)
    return _take_rows(tensor, index.to(tensor.device))


def unshard(local: torch.Tensor, groups: ParallelGroups, dim: int = 1, documents: Documents | None = None) -> torch.Tensor:
    """Gather every cp rank's shard and put the whole sequence back in order.

    Collective over ``groups.cp_group``: every rank of the sequence must call it.
    Not differentiable (for checks and evaluation, not training).
    """
    cp = len(groups.cp_ranks)
    seq_len = local.shape[dim] * cp
    pieces = [torch.empty_like(local) for _ in range(cp)]
    dist.all_gather(pieces, local.contiguous(), group=groups.cp_group)
    # cp rank i sits at (ring i // U, ulysses i % U) of the grid (topology.planning.plan).
    grid = [(i // groups.ulysses_size, groups.ulysses_size, i % groups.ulysses_size) for i in range(cp)]
    if documents is None:
        index = torch.cat([zigzag_indices(seq_len, groups.ring_size, r, u, ur) for r, u, ur in grid])[None]
    else:
        index = torch.cat([documents.local_indices(groups.ring_size, r, u, ur) for r, u, ur in grid], dim=1)
    order = torch.argsort(index, dim=1)
    gathered = torch.cat(pieces, dim=dim)
    if documents is None:
        return gathered.index_select(dim, order[0].to(local.device))
    return _take_rows(gathered, order.to(local.device))


def _take_rows(tensor: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``tensor[b, index[b]]`` for every row ``b`` of ``[batch, seq, ...]``."""
    index = index.reshape(*index.shape, *([1] * (tensor.dim() - 2))).expand(-1, -1, *tensor.shape[2:])
    return tensor.gather(1, index)


def shift_labels(input_ids: torch.Tensor, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """Next-token labels of a whole sequence ``[..., seq]``: ``labels[t] = input_ids[t + 1]``.

    Shift before sharding: after it, every rank's shard predicts its own
    tokens' successors, including the one across a shard boundary.
    """
    labels = torch.full_like(input_ids, ignore_index)
    labels[..., :-1] = input_ids[..., 1:]
    return labels

