"""One stage end to end: RoPE theta into the model, two chained stages on 2 ranks, and bad input.

Layers: the model builder alone (no process group); two stages of a recipe
(256 then 1024 tokens, theta by the NTK rule) in one world of 2 gloo ranks,
the second starting from the first's HF checkpoint; and the command line
with bad input, every rank of it ending with one line and exit status 2.
"""

import importlib.util
import json
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from dist_utils import run_distributed
from launcher.recipe import Recipe
from launcher.runtime.rundir import read_metrics
from stage_helpers import CORPUS, MODEL, hf_weights, launch_ranks, max_diff, plan_for, run_stage_ranks, stage_config
from topology.errors import ConfigError
from trainer.checkpoint import saved_world_size
from trainer.config import ModelConfig, StageConfig
from trainer.model.llama import build_model, rotary_inv_freq
from trainer.model.rope import ntk_theta
from trainer.stage import check_inputs
from trainer.tokenizer import byte_tokenizer

HEAD_DIM = MODEL["head_dim"]


def _inv_freq(theta: float) -> torch.Tensor:
    return 1.0 / theta ** (torch.arange(0, HEAD_DIM, 2, dtype=torch.float64) / HEAD_DIM)


def test_loading_the_previous_stage_with_a_new_theta_changes_the_rotary_frequencies(tmp_path):
    tok = byte_tokenizer()
    first = build_model(ModelConfig(**MODEL), 40_000.0, 256, tokenizer=tok)
    assert torch.allclose(rotary_inv_freq(first).double(), _inv_freq(40_000.0), rtol=1e-6)
    first.save_pretrained(tmp_path)
    second = build_model(ModelConfig(**MODEL), 2.5e6, 1024, init_from=str(tmp_path), tokenizer=tok)
    assert second.config.rope_parameters == {"rope_type": "default", "rope_theta": 2.5e6}
    assert second.config.max_position_embeddings == 1024
    assert torch.allclose(rotary_inv_freq(second).double(), _inv_freq(2.5e6), rtol=1e-6)
    assert not torch.allclose(rotary_inv_freq(second), rotary_inv_freq(first))
    assert max_diff(dict(first.named_parameters()), dict(second.named_parameters())) == 0.0


def test_tiny_model_is_seeded_and_sized_to_the_tokenizer():
    tok = byte_tokenizer()
    a, b = (build_model(ModelConfig(**MODEL), 1e4, 64, tokenizer=tok, seed=3) for _ in range(2))
    assert a.config.vocab_size == len(tok) and a.config.eos_token_id == tok.eos_token_id
    assert max_diff(dict(a.named_parameters()), dict(b.named_parameters())) == 0.0
    with pytest.raises(ConfigError, match=r"model vocabulary \(100\) is smaller than the tokenizer's \(262\)"):
        build_model(ModelConfig(tiny={**MODEL["tiny"], "vocab_size": 100}), 1e4, 64, tokenizer=tok)


@pytest.mark.timeout(300)
def test_two_stages_chain_on_two_ranks(tmp_path):
    recipe = Recipe.from_dict({
        "name": "chain", "model": MODEL, "data": {"path": str(CORPUS)},
        "stages": [{"name": "256", "seq_len": 256, "rope_theta": {"rule": "ntk"}, "batch": 1, "steps": 2, "gpus": 2, "lr": 1e-3},
                   {"name": "1k", "seq_len": 1024, "rope_theta": {"rule": "ntk"}, "batch": 1, "steps": 2, "gpus": 2, "lr": 1e-3,
                    # Stage-end NIAH on the stage's own ranks: 600-token contexts run sharded over the ring.
                    "niah": {"max_len": 600, "min_len": 300, "len_interval": 300, "depth_interval": 0.5, "shard_above": 400}}],
    })
    first, second = recipe.stage_configs(tmp_path)
    assert second.init_from == str(tmp_path / "stage0-256" / "hf")
    theta1, theta2 = ntk_theta(10_000.0, 128, 256, HEAD_DIM), ntk_theta(ntk_theta(10_000.0, 128, 256, HEAD_DIM), 256, 1024, HEAD_DIM)
    assert (first.rope_theta, second.rope_theta) == (pytest.approx(theta1), pytest.approx(theta2)) and theta2 > theta1

    per_rank = run_distributed(run_stage_ranks, 2, [first.to_dict(), second.to_dict()],
                               [plan_for(first).to_dict(), plan_for(second).to_dict()], timeout=240)

    (r1, seen1), (r2, seen2) = per_rank[0]
    same = ("stage", "step", "loss", "tokens", "lr", "average")
    assert [[m.get(k) for k in same] for m in per_rank[1][1][1]] == [[m.get(k) for k in same] for m in seen2]  # rank 1 agrees
    assert (r1.steps, r1.tokens, r1.resumed_from) == (2, 512, None) and r2.tokens == 2048
    for cfg, result, seen in ((first, r1, seen1), (second, r2, seen2)):
        lines = read_metrics(cfg.output_dir)
        assert lines == seen
        events, lines = [m for m in lines if "event" in m], [m for m in lines if "event" not in m]
        assert [m["step"] for m in lines] == [1, 2]
        assert [e["event"] for e in events] == (["niah"] if cfg.niah else [])
        assert set(lines[0]) == {"time", "rank", "stage", "step", "steps", "loss", "tokens", "tokens_per_s", "elapsed_s", "lr",
                                 "step_time_s", "step_time_max_s", "step_time_min_s", "slowest_rank", "ring_comm_s",
                                 "ring_comm_max_s", "peak_memory_gib", "peak_memory_max_gib"}
        assert lines[-1]["loss"] == pytest.approx(result.final_loss) and lines[0]["lr"] == pytest.approx(1e-3)
        config = json.loads((tmp_path / result.hf_dir / "config.json").read_text())
        assert config["rope_parameters"]["rope_theta"] == pytest.approx(cfg.rope_theta)
        assert config["max_position_embeddings"] == cfg.seq_len
        assert (tmp_path / result.hf_dir / "tokenizer_config.json").is_file()
        # ZeRO-3 over the whole world: each rank saved its own optimizer partition.
        assert saved_world_size(tmp_path / cfg.output_dir / "checkpoints" / "step2") == 2

    niah = json.loads((tmp_path / second.output_dir / "niah" / "niah.json").read_text())
    assert len(niah["cells"]) == 6 and (tmp_path / second.output_dir / "niah" / "niah.png").is_file()
    assert [e for e in seen2 if "event" in e][0]["average"] == pytest.approx(niah["average"])
    if importlib.util.find_spec("tensorboard"):  # on by default: the NIAH score is a stage figure there
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

        events = EventAccumulator(str(tmp_path / second.output_dir / "tensorboard"))
        events.Reload()
        assert [(e.step, e.value) for e in events.Scalars("niah/average")] == [(2, pytest.approx(niah["average"]))]
    assert not (tmp_path / first.output_dir / "niah").exists()

    w1, w2 = hf_weights(r1.hf_dir), hf_weights(r2.hf_dir)
    def init(seed):
        model = build_model(ModelConfig(**MODEL), 1e4, 64, tokenizer=byte_tokenizer(), seed=seed)
        return {k: v for k, v in model.named_parameters() if k in w1}
    # Each stage moved its start by two AdamW steps of lr 1e-3: the first started from the seeded
    # tiny model, the second from the first's result (another random model is far from both).
    assert max_diff(w1, init(0)) < 2 * 2 * 1e-3
    assert max_diff(w2, w1) < 2 * 2 * 1e-3
    assert max_diff(w2, init(1)) > 0.05


def test_stage_inputs_are_checked_before_anything_starts(tmp_path):
    cfg = stage_config(tmp_path, seq_len=256, gpus=2, batch=1)
    check_inputs(cfg, plan_for(cfg), 2)
    with pytest.raises(ConfigError, match=r"plan world_size \(2\) != process group size \(4\)"):
        check_inputs(cfg, plan_for(cfg), 4)
    with pytest.raises(ConfigError, match=r"plan shape dp=2 cp=1 ulysses=1 does not match stage 's' \(batch=1, ring size=2"):
        check_inputs(cfg, plan_for(stage_config(tmp_path, gpus=2, batch=2)), 2)
    with pytest.raises(ConfigError, match=r"model.path '/no/such/model' does not exist"):
        check_inputs(stage_config(tmp_path, model={"path": "/no/such/model"}), plan_for(cfg), 2)
    with pytest.raises(ConfigError, match=r"init_from '.*' holds no HF model"):
        check_inputs(stage_config(tmp_path, init_from=str(tmp_path)), plan_for(cfg), 2)
    gqa = stage_config(tmp_path, gpus=8, batch=1, ulysses=8, model={**MODEL, "tiny": {**MODEL["tiny"], "num_key_value_heads": 3}})
    with pytest.raises(ConfigError, match=r"query heads \(4\) are not a multiple of KV heads \(3\)"):
        check_inputs(gqa, plan_for(gqa), 8)
    gqa.model.tiny["num_key_value_heads"] = 2
    with pytest.raises(ConfigError, match=r"query heads \(4\) are not divisible by the Ulysses degree \(8\)"):
        check_inputs(gqa, plan_for(gqa), 8)
    with pytest.raises(ConfigError, match=r"model.tiny is not a valid LlamaConfig \(.*hidden size \(64\) is not a multiple"):
        check_inputs(stage_config(tmp_path, model={**MODEL, "tiny": {**MODEL["tiny"], "num_attention_heads": 6}}), plan_for(cfg), 2)
    with pytest.raises(ConfigError, match=r"seq_len \(254\) must be divisible by 2 \* ring size \(4\)"):
        StageConfig.from_dict({**cfg.to_dict(), "seq_len": 254})


@pytest.mark.timeout(200)
def test_bad_input_stops_every_rank_with_one_line(tmp_path):
    good = stage_config(tmp_path / "out", seq_len=256, gpus=2, batch=1)
    good.save(tmp_path / "good.json")
    plan_for(good).save(tmp_path / "plan2.json")
    plan_for(stage_config(tmp_path, gpus=4, batch=2)).save(tmp_path / "plan4.json")
    # A host that lacks the data: only rank 1's config points at a missing directory.
    stage_config(tmp_path / "out", seq_len=256, gpus=2, batch=1, data={"path": str(tmp_path / "missing")}).save(tmp_path / "nodata.json")

    cases = {
        "plan for 4 GPUs on 2 ranks": ([tmp_path / "good.json"] * 2, tmp_path / "plan4.json",
                                       "plan world_size (4) != process group size (2)"),
        "data missing on rank 1": ([tmp_path / "good.json", tmp_path / "nodata.json"], tmp_path / "plan2.json",
                                   f"rank 1: data.path '{tmp_path / 'missing'}' does not exist"),
    }
    with ThreadPoolExecutor(len(cases)) as pool:  # both worlds at once: each is mostly start-up
        runs = {name: pool.submit(launch_ranks, tmp_path, configs, plan, 150) for name, (configs, plan, _) in cases.items()}
    for name, (_, _, message) in cases.items():
        for rc, err in runs[name].result():
            lines = [line for line in err.splitlines() if line.startswith("ringleader: error:")]
            assert rc == 2, (name, err[-2000:])
            assert len(lines) == 1 and lines[0].startswith(f"ringleader: error: {message}"), (name, err[-2000:])
            assert "Traceback" not in err, (name, err[-2000:])
    assert not (tmp_path / "out").exists()  # nothing written
