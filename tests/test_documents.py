"""Document masks of packed samples: the ring's block schedule covers exactly the block-diagonal causal mask.

Pure functions, no process group: ``step_blocks`` for every rank and step of
a ring, checked pair by pair against the dense mask, over random document
length mixes (hypothesis); the CUDA kernel calls' shapes on the meta device;
the dataset's ``doc_ids`` and the label and position helpers.
"""

from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from trainer.attention.documents import (Documents, block_work, drop_cross_document_labels, pack_blocks, schedule,
                                         step_blocks)
from trainer.attention.ring_attention import (ZigzagRingAttention, _step_work, diagonal_backward, diagonal_forward,
                                              flash_varlen_args, step_backward, step_forward)
from trainer.attention.zigzag import shard, zigzag_indices
from trainer.groups import ParallelGroups


def _covered_pairs(docs: Documents, ring: int) -> tuple[np.ndarray, list[int]]:
    """How often each (query, key) pair of row 0 is attended over the whole ring, and blocks per off-diagonal step."""
    seq = docs.seq_len
    counts = np.zeros((seq, seq), dtype=np.int64)
    off_diagonal = []
    for me in range(ring):
        q_pos = docs.local_indices(ring, me)[0].numpy()
        for step in range(ring):
            k_pos = docs.local_indices(ring, (me - step) % ring)[0].numpy()
            blocks = docs.blocks(ring, me, step)
            if step:
                off_diagonal.append(len(blocks))
            for blk in blocks:
                qs, ks = q_pos[blk.q], k_pos[blk.k]
                pairs = np.ones((len(qs), len(ks)), dtype=bool)
                if blk.causal:
                    pairs = np.tril(pairs)
                np.add.at(counts, np.ix_(qs, ks), pairs)
    return counts, off_diagonal


def _ring_groups(ring: int, me: int) -> ParallelGroups:
    """Ring rank ``me`` of a ring of ``ring`` without a process group (sharding needs only the ranks)."""
    ranks = list(range(ring))
    return ParallelGroups(me, ring, None, None, None, None, ranks, ranks, [me], [me])


@settings(max_examples=40, deadline=None)
@given(ring=st.integers(1, 5), chunk=st.integers(1, 6), layout=st.sampled_from(["document", "sequence"]), data=st.data())
def test_schedule_covers_exactly_the_document_causal_mask(ring, chunk, layout, data):
    seq = 2 * ring * chunk
    cuts = data.draw(st.sets(st.integers(1, seq - 1), max_size=seq - 1))
    docs = Documents(((0, *sorted(cuts), seq),), layout)
    counts, off_diagonal = _covered_pairs(docs, ring)
    assert (counts == docs.mask()[0].numpy()).all()  # every allowed pair once, nothing else
    # At most one rectangle per step: per document (document layout), per row (sequence layout).
    assert all(n <= (len(cuts) + 1 if layout == "document" else 1) for n in off_diagonal)
    held = [docs.local_indices(ring, me)[0] for me in range(ring)]
    assert {len(h) for h in held} == {seq // ring}  # every rank holds the same number of tokens
    assert sorted(torch.cat(held).tolist()) == list(range(seq))  # ... and together all of them, once
    work = [sum(block_work(docs.blocks(ring, me, s)) for s in range(ring)) for me in range(ring)]
    assert work == docs.rank_work(ring).tolist()  # the closed form the benchmark uses


def test_one_document_is_plain_zigzag_causal_attention():
    seq, ring = 16, 2
    one = Documents(((0, seq),))
    for me in range(ring):  # the per-document layout of one document is the whole-sequence zigzag
        assert torch.equal(one.local_indices(ring, me)[0], zigzag_indices(seq, ring, me))
        for s in range(ring):
            assert one.blocks(ring, me, s) == [b._replace(batch=slice(0, 1)) for b in step_blocks((0, seq), ring, me, s)]
    for me in range(ring):
        assert [(b.q, b.k, b.causal) for b in step_blocks((0, seq), ring, me, 0)] == [(slice(0, 8), slice(0, 8), True)]
    assert [(b.q, b.k) for b in step_blocks((0, seq), ring, 1, 1)] == [(slice(0, 8), slice(0, 4))]  # lower: first half of k
    assert [(b.q, b.k) for b in step_blocks((0, seq), ring, 0, 1)] == [(slice(4, 8), slice(0, 8))]  # higher: second half of q


def test_short_documents_skip_off_diagonal_blocks_and_cut_work():
    seq, ring = 64, 4
    short = tuple(range(0, seq + 1, 4))  # 16 documents of 4 tokens, chunk of 8
    whole = (0, seq)
    work = {name: [sum(block_work(step_blocks(cu, ring, me, s)) for s in range(ring)) for me in range(ring)]
            for name, cu in (("short", short), ("whole", whole))}
    assert all(step_blocks(short, ring, me, s) == [] for me in range(ring) for s in range(1, ring))
    assert sum(work["short"]) == 16 * (4 * 5 // 2)
    assert len(set(work["whole"])) == 1 and len(set(work["short"])) == 1  # zigzag: equal work on every rank


def test_documents_from_doc_ids_positions_and_labels():
    doc_ids = torch.tensor([[0, 0, 1, 1, 1, 2], [0, 0, 0, 0, 0, 0]])
    docs = Documents.from_doc_ids(doc_ids)
    assert docs.cu_seqlens == ((0, 2, 5, 6), (0, 6))
    assert docs.positions().tolist() == [[0, 1, 0, 1, 2, 0], [0, 1, 2, 3, 4, 5]]
    assert torch.equal(docs.doc_ids(), doc_ids)
    labels = torch.arange(10, 16).expand(2, 6)
    assert drop_cross_document_labels(labels, doc_ids).tolist() == [[10, -100, 12, 13, -100, 15], list(range(10, 16))]
    with pytest.raises(ValueError, match="non-decreasing"):
        Documents.from_doc_ids(torch.tensor([0, 1, 0]))
    with pytest.raises(ValueError, match="documents cover 2 x 6 tokens"):
        schedule(docs, 1, 6, 1, 0, 0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_cuda_kernel_calls_check_on_meta(dtype):
    """The CUDA calls (varlen flash for several documents in bf16, memory-efficient in fp32) accept GQA shapes."""
    q = torch.empty(1, 24, 8, 64, device="meta", dtype=dtype)
    k = torch.empty(1, 24, 2, 64, device="meta", dtype=dtype)
    blocks = step_blocks((0, 5, 9, 30, 48), 2, 0, 0, slice(0, 1))
    out, lse = diagonal_forward(q, k, k, blocks, 0.125)
    assert out.shape == q.shape and lse.shape == (1, 8, 24) and out.dtype == lse.dtype == torch.float32
    dq, dk, dv = diagonal_backward(q, q, k, k, out.to(dtype), lse, blocks, 0.125)
    assert dq.shape == q.shape and dk.shape == dv.shape == k.shape


needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device for the flash and memory-efficient kernels")


@pytest.mark.parametrize("device,dtype,tolerance", [
    ("cpu", torch.float32, 1e-5),
    pytest.param("cuda", torch.bfloat16, 3e-2, marks=needs_cuda),  # step 0 as one varlen flash call
])
def test_ring_of_one_under_documents_equals_block_diagonal_attention(device, dtype, tolerance):
    """The local block alone (a ring of one, no process group) under a document mask, forward and backward, GQA."""
    groups = ParallelGroups(0, 1, None, None, None, None, [0], [0], [0], [0])
    docs = Documents(((0, 3, 40, 41, 64), (0, 64)))
    gen = torch.Generator().manual_seed(5)
    q, dout = torch.randn(2, 64, 8, 16, generator=gen), torch.randn(2, 64, 8, 16, generator=gen)
    k, v = torch.randn(2, 64, 2, 16, generator=gen), torch.randn(2, 64, 2, 16, generator=gen)
    ref = [t.double().requires_grad_() for t in (q, k, v)]
    mask = docs.mask()[:, None]
    out_ref = F.scaled_dot_product_attention(*(t.transpose(1, 2) for t in ref), attn_mask=mask, enable_gqa=True).transpose(1, 2)
    out_ref.backward(dout.double())
    leaves = [t.to(device, dtype).requires_grad_() for t in (q, k, v)]
    out = ZigzagRingAttention.apply(*leaves, groups, 16 ** -0.5, docs)
    out.backward(dout.to(device, dtype))
    for got, want in zip((out, *(t.grad for t in leaves)), (out_ref, *(t.grad for t in ref))):
        assert got.shape == want.shape
        assert (got.double().cpu() - want).abs().max().item() <= tolerance


# ------------------------------------------------------------------ the per-document (balanced) layout
def _lognormal_documents(seq: int, median: float, seed: int) -> tuple[int, ...]:
    lengths = np.maximum(1, np.random.default_rng(seed).lognormal(np.log(median), 1.2, size=seq).astype(np.int64))
    cu = np.concatenate([[0], np.cumsum(lengths)])
    return (*cu[cu < seq].tolist(), seq)


@pytest.mark.parametrize("ring", [8, 32])
def test_document_layout_balances_realistic_mixes(ring):
    """Web-like (lognormal) mixes: the busiest rank within 1% of the mean, where the whole-sequence zigzag is far off."""
    for median in (500, 4000):
        cu = _lognormal_documents(1 << 16, median, seed=ring)
        balanced, whole = (Documents((cu,), layout).rank_work(ring) for layout in ("document", "sequence"))
        assert balanced.sum() == whole.sum()  # the same attention, placed differently
        assert balanced.max() / balanced.mean() < 1.01
        assert whole.max() / whole.mean() > 1.3
    # Documents shorter than 2R (here R tokens each): one token per chunk, still balanced by the paired deal.
    work = Documents((tuple(range(0, (1 << 16) + 1, ring)),)).rank_work(ring)
    assert work.max() / work.mean() < 1.01


@pytest.mark.parametrize("ring,ulysses", [(4, 1), (2, 2), (3, 2)])
def test_lengths_dividing_by_2r_give_ring_flash_attn_varlen_layout(ring, ulysses):
    """Second implementation: ring-flash-attn's varlen ``extract_local`` (each document chunked in 2R, take r and 2R-1-r)."""
    lengths = [2 * ring * n for n in (1, 5, 2)] + [2 * ring * ulysses]
    cu = tuple(np.concatenate([[0], np.cumsum(lengths)]).tolist())
    docs = Documents((cu,))
    x = torch.arange(cu[-1])
    for r in range(ring):
        pair = torch.cat([torch.cat([c[r], c[2 * ring - 1 - r]]) for c in (x[a:b].chunk(2 * ring) for a, b in zip(cu, cu[1:]))])
        for u in range(ulysses):
            assert torch.equal(docs.local_indices(ring, r, ulysses, u)[0], pair.chunk(ulysses)[u])
    local_cu, max_len = flash_varlen_args(docs, ring)
    assert local_cu == [n // ring for n in cu] and max_len == max(lengths) // ring
    assert flash_varlen_args(Documents(((0, 3, cu[-1]),)), ring) is None  # 3 tokens do not split in 2R chunks
    assert flash_varlen_args(Documents((cu,), "sequence"), ring) is None


def _simulated_ring(q, k, v, dout, docs: Documents | None, ring: int, scale: float):
    """The ring's per-rank steps in one process: every rank's blocks at every step, K/V passed by hand.

    ``docs`` None is the plain causal zigzag. Returns the whole ``out, dq, dk, dv`` put back in sequence order.
    """
    batch, seq = q.shape[:2]
    groups = [_ring_groups(ring, me) for me in range(ring)]
    local = [[shard(t, g, documents=docs) for t in (q, k, v, dout)] for g in groups]
    outs, grads = [], [[torch.zeros(t.shape, dtype=torch.float32, device=t.device) for t in (lq, lk, lv)]
                       for lq, lk, lv, _ in local]
    for me, (lq, lk, lv, ld) in enumerate(local):
        out, lse = diagonal_forward(lq, lk, lv, schedule(docs, batch, seq, ring, me, 0), scale)
        for step in range(1, ring):  # the ring's choice: per-block calls here, one varlen call per step on CUDA
            work = _step_work(docs, batch, seq, ring, me, step, lq)
            step_forward(lq, local[(me - step) % ring][1:3], out, lse, work, scale)
        out = out.to(lq.dtype)
        outs.append(out)
        dq, dk, dv = diagonal_backward(ld, lq, lk, lv, out, lse, schedule(docs, batch, seq, ring, me, 0), scale)
        grads[me][0] += dq
        grads[me][1] += dk
        grads[me][2] += dv
        for step in range(1, ring):
            src = (me - step) % ring
            work = _step_work(docs, batch, seq, ring, me, step, lq)
            step_backward(ld, lq, local[src][1:3], out, lse, grads[me][0], grads[src][1:], work, scale)
    whole = []
    for pieces in [outs] + [[g[i] for g in grads] for i in range(3)]:
        index = torch.cat([docs.local_indices(ring, me) if docs else zigzag_indices(seq, ring, me).expand(batch, -1)
                           for me in range(ring)], dim=1)
        result = torch.empty(pieces[0].shape[0], index.shape[1], *pieces[0].shape[2:], dtype=pieces[0].dtype,
                             device=pieces[0].device)
        for b in range(index.shape[0]):
            result[b, index[b]] = torch.cat([p[b] for p in pieces])
        whole.append(result)
    return whole


@settings(max_examples=30, deadline=None)
@given(ring=st.integers(2, 4), chunk=st.integers(1, 5), gqa=st.sampled_from([1, 2]), data=st.data())
def test_document_layout_ring_equals_block_diagonal_attention(ring, chunk, gqa, data):
    """Random document-length mixes, two rows packed differently: forward and backward against fp64 full attention."""
    seq = 2 * ring * chunk
    rows = tuple((0, *sorted(data.draw(st.sets(st.integers(1, seq - 1), max_size=seq - 1))), seq) for _ in range(2))
    docs = Documents(rows)
    gen = torch.Generator().manual_seed(seq)
    q, dout = torch.randn(2, seq, 2 * gqa, 8, generator=gen), torch.randn(2, seq, 2 * gqa, 8, generator=gen)
    k, v = torch.randn(2, seq, 2, 8, generator=gen), torch.randn(2, seq, 2, 8, generator=gen)
    ref = [t.double().requires_grad_() for t in (q, k, v)]
    out_ref = F.scaled_dot_product_attention(*(t.transpose(1, 2) for t in ref), attn_mask=docs.mask()[:, None],
                                             enable_gqa=True).transpose(1, 2)
    out_ref.backward(dout.double())
    got = _simulated_ring(q, k, v, dout, docs, ring, 8 ** -0.5)
    for name, g, want in zip(("out", "dq", "dk", "dv"), got, (out_ref, *(t.grad for t in ref))):
        assert (g.double() - want).abs().max().item() <= 1e-5, name


@needs_cuda
def test_document_layout_ring_on_cuda_equals_block_diagonal_attention():
    """The varlen flash calls of every step (bf16) on a mix with documents shorter than a chunk and longer than a share."""
    ring, seq = 4, 256
    docs = Documents(((0, 3, 5, 40, 41, 200, 256), (0, 17, 256)))
    gen = torch.Generator().manual_seed(3)
    q, dout = torch.randn(2, seq, 8, 64, generator=gen), torch.randn(2, seq, 8, 64, generator=gen)
    k, v = torch.randn(2, seq, 2, 64, generator=gen), torch.randn(2, seq, 2, 64, generator=gen)
    ref = [t.double().requires_grad_() for t in (q, k, v)]
    out_ref = F.scaled_dot_product_attention(*(t.transpose(1, 2) for t in ref), attn_mask=docs.mask()[:, None],
                                             enable_gqa=True).transpose(1, 2)
    out_ref.backward(dout.double())
    got = _simulated_ring(*(t.cuda().bfloat16() for t in (q, k, v, dout)), docs, ring, 64 ** -0.5)
    for name, g, want in zip(("out", "dq", "dk", "dv"), got, (out_ref, *(t.grad for t in ref))):
        assert (g.double().cpu() - want).abs().max().item() <= 5e-2, name


@pytest.mark.parametrize("device,dtype,tolerance", [
    ("cpu", torch.float32, 1e-5),
    pytest.param("cuda", torch.bfloat16, 5e-2, marks=needs_cuda),  # flash kernels
    pytest.param("cuda", torch.float32, 1e-4, marks=needs_cuda),  # memory-efficient kernels
])
def test_zigzag_ring_steps_equal_causal_attention(device, dtype, tolerance):
    """Every rank's steps of the plain causal zigzag (no documents), GQA, against fp64 causal attention."""
    ring, seq = 4, 256
    gen = torch.Generator().manual_seed(11)
    q, dout = torch.randn(2, seq, 8, 64, generator=gen), torch.randn(2, seq, 8, 64, generator=gen)
    k, v = torch.randn(2, seq, 2, 64, generator=gen), torch.randn(2, seq, 2, 64, generator=gen)
    ref = [t.double().requires_grad_() for t in (q, k, v)]
    out_ref = F.scaled_dot_product_attention(*(t.transpose(1, 2) for t in ref), is_causal=True,
                                             enable_gqa=True).transpose(1, 2)
    out_ref.backward(dout.double())
    got = _simulated_ring(*(t.to(device, dtype) for t in (q, k, v, dout)), None, ring, 64 ** -0.5)
    for name, g, want in zip(("out", "dq", "dk", "dv"), got, (out_ref, *(t.grad for t in ref))):
        assert (g.double().cpu() - want).abs().max().item() <= tolerance, name


def test_packed_steps_equal_packed_blocks():
    """The varlen packing built straight from the layout's spans equals the one built from its blocks."""
    docs = Documents(((0, 5, 9, 30, 48), (0, 7, 48), (0, 48)))
    for me in range(3):
        for step in range(3):
            packed, blocks = docs.packed(3, me, step, "cpu"), docs.blocks(3, me, step)
            assert packed is docs.packed(3, me, step, "cpu") and packed.count == len(blocks)
            for name, got in vars(packed).items():
                want = getattr(pack_blocks(blocks, "cpu"), name)
                assert (got == want) if isinstance(got, int) else torch.equal(got, want), name
            assert packed.cu_q.dtype == torch.int32


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_cuda_step_kernel_calls_check_on_meta(dtype):
    """Off-diagonal steps of the document layout on CUDA: one varlen flash call per step in bf16 (a block at a time in fp32)."""
    docs = Documents(((0, 5, 9, 30, 48), (0, 7, 48)))
    blocks = docs.blocks(2, 0, 1)
    assert len(blocks) > 2
    q = torch.empty(2, 24, 8, 64, device="meta", dtype=dtype)
    k = torch.empty(2, 24, 2, 64, device="meta", dtype=dtype)
    out = torch.empty(q.shape, device="meta", dtype=torch.float32)
    lse = torch.empty(2, 8, 24, device="meta", dtype=torch.float32)
    # What the ring passes: bf16 (flash) the blocks packed once and kept for every layer, fp32 the blocks.
    work = docs.packed(2, 0, 1, q.device) if dtype == torch.bfloat16 else blocks
    step_forward(q, (k, k), out, lse, work, 0.125)
    assert out.shape == q.shape and lse.shape == (2, 8, 24)
    dq = torch.empty(q.shape, device="meta", dtype=torch.float32)
    dkv = [torch.empty(k.shape, device="meta", dtype=torch.float32) for _ in range(2)]
    step_backward(q, q, (k, k), out.to(dtype), lse, dq, dkv, work, 0.125)
    assert dq.shape == q.shape and dkv[0].shape == dkv[1].shape == k.shape


@pytest.mark.parametrize("restart", [False, True])
def test_stage_micro_batch_shards_ids_labels_positions_by_the_document_layout(restart):
    """The data side: every rank's ids, labels (shifted on the whole sample) and positions come from the same tokens."""
    from trainer.stage import _micro_batch

    seq, ring = 24, 3
    doc_ids = torch.tensor([0] * 2 + [1] * 11 + [2] * 5 + [3] * 6)
    ids = torch.arange(100, 100 + seq + 1)
    sample = {"input_ids": ids[:-1], "labels": ids[1:], "doc_ids": doc_ids}
    cfg = SimpleNamespace(seq_len=seq, data=SimpleNamespace(document_mask=True, restart_positions=restart))
    docs = Documents.from_doc_ids(doc_ids)
    whole_positions = docs.positions()[0] if restart else torch.arange(seq)
    seen = []
    for me in range(ring):
        batch = _micro_batch(sample, cfg, _ring_groups(ring, me), None, torch.device("cpu"))
        held = docs.local_indices(ring, me)[0]
        assert batch["documents"] == docs
        assert torch.equal(batch["input_ids"][0], ids[held])
        assert torch.equal(batch["positions"][0], whole_positions[held])
        expected = ids[held + 1].masked_fill(docs.doc_ids()[0][held] != doc_ids[(held + 1).clamp(max=seq - 1)], -100)
        assert torch.equal(batch["labels"][0], expected)  # the next token, none across a document boundary
        seen += held.tolist()
    assert sorted(seen) == list(range(seq))
