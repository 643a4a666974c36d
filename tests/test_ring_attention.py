"""Ring attention equals full causal attention: outputs and input gradients, fp32, on spawned gloo ranks.

One world of 4 processes runs every layout (ring 4, DP 2 x ring 2, Ulysses 2 x
ring 2, pure Ulysses 4, with and without GQA), and the same under document
masks (ring 2, 3 and 4, Ulysses 2 x ring 2, GQA, a batch whose rows pack
documents differently; each document zigzagged on its own, and once the
whole-sequence layout); the tests then check what each layout returned
against a float64 single-process reference (block-diagonal causal under
document masks).
"""

import logging

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from dist_utils import run_distributed
from topology.errors import ConfigError
from topology.planning.plan import Plan, RankPlacement
from trainer.groups import ParallelGroups
from trainer.attention.documents import Documents
from trainer.attention.ring_attention import ZigzagRingAttention, _merge, block_backward, block_forward, ring_attention, select_backend
from trainer.attention.ulysses import kv_heads_for_ulysses
from trainer.attention.zigzag import shard

WORLD = 4
BATCH, SEQ, HEAD_DIM = 2, 48, 8
TOLERANCE = 1e-5

# name: (dp, cp, ulysses, query heads, kv heads)
LAYOUTS = {
    "ring4": (1, 4, 1, 4, 4),
    "dp2_ring2": (2, 2, 1, 4, 4),
    "ring4_gqa": (1, 4, 1, 6, 2),
    "ulysses2_ring2": (1, 4, 2, 4, 4),
    "ulysses2_ring2_gqa": (1, 4, 2, 8, 2),
    "ulysses2_ring2_mqa": (1, 4, 2, 4, 1),
    "ulysses4": (1, 4, 4, 4, 4),
}


# Document boundaries of the 48-token sequences: short documents (shorter than
# a chunk at C=4) beside one longer than a rank's share; many tiny ones; one document.
MIXED = (0, 2, 3, 10, 35, 48)
TINY = (0, 1, 3, 4, 7, 9, 10, 12, 15, 16, 18, 21, 23, 26, 27, 30, 33, 34, 37, 40, 41, 44, 46, 48)
WHOLE = (0, 48)

# name: (dp, cp, ulysses, query heads, kv heads, cu_seqlens per batch row)
DOC_LAYOUTS = {
    "docs_ring2": (2, 2, 1, 4, 4, (MIXED, TINY)),
    "docs_ring3": (1, 3, 1, 4, 2, (MIXED, TINY)),
    "docs_ring4_gqa": (1, 4, 1, 8, 2, (MIXED, TINY)),
    "docs_ring4_one_document": (1, 4, 1, 4, 4, (WHOLE, WHOLE)),
    "docs_ulysses2_ring2_gqa": (1, 4, 2, 8, 2, (TINY, MIXED)),
    "docs_ring4_gqa_sequence_layout": (1, 4, 1, 8, 2, (MIXED, TINY)),  # the whole-sequence zigzag under documents
}


def _groups(dp: int, cp: int, ulysses: int) -> ParallelGroups | None:
    """This rank's groups for a dp x cp grid; ranks past ``dp * cp`` (a ring of 3 in a world of 4) get None."""
    if dp * cp < WORLD:
        ranks = list(range(dp * cp))
        ring_group = dist.new_group(ranks)
        single, _ = dist.new_subgroups_by_enumeration([[r] for r in range(WORLD)])
        me = dist.get_rank()
        if me not in ranks:
            return None
        return ParallelGroups(me, WORLD, ring_group, ring_group, single, single, ranks, ranks, [me], [me])
    plan = Plan("naive", dp, cp, ulysses, SEQ, [RankPlacement(r, "host0", r) for r in range(dp * cp)])
    return ParallelGroups.from_plan(plan)


def _reference(q, k, v, dout, causal=True, mask=None):
    """Attention ``[b, s, heads, d]`` of the whole sequence in float64, and its input gradients.

    ``mask`` ``[b, s, s]`` (True: may attend) replaces the causal mask: the block-diagonal one of packed documents.
    """
    q, k, v = (t.double().requires_grad_() for t in (q, k, v))
    rep = q.shape[2] // k.shape[2]
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.repeat_interleave(rep, 2).transpose(1, 2),
                                         v.repeat_interleave(rep, 2).transpose(1, 2),
                                         attn_mask=None if mask is None else mask[:, None],
                                         is_causal=causal and mask is None).transpose(1, 2)
    out.backward(dout.double())
    return out.detach(), q.grad, k.grad, v.grad


def _compare_layout(groups: ParallelGroups | None, n_q: int, n_kv: int,
                    documents: Documents | None = None) -> dict[str, float]:
    if groups is None:
        return {"idle": 0.0}
    gen = torch.Generator().manual_seed(1234 + groups.dp_rank)  # one sequence per cp group
    q = torch.randn(BATCH, SEQ, n_q, HEAD_DIM, generator=gen)
    k = torch.randn(BATCH, SEQ, n_kv, HEAD_DIM, generator=gen)
    v = torch.randn(BATCH, SEQ, n_kv, HEAD_DIM, generator=gen)
    dout = torch.randn(BATCH, SEQ, n_q, HEAD_DIM, generator=gen)
    expected = _reference(q, k, v, dout, mask=None if documents is None else documents.mask())
    ql, kl, vl = (shard(t, groups, documents=documents).requires_grad_() for t in (q, k, v))
    out = ring_attention(ql, kl, vl, groups, documents=documents)
    out.backward(shard(dout, groups, documents=documents))
    got = (out.detach(), ql.grad, kl.grad, vl.grad)
    return {name: (g.double() - shard(e, groups, documents=documents)).abs().max().item()
            for name, g, e in zip(("out", "dq", "dk", "dv"), got, expected)}


def _saved_elements(groups: ParallelGroups) -> dict[str, int]:
    """What the autograd node keeps for backward, against the local block's size."""
    s_local = SEQ // groups.ring_size
    q = torch.randn(1, s_local, 4, HEAD_DIM, requires_grad=True)
    k = torch.randn(1, s_local, 2, HEAD_DIM, requires_grad=True)
    v = torch.randn(1, s_local, 2, HEAD_DIM, requires_grad=True)
    out = ZigzagRingAttention.apply(q, k, v, groups, HEAD_DIM ** -0.5)
    saved = sum(t.numel() for t in out.grad_fn.saved_tensors)
    return {"saved": saved, "local": 2 * q.numel() + k.numel() + v.numel() + q.numel() // HEAD_DIM}


def _config_error(groups: ParallelGroups, s_local: int, n_q: int, n_kv: int) -> str:
    """The message every rank gets for a bad shape; raised before any communication, so no rank waits."""
    q = torch.randn(1, s_local, n_q, HEAD_DIM)
    k = torch.randn(1, s_local, n_kv, HEAD_DIM)
    try:
        ring_attention(q, k, k, groups)
    except ConfigError as exc:
        return str(exc)
    return ""


def _all_layouts(rank: int, world: int) -> dict:
    results = {name: _compare_layout(_groups(dp, cp, u), n_q, n_kv)
               for name, (dp, cp, u, n_q, n_kv) in LAYOUTS.items()}
    results.update({name: _compare_layout(_groups(dp, cp, u), n_q, n_kv,
                                          Documents(cu, "sequence" if name.endswith("sequence_layout") else "document"))
                    for name, (dp, cp, u, n_q, n_kv, cu) in DOC_LAYOUTS.items()})
    ring4 = _groups(1, 4, 1)
    results["memory"] = _saved_elements(ring4)
    results["bad_heads"] = _config_error(ring4, SEQ // 4, 6, 4)
    results["bad_length"] = _config_error(ring4, 3, 4, 4)
    return results


@pytest.fixture(scope="module")
def per_rank():
    return run_distributed(_all_layouts, WORLD, timeout=240)


@pytest.mark.parametrize("layout", list(LAYOUTS) + list(DOC_LAYOUTS))
def test_matches_full_causal_attention(per_rank, layout):
    dp, cp = (LAYOUTS.get(layout) or DOC_LAYOUTS[layout])[:2]
    assert sum("idle" not in results[layout] for results in per_rank) == dp * cp
    for rank, results in enumerate(per_rank):
        errors = results[layout]
        assert max(errors.values()) <= TOLERANCE, f"rank {rank}: {errors}"


def test_backward_saves_only_the_local_block(per_rank):
    for results in per_rank:
        assert results["memory"]["saved"] == results["memory"]["local"]


def test_bad_shapes_raise_one_line_config_error_on_every_rank(per_rank):
    for results in per_rank:
        assert "query heads (6) are not a multiple of KV heads (4)" in results["bad_heads"]
        assert "sequence length 12 is not divisible by 2 * context-parallel size (8)" in results["bad_length"]
        assert "\n" not in results["bad_heads"] + results["bad_length"]


@pytest.mark.parametrize("n_q,n_kv,ulysses,repeats", [(32, 8, 1, 1), (32, 8, 8, 1), (32, 8, 16, 2), (8, 1, 4, 4)])
def test_kv_heads_repeat_only_when_fewer_than_ulysses(n_q, n_kv, ulysses, repeats):
    assert kv_heads_for_ulysses(n_q, n_kv, ulysses) == repeats


@pytest.mark.parametrize("n_q,n_kv,ulysses,match", [
    (32, 6, 1, r"query heads \(32\) are not a multiple of KV heads \(6\)"),
    (12, 4, 8, r"query heads \(12\) are not divisible by the Ulysses degree \(8\)"),
    (24, 6, 4, r"KV heads \(6\) and the Ulysses degree \(4\)"),
])
def test_bad_heads_for_ulysses(n_q, n_kv, ulysses, match):
    with pytest.raises(ConfigError, match=match):
        kv_heads_for_ulysses(n_q, n_kv, ulysses)


needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device for the flash/efficient kernels")


@pytest.mark.parametrize("device,dtype,tolerance", [
    ("cpu", torch.float32, 1e-5),
    pytest.param("cuda", torch.bfloat16, 3e-2, marks=needs_cuda),  # flash kernels
    pytest.param("cuda", torch.float32, 1e-4, marks=needs_cuda),  # memory-efficient kernels
])
def test_blocks_merged_by_log_sum_exp_equal_one_attention(device, dtype, tolerance):
    """Two key blocks merged by the online-softmax rule, and their backward given the merged out/lse,
    equal attention over both blocks at once: the identity every ring step rests on."""
    gen = torch.Generator().manual_seed(3)
    q = torch.randn(1, 4, 64, 16, generator=gen)
    k, v = torch.randn(1, 2, 128, 16, generator=gen), torch.randn(1, 2, 128, 16, generator=gen)
    dout = torch.randn(1, 4, 64, 16, generator=gen)
    ref = _reference(*(t.transpose(1, 2) for t in (q, k, v, dout)), causal=False)
    q, k, v, dout = (t.to(device, dtype) for t in (q, k, v, dout))
    scale = 16 ** -0.5
    halves = [slice(0, 64), slice(64, 128)]
    out, lse = block_forward(q, k[:, :, halves[0]], v[:, :, halves[0]], False, scale)
    out = out.float()
    _merge(out, lse, *block_forward(q, k[:, :, halves[1]], v[:, :, halves[1]], False, scale))
    out = out.to(dtype)
    grads = [block_backward(dout, q, k[:, :, h], v[:, :, h], out, lse, False, scale) for h in halves]
    dq = sum(g[0].float() for g in grads)
    dk = torch.cat([g[1] for g in grads], dim=2)
    dv = torch.cat([g[2] for g in grads], dim=2)
    for got, want in zip((out, dq, dk, dv), ref):
        assert (got.double().cpu() - want.transpose(1, 2)).abs().max().item() <= tolerance


def test_backend_is_chosen_once_and_logged(caplog):
    select_backend.cache_clear()
    with caplog.at_level(logging.INFO, logger="trainer.attention.ring_attention"):
        assert select_backend("cpu", torch.float32, True) == "torch"
        assert select_backend("cpu", torch.float32, True) == "torch"
    assert [r.getMessage() for r in caplog.records] == ["ring attention backend: torch (flash-for-cpu; device cpu)"]
