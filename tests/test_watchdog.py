"""A rank that hangs, a driver that is told to stop, a stage that is redone: on real Ray.

- A rank process is frozen (SIGSTOP) mid-stage. Its peer waits in a gloo
  collective, no step completes, and the controller's watchdog tears the
  group down and retries from the last checkpoint, as after a worker failure.
- ``--restart-from`` redoes a changed stage in an existing run directory;
  an unchanged finished stage is skipped.
- SIGTERM of a driver that waits for the autoscaler withdraws its
  resource request before it exits.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml

from launcher.recipe import Recipe
from launcher.runtime.controller import Controller, ControllerOptions
from launcher.runtime.rundir import read_metrics
from launcher.runtime.watchdog import StageStalled, Watchdog, WatchdogPolicy
from tests.ray_utils import REPO, RayHead, free_port, local_cluster
from topology.errors import ConfigError

TINY = {"tiny": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2,
                 "num_key_value_heads": 1, "head_dim": 16, "vocab_size": 264},
        "base_theta": 10000, "base_len": 64, "head_dim": 16}


def recipe(tmp_path: Path, name: str = "r", **stage) -> Recipe:
    data = {"name": name, "model": TINY, "data": {"path": str(REPO / "clusters" / "data" / "corpus")},
            "deepspeed": {"zero_optimization": {"stage": 2}},
            "stages": [{"name": "s", "seq_len": 128, "rope_theta": {"rule": "ntk"}, "batch": 1, "gpus": 1, "steps": 2,
                        "lr": 1e-3, **stage}]}
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data))
    return Recipe.load(path)


def options(tmp_path: Path, run_dir: Path, **kw) -> ControllerOptions:
    return ControllerOptions(run_dir=run_dir, profile_cache=tmp_path / "profiles", resource_timeout_s=30,
                             profile_transfer_mb=1, profile_repeats=2, progress_bar=False, **kw)


def test_watchdog_bound_follows_the_slowest_step():
    now = [0.0]
    dog = Watchdog(WatchdogPolicy(factor=3, floor_s=2, startup_s=50), steps=5, predicted_step_s=20.0, clock=lambda: now[0])
    assert dog.bound == 60  # before any step: 3 x the predicted step
    now[0] = 40.0
    dog.step({"step": 1})  # startup is not a step time
    assert dog.bound == 60
    now[0] = 41.0
    dog.step({"step": 2})
    assert dog.bound == 3  # 3 x 1 s
    now[0] = 45.0
    with pytest.raises(StageStalled, match=r"no step completed in 4 s \(bound 3 s: 3 x slowest step 1.0 s, floor 2 s\)"):
        dog.check()
    dog.step({"event": "niah"})  # not a step: the clock keeps running
    with pytest.raises(StageStalled):
        dog.check()
    dog.step({"step": 5})
    now[0] = 1e6
    dog.check()  # after the last step the watchdog stands down


def resource_request(address: str) -> list:
    """The autoscaler resource request standing in the cluster at ``address``."""
    import ray
    from ray.autoscaler.v2.utils import is_autoscaler_v2

    ray.init(address=address, logging_level="warning")
    try:
        if is_autoscaler_v2():
            from ray.autoscaler.v2.sdk import get_cluster_status

            return list(get_cluster_status(address).resource_demands.cluster_constraint_demand)
        from ray._private.ray_constants import AUTOSCALER_RESOURCE_REQUEST_CHANNEL
        from ray.experimental.internal_kv import _internal_kv_get

        raw = _internal_kv_get(AUTOSCALER_RESOURCE_REQUEST_CHANNEL)
        return json.loads(raw) if raw else []
    finally:
        ray.shutdown()


@pytest.mark.ray
def test_sigterm_withdraws_the_autoscaler_request(tmp_path, run_dir):
    """A driver waiting for GPUs the autoscaler cannot bring (no worker may start) is sent SIGTERM.

    Runs before the tests below start their module-wide cluster: this process connects to the head here."""
    from ray._private.services import get_node_ip_address

    port = free_port()
    config = yaml.safe_load((REPO / "clusters" / "local-autoscaling.yaml").read_text())
    config["provider"]["gcs_address"] = f"{get_node_ip_address()}:{port}"
    config["max_workers"] = 0
    for t in config["available_node_types"].values():
        t["max_workers"] = 0
    config_path = tmp_path / "autoscaling.yaml"
    config_path.write_text(yaml.safe_dump(config))
    recipe(tmp_path, name="wait")
    head = RayHead.start(f"--autoscaling-config={config_path}", "--num-cpus=2", "--num-gpus=0", port=port,
                         env={"RAY_FAKE_CLUSTER": "1", "AUTOSCALER_UPDATE_INTERVAL_S": "1"})
    try:
        driver = subprocess.Popen(
            [sys.executable, "-m", "launcher", "run", str(tmp_path / "wait.yaml"), "--address", head.address,
             "--run-dir", str(run_dir), "--resource-timeout", "300", "--profile-cache", str(tmp_path / "profiles")],
            cwd=REPO, env=head.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        log = []
        for line in driver.stdout:
            log.append(line)
            if "asked the autoscaler for 1 GPUs" in line:
                break
        assert resource_request(head.address), "".join(log)
        driver.send_signal(signal.SIGTERM)
        rest, _ = driver.communicate(timeout=60)
        assert driver.returncode == 128 + signal.SIGTERM, "".join(log) + rest
        assert "terminated (signal 15)" in rest
        assert resource_request(head.address) == []
        assert not (run_dir / "run.lock").exists()  # released on the way out too
    finally:
        head.stop()


@pytest.fixture(scope="module")
def cluster():
    with local_cluster(hosts=2, gpus_per_host=1, cpus_per_host=1) as lc:
        yield lc


def rank_worker_pids(lc) -> list[int]:
    """Processes of this cluster's raylets that host a rank actor (never another cluster's)."""
    raylets = {str(n.all_processes["raylet"][0].process.pid) for n in lc.nodes}
    found = []
    for entry in Path("/proc").iterdir():
        try:
            ppid = (entry / "stat").read_text().rsplit(")", 1)[1].split()[1]
            if ppid in raylets and (entry / "cmdline").read_bytes().startswith(b"ray::RankWorker"):
                found.append(int(entry.name))
        except (OSError, IndexError):
            continue
    return found


def freeze_a_rank(lc, stage_dir: Path, after_step: int, frozen: dict, stop: threading.Event) -> None:
    while not stop.is_set():
        steps = [m["step"] for m in read_metrics(stage_dir) if "step" in m]
        pids = rank_worker_pids(lc)
        if steps and max(steps) >= after_step and pids:
            os.kill(pids[-1], signal.SIGSTOP)
            frozen.update(pid=pids[-1], at_step=max(steps))
            return
        time.sleep(0.1)


@pytest.mark.ray
def test_stalled_rank_is_torn_down_and_retried(tmp_path, run_dir, cluster):
    steps = 16
    r = recipe(tmp_path, gpus=2, seq_len=256, steps=steps, checkpoint_every=3)
    opt = options(tmp_path, run_dir, watchdog=WatchdogPolicy(factor=10, floor_s=10, startup_s=300))
    stage_dir = run_dir / "stage0-s"
    frozen: dict = {}
    stop = threading.Event()
    freezer = threading.Thread(target=freeze_a_rank, args=(cluster, stage_dir, 4, frozen, stop), daemon=True)
    freezer.start()
    try:
        result = Controller(r, opt).run_all()[0]
    finally:
        stop.set()
        freezer.join(timeout=30)
        if frozen:
            try:
                os.kill(frozen["pid"], signal.SIGCONT)  # gone already when the group was torn down
            except ProcessLookupError:
                pass
    assert frozen, "the stage finished before a rank could be frozen"
    lines = read_metrics(stage_dir)
    retries = [m for m in lines if m.get("event") == "retry"]
    assert len(retries) == 1 and retries[0]["cause"].startswith("stage watchdog: no step completed in"), retries
    resume = retries[0]["resume_step"]
    assert resume is not None and resume % 3 == 0 and resume <= frozen["at_step"] + 1
    assert result["steps"] == steps and result["resumed_from"] == resume
    after = [m["step"] for m in lines[lines.index(retries[0]) + 1:] if "step" in m]
    assert after[0] == resume + 1 and after[-1] == steps
    assert not Path(f"/proc/{frozen['pid']}").exists() or frozen["pid"] not in rank_worker_pids(cluster)


@pytest.mark.ray
def test_restart_from_redoes_a_changed_stage(tmp_path, run_dir, cluster):
    first = Controller(recipe(tmp_path), options(tmp_path, run_dir)).run_all()[0]
    done = run_dir / "stage0-s" / "done.json"
    stamp = done.stat().st_mtime_ns
    assert Controller(recipe(tmp_path), options(tmp_path, run_dir)).run_all()[0] == first  # unchanged and finished: skipped
    assert done.stat().st_mtime_ns == stamp
    changed = recipe(tmp_path, steps=3)
    with pytest.raises(ConfigError, match=r"stage 's' differs .*steps 2 -> 3"):
        Controller(changed, options(tmp_path, run_dir)).run_all()
    result = Controller(changed, options(tmp_path, run_dir, restart_from="s")).run_all()[0]
    assert result["steps"] == 3 and result["resumed_from"] is None  # redone from the start, not resumed
    replaced = list((run_dir / "replaced").iterdir())
    assert len(replaced) == 1 and json.loads((replaced[0] / "stage0-s" / "done.json").read_text())["steps"] == 2
    recorded = json.loads((run_dir / "stage0-s" / "identity.json").read_text())
    assert recorded["settings"]["steps"] == 3
    assert yaml.safe_load((run_dir / "recipe.yaml").read_text())["stages"][0]["steps"] == 3
