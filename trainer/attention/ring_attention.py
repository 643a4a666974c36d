"""Zigzag ring attention (causal), with optional Ulysses head exchange.

Each rank holds a zigzag shard of one sequence (trainer.attention.zigzag): chunks ``r``
and ``2R-1-r`` of ``2R``. Its K,V block travels around the ring while every
rank attends its queries to the block it holds, and the partial results are
merged with the log-sum-exp (online softmax) rule. Per step, the zigzag
layout makes the work the same on every rank (ring-flash-attn's schedule):

* step 0: the local block, causal;
* block from a lower ring rank: all local queries against the block's first
  half (its second half lies in their future);
* block from a higher ring rank: the second half of the local queries
  against the whole block (the first half precedes all of it).

The backward pass is a ring too: K,V travel again together with fp32
accumulators of their gradients, which arrive home after a full turn. Only
q, k, v, the output and its log-sum-exp are saved, so memory per rank grows
with the local block, not the sequence. With GQA only the KV heads travel.

Two backends share the interface: ``torch`` (fused SDPA kernels that return
the log-sum-exp; CPU and CUDA) and ``ring-flash-attn`` (its zigzag flash
kernels, used on CUDA in half precision when flash_attn is installed).
"""

from __future__ import annotations

import functools
import importlib.util
import logging

import torch
import torch.nn.functional as F

from trainer.groups import ParallelGroups
from trainer.attention.ring_comm import RingComm
from trainer.attention.ulysses import heads_to_seq, kv_heads_for_ulysses, repeat_kv_heads, seq_to_heads
from trainer.attention.zigzag import check_seq_len

log = logging.getLogger(__name__)
aten = torch.ops.aten

# ----------------------------------------------------------------- block kernels
# Layout [b, heads, s, d]. k, v may have fewer heads than q (GQA): they are
# repeated for the kernel only, and their gradients folded back.


def _repeat(x: torch.Tensor, n_rep: int) -> torch.Tensor:
    return x if n_rep == 1 else x.repeat_interleave(n_rep, dim=1)


def _fold(grad: torch.Tensor, n_rep: int) -> torch.Tensor:
    if n_rep == 1:
        return grad
    b, h, s, d = grad.shape
    return grad.view(b, h // n_rep, n_rep, s, d).sum(2)


def _use_flash(q: torch.Tensor) -> bool:
    """Flash kernels: half precision, head dim <= 256, Ampere or newer (L40S, A100, H100)."""
    return (q.dtype in (torch.float16, torch.bfloat16) and q.shape[-1] <= 256
            and torch.cuda.get_device_capability(q.device) >= (8, 0))


def block_forward(q, k, v, causal: bool, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of one block: ``(out [b, h, s_q, d], lse [b, h, s_q] fp32)``."""
    n_rep = q.shape[1] // k.shape[1]
    k, v = _repeat(k, n_rep), _repeat(v, n_rep)
    if q.device.type == "cpu":
        out, lse = aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, causal, scale=scale)
    elif _use_flash(q):
        out, lse = aten._scaled_dot_product_flash_attention(q, k, v, 0.0, causal, False, scale=scale)[:2]
    else:
        out, lse = aten._scaled_dot_product_efficient_attention(q, k, v, None, True, 0.0, causal, scale=scale)[:2]
        lse = lse[..., :q.shape[2]]  # the kernel pads the lse rows to a multiple of 32
    return out, lse.float()


def block_backward(dout, q, k, v, out, lse, causal: bool, scale: float):
    """Gradients of one block given the *merged* output and lse: ``(dq, dk, dv)``.

    With the final output and log-sum-exp, each block's softmax is the slice
    of the full softmax, so per-block gradients add up to the exact ones.
    """
    n_kv = k.shape[1]
    n_rep = q.shape[1] // n_kv
    k, v = _repeat(k, n_rep), _repeat(v, n_rep)
    lse = lse.contiguous()
    if q.device.type == "cpu":
        dq, dk, dv = aten._scaled_dot_product_flash_attention_for_cpu_backward(
            dout, q, k, v, out, lse, 0.0, causal, scale=scale)
    elif _use_flash(q):
        rng = torch.zeros(2, dtype=torch.uint64, device=q.device)  # dropout 0: the seed is never read
        dq, dk, dv = aten._scaled_dot_product_flash_attention_backward(
            dout, q, k, v, out, lse, None, None, q.shape[2], k.shape[2], 0.0, causal, rng, rng[0], scale=scale)
    else:
        pad = -lse.shape[-1] % 32
        lse = F.pad(lse, (0, pad)) if pad else lse
        seed = torch.zeros((), dtype=torch.int64, device=q.device)
        dq, dk, dv, _ = aten._scaled_dot_product_efficient_attention_backward(
            dout, q, k, v, None, out, lse, seed, seed, 0.0, [True, True, True, False], causal, scale=scale)
    return dq, _fold(dk, n_rep), _fold(dv, n_rep)


def _merge(out: torch.Tensor, lse: torch.Tensor, block_out: torch.Tensor, block_lse: torch.Tensor) -> None:
    """Fold one block into the running (out, lse), in place (both fp32).

    ``out - sigmoid(lse_b - lse) * (out - out_b)`` is the softmax-weighted
    mean of the two partial outputs, written so that it never exponentiates
    a large number (ring-flash-attn PR 34).
    """
    block_lse = block_lse.unsqueeze(-1)
    old_lse = lse.unsqueeze(-1)
    out.sub_(torch.sigmoid(block_lse - old_lse) * (out - block_out.float()))
    lse.sub_(F.logsigmoid(old_lse - block_lse).squeeze(-1))


# ---------------------------------------------------------------------- the ring
class ZigzagRingAttention(torch.autograd.Function):
    """Causal attention over a ring of zigzag shards; inputs ``[b, heads, s_local, d]``."""

    @staticmethod
    def forward(ctx, q, k, v, groups: ParallelGroups, scale: float):
        ring, me = groups.ring_size, groups.ring_rank
        half = q.shape[2] // 2
        comm = RingComm(groups)
        kv = torch.stack([k, v])  # one message per step, not two
        out = lse = None
        for step in range(ring):
            if step + 1 < ring:
                next_kv = comm.send_recv(kv)
            bk, bv = kv[0], kv[1]
            if step == 0:
                block_out, block_lse = block_forward(q, bk, bv, True, scale)
                out, lse = block_out.float(), block_lse.clone()
            elif step <= me:
                _merge(out, lse, *block_forward(q, bk[:, :, :half], bv[:, :, :half], False, scale))
            else:
                _merge(out[:, :, half:], lse[:, :, half:], *block_forward(q[:, :, half:], bk, bv, False, scale))
            if step + 1 < ring:
                comm.wait()
                kv = next_kv
        out = out.to(q.dtype)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.groups, ctx.scale = groups, scale
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse = ctx.saved_tensors
        groups, scale = ctx.groups, ctx.scale
        ring, me = groups.ring_size, groups.ring_rank
        half = q.shape[2] // 2
        dout = dout.contiguous()
        kv_comm, dkv_comm = RingComm(groups), RingComm(groups)
        dq = torch.zeros_like(q, dtype=torch.float32)
        kv = torch.stack([k, v])
        for step in range(ring):
            if step + 1 < ring:
                next_kv = kv_comm.send_recv(kv, tag=0)
            bk, bv = kv[0], kv[1]
            if step == 0:
                dq_b, dk_b, dv_b = block_backward(dout, q, bk, bv, out, lse, True, scale)
                dq += dq_b
                keys = slice(None)
            elif step <= me:
                dq_b, dk_b, dv_b = block_backward(dout, q, bk[:, :, :half], bv[:, :, :half], out, lse, False, scale)
                dq += dq_b
                keys = slice(0, half)
            else:
                dq_b, dk_b, dv_b = block_backward(dout[:, :, half:], q[:, :, half:], bk, bv,
                                                  out[:, :, half:], lse[:, :, half:], False, scale)
                dq[:, :, half:] += dq_b
                keys = slice(None)
            # The gradient accumulator of the block held now arrives from the
            # previous rank (it has visited every rank the block visited).
            if step == 0:
                dkv = torch.zeros_like(kv, dtype=torch.float32)
            else:
                dkv_comm.wait()
                dkv = next_dkv
            dkv[0, :, :, keys] += dk_b
            dkv[1, :, :, keys] += dv_b
            if ring > 1:
                next_dkv = dkv_comm.send_recv(dkv, tag=1)
            if step + 1 < ring:
                kv_comm.wait()
                kv = next_kv
        if ring > 1:
            dkv_comm.wait()  # after a full turn the accumulator of our own block is back
            dkv = next_dkv
        return dq.to(q.dtype), dkv[0].to(k.dtype), dkv[1].to(v.dtype), None, None


# ------------------------------------------------------------------ public entry
@functools.lru_cache(maxsize=None)
def select_backend(device_type: str, dtype: torch.dtype, ring_in_rank_order: bool) -> str:
    """``ring-flash-attn`` on CUDA in half precision when flash_attn is installed, else ``torch``.

    Chosen once per (device, dtype) and logged, so a run's log says which kernels it used.
    """
    reason = "flash_attn not installed"
    name = "torch"
    if device_type != "cuda":
        reason = f"device {device_type}"
    elif dtype not in (torch.float16, torch.bfloat16):
        reason = f"dtype {dtype} (flash kernels need fp16/bf16)"
    elif not ring_in_rank_order:
        reason = "ring order differs from rank order"
    elif importlib.util.find_spec("flash_attn"):
        try:
            import ring_flash_attn  # noqa: F401  (imports flash_attn's CUDA extension)
            name, reason = "ring-flash-attn", "zigzag_ring_flash_attn_func"
        except ImportError as exc:
            reason = f"ring_flash_attn unusable: {exc}"
    kernels = "flash-for-cpu" if device_type == "cpu" else "sdpa flash/efficient"
    log.info("ring attention backend: %s (%s)", name, reason if name != "torch" else f"{kernels}; {reason}")
    return name


def _ring(q, k, v, groups: ParallelGroups, scale: float) -> torch.Tensor:
    """Ring attention on ``[b, s, heads, d]`` (the ring group's part, after any Ulysses exchange)."""
    in_order = groups.ring_ranks == sorted(groups.ring_ranks)
    if select_backend(q.device.type, q.dtype, in_order) == "ring-flash-attn":
        from ring_flash_attn import zigzag_ring_flash_attn_func

        return zigzag_ring_flash_attn_func(q, k, v, softmax_scale=scale, causal=True, group=groups.ring_group)
    out = ZigzagRingAttention.apply(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), groups, scale)
    return out.transpose(1, 2)


def ring_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, groups: ParallelGroups,
                   scale: float | None = None) -> torch.Tensor:
    """Causal attention of a zigzag-sharded sequence over its context-parallel ranks.

    Parameters
    ----------
    q
        ``[b, s_local, n_q, d]``: this rank's queries, sharded by
        ``trainer.attention.zigzag.shard`` (RoPE already applied with global positions).
    k, v
        ``[b, s_local, n_kv, d]``, ``n_q`` a multiple of ``n_kv`` (GQA).
    groups
        This rank's ring and ulysses groups (``ParallelGroups.from_plan``).
    scale
        Softmax scale; ``1 / sqrt(d)`` by default.

    Returns
    -------
    torch.Tensor
        ``[b, s_local, n_q, d]``, equal to full causal attention over the
        whole sequence, restricted to this rank's tokens. Differentiable.

    Raises
    ------
    ConfigError
        Head counts that do not split (see ``kv_heads_for_ulysses``) or a
        shard that cannot be cut in the two zigzag halves.

    Notes
    -----
    Per rank, ``R`` block steps of ``O((s/R)^2 * n_q * d / U)`` FLOPs each
    overlap with sending ``2 * (s/R) * n_kv * d / U`` elements to the next rank.
    """
    n_q, n_kv, d = q.shape[2], k.shape[2], q.shape[3]
    ulysses = groups.ulysses_size
    repeats = kv_heads_for_ulysses(n_q, n_kv, ulysses)
    if groups.ring_size > 1:
        cp = groups.ring_size * ulysses
        check_seq_len(q.shape[1] * cp, cp)
    scale = d ** -0.5 if scale is None else scale
    if ulysses == 1:
        return _ring(q, k, v, groups, scale)
    k, v = repeat_kv_heads(k, repeats), repeat_kv_heads(v, repeats)
    group = groups.ulysses_group
    out = _ring(seq_to_heads(q, group), seq_to_heads(k, group), seq_to_heads(v, group), groups, scale)
    return heads_to_seq(out, group)
