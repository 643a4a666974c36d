"""A host dies in the middle of a stage: the run resumes from its last checkpoint on the hosts left.

Three Ray nodes (127.0.0.2-4, one fake GPU each); the stage needs two.
Once rank 0 has logged a step past the first checkpoint, a host holding
ranks is killed (``Cluster.remove_node``). The controller must tear the
group down, wait for Ray to declare the host dead, re-profile, re-plan on
the hosts left and finish the stage from the checkpoint, with the
retry in metrics.jsonl.
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pytest
import yaml

from launcher.controller import Controller, ControllerOptions
from launcher.recipe import Recipe
from launcher.rundir import read_metrics
from tests.ray_utils import REPO, local_cluster

STEPS = 80
"""Tiny steps take well under 0.1 s; a killed host's ranks take a few seconds to notice, and the stage must outlast that."""
RECIPE = {
    "name": "fault",
    "model": {"tiny": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2,
                       "num_key_value_heads": 1, "head_dim": 16, "vocab_size": 264},
              "base_theta": 10000, "base_len": 64, "head_dim": 16},
    "data": {"path": str(REPO / "clusters" / "data" / "corpus")},
    "max_retries": 2,
    "deepspeed": {"zero_optimization": {"stage": 2}},
    "stages": [{"name": "s", "seq_len": 256, "rope_theta": {"rule": "ntk"}, "batch": 1, "gpus": 2, "steps": STEPS,
                "checkpoint_every": 5, "lr": 1e-3}],
}
KILL_AFTER_STEP = 6
FAST_HEALTH_CHECKS = {"health_check_period_ms": 500, "health_check_timeout_ms": 500, "health_check_failure_threshold": 3}
"""Ray declares a killed host dead after about 1.5 s instead of about 15 s."""


def kill_a_host_mid_stage(lc, stage_dir: Path, killed: dict, stop: threading.Event) -> None:
    """Wait for rank 0's step KILL_AFTER_STEP, then remove a non-head host that holds ranks."""
    while not stop.is_set():
        steps = [m["step"] for m in read_metrics(stage_dir) if "step" in m]
        if steps and max(steps) >= KILL_AFTER_STEP:
            plan = json.loads((stage_dir / "plan.json").read_text())
            used = {p["ip"] for p in plan["placements"]}
            victim = next(i for i in range(len(lc.ips) - 1, 0, -1) if lc.ips[i] in used)
            killed.update(ip=lc.ips[victim], at_step=max(steps))
            lc.remove_host(victim)
            return
        time.sleep(0.1)


@pytest.mark.ray
def test_host_removed_mid_stage_resumes_on_remaining_hosts(tmp_path):
    path = tmp_path / "fault.yaml"
    path.write_text(yaml.safe_dump(RECIPE))
    recipe = Recipe.load(path)
    options = ControllerOptions(run_dir=tmp_path / "run", profile_cache=tmp_path / "profiles", resource_timeout_s=90,
                                profile_transfer_mb=1, profile_repeats=2, progress_bar=False)
    stage_dir = tmp_path / "run" / "stage0-s"
    with local_cluster(hosts=3, gpus_per_host=1, cpus_per_host=1, system_config=FAST_HEALTH_CHECKS) as lc:
        killed: dict = {}
        stop = threading.Event()
        killer = threading.Thread(target=kill_a_host_mid_stage, args=(lc, stage_dir, killed, stop), daemon=True)
        killer.start()
        try:
            results = Controller(recipe, options).run_all()
        finally:
            stop.set()
            killer.join(timeout=30)
    assert killed, "the stage finished before a host could be removed"
    result = results[0]
    assert result["steps"] == STEPS and Path(result["hf_dir"], "config.json").is_file()
    lines = read_metrics(stage_dir)
    retries = [m for m in lines if m.get("event") == "retry"]
    assert len(retries) == 1 and retries[0]["attempt"] == 1 and retries[0]["cause"]
    resume = retries[0]["resume_step"]
    assert resume is not None and resume % 5 == 0 and resume >= 5
    assert result["resumed_from"] == resume  # the trainer picked up that checkpoint
    # Steps after the retry continue from the checkpoint, not from the start.
    after = [m["step"] for m in lines[lines.index(retries[0]) + 1:] if "step" in m]
    assert after[0] == resume + 1 and after[-1] == STEPS
    # The new plan avoids the dead host.
    plan = json.loads((stage_dir / "plan.json").read_text())
    assert killed["ip"] not in {p["ip"] for p in plan["placements"]} and plan["world_size"] == 2
