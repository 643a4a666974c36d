"""Zigzag sharding as pure functions: coverage, balance, the ring-flash-attn / USP layout, labels."""

import pytest
import torch
from hypothesis import given, settings, strategies as st

from topology.errors import ConfigError
from trainer.groups import ParallelGroups
from trainer.attention.zigzag import IGNORE_INDEX, check_seq_len, shard, shift_labels, zigzag_indices


def _layout(ring: int, ulysses: int, cp_rank: int) -> ParallelGroups:
    """The rank grid's view for one rank of a single sequence, without process groups (shard needs none)."""
    cp = list(range(ring * ulysses))
    r, u = divmod(cp_rank, ulysses)
    return ParallelGroups(cp_rank, len(cp), None, None, None, None, cp,
                          ring_ranks=[i * ulysses + u for i in range(ring)],
                          ulysses_ranks=[r * ulysses + j for j in range(ulysses)], dp_ranks=[cp_rank])


def test_hand_checked_layout():
    # 16 tokens, ring 4: chunks of 2; rank r holds chunks r and 7 - r.
    assert [zigzag_indices(16, 4, r).tolist() for r in range(4)] == [
        [0, 1, 14, 15], [2, 3, 12, 13], [4, 5, 10, 11], [6, 7, 8, 9]]
    # Ulysses 2 x ring 2 over 8 tokens: ring rank 0's pair [0, 1, 6, 7] split in two contiguous pieces.
    assert zigzag_indices(8, 2, 0, 2, 0).tolist() == [0, 1]
    assert zigzag_indices(8, 2, 0, 2, 1).tolist() == [6, 7]


@settings(max_examples=60, deadline=None)
@given(ring=st.integers(1, 8), ulysses=st.sampled_from([1, 2, 4]), chunk=st.integers(1, 6))
def test_shards_cover_the_sequence_once_and_balance_causal_work(ring, ulysses, chunk):
    seq = 2 * ring * ulysses * chunk
    held = [zigzag_indices(seq, ring, r, ulysses, u) for r in range(ring) for u in range(ulysses)]
    assert sorted(torch.cat(held).tolist()) == list(range(seq))
    assert {len(h) for h in held} == {seq // (ring * ulysses)}
    # Causal work of a ring member (its whole pair, after the all-to-all): token t sees t + 1 keys.
    work = {int(torch.cat(held[r * ulysses:(r + 1) * ulysses]).add(1).sum()) for r in range(ring)}
    assert len(work) == 1


@pytest.mark.parametrize("ring,ulysses", [(4, 1), (2, 2), (3, 2)])
def test_matches_ring_flash_attn_and_usp_layout(ring, ulysses):
    """Second implementation: ring-flash-attn's ``extract_local`` (chunk 2R, take r and 2R-1-r), then USP's split in U."""
    seq = 2 * ring * ulysses * 3
    x = torch.arange(seq)
    for r in range(ring):
        chunks = x.chunk(2 * ring)
        pair = torch.cat([chunks[r], chunks[2 * ring - 1 - r]])
        for u in range(ulysses):
            assert torch.equal(zigzag_indices(seq, ring, r, ulysses, u), pair.chunk(ulysses)[u])


def test_shard_follows_the_rank_grid():
    ids = torch.arange(100, 132).unsqueeze(0)  # [batch 1, 32 tokens]
    for cp_rank in range(4):
        groups = _layout(ring=2, ulysses=2, cp_rank=cp_rank)
        expected = zigzag_indices(32, 2, groups.ring_rank, 2, groups.ulysses_rank)
        assert torch.equal(shard(ids, groups), ids[:, expected])
        assert torch.equal(shard(ids.unsqueeze(-1), groups, dim=1)[..., 0], ids[:, expected])


def test_labels_are_shifted_before_sharding():
    ids = torch.arange(10, 26).unsqueeze(0)
    labels = shift_labels(ids)
    assert labels[0, :-1].tolist() == list(range(11, 26)) and labels[0, -1] == IGNORE_INDEX
    # Rank 0 of a ring of 2 holds tokens 0-3 and 12-15: token 3's label is token 4, which lives on rank 1.
    local = shard(labels, _layout(ring=2, ulysses=1, cp_rank=0))
    assert local[0].tolist() == [11, 12, 13, 14, 23, 24, 25, IGNORE_INDEX]


@pytest.mark.parametrize("seq_len,cp", [(100, 8), (6, 2), (0, 1)])
def test_bad_sequence_length_is_a_one_line_config_error(seq_len, cp):
    with pytest.raises(ConfigError, match=rf"sequence length {seq_len} is not divisible by 2 \* context-parallel size \({2 * cp}\)") as info:
        check_seq_len(seq_len, cp)
    assert "\n" not in str(info.value)
    with pytest.raises(ConfigError):
        zigzag_indices(seq_len, cp, 0)


def test_rank_outside_the_grid():
    with pytest.raises(ValueError, match="outside the grid"):
        zigzag_indices(16, 2, 2)
