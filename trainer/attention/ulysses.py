"""Ulysses all-to-all: trade sequence shards for head shards inside a group of U ranks.

Before the ring, each rank of a ulysses group holds ``s / cp`` tokens of every
head; after ``seq_to_heads`` it holds ``s / R`` tokens (its ring member's
whole zigzag pair, in order) of ``heads / U`` heads. Attention is independent
per head, so the ring then runs on fewer heads with longer blocks, and
``heads_to_seq`` undoes the exchange on the output. The all-to-all is the
only traffic of this group, so it stays on a host's fast links (USP, Fang &
Zhao 2024).

Heads are split in contiguous groups: ulysses rank ``u`` gets query heads
``[u * n_q / U, (u + 1) * n_q / U)``, which keeps GQA's query-to-KV head
mapping intact as long as KV heads are split the same way.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from topology.errors import ConfigError


def _all_to_all(x: torch.Tensor, group: dist.ProcessGroup, scatter_dim: int, gather_dim: int) -> torch.Tensor:
    """Split ``x`` in ``U`` pieces along ``scatter_dim``, send piece ``j`` to rank ``j``,
    and concatenate the received pieces (in rank order) along ``gather_dim``."""
    size = dist.get_world_size(group)
    pieces = x.chunk(size, dim=scatter_dim)
    send = torch.stack(pieces).contiguous()
    received = torch.empty_like(send)
    dist.all_to_all_single(received, send, group=group)
    return torch.cat(received.unbind(0), dim=gather_dim)


class _AllToAll(torch.autograd.Function):
    """Differentiable all-to-all: the gradient travels back by the inverse exchange."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group: dist.ProcessGroup, scatter_dim: int, gather_dim: int) -> torch.Tensor:
        ctx.group, ctx.scatter_dim, ctx.gather_dim = group, scatter_dim, gather_dim
        return _all_to_all(x, group, scatter_dim, gather_dim)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return _all_to_all(grad, ctx.group, ctx.gather_dim, ctx.scatter_dim), None, None, None


def seq_to_heads(x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    """``[b, s/cp, h, d]`` on each rank -> ``[b, s/R, h/U, d]`` (sequence gathered, heads scattered)."""
    return _AllToAll.apply(x, group, 2, 1)


def heads_to_seq(x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    """``[b, s/R, h/U, d]`` -> ``[b, s/cp, h, d]``: the inverse of ``seq_to_heads``."""
    return _AllToAll.apply(x, group, 1, 2)


def kv_heads_for_ulysses(n_q: int, n_kv: int, ulysses: int) -> int:
    """How many times each KV head is repeated so that ``U`` ranks get whole KV heads.

    With ``n_kv >= U`` each rank takes ``n_kv / U`` KV heads (no repeat). With
    fewer KV heads than ranks (e.g. 8 KV heads, U = 16, or multi-query
    attention), each KV head is repeated ``U / n_kv`` times; ranks that share
    a KV head then each hold a copy, which costs memory and ring traffic but
    keeps every query head next to its KV head.

    Raises
    ------
    ConfigError
        If the query heads do not split into whole groups per KV head or per
        rank, or the KV heads and ``U`` do not divide one another.
    """
    if n_kv < 1 or n_q % n_kv:
        raise ConfigError(f"query heads ({n_q}) are not a multiple of KV heads ({n_kv}); GQA needs whole groups")
    if n_q % ulysses:
        raise ConfigError(f"query heads ({n_q}) are not divisible by the Ulysses degree ({ulysses}); pick ulysses dividing {n_q}")
    if n_kv % ulysses == 0:
        return 1
    if ulysses % n_kv == 0:
        return ulysses // n_kv
    raise ConfigError(f"KV heads ({n_kv}) and the Ulysses degree ({ulysses}) do not divide one another; "
                      f"pick ulysses dividing {n_kv} or a multiple of it")


def repeat_kv_heads(x: torch.Tensor, repeats: int) -> torch.Tensor:
    """``[b, s, n_kv, d]`` -> ``[b, s, n_kv * repeats, d]``, each head repeated in place (autograd sums the copies)."""
    return x if repeats == 1 else x.repeat_interleave(repeats, dim=2)
