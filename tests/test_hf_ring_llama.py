"""A tiny HF Llama on one zigzag-sharded sequence gives the unsharded loss, logits and gradients.

One world of 4 gloo processes runs C=2 (two data-parallel copies), C=4,
Ulysses 2 x ring 2, and C=4 with gradient checkpointing. Every rank builds
the same randomly initialised model, computes the reference on the whole
sequence with transformers' own SDPA attention, then switches the model to
ring attention through AttentionInterface and runs its shard.

Under document masks (C=1, C=4, Ulysses 2 x ring 2; positions running over
the sample or restarting per document) the reference runs each document on
its own through SDPA, which is what a block-diagonal causal mask means.
"""

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaForCausalLM

from dist_utils import run_distributed
from topology.planning.plan import Plan, RankPlacement
from trainer.groups import ParallelGroups
from trainer.attention.documents import Documents, drop_cross_document_labels
from trainer.attention.hf_attention import register_ring_attention
from trainer.model.loss import shard_loss_sum
from trainer.attention.zigzag import shard, shift_labels, unshard

WORLD = 4
SEQ = 64
TOLERANCE = 1e-5

# name: (dp, cp, ulysses, gradient checkpointing)
LAYOUTS = {
    "C2": (2, 2, 1, False),
    "C4": (1, 4, 1, False),
    "C4_ulysses2": (1, 4, 2, False),
    "C4_checkpointing": (1, 4, 1, True),
}


# name: (dp, cp, ulysses, restart positions); documents of the 64-token sequence below
DOC_LAYOUTS = {
    "docs_C1": (4, 1, 1, False),
    "docs_C4": (1, 4, 1, False),
    "docs_C4_ulysses2_restart": (1, 4, 2, True),
}
CU_SEQLENS = (0, 3, 4, 13, 40, 52, 64)


def _tiny_llama() -> LlamaForCausalLM:
    torch.manual_seed(0)  # same weights on every rank
    config = LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=SEQ,
                         rope_parameters={"rope_type": "default", "rope_theta": 10_000.0}, attention_dropout=0.0)
    config._attn_implementation = "sdpa"
    return LlamaForCausalLM(config).train()


def _grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().clone() for n, p in model.named_parameters()}


def _setup(dp: int, cp: int, ulysses: int, seed: int) -> tuple[ParallelGroups, LlamaForCausalLM, torch.Tensor]:
    """This rank's groups, the tiny model (the same on every rank) and its data-parallel group's sample."""
    plan = Plan("naive", dp, cp, ulysses, SEQ, [RankPlacement(r, "host0", r) for r in range(dp * cp)])
    groups = ParallelGroups.from_plan(plan)
    model = _tiny_llama()
    gen = torch.Generator().manual_seed(seed + groups.dp_rank)
    return groups, model, torch.randint(0, model.config.vocab_size, (1, SEQ), generator=gen)


def _compare(dp: int, cp: int, ulysses: int, checkpointing: bool) -> dict[str, float]:
    groups, model, input_ids = _setup(dp, cp, ulysses, seed=7)
    labels = shift_labels(input_ids)
    positions = torch.arange(SEQ).unsqueeze(0)

    ref = model(input_ids=input_ids, position_ids=positions)
    ref_loss = torch.nn.functional.cross_entropy(ref.logits[0], labels[0], ignore_index=-100)
    ref_loss.backward()
    ref_grads = _grads(model)
    model.zero_grad(set_to_none=True)

    model.set_attn_implementation(register_ring_attention(groups))
    if checkpointing:
        model.gradient_checkpointing_enable()
    calls = []  # attention runs twice per step when checkpointing recomputes it in backward
    model.model.layers[0].self_attn.register_forward_hook(lambda *_: calls.append(1))
    local_ids, local_positions = shard(input_ids, groups), shard(positions, groups)
    # Each rank: the sum of its tokens' losses over the sequence's token count, so the shares add up to the mean.
    loss_sum, count = shard_loss_sum(model, local_ids, local_positions, shard(labels, groups))
    dist.all_reduce(count, group=groups.cp_group)
    loss = loss_sum / count
    loss.backward()
    attention_calls = len(calls)
    total = loss.detach().clone()
    dist.all_reduce(total, group=groups.cp_group)
    with torch.no_grad():
        logits = model(input_ids=local_ids, position_ids=local_positions).logits
    grad_errors = []
    for name, grad in _grads(model).items():
        dist.all_reduce(grad, group=groups.cp_group)  # the shares' gradients sum to the sequence's
        grad_errors.append((grad - ref_grads[name]).abs().max().item())
    return {
        "loss": abs(total.item() - ref_loss.item()),
        "logits": (unshard(logits.detach(), groups) - ref.logits.detach()).abs().max().item(),
        "grads": max(grad_errors),
        "ref_loss": ref_loss.item(),
        "attention_calls": attention_calls,
    }


def _compare_documents(dp: int, cp: int, ulysses: int, restart: bool) -> dict[str, float]:
    groups, model, input_ids = _setup(dp, cp, ulysses, seed=11)
    documents = Documents((CU_SEQLENS,))
    labels = drop_cross_document_labels(shift_labels(input_ids), documents.doc_ids())
    positions = documents.positions() if restart else torch.arange(SEQ)[None]

    # Reference: every document on its own, summed token losses over the sample's labelled tokens.
    ref_sum = torch.zeros(())
    ref_logits = []
    for a, b in zip(CU_SEQLENS, CU_SEQLENS[1:]):
        logits = model(input_ids=input_ids[:, a:b], position_ids=positions[:, a:b]).logits
        ref_sum = ref_sum + F.cross_entropy(logits[0], labels[0, a:b], ignore_index=-100, reduction="sum")
        ref_logits.append(logits.detach())
    count = (labels != -100).sum()
    (ref_sum / count).backward()
    ref_grads = _grads(model)
    model.zero_grad(set_to_none=True)

    model.set_attn_implementation(register_ring_attention(groups))
    ids, pos = shard(input_ids, groups, documents=documents), shard(positions, groups, documents=documents)
    loss_sum, _ = shard_loss_sum(model, ids, pos, shard(labels, groups, documents=documents), documents)
    (loss_sum / count).backward()
    total = loss_sum.detach().clone()
    dist.all_reduce(total, group=groups.cp_group)
    grad_errors = []
    for name, grad in _grads(model).items():
        dist.all_reduce(grad, group=groups.cp_group)
        grad_errors.append((grad - ref_grads[name]).abs().max().item())
    with torch.no_grad():
        logits = model(input_ids=ids, position_ids=pos, documents=documents).logits
    return {"loss": abs(total.item() - ref_sum.item()) / count.item(),
            "logits": (unshard(logits, groups, documents=documents) - torch.cat(ref_logits, dim=1)).abs().max().item(),
            "grads": max(grad_errors), "ref_loss": ref_sum.item() / count.item()}


def _all_layouts(rank: int, world: int) -> dict:
    results = {name: _compare(*layout) for name, layout in LAYOUTS.items()}
    results.update({name: _compare_documents(*layout) for name, layout in DOC_LAYOUTS.items()})
    return results


@pytest.fixture(scope="module")
def per_rank():
    return run_distributed(_all_layouts, WORLD, timeout=300)


@pytest.mark.parametrize("layout", list(LAYOUTS) + list(DOC_LAYOUTS))
def test_sharded_loss_logits_and_grads_match_unsharded(per_rank, layout):
    for rank, results in enumerate(per_rank):
        errors = results[layout]
        assert errors["ref_loss"] > 1.0  # a random model: the loss is near ln(96), not a degenerate 0
        assert errors["loss"] <= TOLERANCE, f"rank {rank}: {errors}"
        assert errors["logits"] <= TOLERANCE, f"rank {rank}: {errors}"
        assert errors["grads"] <= TOLERANCE, f"rank {rank}: {errors}"


def test_gradient_checkpointing_recomputes_ring_attention(per_rank):
    assert all(results["C4_checkpointing"]["attention_calls"] == 2 for results in per_rank)
    assert all(results["C4"]["attention_calls"] == 1 for results in per_rank)
