"""A host dies in the middle of a stage: the run resumes from its last checkpoint on the hosts left.

Three Ray nodes (127.0.0.2-4, one fake GPU each); the stage needs two.
Once rank 0 has logged a step past the first checkpoint, a host holding
ranks is killed (``Cluster.remove_node``). The controller must tear the
group down, wait for Ray to declare the host dead, re-profile, re-plan on
the hosts left and finish the stage from the checkpoint, with the
retry in metrics.jsonl.

With two hosts and a stage whose ``min_gpus`` allows it, the stage instead
goes on with fewer ranks: the ring shrinks and the checkpoint is re-partitioned.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from launcher.runtime.controller import Controller, ControllerOptions
from launcher.recipe import Recipe
from launcher.runtime.rundir import read_metrics
from tests.ray_utils import REPO, local_cluster, when_step_reached

STEPS = 40
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


def kill_a_host(lc, stage_dir: Path, step: int) -> dict:
    """Remove a non-head host that holds ranks of the stage's plan."""
    plan = json.loads((stage_dir / "plan.json").read_text())
    used = {p["ip"] for p in plan["placements"]}
    victim = next(i for i in range(len(lc.ips) - 1, 0, -1) if lc.ips[i] in used)
    lc.remove_host(victim)
    return {"ip": lc.ips[victim], "at_step": step}


def run_with_a_host_killed(tmp_path: Path, run_dir: Path, recipe_dict: dict, hosts: int) -> tuple[dict, dict, list[dict], Path]:
    """Run the recipe on ``hosts`` one-GPU hosts, killing one mid-stage; (result, killed, metrics lines, stage dir)."""
    path = tmp_path / "fault.yaml"
    path.write_text(yaml.safe_dump(recipe_dict))
    recipe = Recipe.load(path)
    options = ControllerOptions(run_dir=run_dir, profile_cache=tmp_path / "profiles", resource_timeout_s=90,
                                profile_transfer_mb=1, profile_repeats=2, progress_bar=False)
    stage_dir = run_dir / "stage0-s"
    with local_cluster(hosts=hosts, gpus_per_host=1, cpus_per_host=1, system_config=FAST_HEALTH_CHECKS) as lc:
        with when_step_reached(stage_dir, KILL_AFTER_STEP, lambda step: kill_a_host(lc, stage_dir, step)) as killed:
            results = Controller(recipe, options).run_all()
    assert killed, "the stage finished before a host could be removed"
    return results[0], killed, read_metrics(stage_dir), stage_dir


def check_resumed(result: dict, lines: list[dict], steps: int) -> dict:
    """The one retry resumed from a checkpoint and the steps after it go on from there; returns the retry event."""
    assert result["steps"] == steps and Path(result["hf_dir"], "config.json").is_file()
    retries = [m for m in lines if m.get("event") == "retry"]
    assert len(retries) == 1 and retries[0]["attempt"] == 1 and retries[0]["cause"]
    resume = retries[0]["resume_step"]
    assert resume is not None and resume % 5 == 0 and resume >= 5
    assert result["resumed_from"] == resume  # the trainer picked up that checkpoint
    # Steps after the retry continue from the checkpoint, not from the start.
    after = [m["step"] for m in lines[lines.index(retries[0]) + 1:] if "step" in m]
    assert after[0] == resume + 1 and after[-1] == steps
    return retries[0]


@pytest.mark.ray
def test_host_removed_mid_stage_resumes_on_remaining_hosts(tmp_path, run_dir):
    result, killed, lines, stage_dir = run_with_a_host_killed(tmp_path, run_dir, RECIPE, hosts=3)
    retry = check_resumed(result, lines, STEPS)
    assert retry["world_size"] == 2
    # The new plan avoids the dead host.
    plan = json.loads((stage_dir / "plan.json").read_text())
    assert killed["ip"] not in {p["ip"] for p in plan["placements"]} and plan["world_size"] == 2


@pytest.mark.ray
def test_host_removed_with_no_spare_continues_on_fewer_ranks(tmp_path, run_dir):
    """Two hosts, a ring of 2 under ZeRO-3, ``min_gpus`` 1: the lost host is not replaced, the ring shrinks to one
    rank, and the ZeRO-3 checkpoint of 2 ranks is re-partitioned for it."""
    recipe = {**RECIPE, "deepspeed": {"zero_optimization": {"stage": 3}},
              "stages": [{**RECIPE["stages"][0], "min_gpus": 1}]}
    result, killed, lines, stage_dir = run_with_a_host_killed(tmp_path, run_dir, recipe, hosts=2)
    retry = check_resumed(result, lines, STEPS)
    assert (retry["world_size"], retry["ring"]) == (1, 1)
    plan = json.loads((stage_dir / "plan.json").read_text())
    assert plan["world_size"] == 1 and killed["ip"] not in {p["ip"] for p in plan["placements"]}
    # Weights and Adam moments came through the shrink: a step run by both attempts (between the checkpoint and
    # the kill) has the same loss on 1 rank as it had on 2, and the step after the checkpoint improves on step 1.
    cut = lines.index(retry)
    before = {m["step"]: m["loss"] for m in lines[:cut] if "step" in m}
    after = {m["step"]: m["loss"] for m in lines[cut + 1:] if "step" in m}
    for step in before.keys() & after.keys():
        assert after[step] == pytest.approx(before[step], abs=1e-3)
    assert after[retry["resume_step"] + 1] < before[1]
