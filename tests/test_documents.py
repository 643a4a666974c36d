"""Document masks of packed samples: the ring's block schedule covers exactly the block-diagonal causal mask.

Pure functions, no process group: ``step_blocks`` for every rank and step of
a ring, checked pair by pair against the dense mask, over random document
length mixes (hypothesis); the CUDA kernel calls' shapes on the meta device;
the dataset's ``doc_ids`` and the label and position helpers.
"""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from trainer.attention.documents import Documents, block_work, drop_cross_document_labels, schedule, step_blocks
from trainer.attention.ring_attention import ZigzagRingAttention, diagonal_backward, diagonal_forward
from trainer.attention.zigzag import zigzag_indices
from trainer.groups import ParallelGroups


def _covered_pairs(cu: tuple[int, ...], ring: int) -> tuple[np.ndarray, list[int]]:
    """How often each (query, key) pair of the sequence is attended over the whole ring, and blocks per off-diagonal step."""
    seq = cu[-1]
    counts = np.zeros((seq, seq), dtype=np.int64)
    off_diagonal = []
    for me in range(ring):
        q_pos = zigzag_indices(seq, ring, me).numpy()
        for step in range(ring):
            k_pos = zigzag_indices(seq, ring, (me - step) % ring).numpy()
            blocks = step_blocks(cu, ring, me, step)
            if step:
                off_diagonal.append(len(blocks))
            for blk in blocks:
                qs, ks = q_pos[blk.q], k_pos[blk.k]
                pairs = np.ones((len(qs), len(ks)), dtype=bool)
                if blk.causal:
                    pairs = np.tril(pairs)
                counts[np.ix_(qs, ks)] += pairs
    return counts, off_diagonal


@settings(max_examples=40, deadline=None)
@given(ring=st.integers(1, 5), chunk=st.integers(1, 6), data=st.data())
def test_schedule_covers_exactly_the_document_causal_mask(ring, chunk, data):
    seq = 2 * ring * chunk
    cuts = data.draw(st.sets(st.integers(1, seq - 1), max_size=seq - 1))
    cu = (0, *sorted(cuts), seq)
    counts, off_diagonal = _covered_pairs(cu, ring)
    expected = Documents((cu,)).mask()[0].numpy()
    assert (counts == expected).all()  # every allowed pair once, nothing else
    assert all(n <= 1 for n in off_diagonal)  # at most one rectangle per off-diagonal step


def test_one_document_is_plain_zigzag_causal_attention():
    seq, ring = 16, 2
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


needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device for the varlen flash kernel")


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
