"""Memory per GPU: hand-checked terms, the recipe's stages, and the activation formula held against autograd."""

import pytest
import torch
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRotaryEmbedding

from launcher.estimate.memory import MemoryAssumptions, estimate_memory, intermediate_size, layer_saved_bytes, model_shape
from topology.cost import LLAMA3_8B, ModelShape
from topology.errors import ConfigError
from topology.network.model import GpuSpec
from trainer.config import ModelConfig

L40S = GpuSpec()


def test_model_states_are_sharded_over_the_world():
    m = estimate_memory(LLAMA3_8B, seq_len=65536, gpus=8, cp=8)
    p = LLAMA3_8B.params
    assert (m.weights, m.grads, m.optimizer) == (2 * p / 8, 2 * p / 8, 12 * p / 8)
    assert 16.0e9 < m.weights + m.grads + m.optimizer < 16.1e9  # 16 bytes per parameter over 8 GPUs
    wide = estimate_memory(LLAMA3_8B, seq_len=65536, gpus=512, cp=8)
    assert wide.optimizer == pytest.approx(m.optimizer / 64)
    assert wide.checkpoints == m.checkpoints  # activations follow tokens per GPU, not the world


def test_activation_terms_by_hand():
    m = estimate_memory(LLAMA3_8B, seq_len=2**19, gpus=512, cp=32)
    c = 16384
    assert m.checkpoints == c * 4096 * 2 * 32
    assert intermediate_size(LLAMA3_8B) == 14336
    assert m.ring_buffers == c * 1024 * (2 * 2 * 2 + 2 * 2 * 4) + c * (4096 + 32) * 4
    assert m.logits == (2**30 // (4 * 128256)) * 128256 * 14  # one loss chunk, not all 16K tokens
    assert m.zero_buffers == 2 * (1e9 + 5e8)
    halved = estimate_memory(LLAMA3_8B, seq_len=2**19, gpus=512, cp=64)
    assert halved.checkpoints == m.checkpoints / 2 and halved.layer_working == m.layer_working / 2


def test_recipe_stages_fit_an_l40s_and_smaller_rings_do_not():
    for seq, gpus, cp in [(2**16, 8, 8), (2**18, 32, 32), (2**19, 512, 32), (2**20, 512, 64), (2**22, 512, 256)]:
        m = estimate_memory(LLAMA3_8B, seq, gpus, cp, gpu=L40S)
        assert m.fits and m.total <= 0.9 * 48e9, (seq, m.total / 1e9)
    assert not estimate_memory(LLAMA3_8B, 2**16, 8, 1).fits  # 64K tokens on one GPU
    assert not estimate_memory(LLAMA3_8B, 2**18, 32, 4).fits


def test_options_move_the_right_terms():
    base = estimate_memory(LLAMA3_8B, 2**19, 512, 32)
    no_ckpt = estimate_memory(LLAMA3_8B, 2**19, 512, 32, assumptions=MemoryAssumptions(activation_checkpointing=False))
    assert no_ckpt.checkpoints == 0 and no_ckpt.layer_working == 32 * base.layer_working and not no_ckpt.fits
    whole = estimate_memory(LLAMA3_8B, 2**19, 512, 32, assumptions=MemoryAssumptions(loss_chunk_bytes=None))
    assert whole.logits == 16384 * 128256 * 14
    ds = {"zero_optimization": {"stage3_max_live_parameters": 1e8, "reduce_bucket_size": 1e8}}
    assert estimate_memory(LLAMA3_8B, 2**19, 512, 32, deepspeed=ds).zero_buffers == 2 * 2e8
    usp = estimate_memory(LLAMA3_8B, 2**19, 512, 32, ulysses=2)
    assert usp.ring_buffers > base.ring_buffers  # the all-to-all copies
    assert estimate_memory(LLAMA3_8B, 2**19, 512, 32, gpu=GpuSpec(memory_gb=24)).fits is True
    assert estimate_memory(LLAMA3_8B, 2**19, 512, 32, gpu=GpuSpec(memory_gb=16)).fits is False


@pytest.mark.parametrize("gpus, cp, ulysses", [(8, 3, 1), (8, 8, 3), (12, 12, 1)])
def test_bad_layouts_raise(gpus, cp, ulysses):
    with pytest.raises(ConfigError):
        estimate_memory(LLAMA3_8B, 65536, gpus, cp, ulysses)


def test_layer_formula_matches_what_autograd_saves():
    """Run a real HF Llama layer in bf16 and add up the activations autograd keeps for backward."""
    cfg = LlamaConfig(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=16, intermediate_size=96,
                      num_hidden_layers=1, vocab_size=100)
    cfg._attn_implementation = "sdpa"
    layer = LlamaDecoderLayer(cfg, 0).to(torch.bfloat16)
    tokens = 128
    x = torch.randn(1, tokens, 64, dtype=torch.bfloat16, requires_grad=True)
    pos = torch.arange(tokens)[None]
    cos, sin = LlamaRotaryEmbedding(cfg)(x, pos)
    skip = {p.untyped_storage().data_ptr() for p in layer.parameters()} | {x.untyped_storage().data_ptr()}
    saved: dict[int, int] = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in skip:
            saved[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        layer(x, attention_mask=None, position_embeddings=(cos, sin), position_ids=pos).sum().backward()
    shape = ModelShape("tiny", layers=1, hidden=64, n_q_heads=4, n_kv_heads=2, head_dim=16, vocab=100,
                       params=2 * 100 * 64 + 64 + 64 * 64 * 2 + 2 * 64 * 32 + 3 * 64 * 96 + 2 * 64)
    assert intermediate_size(shape) == 96
    assert sum(saved.values()) == tokens * layer_saved_bytes(shape)


@pytest.mark.parametrize("tie", [False, True])
def test_shape_of_a_tiny_config_counts_what_hf_builds(tie):
    from transformers import LlamaForCausalLM

    tiny = {"hidden_size": 48, "intermediate_size": 80, "num_hidden_layers": 3, "num_attention_heads": 6,
            "num_key_value_heads": 2, "head_dim": 8, "vocab_size": 262, "tie_word_embeddings": tie}
    shape, source = model_shape(ModelConfig(tiny=tiny))
    real = LlamaForCausalLM(LlamaConfig(**tiny))
    assert shape.params == sum(p.numel() for p in real.parameters())
    assert intermediate_size(shape) == 80 and shape.n_kv_heads == 2 and "tiny" in source


def test_hub_name_without_a_local_config_falls_back_to_llama3_8b():
    shape, source = model_shape(ModelConfig(path="meta-llama/Meta-Llama-3-8B-Instruct"))
    assert shape == LLAMA3_8B and "assuming Llama-3-8B" in source


def test_start_up_host_memory_falls_with_zero3_construction():
    """Eight ranks of Llama-3-8B on one host: 8 whole bf16 copies (128 GB) against one checkpoint file plus 1/N each."""
    from launcher.estimate.memory import startup_host_bytes

    whole = startup_host_bytes(8.03e9, 8, 8, zero3=False)
    partitioned = startup_host_bytes(8.03e9, 8, 8, zero3=True)
    assert whole == 8 * 2 * 8.03e9
    assert partitioned == 5e9 + 2 * 8.03e9
    # On 512 GPUs each rank's share is tiny: the checkpoint file being read dominates.
    assert startup_host_bytes(8.03e9, 8, 512, zero3=True) == 5e9 + 8 * 2 * 8.03e9 / 512
