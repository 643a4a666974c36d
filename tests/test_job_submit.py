"""The README's cluster path: `ray start --head`, then the real `ray job submit` CLI runs a recipe.

The recipe is the demo's shape cut down (two stages, two ranks each, two
steps) so that the test stays affordable; the controller, profiler, planner
and trainer are the real ones, inside a real Ray job.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
import yaml

from launcher.progress import StageProgress, eta_seconds, step_line
from tests.ray_utils import REPO, RayHead, ray_job_submit

DEMO = REPO / "clusters" / "recipes" / "demo.yaml"


def small_demo(tmp_path: Path) -> Path:
    recipe = yaml.safe_load(DEMO.read_text())
    recipe["data"]["path"] = str(REPO / "clusters" / "data" / "corpus")
    recipe["deepspeed"] = {"zero_optimization": {"stage": 2}}
    for stage in recipe["stages"]:
        stage.update(gpus=2, steps=2, checkpoint_every=1)
    path = tmp_path / "demo-small.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


@pytest.mark.ray
def test_ray_job_submit_runs_both_stages(tmp_path):
    recipe, run_dir = small_demo(tmp_path), tmp_path / "run"
    head = RayHead.start("--num-cpus=3", "--num-gpus=0")
    try:
        proc = ray_job_submit(head, ["python", "-m", "launcher", "run", str(recipe), "--run-dir", str(run_dir),
                                    "--profile-cache", str(tmp_path / "profiles")], timeout=400)
    finally:
        head.stop()
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-4000:]
    assert "succeeded" in log
    assert "plan aware" in log and "[1k] step 2/2" in log  # plan summary and progress lines in the job log
    for stage in ("stage0-256", "stage1-1k"):
        d = run_dir / stage
        assert (d / "checkpoints" / "latest").read_text().strip() == "step2"
        steps = [json.loads(line) for line in (d / "metrics.jsonl").read_text().splitlines()]
        assert [m["step"] for m in steps] == [1, 2]
        assert json.loads((d / "plan.json").read_text())["world_size"] == 2
        assert (d / "hf" / "config.json").is_file() and (d / "topology.json").is_file()
    assert (run_dir / "recipe.yaml").read_text() == recipe.read_text()
    second = json.loads((run_dir / "stage1-1k" / "stage.json").read_text())
    assert second["init_from"] == str(run_dir / "stage0-256" / "hf")


def test_progress_lines_and_bar():
    m = {"stage": "1k", "step": 6, "steps": 10, "loss": 4.25, "tokens": 6144, "tokens_per_s": 2048.0, "elapsed_s": 3.0}
    # Resumed at step 4: two steps in 3 s, four to go.
    assert eta_seconds(6, 10, 3.0, first_step=4) == 6.0
    assert step_line(m, first_step=4) == "[1k] step 6/10 loss 4.2500 tokens/s 2,048 elapsed 3.0s ETA 6.0s"
    plain = io.StringIO()
    with StageProgress("1k", 10, start_step=4, stream=plain) as progress:  # not a terminal: lines
        progress.update(m)
    assert plain.getvalue() == step_line(m, 4) + "\n"
    bar = io.StringIO()
    with StageProgress("1k", 10, start_step=4, stream=bar, bar=True) as progress:
        progress.update(m)
    assert "stage 1k" in bar.getvalue() and "6/10" in bar.getvalue() and "\r" in bar.getvalue()
