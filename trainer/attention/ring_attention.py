"""Zigzag ring attention (causal, or causal within packed documents), with optional Ulysses head exchange.

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
with the local block, not the sequence. With GQA only the KV heads travel,
and the kernels work per KV-head group: K/V are never repeated to the query
heads, and dK/dV are accumulated at KV-head size.

With ``documents`` (packed samples under a document mask, each document
zigzagged on its own: ``trainer.attention.doc_zigzag``) each step computes
only the blocks where a query and a key share a document
(``trainer.attention.documents``): causal squares per document at step 0,
at most one rectangle per document at every other step, nothing where
nothing is shared.

Two backends share the interface: ``torch`` (fused SDPA kernels that return
the log-sum-exp; CPU and CUDA, where the per-document blocks of each step are
one varlen flash call) and ``ring-flash-attn`` (its zigzag flash kernels,
used on CUDA in half precision when flash_attn is installed, for document
masks when every document divides into ``2R`` chunks; see ``_ring``).
"""

from __future__ import annotations

import functools
import importlib.util
import logging

import torch
import torch.nn.functional as F

from trainer.groups import ParallelGroups
from trainer.attention.documents import Block, Documents, Packed, schedule
from trainer.attention.ring_comm import RingComm
from trainer.attention.ulysses import heads_to_seq, kv_heads_for_ulysses, repeat_kv_heads, seq_to_heads
from trainer.attention.zigzag import check_seq_len

log = logging.getLogger(__name__)
aten = torch.ops.aten

# ----------------------------------------------------------------- block kernels
# Layout [b, heads, s, d] (views of [b, s, heads, d] tensors). k, v may have
# fewer heads than q (GQA): the CPU and CUDA flash kernels take them as they
# are and return dK/dV at KV-head size, so no K/V copy is made per block. Only
# CUDA's memory-efficient kernel (fp32 on CUDA, never the training dtype)
# needs equal head counts; it gets repeated K/V and its gradients are folded.


def _repeat(x: torch.Tensor, n_rep: int) -> torch.Tensor:
    return x if n_rep == 1 else x.repeat_interleave(n_rep, dim=1)


def _fold(grad: torch.Tensor, n_rep: int) -> torch.Tensor:
    if n_rep == 1:
        return grad
    b, h, s, d = grad.shape
    return grad.view(b, h // n_rep, n_rep, s, d).sum(2)


def kernel_for(q: torch.Tensor) -> str:
    """``cpu``, ``flash`` (half precision, head dim <= 256, Ampere or newer) or ``efficient``.

    The meta device stands for CUDA, so the CUDA kernels' argument and shape
    checks run on a machine without a GPU.
    """
    if q.device.type == "cpu":
        return "cpu"
    half = q.dtype in (torch.float16, torch.bfloat16) and q.shape[-1] <= 256
    if q.device.type == "meta":
        return "flash" if half else "efficient"
    return "flash" if half and torch.cuda.get_device_capability(q.device) >= (8, 0) else "efficient"


def block_forward(q, k, v, causal: bool, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of one block: ``(out [b, h, s_q, d], lse [b, h, s_q] fp32)``."""
    kernel = kernel_for(q)
    if kernel == "cpu":
        out, lse = aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, causal, scale=scale)
    elif kernel == "flash":
        out, lse = aten._scaled_dot_product_flash_attention(q, k, v, 0.0, causal, False, scale=scale)[:2]
    else:
        n_rep = q.shape[1] // k.shape[1]
        out, lse = aten._scaled_dot_product_efficient_attention(q, _repeat(k, n_rep), _repeat(v, n_rep), None, True, 0.0,
                                                                causal, scale=scale)[:2]
        lse = lse[..., :q.shape[2]]  # the kernel pads the lse rows to a multiple of 32
    return out, lse.float()


def block_backward(dout, q, k, v, out, lse, causal: bool, scale: float):
    """Gradients of one block given the *merged* output and lse: ``(dq, dk, dv)``, dk/dv at KV-head size.

    With the final output and log-sum-exp, each block's softmax is the slice
    of the full softmax, so per-block gradients add up to the exact ones.
    """
    lse = lse.contiguous()
    kernel = kernel_for(q)
    if kernel == "cpu":
        return aten._scaled_dot_product_flash_attention_for_cpu_backward(dout, q, k, v, out, lse, 0.0, causal, scale=scale)
    if kernel == "flash":
        rng = torch.zeros(2, dtype=torch.uint64, device=q.device)  # dropout 0: the seed is never read
        return aten._scaled_dot_product_flash_attention_backward(
            dout, q, k, v, out, lse, None, None, q.shape[2], k.shape[2], 0.0, causal, rng, rng[0], scale=scale)
    n_rep = q.shape[1] // k.shape[1]
    pad = -lse.shape[-1] % 32
    lse = F.pad(lse, (0, pad)) if pad else lse
    seed = torch.zeros((), dtype=torch.int64, device=q.device)
    dq, dk, dv, _ = aten._scaled_dot_product_efficient_attention_backward(
        dout, q, _repeat(k, n_rep), _repeat(v, n_rep), None, out, lse, seed, seed, 0.0, [True, True, True, False],
        causal, scale=scale)
    return dq, _fold(dk, n_rep), _fold(dv, n_rep)


def varlen_forward(q, k, v, cu_q: torch.Tensor, max_q: int, scale: float, cu_k: torch.Tensor | None = None,
                   max_k: int | None = None, causal: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention within each segment of packed rows, one CUDA flash call (segment ``i``: ``cu[i]:cu[i+1]``).

    ``q [n_q_rows, n_q, d]``, ``k, v [n_k_rows, n_kv, d]``, ``cu_q``/``cu_k`` int32
    on the device (``cu_k`` None: the same segments as ``q``); returns
    ``(out [n_q_rows, n_q, d], lse [n_q, n_q_rows] fp32)``.
    """
    cu_k, max_k = (cu_q, max_q) if cu_k is None else (cu_k, max_k)
    out, lse, *_ = aten._flash_attention_forward(q, k, v, cu_q, cu_k, max_q, max_k, 0.0, causal, False, scale=scale)
    return out, lse


def varlen_backward(dout, q, k, v, out, lse, cu_q: torch.Tensor, max_q: int, scale: float,
                    cu_k: torch.Tensor | None = None, max_k: int | None = None, causal: bool = True):
    """Gradients of ``varlen_forward`` given the merged output and lse ``[n_q, rows]``: ``(dq, dk, dv)``."""
    cu_k, max_k = (cu_q, max_q) if cu_k is None else (cu_k, max_k)
    rng = torch.zeros(2, dtype=torch.uint64, device=q.device)
    unused = torch.empty(0, device=q.device)
    return aten._flash_attention_backward(dout, q, k, v, out, lse.contiguous(), cu_q, cu_k, max_q, max_k,
                                          0.0, causal, rng, unused, scale=scale)


def _merge(out: torch.Tensor, lse: torch.Tensor, block_out: torch.Tensor, block_lse: torch.Tensor) -> None:
    """Fold one block into the running (out, lse), in place (both fp32).

    ``out + sigmoid(lse_b - lse) * (out_b - out)`` (one fused ``lerp_``, no
    temporaries of the output's size) is the softmax-weighted mean of the two
    partial outputs, written so that it never exponentiates a large number
    (ring-flash-attn PR 34).
    """
    out.lerp_(block_out.float(), torch.sigmoid(block_lse - lse).unsqueeze(-1))
    lse.sub_(F.logsigmoid(lse - block_lse))


def _t(x: torch.Tensor) -> torch.Tensor:
    """``[b, s, h, d]`` <-> ``[b, h, s, d]`` (a view)."""
    return x.transpose(1, 2)


def _rows(blocks: list[Block]) -> dict[int | None, list[Block]]:
    by_row: dict[int | None, list[Block]] = {}
    for blk in blocks:
        by_row.setdefault(blk.batch.start, []).append(blk)
    return by_row


def _varlen_args(blocks: list[Block], device: torch.device) -> tuple[torch.Tensor, int]:
    bounds = [blocks[0].q.start] + [blk.q.stop for blk in blocks]
    return torch.tensor(bounds, dtype=torch.int32, device=device), max(b - a for a, b in zip(bounds, bounds[1:]))


def diagonal_forward(q, k, v, blocks: list[Block], scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Step 0: the local block under its causal squares (``[b, s, h, d]`` in; fp32 ``out [b, s, h, d]``, ``lse [b, h, s]``).

    One square over the whole batch is plain causal attention. Several (one per
    document) take one varlen flash call per row on CUDA, a call per square on CPU.
    """
    if len(blocks) == 1 and blocks[0].batch == slice(None):
        out, lse = block_forward(_t(q), _t(k), _t(v), True, scale)
        return _t(out.float()), lse
    b, s, h, d = q.shape
    out = torch.empty(b, s, h, d, dtype=torch.float32, device=q.device)
    lse = torch.empty(b, h, s, dtype=torch.float32, device=q.device)
    for row, squares in _rows(blocks).items():
        if kernel_for(q) == "flash" and len(squares) > 1:
            cu, max_len = _varlen_args(squares, q.device)
            o, l = varlen_forward(q[row], k[row], v[row], cu, max_len, scale)
            out[row], lse[row] = o, l
            continue
        for blk in squares:
            o, l = block_forward(_t(q[blk.batch, blk.q]), _t(k[blk.batch, blk.k]), _t(v[blk.batch, blk.k]), True, scale)
            out[blk.batch, blk.q] = _t(o)
            lse[blk.batch, :, blk.q] = l
    return out, lse


def diagonal_backward(dout, q, k, v, out, lse, blocks: list[Block], scale: float):
    """Gradients of ``diagonal_forward`` given the merged out/lse: fp32 ``(dq, dk, dv)``, all ``[b, s, heads, d]``."""
    if len(blocks) == 1 and blocks[0].batch == slice(None):
        grads = block_backward(_t(dout), _t(q), _t(k), _t(v), _t(out), lse, True, scale)
        return tuple(_t(g).float() for g in grads)
    dq, dk, dv = (torch.empty(x.shape, dtype=torch.float32, device=x.device) for x in (q, k, v))
    for row, squares in _rows(blocks).items():
        if kernel_for(q) == "flash" and len(squares) > 1:
            cu, max_len = _varlen_args(squares, q.device)
            dq[row], dk[row], dv[row] = varlen_backward(dout[row], q[row], k[row], v[row], out[row], lse[row], cu,
                                                        max_len, scale)
            continue
        for blk in squares:
            r, rows = blk.batch, blk.q
            grads = block_backward(_t(dout[r, rows]), _t(q[r, rows]), _t(k[r, rows]), _t(v[r, rows]), _t(out[r, rows]),
                                   lse[r, :, rows], True, scale)
            dq[r, rows], dk[r, rows], dv[r, rows] = (_t(g) for g in grads)
    return dq, dk, dv


def step_forward(q, kv, out, lse, work: list[Block] | Packed, scale: float) -> None:
    """Fold one off-diagonal ring step into the running ``out [b, s, h, d]``, ``lse [b, h, s]`` (fp32, in place).

    ``work``: the step's blocks, one kernel call each, or the same blocks
    ``Packed`` for one varlen flash call (CUDA, under a document mask).
    """
    if isinstance(work, Packed):
        if work.count:
            p = work
            block_out, block_lse = varlen_forward(q[p.q_row, p.q_col], kv[0][p.k_row, p.k_col], kv[1][p.k_row, p.k_col],
                                                  p.cu_q, p.max_q, scale, p.cu_k, p.max_k, causal=False)
            rows_out, rows_lse = out[p.q_row, p.q_col], _t(lse)[p.q_row, p.q_col]  # [n, h, d], [n, h]
            _merge(rows_out, rows_lse, block_out, block_lse.t())
            out[p.q_row, p.q_col], _t(lse)[p.q_row, p.q_col] = rows_out, rows_lse
        return
    for blk in work:
        r = blk.batch
        block_out, block_lse = block_forward(_t(q[r, blk.q]), _t(kv[0][r, blk.k]), _t(kv[1][r, blk.k]), False, scale)
        _merge(_t(out[r, blk.q]), lse[r, :, blk.q], block_out, block_lse)


def step_backward(dout, q, kv, out, lse, dq, dkv, work: list[Block] | Packed, scale: float) -> None:
    """Add one off-diagonal ring step's gradients to ``dq`` and the travelling ``dkv`` (fp32, in place)."""
    if isinstance(work, Packed):
        if work.count:
            qi, ki = (work.q_row, work.q_col), (work.k_row, work.k_col)
            dq_b, dk_b, dv_b = varlen_backward(dout[qi], q[qi], kv[0][ki], kv[1][ki], out[qi], _t(lse)[qi].t(), work.cu_q,
                                               work.max_q, scale, work.cu_k, work.max_k, causal=False)
            dq.index_put_(qi, dq_b.float(), accumulate=True)
            dkv[0].index_put_(ki, dk_b.float(), accumulate=True)
            dkv[1].index_put_(ki, dv_b.float(), accumulate=True)
        return
    for blk in work:
        r = blk.batch
        dq_b, dk_b, dv_b = block_backward(_t(dout[r, blk.q]), _t(q[r, blk.q]), _t(kv[0][r, blk.k]),
                                          _t(kv[1][r, blk.k]), _t(out[r, blk.q]), lse[r, :, blk.q], False, scale)
        dq[r, blk.q] += _t(dq_b)
        dkv[0][r, blk.k] += _t(dk_b)
        dkv[1][r, blk.k] += _t(dv_b)


def _step_work(documents: Documents | None, batch: int, seq: int, ring: int, me: int, step: int, q) -> list[Block] | Packed:
    """An off-diagonal step's work: ``Packed`` (built once per micro-batch, kept for every layer) for the CUDA
    flash kernel under a document mask, the blocks otherwise."""
    if documents is not None and kernel_for(q) == "flash":
        documents.check_covers(batch, seq)
        return documents.packed(ring, me, step, q.device)
    return schedule(documents, batch, seq, ring, me, step)


# ---------------------------------------------------------------------- the ring
class ZigzagRingAttention(torch.autograd.Function):
    """Causal (or document-causal) attention over a ring of zigzag shards; inputs ``[b, s_local, heads, d]``.

    K and V travel as they are (``[b, s, n_kv, d]``, two messages per step);
    each step computes the blocks ``trainer.attention.documents.schedule``
    gives it, so blocks with nothing to attend cost nothing.
    """

    @staticmethod
    def forward(ctx, q, k, v, groups: ParallelGroups, scale: float, documents: Documents | None = None):
        ring, me = groups.ring_size, groups.ring_rank
        batch, seq = q.shape[0], q.shape[1] * ring
        comm = RingComm(groups)
        kv = (k.contiguous(), v.contiguous())
        out = lse = None
        for step in range(ring):
            if step + 1 < ring:
                next_kv = comm.send_recv(kv)
            if step == 0:
                out, lse = diagonal_forward(q, *kv, schedule(documents, batch, seq, ring, me, step), scale)
            else:
                step_forward(q, kv, out, lse, _step_work(documents, batch, seq, ring, me, step, q), scale)
            if step + 1 < ring:
                comm.wait()
                kv = next_kv
        out = out.to(q.dtype)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.groups, ctx.scale, ctx.documents = groups, scale, documents
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse = ctx.saved_tensors
        groups, scale = ctx.groups, ctx.scale
        ring, me = groups.ring_size, groups.ring_rank
        batch, seq = q.shape[0], q.shape[1] * ring
        kv_comm, dkv_comm = RingComm(groups), RingComm(groups)
        kv = (k.contiguous(), v.contiguous())
        for step in range(ring):
            if step + 1 < ring:
                next_kv = kv_comm.send_recv(kv, tag=0)
            if step == 0:
                blocks = schedule(ctx.documents, batch, seq, ring, me, step)
                dq, *dkv = diagonal_backward(dout, q, *kv, out, lse, blocks, scale)
            else:
                # The gradient accumulator of the block held now arrives from the
                # previous rank (it has visited every rank the block visited).
                dkv_comm.wait()
                dkv = next_dkv
            if step:
                step_backward(dout, q, kv, out, lse, dq, dkv, _step_work(ctx.documents, batch, seq, ring, me, step, q),
                              scale)
            if ring > 1:
                next_dkv = dkv_comm.send_recv(dkv, tag=2)
            if step + 1 < ring:
                kv_comm.wait()
                kv = next_kv
        if ring > 1:
            dkv_comm.wait()  # after a full turn the accumulator of our own block is back
            dkv = next_dkv
        return dq.to(q.dtype), dkv[0].to(k.dtype), dkv[1].to(v.dtype), None, None, None


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
            name, reason = "ring-flash-attn", "zigzag_ring_flash_attn_func, _varlen_func for documents"
        except ImportError as exc:
            reason = f"ring_flash_attn unusable: {exc}"
    kernels = "flash-for-cpu" if device_type == "cpu" else "sdpa flash/efficient"
    log.info("ring attention backend: %s (%s)", name, reason if name != "torch" else f"{kernels}; {reason}")
    return name


def _ring(q, k, v, groups: ParallelGroups, scale: float, documents: Documents | None) -> torch.Tensor:
    """Ring attention on ``[b, s, heads, d]`` (the ring group's part, after any Ulysses exchange).

    ring-flash-attn's zigzag functions take the unmasked case and, through its
    varlen function, document masks in the per-document layout when every
    document's length is a multiple of ``2R`` (its layout then equals ours).
    Everything else runs the ``torch`` backend.
    """
    in_order = groups.ring_ranks == sorted(groups.ring_ranks)
    if select_backend(q.device.type, q.dtype, in_order) == "ring-flash-attn":
        if documents is None:
            from ring_flash_attn import zigzag_ring_flash_attn_func

            return zigzag_ring_flash_attn_func(q, k, v, softmax_scale=scale, causal=True, group=groups.ring_group)
        varlen = flash_varlen_args(documents, groups.ring_size)
        if varlen is not None:
            from ring_flash_attn import zigzag_ring_flash_attn_varlen_func

            b, s = q.shape[:2]
            cu, max_len = varlen
            out = zigzag_ring_flash_attn_varlen_func(q.flatten(0, 1), k.flatten(0, 1), v.flatten(0, 1),
                                                     torch.tensor(cu, dtype=torch.int32, device=q.device), max_len,
                                                     softmax_scale=scale, causal=True, group=groups.ring_group)
            return out.view(b, s, *out.shape[1:])
    return ZigzagRingAttention.apply(q, k, v, groups, scale, documents)


def flash_varlen_args(documents: Documents, ring: int) -> tuple[list[int], int] | None:
    """Local ``(cu_seqlens, max_seqlen)`` of the rows packed one after another, as ring-flash-attn's zigzag varlen
    function takes them, or None when its layout is not ours (a length not a multiple of ``2R``, or the
    whole-sequence layout).

    >>> flash_varlen_args(Documents(((0, 4, 12), (0, 12))), ring=2)
    ([0, 2, 6, 12], 6)
    """
    if documents.layout != "document":
        return None
    cu = [0]
    for row in documents.cu_seqlens:
        lengths = [b - a for a, b in zip(row, row[1:])]
        if any(n % (2 * ring) for n in lengths):
            return None
        for n in lengths:
            cu.append(cu[-1] + n // ring)
    return cu, max(b - a for a, b in zip(cu, cu[1:]))


def ring_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, groups: ParallelGroups,
                   scale: float | None = None, documents: Documents | None = None) -> torch.Tensor:
    """Causal (or document-causal) attention of a zigzag-sharded sequence over its context-parallel ranks.

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
    documents
        Document boundaries of the whole sequences (every rank passes the
        same): each token then attends only within its own document.

    Returns
    -------
    torch.Tensor
        ``[b, s_local, n_q, d]``, equal to full causal (block-diagonal causal
        with ``documents``) attention over the whole sequence, restricted to
        this rank's tokens. Differentiable.

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
        return _ring(q, k, v, groups, scale, documents)
    k, v = repeat_kv_heads(k, repeats), repeat_kv_heads(v, repeats)
    group = groups.ulysses_group
    out = _ring(seq_to_heads(q, group), seq_to_heads(k, group), seq_to_heads(v, group), groups, scale, documents)
    return heads_to_seq(out, group)
