"""How long planning takes as clusters grow (targets on a 2-core machine: 512 GPUs < 0.5 s, 16384 < 20 s).

    python benchmarks/plan_scaling.py
    python benchmarks/plan_scaling.py --sizes 512 4096 16384 --ring 64 --repeats 3

Each size is a 2:1 leaf-spine of 8-GPU hosts, 8 hosts per leaf. The time
covers ``make_plan`` end to end (host choice, ring order, in-host order and
the cost model with its bound) on a fresh topology, so no path cache is warm;
the naive baseline, which skips the search but pays the same cost model, is
timed beside it. Then a small plan on each cluster (``--small`` GPUs in
rings of 8 with Ulysses pairs): its exact search, the joint floors and the
units inside hosts run over the whole cluster. Last, one node of many CPU
slots (a cluster without GPUs, where each CPU is a rank slot) and a second of
4, as the controller's profile gives them: a ring of 8, and every slot.
"""

from __future__ import annotations

import argparse
import time

from topology.planning.planner import make_plan
from topology.network.presets import leaf_spine

TARGETS = {512: 0.5, 16384: 20.0}


def time_plan(gpus: int, ring: int, strategy: str, repeats: int, world: int | None = None,
              ulysses: int = 1) -> tuple[float, dict]:
    best, cost = float("inf"), {}
    for _ in range(repeats):
        topo = leaf_spine(hosts=gpus // 8, hosts_per_leaf=8, oversubscription=2.0)
        start = time.perf_counter()
        plan = make_plan(topo, world or gpus, ring, ulysses, strategy=strategy)
        best = min(best, time.perf_counter() - start)
        cost = plan.cost
    return best, cost


def time_slots(slots: int, world: int, ring: int) -> float:
    """Seconds to plan ``world`` ranks in rings of ``ring`` on a node of ``slots`` CPU slots beside one of 4."""
    from topology.network.model import MEASURED_FORMAT, Topology

    topo = Topology.from_dict({"format": MEASURED_FORMAT, "version": 1, "name": "cpus", "host_bw_gbps": [[0, 10], [10, 0]],
                               "hosts": [{"name": "a", "gpus": slots}, {"name": "b", "gpus": 4}]})
    start = time.perf_counter()
    make_plan(topo, world, ring)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[512, 4096, 16384])
    parser.add_argument("--ring", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--small", type=int, default=16, help="GPUs of the small plan on each cluster")
    parser.add_argument("--slots", type=int, nargs="+", default=[256, 1024, 4096], help="CPU slots of the big node")
    args = parser.parse_args()
    print(f"{'GPUs':>6}  {'aware s':>8}  {'naive s':>8}  {'aware/naive':>11}  {'target s':>8}  {'slowest hop':>11}  {'bound':>7}")
    for gpus in args.sizes:
        aware, cost = time_plan(gpus, args.ring, "aware", args.repeats)
        naive, _ = time_plan(gpus, args.ring, "naive", args.repeats)
        target = TARGETS.get(gpus)
        verdict = "-" if target is None else f"{target:g} {'ok' if aware < target else 'MISSED'}"
        print(f"{gpus:>6}  {aware:>8.3f}  {naive:>8.3f}  {aware / naive:>11.2f}  {verdict:>8}  "
              f"{cost['slowest_hop_gbps']:>9.2f}GB/s  {cost['bound_hop_gbps']:>5.2f}GB/s")
    print(f"\n{args.small} GPUs, rings of 8 in Ulysses pairs, on each cluster:")
    print(f"{'GPUs':>6}  {'aware s':>8}  {'naive s':>8}  {'above bound':>11}  proof")
    for gpus in args.sizes:
        aware, cost = time_plan(gpus, 8, "aware", 1, args.small, 2)
        naive, _ = time_plan(gpus, 8, "naive", 1, args.small, 2)
        found = cost["search"]
        print(f"{gpus:>6}  {aware:>8.3f}  {naive:>8.3f}  {cost['step_time_s'] / cost['bound_step_s'] - 1:>11.3%}  "
              f"{found['proof'] or 'none'}")
    print(f"\nOne node of many CPU slots beside one of 4:\n{'slots':>6}  {'8 ranks s':>9}  {'all ranks s':>11}")
    for slots in args.slots:
        print(f"{slots:>6}  {time_slots(slots, 8, 8):>9.3f}  {time_slots(slots, slots, 8):>11.3f}")


if __name__ == "__main__":
    main()
