"""Launch latency: from submission until every rank is in its process group.

8 ranks on 4 emulated hosts (ray.cluster_utils, 127.0.0.2-5, 2 fake GPUs
each), measured side by side on the same cluster, alternating trials:

* ringleader: placement group pinned to the planned hosts, one actor per
  rank, torchrun env, ``init_process_group`` + barrier
  (``launcher.runtime.workers.WorkerGroup``); the plan comes from the real profiler
  and planner, run once beforehand and timed on its own line;
* Ray Train: ``TorchTrainer`` (gloo) with 8 workers of {GPU: 1, CPU: 1},
  until every worker's train function has passed a barrier.

Both ask Ray for the same bundles and join a gloo group; each time is the
last rank's arrival minus the submission. Run by hand (needs ``pip install
-e .[bench]`` for Ray Train)::

    python benchmarks/launch.py --trials 3
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import ray  # noqa: E402

from launcher.runtime.controller import placement_nodes, with_slots  # noqa: E402
from launcher.runtime.resources import ClusterView  # noqa: E402
from launcher.runtime.workers import WorkerGroup  # noqa: E402
from tests.ray_utils import local_cluster  # noqa: E402
from topology.network.model import Topology  # noqa: E402
from topology.planning.planner import make_plan  # noqa: E402
from topology.profiling.profile import profile_cluster  # noqa: E402

HOSTS, GPUS_PER_HOST = 4, 2
WORLD = HOSTS * GPUS_PER_HOST


def plan_cluster(cp: int):
    view = ClusterView.snapshot(use_gpus=True)
    measured = with_slots(profile_cluster(transfer_mb=1, repeats=2), view)
    topo = Topology.from_measured(measured)
    return view, topo, make_plan(topo, WORLD, cp, seq_len=16 * cp)


def ringleader_launch(plan, topo, bundle) -> float:
    """Seconds from submission to the last rank past its first barrier."""
    t0 = time.time()
    group = WorkerGroup.start(plan, placement_nodes(plan, topo), bundle)
    try:
        arrivals = ray.get([w.init_group.remote(env, 120.0) for w, env in zip(group.workers, group.envs)])
    finally:
        group.shutdown()
    return max(arrivals) - t0


def ray_train_launch(storage: str) -> float:
    """Seconds from ``TorchTrainer.fit()`` to the last worker past a barrier in its train function."""
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    marks = Path(tempfile.mkdtemp(prefix="rl-bench-", dir=storage))

    def train_func(config):
        import torch.distributed as dist

        dist.barrier()
        Path(config["marks"], f"{dist.get_rank()}").write_text(repr(time.time()))

    trainer = TorchTrainer(
        train_func, train_loop_config={"marks": str(marks)}, torch_config=TorchConfig(backend="gloo"),
        scaling_config=ScalingConfig(num_workers=WORLD, use_gpu=True, resources_per_worker={"CPU": 1, "GPU": 1}),
        run_config=RunConfig(storage_path=storage, name=f"bench-{time.time_ns()}"),
    )
    t0 = time.time()
    trainer.fit()
    arrivals = [float(p.read_text()) for p in marks.iterdir()]
    assert len(arrivals) == WORLD, f"{len(arrivals)} of {WORLD} workers reported"
    return max(arrivals) - t0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=3)
    parser.add_argument("--ring", type=int, default=4, help="ring size of the plan (default 4: two rings over two hosts each)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="rl-bench-") as storage:
        return compare(args.trials, args.ring, storage)


def compare(trials: int, ring: int, storage: str) -> int:
    # One CPU per rank beside each GPU; Ray Train's controller actor needs one more on the head.
    with local_cluster(hosts=HOSTS, gpus_per_host=GPUS_PER_HOST, cpus_per_host=GPUS_PER_HOST + 1):
        t0 = time.time()
        view, topo, plan = plan_cluster(ring)
        plan_s = time.time() - t0
        ours, theirs = [], []
        for trial in range(trials):
            ours.append(ringleader_launch(plan, topo, view.bundle()))
            theirs.append(ray_train_launch(storage))
            print(f"trial {trial + 1}: ringleader {ours[-1]:.2f} s, Ray Train TorchTrainer {theirs[-1]:.2f} s", flush=True)
    a, b = statistics.median(ours), statistics.median(theirs)
    print(f"\n{WORLD} ranks on {HOSTS} emulated hosts, median of {trials} trials:")
    print(f"  profile + plan (once per node set, then cached): {plan_s:.2f} s")
    print(f"  ringleader: submission -> all ranks in process group: {a:.2f} s")
    print(f"  Ray Train TorchTrainer, same cluster:              {b:.2f} s")
    print(f"  ratio ringleader / TorchTrainer: {a / b:.2f} (with profile + plan: {(a + plan_s) / b:.2f})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
