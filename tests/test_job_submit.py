"""The README's cluster path: `ray start --head`, then the real `ray job submit` CLI runs the demo recipe.

The controller, profiler, planner and trainer are the real ones, inside a
real Ray job, on the recipe file the README runs.
"""

from __future__ import annotations

import io
import json
import secrets
import urllib.error
import urllib.request

import pytest
import yaml

from trainer.reporting.progress import StageProgress, eta_seconds, step_line
from tests.ray_utils import REPO, RayHead, ray_job_submit

DEMO = REPO / "clusters" / "recipes" / "demo.yaml"


@pytest.fixture(scope="module")
def token_head(tmp_path_factory):
    """A head started as the rendered configs start theirs: RAY_AUTH_MODE=token, the token read from a file."""
    token_file = tmp_path_factory.mktemp("auth") / "auth_token"
    token_file.write_text(secrets.token_hex(32))
    token_file.chmod(0o600)
    head = RayHead.start("--num-cpus=5", "--num-gpus=0", env={"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token_file)})
    try:
        yield head, token_file.read_text()
    finally:
        head.stop()


def _http(url: str, token: str | None = None, body: dict | None = None) -> int:
    """Status of a GET (or, with ``body``, a POST) to the dashboard, with an optional bearer token."""
    headers = {"Content-Type": "application/json"} | ({"Authorization": f"Bearer {token}"} if token else {})
    data = json.dumps(body).encode() if body is not None else None
    try:
        with urllib.request.urlopen(urllib.request.Request(url, data=data, headers=headers), timeout=30) as r:
            return r.status
    except urllib.error.HTTPError as exc:
        return exc.code


@pytest.mark.ray
def test_token_head_refuses_requests_without_the_token(token_head, tmp_path):
    head, token = token_head
    jobs = f"{head.dashboard_url}/api/jobs/"
    assert _http(jobs) == 401
    assert _http(jobs, token="not-" + token) == 403
    assert _http(jobs, body={"entrypoint": "touch /tmp/should-never-run"}) == 401
    assert _http(jobs, token=token) == 200
    # The CLI without the token: refused, and no job was created.
    no_token = {k: v for k, v in head.env.items() if k not in ("RAY_AUTH_TOKEN_PATH", "RAY_AUTH_TOKEN")} | {"RAY_AUTH_MODE": "disabled"}
    marker = tmp_path / "ran"
    proc = ray_job_submit(RayHead(head.temp_dir, head.port, head.dashboard_port, no_token), ["touch", str(marker)],
                          working_dir=tmp_path, timeout=120)
    assert proc.returncode != 0 and "Authentication required" in proc.stdout + proc.stderr
    assert not marker.exists()
    with urllib.request.urlopen(urllib.request.Request(jobs, headers={"Authorization": f"Bearer {token}"}), timeout=30) as r:
        assert all(str(marker) not in j["entrypoint"] for j in json.loads(r.read()))


@pytest.mark.ray
def test_ray_job_submit_runs_the_demo_recipe(token_head, tmp_path, run_dir):
    head, _ = token_head
    stages = yaml.safe_load(DEMO.read_text())["stages"]
    # The README's command: RAY_AUTH_MODE=token and the token's file in the environment of `ray job submit`.
    proc = ray_job_submit(head, ["python", "-m", "launcher", "run", str(DEMO.relative_to(REPO)), "--run-dir", str(run_dir),
                                "--profile-cache", str(tmp_path / "profiles")], timeout=500)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-4000:]
    assert "succeeded" in log
    last = stages[-1]
    assert "plan aware" in log and f"[{last['name']}] step {last['steps']}/{last['steps']}" in log  # plan and progress in the job log
    # One progress format, no third-party noise, and where everything is at the end.
    for noise in ("Setting accelerator", "shm_comm_op", "FutureWarning", "it/s]", "Ray deduplicates logs"):
        assert noise not in log
    assert f"stage1-{last['name']}: topology.html plan.json metrics.jsonl logs/ ({last['gpus']} ranks) checkpoints/ hf/ tensorboard/" in log
    for i, stage in enumerate(stages):
        d = run_dir / f"stage{i}-{stage['name']}"
        assert (d / "checkpoints" / "latest").read_text().strip() == f"step{stage['steps']}"
        steps = [json.loads(line) for line in (d / "metrics.jsonl").read_text().splitlines()]
        assert [m["step"] for m in steps] == list(range(1, stage["steps"] + 1))
        assert all(m["rank"] == 0 and m["time"] > 0 and m["step_time_max_s"] >= m["step_time_min_s"] for m in steps)
        logs = sorted(p.name for p in (d / "logs").iterdir())
        assert logs == [f"rank-{r}.log" for r in range(stage["gpus"])]
        assert "shm_comm_op built" in (d / "logs" / "rank-0.log").read_text()  # DeepSpeed's lines: kept, off the console
        assert any((d / "tensorboard").glob("events.out.tfevents.*"))
        assert json.loads((d / "plan.json").read_text())["world_size"] == stage["gpus"]
        assert (d / "hf" / "config.json").is_file() and (d / "topology.json").is_file()
    assert (run_dir / "recipe.yaml").read_text() == DEMO.read_text()
    second = json.loads((run_dir / f"stage1-{stages[1]['name']}" / "stage.json").read_text())
    assert second["init_from"] == str(run_dir / f"stage0-{stages[0]['name']}" / "hf")


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
