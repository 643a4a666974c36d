"""ZeRO-3 start-up: the model is built straight into partitions, and trains to the same loss as a whole one.

Two gloo ranks with DeepSpeed's CPU accelerator. A tiny Llama is saved once;
each rank then loads it with the stage's ZeRO-3 config (``build_model``'s
from_pretrained inside ``zero3_construction``) and also builds a random one
from its config inside the context. Right after construction each rank must
hold about half of the parameters; the DeepSpeed engine's loss must equal
the loss of the whole model on one process.
"""

import os
import sys

import pytest
import torch
import torch.distributed as dist
from transformers import AutoModelForCausalLM

from dist_utils import run_distributed
from topology.planning.plan import Plan, RankPlacement
from trainer.attention.documents import Documents
from trainer.attention.hf_attention import register_ring_attention
from trainer.config import ModelConfig
from trainer.groups import ParallelGroups
from trainer.engine import MUON_MODULE, import_deepspeed, make_engine, zero3_construction
from trainer.model.loss import ShardLoss, shard_loss_sum
from trainer.model.llama import build_model
from trainer.attention.zigzag import shift_labels

TINY = {"vocab_size": 128, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "attention_dropout": 0.0}
DS_CONFIG = {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1,
             "zero_optimization": {"stage": 3}, "bf16": {"enabled": False},
             "optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "torch_adam": True}}}
SEQ = 32


def _local_numel(model: torch.nn.Module) -> tuple[int, int]:
    """(elements this rank holds, elements of the whole model); a ZeRO-3 parameter keeps its partition in ds_tensor."""
    held = sum(p.ds_tensor.numel() if hasattr(p, "ds_tensor") else p.numel() for p in model.parameters())
    whole = sum(p.ds_numel if hasattr(p, "ds_numel") else p.numel() for p in model.parameters())
    return held, whole


def _start_up(rank: int, world: int, model_dir: str) -> dict:
    if rank == 0:
        build_model(ModelConfig(tiny=TINY), 10_000.0, SEQ, seed=3).save_pretrained(model_dir)
    dist.barrier()
    whole = build_model(ModelConfig(path=model_dir), 10_000.0, SEQ)
    ids = torch.randint(0, TINY["vocab_size"], (1, SEQ), generator=torch.Generator().manual_seed(0))
    positions, labels = torch.arange(SEQ)[None], shift_labels(ids)
    with torch.no_grad():
        reference, _ = shard_loss_sum(whole, ids, positions, labels)

    loaded = build_model(ModelConfig(path=model_dir), 10_000.0, SEQ, ds_config=DS_CONFIG)
    with zero3_construction(DS_CONFIG):
        random = AutoModelForCausalLM.from_config(whole.config)
    results = {"loaded": _local_numel(loaded), "random": _local_numel(random)}
    results["tiny"] = _local_numel(build_model(ModelConfig(tiny=TINY), 10_000.0, SEQ, seed=3, ds_config=DS_CONFIG))
    results["after"] = _local_numel(AutoModelForCausalLM.from_config(whole.config))
    engine = make_engine(ShardLoss(loaded), DS_CONFIG, torch.device("cpu"))
    results["inductor"] = "torch._inductor.compile_fx" in sys.modules  # Muon's kernels were never compiled
    with torch.no_grad():
        loss, _ = engine(ids, positions, labels)
    results["loss"], results["reference"] = loss.item(), reference.item()

    # Document boundaries pass through the DeepSpeed engine to every attention call (ring of one here).
    groups = ParallelGroups.from_plan(Plan("naive", world, 1, 1, SEQ, [RankPlacement(r, "host0", r) for r in range(world)]))
    documents = Documents(((0, 5, 20, SEQ),))
    for model in (whole, loaded):
        model.set_attn_implementation(register_ring_attention(groups))
    with torch.no_grad():
        masked, _ = engine(ids, positions, labels, documents)
        masked_reference, _ = shard_loss_sum(whole, ids, positions, labels, documents)
    results["masked"], results["masked_reference"] = masked.item(), masked_reference.item()
    return results


def test_zero3_start_up_partitions_and_matches_whole_model(tmp_path):
    per_rank = run_distributed(_start_up, 2, str(tmp_path / "tiny"), timeout=240)
    for results in per_rank:
        for kind in ("loaded", "random"):
            held, whole = results[kind]
            assert 0.45 * whole <= held <= 0.55 * whole, (kind, held, whole)  # about 1/N of every parameter
        for kind in ("tiny", "after"):  # a seeded tiny model, and any model built after the context: whole
            held, whole = results[kind]
            assert held == whole, kind
        assert abs(results["loss"] - results["reference"]) <= 1e-4 * abs(results["reference"])
        assert results["reference"] > 1.0
        assert abs(results["masked"] - results["masked_reference"]) <= 1e-4 * abs(results["masked_reference"])
        assert abs(results["masked"] - results["loss"]) > 1e-3  # the mask changed what the tokens see
        assert not results["inductor"]


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # TorchInductor's own, as it loads
def test_a_stage_that_asks_for_muon_gets_deepspeeds_muon():
    sys.modules.pop(MUON_MODULE, None)
    import_deepspeed()
    assert sys.modules[MUON_MODULE].MuonWithAuxAdam.__module__ == "trainer.engine"  # the stand-in, nothing compiled
    import_deepspeed(muon=True)
    from deepspeed.runtime.zero.muon.muon_optimizer import MuonWithAuxAdam

    assert MuonWithAuxAdam.__module__ == MUON_MODULE and hasattr(MuonWithAuxAdam, "step")


@pytest.mark.parametrize("arch_list, readable", [
    ("9.0a", "9.0"),
    ("8.0 8.6 9.0a 10.0f 12.0a+PTX", "8.0;8.6;9.0;10.0;12.0+PTX"),
    ("9.0;9.0a", "9.0"),
    ("Hopper", None),
])
def test_deepspeeds_op_builder_reads_the_arch_list_ranks_give_it(monkeypatch, arch_list, readable):
    """CUDA images for Hopper set targets like ``9.0a``; DeepSpeed's JIT build of FusedAdam failed on them."""
    from deepspeed.ops.op_builder.fused_adam import FusedAdamBuilder  # the CUDA builder, whatever the accelerator

    from trainer.engine import prepare_jit_build

    def arch_flags() -> str:
        builder = FusedAdamBuilder()
        builder.jit_mode, builder._jit_arch_list = True, os.environ["TORCH_CUDA_ARCH_LIST"]
        builder.compute_capability_args()
        return os.environ["TORCH_CUDA_ARCH_LIST"]

    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", arch_list)
    if readable is not None and any(c.isalpha() for c in arch_list.replace("+PTX", "")):
        with pytest.raises(ValueError):
            arch_flags()
    prepare_jit_build()
    assert os.environ.get("TORCH_CUDA_ARCH_LIST") == readable
    if readable is not None:
        assert arch_flags().split(";")[-1].endswith("+PTX")
