"""RoPE theta schedule: the recipe's published theta row, and that HF Llama really rotates with it."""

import json
import math

import pytest
import torch
from transformers import AutoConfig, LlamaConfig, LlamaForCausalLM
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

from trainer.model.llama import set_rope, write_rope_compat
from trainer.model.rope import ntk_theta, scaling_law_theta

BASE_THETA, BASE_LEN = 500_000.0, 8192  # Llama-3-8B-Instruct


def _significant(x: float, digits: int) -> float:
    return float(f"{x:.{digits}g}")


def test_recipe_theta_row():
    """65K, 262K, 524K by NTK stage by stage; 1048K by NTK from 262K (s=4); 4191K by the scaling law."""
    t65k = ntk_theta(BASE_THETA, BASE_LEN, 2**16)
    t262k = ntk_theta(t65k, 2**16, 2**18)
    t524k = ntk_theta(t262k, 2**18, 2**19)
    t1048k = ntk_theta(t262k, 2**18, 2**20)
    t4191k = scaling_law_theta(BASE_THETA, BASE_LEN, 2**22)
    assert _significant(t65k, 3) == 15.3e6
    assert _significant(t262k, 4) == 207.1e6
    assert _significant(t524k, 3) == 1.06e9
    assert _significant(t1048k, 3) == 2.80e9
    assert _significant(t4191k, 3) == 45.2e9


def test_rules_keep_the_base_at_the_base_length():
    assert ntk_theta(BASE_THETA, BASE_LEN, BASE_LEN) == pytest.approx(BASE_THETA)
    assert scaling_law_theta(BASE_THETA, BASE_LEN, BASE_LEN) == pytest.approx(BASE_THETA)


@pytest.mark.parametrize("rule", [
    lambda n: ntk_theta(BASE_THETA, BASE_LEN, n),
    lambda n: scaling_law_theta(BASE_THETA, BASE_LEN, n),
])
def test_theta_rises_with_length(rule):
    thetas = [rule(2**k) for k in range(13, 23)]
    assert all(a < b for a, b in zip(thetas, thetas[1:]))


def test_ntk_alpha_one_is_plain_ntk_scaling():
    # alpha = 1: theta * s ** (d / (d - 2)), the original NTK-aware rule.
    assert ntk_theta(10_000, 1000, 4000, head_dim=64, alpha=1.0) == pytest.approx(10_000 * 4 ** (64 / 62))


@pytest.mark.parametrize("call", [
    lambda: ntk_theta(BASE_THETA, 0, 1024),
    lambda: ntk_theta(BASE_THETA, 1024, 2048, head_dim=2),
    lambda: scaling_law_theta(BASE_THETA, BASE_LEN, 4),
])
def test_bad_lengths_raise(call):
    with pytest.raises(ValueError):
        call()


def test_hf_llama_rotates_with_the_theta_in_rope_parameters():
    """Writing theta into ``config.rope_parameters`` is what changes the model's rotary frequencies."""
    theta = ntk_theta(BASE_THETA, BASE_LEN, 2**16)
    head_dim = 16
    config = LlamaConfig(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2**16,
                         rope_parameters={"rope_type": "default", "rope_theta": theta})
    rotary = LlamaRotaryEmbedding(config)
    expected = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    torch.testing.assert_close(rotary.inv_freq.double(), expected, rtol=1e-6, atol=0)
    # The slowest dimension turns less than once over the whole context: the point of raising theta.
    assert 2**16 * rotary.inv_freq.min().item() < 2 * math.pi


LLAMA3_SCALING = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                  "original_max_position_embeddings": 8192}


def _llama3_base() -> LlamaConfig:
    return LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                       num_key_value_heads=2, vocab_size=64, max_position_embeddings=8192,
                       rope_parameters={**LLAMA3_SCALING, "rope_theta": BASE_THETA})


def test_stage_theta_is_set_within_the_base_models_rope_scaling():
    config = _llama3_base()
    set_rope(config, 15.3e6, 65536)
    assert config.rope_parameters == {**LLAMA3_SCALING, "rope_theta": 15.3e6}
    assert config.max_position_embeddings == 65536
    set_rope(config, 2e8, 65536, rope_parameters={"rope_type": "default"})  # the recipe's explicit choice
    assert config.rope_parameters == {"rope_type": "default", "rope_theta": 2e8}


def test_exported_config_gives_the_stage_theta_to_new_and_old_readers(tmp_path):
    """transformers 5 reads ``rope_parameters`` (or ``rope_scaling`` + ``rope_theta``); 4.x reads the top-level pair."""
    config = _llama3_base()
    set_rope(config, 15.3e6, 65536)
    LlamaForCausalLM(config).save_pretrained(tmp_path)
    write_rope_compat(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["rope_parameters"] == {**LLAMA3_SCALING, "rope_theta": 15.3e6}
    # An older reader: theta and scaling at the top level, as transformers 4.x's LlamaConfig takes them.
    assert saved["rope_theta"] == 15.3e6
    assert saved["rope_scaling"] == LLAMA3_SCALING
    reloaded = AutoConfig.from_pretrained(tmp_path)
    assert reloaded.rope_parameters == {**LLAMA3_SCALING, "rope_theta": 15.3e6}
    expected = LlamaRotaryEmbedding(config).inv_freq
    torch.testing.assert_close(LlamaRotaryEmbedding(reloaded).inv_freq, expected, rtol=0, atol=0)
