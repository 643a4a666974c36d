"""A real Ray autoscaler adds nodes when the second stage needs more GPUs than the first.

The head runs ``ray start --head --autoscaling-config`` with the
``fake_multinode`` provider (RAY_FAKE_CLUSTER=1): the autoscaler launches
real raylets on this machine with fake GPUs. The cluster starts with no GPU
at all; ``ringleader run --address`` asks for stage 1's GPUs (one node
appears), then for stage 2's (a second node appears) and trains on them.

The test uses a copy of clusters/local-autoscaling.yaml with two things
changed: the provider's GCS address (the shipped file assumes the default
port 6379, which other clusters on this machine may hold) and the worker
type's size, 1 fake GPU instead of 8, so that growing by a node means 2
ranks in training here rather than 9.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import yaml

from tests.ray_utils import REPO, RayHead, free_port

CONFIG = REPO / "clusters" / "local-autoscaling.yaml"
FAKE_HEAD_NODE_ID = "f" * 51 + "00000"


def test_shipped_config_is_a_fake_multinode_cluster_of_8_gpu_workers():
    from ray.autoscaler._private.util import validate_config

    config = yaml.safe_load(CONFIG.read_text())
    validate_config(config)
    assert config["provider"]["type"] == "fake_multinode"
    workers = [t for name, t in config["available_node_types"].items() if name != config["head_node_type"]]
    assert [(t["resources"]["GPU"], t["max_workers"]) for t in workers] == [(8, 4)]


@pytest.mark.ray
def test_second_stage_scales_the_cluster_up(tmp_path, run_dir):
    from ray._private.services import get_node_ip_address

    port = free_port()
    config = yaml.safe_load(CONFIG.read_text())
    config["provider"]["gcs_address"] = f"{get_node_ip_address()}:{port}"
    worker = next(t for name, t in config["available_node_types"].items() if name != config["head_node_type"])
    worker["resources"].update(CPU=1, GPU=1)
    config_path = tmp_path / "autoscaling.yaml"
    config_path.write_text(yaml.safe_dump(config))

    recipe = yaml.safe_load((REPO / "clusters" / "recipes" / "demo.yaml").read_text())
    recipe["data"]["path"] = str(REPO / "clusters" / "data" / "corpus")
    recipe["deepspeed"] = {"zero_optimization": {"stage": 2}}
    for stage, gpus in zip(recipe["stages"], (1, 2)):
        stage.update(gpus=gpus, steps=2, checkpoint_every=0)
    recipe_path = tmp_path / "grow.yaml"
    recipe_path.write_text(yaml.safe_dump(recipe))

    head = RayHead.start(f"--autoscaling-config={config_path}", "--num-cpus=4", "--num-gpus=0", port=port,
                         env={"RAY_FAKE_CLUSTER": "1", "AUTOSCALER_UPDATE_INTERVAL_S": "1"})
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "launcher", "run", str(recipe_path), "--address", head.address,
             "--run-dir", str(run_dir), "--resource-timeout", "240", "--profile-cache", str(tmp_path / "profiles")],
            cwd=REPO, env=head.env, capture_output=True, text=True, timeout=500,
        )
    finally:
        head.stop()
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-4000:]
    assert "autoscaling" in log and "asked the autoscaler for 2 GPUs" in log
    nodes = []
    for stage in ("stage0-256", "stage1-1k"):
        plan = json.loads((run_dir / stage / "plan.json").read_text())
        nodes.append({p["node_id"] for p in plan["placements"]})
        assert (run_dir / stage / "done.json").is_file()
    assert len(nodes[0]) == 1 and len(nodes[1]) == 2  # one 1-GPU node, then two
    assert FAKE_HEAD_NODE_ID not in nodes[0] | nodes[1]  # ranks run on the nodes the autoscaler added
