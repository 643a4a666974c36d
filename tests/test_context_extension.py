"""The context-extension recipe, cut to CI size: copy drills and stage 1 at 256 tokens, then 4x with the NTK theta.

clusters/recipes/tiny-retrieval.yaml is what benchmarks/context_extension.py
runs for its table (about 20 minutes). Here the same recipe runs for a few
steps on 2 gloo ranks: what is checked is the chain that makes the method
work, where a missing theta would show: the extended stage's saved model
carries the NTK theta and rotates with it, each stage follows its own
warmup-and-cosine learning rate, and stage 1 learns (its loss falls).
"""

import json
import math

import pytest
import torch

from dist_utils import run_distributed
from launcher.recipe import Recipe
from launcher.runtime.rundir import read_metrics
from ray_utils import REPO
from stage_helpers import plan_for, run_stage_ranks
from trainer.engine import deepspeed_config
from trainer.model.llama import rotary_inv_freq
from trainer.niah.evaluate import load_eval_model
from trainer.model.rope import ntk_theta

RECIPE = REPO / "clusters" / "recipes" / "tiny-retrieval.yaml"


def _ci_sized(recipe: Recipe) -> Recipe:
    """The recipe on 2 ranks (a ring of 2 per stage), a few steps each, a small corpus, NIAH at 1024 only."""
    *drills, first, second = recipe.stages
    for stage in recipe.stages:
        stage.steps, stage.gpus, stage.batch, stage.grad_accum, stage.checkpoint_every = 4, 2, 1, 2, 0
        stage.niah = None
    first.steps = 12
    second.niah = {"min_len": 1024, "max_len": 1024, "depth_interval": 0.5}
    for stage in drills:
        stage.data.synthetic = {"copy": {**stage.data.synthetic["copy"], "documents": 300}}
    recipe.data.synthetic = {"retrieval": {**recipe.data.synthetic["retrieval"], "documents": 300}}
    second.data.synthetic = {"retrieval": {**second.data.synthetic["retrieval"], "documents": 100}}
    recipe.deepspeed["scheduler"]["params"]["warmup_num_steps"] = 3
    return recipe


def test_deepspeed_cosine_schedule_spans_each_stage(tmp_path):
    *drills, first, second = Recipe.load(RECIPE).stage_configs(tmp_path)
    for cfg in (*drills, first, second):
        ds = deepspeed_config(cfg, cuda=False)
        assert ds["scheduler"]["type"] == "WarmupCosineLR" and ds["scheduler"]["params"]["total_num_steps"] == cfg.steps
        assert ds["optimizer"]["params"]["lr"] == cfg.lr  # the schedule's peak is the stage's lr
    assert second.steps <= first.steps // 4  # the extension is a small fraction of stage 1


@pytest.mark.timeout(240)
def test_tiny_retrieval_extends_to_4x_with_the_ntk_theta(tmp_path):
    recipe = _ci_sized(Recipe.load(RECIPE))
    stages = recipe.stage_configs(tmp_path)
    *drills, first, second = stages
    base = recipe.model.base_theta
    theta = ntk_theta(base, 256, 1024, recipe.model.head_dim)
    assert (first.rope_theta, second.seq_len) == (base, 4 * first.seq_len)
    assert second.rope_theta == pytest.approx(theta) and theta > 4 * base

    assert all(d.rope_theta == base for d in drills) and first.init_from == str(tmp_path / drills[-1].output_dir / "hf")
    run_distributed(run_stage_ranks, 2, [c.to_dict() for c in stages], [plan_for(c).to_dict() for c in stages], timeout=200)

    for cfg, want in ((first, base), (second, theta)):
        hf = tmp_path / cfg.output_dir / "hf"
        config = json.loads((hf / "config.json").read_text())
        assert config["rope_parameters"]["rope_theta"] == pytest.approx(want)
        assert config["max_position_embeddings"] == cfg.seq_len
        model = load_eval_model(str(hf), torch.device("cpu"))
        head = model.config.head_dim
        expected = 1.0 / want ** (torch.arange(0, head, 2, dtype=torch.float64) / head)
        assert torch.allclose(rotary_inv_freq(model).double(), expected, rtol=1e-6)  # the model rotates with it

    lines = [[m for m in read_metrics(tmp_path / cfg.output_dir) if "event" not in m] for cfg in (first, second)]
    for cfg, stage in zip((first, second), lines):
        lr = [m["lr"] for m in stage]
        peak = lr.index(max(lr))
        # Warmup to the stage's own lr, then a cosine decay over the stage's own steps.
        assert max(lr) <= cfg.lr * (1 + 1e-6) and lr[:peak + 1] == sorted(lr[:peak + 1])
        assert lr[peak:] == sorted(lr[peak:], reverse=True) and lr[-1] < max(lr)
    assert lines[1][0]["lr"] < lines[0][-1]["lr"] or lines[1][0]["lr"] < lines[1][1]["lr"]  # stage 2 warms up again
    first_loss = [m["loss"] for m in lines[0]]
    assert all(math.isfinite(x) for x in first_loss) and min(first_loss[-3:]) < first_loss[0] - 0.5  # stage 1 learns

    niah = json.loads((tmp_path / second.output_dir / "niah" / "niah.json").read_text())
    assert [c["length"] for c in niah["cells"]] == [1024] * 3 and niah["config"]["digits"] == 8
