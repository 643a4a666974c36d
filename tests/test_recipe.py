"""Recipe loading: the whole recipe is checked before anything starts, each error names stage and field."""

from __future__ import annotations

import copy
import math
import re
from pathlib import Path

import pytest
import yaml

from launcher.recipe import Recipe, ThetaRule
from topology.errors import ConfigError
from trainer.model.rope import ntk_theta, scaling_law_theta

DEMO = Path(__file__).resolve().parents[1] / "clusters" / "recipes" / "demo.yaml"

BASE = {
    "name": "t",
    "model": {"tiny": {"hidden_size": 64}, "base_theta": 10000, "base_len": 128, "head_dim": 16},
    "data": {"path": "corpus"},
    "stages": [
        {"name": "a", "seq_len": 256, "rope_theta": {"rule": "ntk"}, "batch": 1, "gpus": 2, "steps": 2},
        {"name": "b", "seq_len": 1024, "rope_theta": {"rule": "ntk"}, "batch": 2, "gpus": 4, "steps": 2},
    ],
}


def load(tmp_path: Path, **changes) -> Recipe:
    """BASE with top-level ``changes``; ``stage0``/``stage1`` keys update one stage."""
    (tmp_path / "corpus").mkdir(exist_ok=True)
    data = copy.deepcopy(BASE)
    for key, value in changes.items():
        if key[:5] == "stage" and key[5:].isdigit():
            data["stages"][int(key[5:])].update(value)
        else:
            data[key] = value
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(data))
    return Recipe.load(path)


def fails(tmp_path: Path, pattern: str, **changes) -> str:
    with pytest.raises(ConfigError, match=pattern) as info:
        load(tmp_path, **changes)
    message = str(info.value)
    assert "\n" not in message
    return message


def test_demo_recipe_chains_its_stages(tmp_path):
    recipe = Recipe.load(DEMO)
    configs = recipe.stage_configs(tmp_path)
    assert [c.gpus for c in configs] == [2, 4]
    assert configs[0].init_from is None
    assert configs[1].init_from == str(tmp_path / "stage0-256" / "hf")
    assert Path(recipe.data.path).is_dir()  # relative to the recipe file, not the working directory
    assert configs[0].rope_theta < configs[1].rope_theta


def test_theta_rules(tmp_path):
    recipe = load(tmp_path, stages=[
        {"name": "a", "seq_len": 256, "rope_theta": {"rule": "ntk"}, "batch": 1, "gpus": 2, "steps": 1},
        {"name": "b", "seq_len": 1024, "rope_theta": {"rule": "ntk", "alpha": 2}, "batch": 1, "gpus": 2, "steps": 1},
        {"name": "c", "seq_len": 2048, "rope_theta": {"rule": "ntk", "from": "a"}, "batch": 1, "gpus": 2, "steps": 1},
        {"name": "d", "seq_len": 4096, "rope_theta": {"rule": "scaling-law"}, "batch": 1, "gpus": 2, "steps": 1},
        {"name": "e", "seq_len": 4096, "rope_theta": 123456.0, "batch": 1, "gpus": 2, "steps": 1},
    ])
    t = recipe.resolve_theta()
    a = ntk_theta(10000, 128, 256, 16)  # first stage scales from the base model
    assert math.isclose(t["a"], a)
    assert math.isclose(t["b"], ntk_theta(a, 256, 1024, 16, alpha=2))  # default: from the previous stage
    assert math.isclose(t["c"], ntk_theta(a, 256, 2048, 16))  # from a named earlier stage
    assert math.isclose(t["d"], scaling_law_theta(10000, 128, 4096))  # always from the base model
    assert t["e"] == 123456.0
    assert isinstance(recipe.stage("c").rope_theta, ThetaRule)


@pytest.mark.parametrize("where, change, pattern", [
    ("top", {"epochs": 3}, r"unknown key 'epochs'; known keys are .*max_retries"),
    ("stage1", {"seqlen": 10}, r"stage 'b': unknown key 'seqlen'"),
    ("model", {"tiny": {}, "layers": 2}, r"model: unknown key 'layers'"),
])
def test_unknown_keys_are_named(tmp_path, where, change, pattern):
    if where == "model":
        fails(tmp_path, pattern, model=change)
    elif where == "top":
        fails(tmp_path, pattern, **change)
    else:
        fails(tmp_path, pattern, **{where: change})


@pytest.mark.parametrize("stage, pattern", [
    ({"gpus": 0}, r"stage 'b': gpus is 0"),
    ({"steps": "many"}, r"stage 'b': steps is 'many'"),
    ({"batch": 3}, r"stage 'b': batch \(3\) must divide gpus \(4\)"),
    ({"seq_len": 1002}, r"stage 'b': seq_len \(1002\) must be divisible by 2 \* ring size \(4\)"),
    ({"ulysses": 4}, r"stage 'b': ulysses \(4\) must divide the ring size"),
    ({"min_gpus": 8}, r"stage 'b': min_gpus \(8\) exceeds gpus \(4\)"),
    ({"rope_theta": -5}, r"stage 'b': rope_theta is -5"),
    ({"rope_theta": {"rule": "yarn"}}, r"stage 'b': rope_theta.rule is 'yarn'"),
    ({"rope_theta": {"rule": "ntk", "from": "z"}}, r"stage 'b': rope_theta.from names 'z'"),
    ({"name": "a"}, r"stage names must be unique"),
    ({"niah": {"max_lenght": 4096}}, r"stage 'b': niah: unknown key\(s\) max_lenght"),
    ({"niah": {"depth_interval": 1.5}}, r"depth interval 1.5 is outside \(0, 1\]"),
    ({"niah": {"depth_interval": True}}, r"niah: depth_interval is True; input should be a number, not true or false"),
    ({"lr": True}, r"stage 'b': lr is True; input should be a number, not true or false"),
    ({"rope_theta": True}, r"stage 'b': rope_theta is True"),
])
def test_bad_stage_values_name_stage_and_field(tmp_path, stage, pattern):
    fails(tmp_path, pattern, stage1=stage)


def test_theta_from_a_later_stage_is_refused(tmp_path):
    fails(tmp_path, r"stage 'a': rope_theta.from names 'b'", stage0={"rope_theta": {"rule": "ntk", "from": "b"}})


def test_ntk_rule_cannot_shrink_context(tmp_path):
    message = fails(tmp_path, r"stage 'a': rope_theta rule ntk scales up from 128 tokens, but seq_len is 64", stage0={"seq_len": 64})
    assert "base_len" in message


def test_missing_paths(tmp_path):
    fails(tmp_path, r"data.path 'nowhere' does not exist", data={"path": "nowhere"})
    fails(tmp_path, r"model.path './no-such-model' does not exist", model={"path": "./no-such-model"})
    fails(tmp_path, r"give exactly one of 'path'", model={"path": "x/y", "tiny": {}})


def test_not_a_mapping(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("- just\n- a list\n")
    with pytest.raises(ConfigError, match="expected a mapping"):
        Recipe.load(path)
    path.write_text("name: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        Recipe.load(path)


@pytest.mark.parametrize("changes, lines", [
    ({"stage0": {"name": "x/../../../../tmp/escaped"}}, [r"stages\[0\]|stage 'x/\.\./.*': name is .*usable as a directory name"]),
    ({"stage0": {"name": ".hidden"}}, [r"name is '\.hidden'; it must be usable as a directory name"]),
    ({"name": "../up"}, [r"recipe.yaml: name is '\.\./up'"]),
    ({"max_retries": -5}, [r"max_retries is -5; input should be greater than or equal to 0"]),
    ({"max_retries": "many"}, [r"max_retries is 'many'; input should be a valid integer"]),
    ({"seed": 1.7}, [r"seed is 1\.7; input should be a valid integer"]),
    ({"seed": True}, [r"seed is True"]),
    ({"deepspeed": "str"}, [r"deepspeed is 'str'; input should be a valid dictionary"]),
    ({"deepspeed": {"zero_optimization": "x"}}, [r"deepspeed.zero_optimization is 'x'; input should be a valid dictionary"]),
    ({"deepspeed": {"zero_optimization": {"stage": 7}, "bf16": {"enabled": "maybe"}, "gradient_clipping": -1}},
     [r"deepspeed.zero_optimization.stage is 7; input should be less than or equal to 3",
      r"deepspeed.bf16.enabled is 'maybe'; input should be a valid boolean", r"deepspeed.gradient_clipping is -1"]),
    ({"deepspeed": {"optimizer": {"type": "AdamW", "params": [0.9]}}}, [r"deepspeed.optimizer.params is \[0\.9\]"]),
    ({"deepspeed": {"scheduler": {"params": {"warmup_num_steps": 5}}}},
     [r"stage 'a': deepspeed.scheduler names no 'type'", r"stage 'b': deepspeed.scheduler names no 'type'"]),
    ({"collective_timeout": 0}, [r"collective_timeout is 0; input should be greater than 0"]),
    ({"stage1": {"rope_theta": float("inf")}}, [r"stage 'b': rope_theta is inf; input should be a finite number"]),
    ({"stage1": {"rope_theta": float("nan")}}, [r"stage 'b': rope_theta is nan"]),
    ({"stage1": {"lr": "fast"}}, [r"stage 'b': lr is 'fast'; input should be a valid number"]),
    ({"stage1": {"lr": -1e-5}}, [r"stage 'b': lr is -1e-05; input should be greater than 0"]),
    ({"stage1": {"batch": "many"}}, [r"stage 'b': batch is 'many'; input should be a valid integer or input should be 'auto'"]),
    ({"stage1": {"checkpoint_every": -1}}, [r"stage 'b': checkpoint_every is -1"]),
    ({"stage1": {"rope_theta": {"rule": "ntk", "alpha": 0}}}, [r"stage 'b': rope_theta.alpha is 0"]),
    ({"model": {"tiny": {}, "base_theta": -1, "base_len": 1.5}}, [r"model.base_theta is -1", r"model.base_len is 1\.5"]),
    ({"data": {"path": "corpus", "kind": "books"}}, [r"data.kind is 'books'; input should be 'pretrain' or 'chat'"]),
    ({"stages": []}, [r"stages is \[\]; list should have at least 1 item"]),
    ({"stage0": {"steps": 0}, "stage1": {"gpus": -4, "lr": "x"}, "seed": 0.5},
     [r"stage 'a': steps is 0", r"stage 'b': gpus is -4", r"stage 'b': lr is 'x'", r"seed is 0\.5"]),
])
def test_bad_recipes_report_every_problem_one_line_each(tmp_path, changes, lines):
    """The issue's examples and more: each problem is its own line naming stage and field; nothing stops at the first."""
    with pytest.raises(ConfigError) as info:
        load(tmp_path, **changes)
    got = str(info.value).splitlines()
    assert len(got) == len(lines), got
    for line, pattern in zip(got, lines):
        assert re.search(pattern, line), (pattern, line)
        assert line.startswith(str(tmp_path / "recipe.yaml"))


def test_shape_problems_of_several_stages_come_together(tmp_path):
    with pytest.raises(ConfigError) as info:
        load(tmp_path, stage0={"seq_len": 258}, stage1={"batch": 3})
    got = str(info.value).splitlines()
    assert len(got) == 2 and "stage 'a': seq_len (258)" in got[0] and "stage 'b': batch (3) must divide gpus" in got[1]


def test_deepspeed_keys_ringleader_does_not_read_pass_through_as_written(tmp_path):
    """Only the keys ringleader reads itself are typed; DeepSpeed's others reach the stage config unchanged."""
    written = {"zero_optimization": {"stage": 3, "reduce_bucket_size": 200_000_000, "offload_optimizer": {"device": "cpu"}},
               "wall_clock_breakdown": True, "gradient_clipping": 1}
    ds = load(tmp_path, deepspeed=written).stage_configs(tmp_path)[0].deepspeed
    assert ds["zero_optimization"]["offload_optimizer"] == {"device": "cpu"} and ds["wall_clock_breakdown"] is True
    assert type(ds["zero_optimization"]["reduce_bucket_size"]) is int and type(ds["gradient_clipping"]) is int


def test_stage_config_shares_the_recipe_types(tmp_path):
    """The trainer's stage.json is checked by the same field types as the recipe."""
    from trainer.config import StageConfig

    cfg = load(tmp_path).stage_configs(tmp_path)[0].to_dict()
    with pytest.raises(ConfigError) as info:
        StageConfig.from_dict({**cfg, "seed": 1.7, "rope_theta": float("inf"), "name": "a/b", "colour": 1}, "stage.json")
    got = str(info.value).splitlines()
    assert [line.split(" is ")[0].split(": ")[-1] for line in got[:3]] == ["name", "rope_theta", "seed"]
    assert "unknown key 'colour'" in got[3]
    assert StageConfig.from_dict(cfg).collective_timeout == 1800.0
