"""Bad input to ``ringleader run``: one line naming the field or address, non-zero exit, nothing started."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import ray
import yaml

from launcher.cli import main
from tests.ray_utils import REPO, RayHead, free_port

DEMO = REPO / "clusters" / "recipes" / "demo.yaml"


def recipe_file(tmp_path: Path, **changes) -> Path:
    data = yaml.safe_load(DEMO.read_text())
    data["data"]["path"] = str(REPO / "clusters" / "data" / "corpus")
    data.update(changes)
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def model(path: str) -> dict:
    return {"path": path, "base_theta": 10000, "base_len": 128, "head_dim": 16}


def run_cli(capsys, *argv: str) -> tuple[int, str]:
    code = main(["run", *argv])
    err = capsys.readouterr().err.strip()
    return code, err


def one_line_error(err: str) -> str:
    lines = [line for line in err.splitlines() if line.startswith("ringleader: error:")]
    assert len(lines) == 1, err
    return lines[0]


def test_unknown_key(tmp_path, capsys):
    run_dir = tmp_path / "run"
    code, err = run_cli(capsys, str(recipe_file(tmp_path, warmup_steps=10)), "--run-dir", str(run_dir))
    assert code == 2
    assert "unknown key 'warmup_steps'" in one_line_error(err)
    assert not run_dir.exists() and not ray.is_initialized()


def test_model_path_that_does_not_exist(tmp_path, capsys):
    run_dir = tmp_path / "run"
    code, err = run_cli(capsys, str(recipe_file(tmp_path, model=model("/no/such/llama"))), "--run-dir", str(run_dir))
    assert code == 2 and "model.path '/no/such/llama' does not exist" in one_line_error(err)
    empty = tmp_path / "empty-model"
    empty.mkdir()
    code, err = run_cli(capsys, str(recipe_file(tmp_path, model=model(str(empty)))), "--run-dir", str(run_dir))
    assert code == 2 and "has no config.json" in one_line_error(err)
    assert not run_dir.exists() and not ray.is_initialized()


def test_unreachable_address_real_cli(tmp_path):
    address = f"127.0.0.1:{free_port()}"  # nothing listens there
    run_dir = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-m", "launcher", "run", str(DEMO), "--address", address, "--run-dir", str(run_dir)],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    line = one_line_error(proc.stderr)
    assert address in line and "cannot reach" in line
    assert not run_dir.exists()


def test_topology_without_dry_run(capsys):
    code, err = run_cli(capsys, str(DEMO), "--topology", "g6e-4x")
    assert code == 2 and "--dry-run" in one_line_error(err)


@pytest.mark.ray
def test_stage_larger_than_a_fixed_cluster(tmp_path, capsys):
    """More ranks than slots, or a model no node can hold: refused before the run directory or any rank exists."""
    head = RayHead.start("--num-cpus=2", "--num-gpus=0", f"--memory={4 * 2**30}", f"--object-store-memory={2**30}")
    try:
        run_dir = tmp_path / "run"
        code, err = run_cli(capsys, str(recipe_file(tmp_path)), "--address", head.address, "--run-dir", str(run_dir))
        assert code == 2
        line = one_line_error(err)
        assert "stage '1k' needs 4 CPU slots" in line and "no autoscaler" in line
        assert not run_dir.exists() and not ray.is_initialized()
        # A billion layers of the tiny model: LlamaConfig takes it, and each rank would build it until the node ran out.
        huge = {**TINY, "tiny": {**TINY["tiny"], "num_hidden_layers": 10**9}}
        code, err = run_cli(capsys, str(recipe_file(tmp_path, model=huge, stages=stage_change(gpus=2)[:1])),
                            "--address", head.address, "--run-dir", str(run_dir))
        line = one_line_error(err)
        assert code == 2 and "stage '256': its model needs" in line and "GiB of the largest node" in line, err
        assert not run_dir.exists() and not ray.is_initialized()
        # 0.47B parameters: built in bf16 they fit the node's 5 GiB; trained in fp32 on its CPU slots (16 bytes a
        # parameter, over 2 ranks of one host) they do not.
        half = {**TINY, "tiny": {**TINY["tiny"], "hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 30,
                                 "num_attention_heads": 64, "num_key_value_heads": 32}}
        code, err = run_cli(capsys, str(recipe_file(tmp_path, model=half, stages=stage_change(gpus=2)[:1])),
                            "--address", head.address, "--run-dir", str(run_dir))
        line = one_line_error(err)
        assert code == 2 and "needs 7.0" in line and "more than the 5 GiB of the largest node" in line, err
        assert not run_dir.exists() and not ray.is_initialized()
        ray.init(address=head.address, logging_level="warning")
        try:
            assert ray.util.placement_group_table() == {}  # no group was ever reserved
        finally:
            ray.shutdown()
    finally:
        head.stop()


def stage_change(**changes) -> list:
    stages = yaml.safe_load(DEMO.read_text())["stages"]
    stages[0].update(changes)
    return stages


TINY = yaml.safe_load(DEMO.read_text())["model"]


@pytest.mark.parametrize("changes, expected", [
    ({"stages": stage_change(name="x/../../../../tmp/escaped")}, ["name is 'x/../../../../tmp/escaped'; it must be usable as a directory name"]),
    ({"max_retries": -5}, ["max_retries is -5; input should be greater than or equal to 0"]),
    ({"max_retries": "many"}, ["max_retries is 'many'; input should be a valid integer"]),
    ({"seed": 1.7}, ["seed is 1.7; input should be a valid integer"]),
    ({"stages": stage_change(rope_theta=float("inf"))}, ["stage '256': rope_theta is inf; input should be a finite number"]),
    ({"stages": stage_change(lr="fast")}, ["stage '256': lr is 'fast'; input should be a valid number"]),
    ({"deepspeed": "str"}, ["deepspeed is 'str'; input should be a valid dictionary"]),
    ({"collective_timeout": -1}, ["collective_timeout is -1; input should be greater than 0"]),
    ({"model": model("nobody-here/no-such-model")}, ["cannot load model config 'nobody-here/no-such-model'", "local HF cache"]),
    ({"model": {**TINY, "tiny": {**TINY["tiny"], "hidden_size": -64}}}, ["model.tiny: hidden_size is -64; sizes must be whole numbers >= 1"]),
    ({"model": {**TINY, "tiny": {**TINY["tiny"], "num_key_value_heads": 3}}},
     ["model: query heads (4) are not a multiple of KV heads (3)"]),
    ({"stages": stage_change(gpus=8, ulysses=8)}, ["stage '256': query heads (4) are not divisible by the Ulysses degree (8)"]),
    ({"seed": "x", "max_retries": -1, "stages": stage_change(steps=0, lr="fast")},
     ["max_retries is -1", "seed is 'x'", "stage '256': steps is 0", "stage '256': lr is 'fast'"]),
])
def test_bad_recipe_one_line_each_exit_2_nothing_started(tmp_path, capsys, changes, expected):
    """Every bad field is named on its own line before Ray starts or the run directory exists."""
    run_dir = tmp_path / "run"
    code, err = run_cli(capsys, str(recipe_file(tmp_path, **changes)), "--run-dir", str(run_dir))
    lines = err.splitlines()
    assert code == 2 and all(line.startswith("ringleader: error: ") for line in lines), err
    if len(expected) > 1 and all(" is " in e for e in expected):  # several fields: one line each
        assert len(lines) == len(expected), err
        assert all(sum(text in line for line in lines) == 1 for text in expected), err
    else:
        assert len(lines) == 1 and all(text in lines[0] for text in expected), err
    assert not run_dir.exists() and not ray.is_initialized()


@pytest.mark.parametrize("tiny, expected", [
    ({"num_key_value_heads": 3}, "model: query heads (4) are not a multiple of KV heads (3)"),
    ({"num_key_value_heads": 10**30}, "model: query heads (4) are not a multiple of KV heads"),
])
def test_heads_that_do_not_group_are_refused_by_a_dry_run(tmp_path, capsys, tiny, expected):
    """transformers builds such a Llama; the dry run refuses it, as the run does before Ray starts."""
    recipe = recipe_file(tmp_path, model={**TINY, "tiny": {**TINY["tiny"], **tiny}})
    code, err = run_cli(capsys, str(recipe), "--dry-run")
    assert code == 2 and expected in one_line_error(err) and len(err.splitlines()) == 1, err


def test_bad_flag_values(tmp_path, capsys):
    with pytest.raises(SystemExit) as info:
        main(["run", str(DEMO), "--collective-timeout", "inf"])
    assert info.value.code == 2 and "not a finite number of seconds" in capsys.readouterr().err
