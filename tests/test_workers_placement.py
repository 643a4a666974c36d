"""Rank actors land on the hosts and GPUs their plan gives them, with torchrun's environment.

Three Ray nodes on this machine (127.0.0.2-4, two fake GPUs each); the plan
is written by hand in an order Ray would never pick by itself, so a worker
on the wrong host or a rank with the wrong environment shows.
"""

from __future__ import annotations

import time
import urllib.request

import pytest
import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from launcher.runtime.workers import PlacementFailed, WorkerGroup, match_gpus, rank_env
from tests.ray_utils import local_cluster
from topology.planning.plan import Plan, RankPlacement

GPU_RANK = {"GPU": 1.0, "CPU": 1.0}


@pytest.fixture(scope="module")
def cluster():
    # Metrics reach the nodes' Prometheus endpoints every second instead of every ten.
    with local_cluster(hosts=3, gpus_per_host=2, cpus_per_host=2, system_config={"metrics_report_interval_ms": 1000}) as lc:
        yield lc


@ray.remote(num_cpus=0)
class MetricsRank:
    """A rank's tracker in a Ray worker, as ``trainer.stage`` opens it there."""

    def record(self, stage: str, rank: int) -> list[str]:
        from trainer.reporting.tracking import TrackingConfig, open_trackers

        trackers = open_trackers(TrackingConfig(tensorboard=False), stage, "/nonexistent/stage", rank)
        trackers.log_stage(0, {"world_size": 4.0})
        trackers.log_step({"step": 1, "loss": 2.5, "step_time_s": 0.25, "ring_comm_s": 0.125, "peak_memory_gib": 1.5})
        return trackers.names


def hand_plan(lc, slots: list[tuple[int, int]], cp: int) -> Plan:
    """Rank r on host ``slots[r][0]`` (index into the cluster), GPU ``slots[r][1]``."""
    placements = [RankPlacement(r, f"h{h}", g, lc.node_id(h), lc.ips[h]) for r, (h, g) in enumerate(slots)]
    return Plan("hand", len(slots) // cp, cp, 1, 16 * cp, placements)


# ------------------------------------------------------------------ pure helpers
def test_rank_env_follows_plan():
    placements = [RankPlacement(0, "b", 1), RankPlacement(1, "a", 0), RankPlacement(2, "b", 0), RankPlacement(3, "a", 1)]
    plan = Plan("hand", 2, 2, 1, 8, placements)
    envs = [rank_env(plan, r, "10.0.0.2", 29500) for r in range(4)]
    assert [e["RANK"] for e in envs] == ["0", "1", "2", "3"]
    assert {e["WORLD_SIZE"] for e in envs} == {"4"}
    assert [e["LOCAL_RANK"] for e in envs] == ["0", "0", "1", "1"]
    assert [e["GROUP_RANK"] for e in envs] == ["0", "1", "0", "1"]  # host order = first rank's host first
    assert {e["LOCAL_WORLD_SIZE"] for e in envs} == {"2"}
    assert {(e["MASTER_ADDR"], e["MASTER_PORT"]) for e in envs} == {("10.0.0.2", "29500")}


def test_match_gpus_gives_each_rank_its_planned_gpu():
    plan = Plan("hand", 1, 4, 1, 8, [RankPlacement(r, "a", g) for r, g in enumerate([2, 0, 3, 1])])
    # Ray handed actors 0..3 the GPUs 3, 1, 0, 2.
    pick = match_gpus(plan, [0, 1, 2, 3], [[3], [1], [0], [2]])
    given = [[3], [1], [0], [2]]
    assert [given[k][0] for k in pick] == [2, 0, 3, 1]


# ------------------------------------------------------------------ on Ray
@pytest.mark.ray
def test_workers_land_where_planned_with_torchrun_env(cluster):
    # Host 2 first, host 0 second, host 1 last; GPUs reversed on the full host.
    plan = hand_plan(cluster, [(2, 1), (2, 0), (0, 0), (1, 1)], cp=2)
    nodes = [p.node_id for p in plan.placements]
    group = WorkerGroup.start(plan, nodes, GPU_RANK, timeout_s=60, stage="1k")
    try:
        # Each actor is named after its stage, rank and host, and says so in its log prefix.
        names = [f"1k/rank-{r}@h{h}" for r, (h, _) in enumerate([(2, 1), (2, 0), (0, 0), (1, 1)])]
        assert [ray.get_actor(n)._actor_id for n in names] == [w._actor_id for w in group.workers]
        group.init_process_group(timeout_s=60)
        seen = ray.get([w.whoami.remote() for w in group.workers], timeout=60)
        for r, info in enumerate(seen):
            planned = plan.placements[r]
            assert info["node_id"] == planned.node_id, f"rank {r} landed on the wrong host"
            assert info["ip"] == planned.ip
            assert info["rank"] == r and info["world_size"] == 4  # torch.distributed agrees
            env = info["env"]
            assert env["RANK"] == str(r) and env["WORLD_SIZE"] == "4"
            assert env["LOCAL_RANK"] == str(plan.local_rank(r))
            assert env["MASTER_ADDR"] == cluster.ips[2]  # rank 0's host
        # Host 2 is fully used: both ranks see both GPUs in local-rank order, so
        # cuda:LOCAL_RANK is exactly the planned GPU of each.
        assert seen[0]["env"]["CUDA_VISIBLE_DEVICES"] == seen[1]["env"]["CUDA_VISIBLE_DEVICES"] == "1,0"
        assert sorted(g for r in (0, 1) for g in seen[r]["gpu_ids"]) == [0, 1]  # and Ray gave the stage both
        assert len({s["env"]["MASTER_PORT"] for s in seen}) == 1
    finally:
        group.shutdown()


@pytest.mark.ray
def test_unplaceable_group_fails_fast_and_releases(cluster):
    # Three ranks on a host with two GPUs: the placement group can never be ready.
    plan = hand_plan(cluster, [(1, 0), (1, 1), (1, 2), (0, 0)], cp=2)
    nodes = [p.node_id for p in plan.placements]
    with pytest.raises(PlacementFailed, match="not ready"):
        WorkerGroup.start(plan, nodes, GPU_RANK, timeout_s=3)
    # Nothing left holding GPUs: a full-host group fits right away.
    ok = hand_plan(cluster, [(1, 0), (1, 1)], cp=2)
    group = WorkerGroup.start(ok, [p.node_id for p in ok.placements], GPU_RANK, timeout_s=30)
    group.shutdown()


@pytest.mark.ray
def test_ranks_metrics_reach_rays_prometheus_endpoint(cluster):
    node = next(n for n in ray.nodes() if n["Alive"] and n["NodeManagerAddress"] == cluster.ips[1])
    rank = MetricsRank.options(scheduling_strategy=NodeAffinitySchedulingStrategy(node["NodeID"], soft=False)).remote()
    assert ray.get(rank.record.remote("1k", 3), timeout=60) == ["raymetrics"]  # rank 3: Ray metrics only
    url = f"http://{node['NodeManagerAddress']}:{node['MetricsExportPort']}/metrics"
    wanted = {"ray_ringleader_loss": 2.5, "ray_ringleader_step_time_s": 0.25, "ray_ringleader_ring_comm_s": 0.125,
              "ray_ringleader_peak_memory_gib": 1.5, "ray_ringleader_plan_world_size": 4.0, "ray_ringleader_steps_total": 1.0}
    found: dict[str, float] = {}
    deadline = time.monotonic() + 60
    while set(found) != set(wanted) and time.monotonic() < deadline:
        with urllib.request.urlopen(url, timeout=10) as page:
            for line in page.read().decode().splitlines():
                name = line.split("{", 1)[0]
                if name in wanted and 'stage="1k"' in line and 'rank="3"' in line:
                    found[name] = float(line.rsplit(" ", 1)[1])
        time.sleep(0.5)  # the agent exports once a second (see the fixture)
    ray.kill(rank)
    assert found == wanted
