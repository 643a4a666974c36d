"""The 4194K recipe as data: the published table, theta rules, and the loader's options."""

from pathlib import Path

import pytest
import yaml

from launcher.recipe import AUTO, Recipe
from topology.errors import ConfigError

RECIPE = Path(__file__).resolve().parents[1] / "clusters" / "recipes" / "llama3-8b-4194k.yaml"


@pytest.fixture(scope="module")
def recipe() -> Recipe:
    return Recipe.load(RECIPE, check_paths=False)


def test_stages_follow_the_published_table(recipe):
    rows = [(s.name, s.seq_len, s.batch, s.grad_accum, s.steps, s.gpus, s.lr) for s in recipe.stages]
    assert rows == [
        ("65K", 2**16, 1, 32, 30, 8, 2e-5),
        ("262K", 2**18, 1, 16, 24, 32, 2e-5),
        ("524K", 2**19, 16, 1, 50, 512, 2e-5),
        ("1048K", 2**20, 8, 1, 50, 512, 2e-5),
        ("4191K", 2**22, 2, 2, 12, 512, 2e-5),
    ]
    assert [s.published_tokens for s in recipe.stages] == [62_914_560, 100_663_296, 419_430_400, 838_860_800, 201_326_592]


def test_theta_rules_give_the_published_row(recipe):
    thetas = recipe.resolve_theta()
    shown = [round(thetas["65K"] / 1e6, 1), round(thetas["262K"] / 1e6, 1), round(thetas["524K"] / 1e9, 2),
             round(thetas["1048K"] / 1e9, 2), round(thetas["4191K"] / 1e9, 1)]
    assert shown == [15.3, 207.1, 1.06, 2.80, 45.2]
    assert recipe.stage("1048K").rope_theta.base_stage == "262K"


def test_ring_sizes_and_tokens_per_gpu(recipe):
    configs = recipe.stage_configs("runs/x")
    assert [c.cp for c in configs] == [8, 32, 32, 64, 256]
    assert [c.seq_len // c.cp for c in configs] == [8192, 8192, 16384, 16384, 16384]
    assert [c.init_from for c in configs][1:] == [f"runs/x/stage{i}-{s.name}/hf" for i, s in enumerate(recipe.stages[:-1])]


def test_model_and_data_settings(recipe):
    assert recipe.model.path == "meta-llama/Meta-Llama-3-8B-Instruct"
    assert (recipe.model.base_theta, recipe.model.base_len, recipe.model.head_dim) == (500_000, 8192, 128)
    assert recipe.data.kind == "pretrain" and recipe.data.upsample_long
    assert recipe.stages[-1].data.kind == "chat"
    written = {"max_len": 4194200, "min_len": 100, "len_interval": 260000, "depth_interval": 0.2, "digits": 8,
               "haystack": "/data/haystack"}
    niah = recipe.stages[-1].niah  # validated at load and completed with NiahConfig's defaults
    assert {k: niah[k] for k in written} == written and niah["shard_above"] == 131_072


def test_data_paths_are_checked_unless_asked_not_to():
    if Path("/data/slimpajama").exists():
        pytest.skip("/data/slimpajama exists on this machine")
    with pytest.raises(ConfigError, match="/data/slimpajama"):
        Recipe.load(RECIPE)


def _raw():
    return yaml.safe_load(RECIPE.read_text())


def test_ring_is_another_way_to_write_batch():
    raw = _raw()
    del raw["stages"][2]["batch"]
    raw["stages"][2]["ring"] = 32
    del raw["stages"][4]["batch"]
    raw["stages"][4]["ring"] = AUTO
    r = Recipe.from_dict(raw, check_paths=False)
    assert r.stages[2].batch == 16 and r.stages[4].batch == AUTO


@pytest.mark.parametrize("edit, message", [
    (lambda s: s.update(ring=32), "not both"),
    (lambda s: (s.pop("batch"), s.update(ring=48)), "divides gpus"),
    (lambda s: s.update(train_batch_size=7), r"train_batch_size \(7\) != batch \(16\) x grad_accum \(1\)"),
])
def test_bad_batch_settings_are_one_line_errors(edit, message):
    raw = _raw()
    edit(raw["stages"][2])
    with pytest.raises(ConfigError, match=message) as info:
        Recipe.from_dict(raw, check_paths=False)
    assert "\n" not in str(info.value) and "524K" in str(info.value)
