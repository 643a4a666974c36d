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
    assert "unknown key(s) warmup_steps" in one_line_error(err)
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
    head = RayHead.start("--num-cpus=2", "--num-gpus=0")
    try:
        run_dir = tmp_path / "run"
        code, err = run_cli(capsys, str(recipe_file(tmp_path)), "--address", head.address, "--run-dir", str(run_dir))
        assert code == 2
        line = one_line_error(err)
        assert "stage '1k' needs 4 CPU slots" in line and "no autoscaler" in line
        assert not run_dir.exists() and not ray.is_initialized()
        ray.init(address=head.address, logging_level="warning")
        try:
            assert ray.util.placement_group_table() == {}  # no group was ever reserved
        finally:
            ray.shutdown()
    finally:
        head.stop()
