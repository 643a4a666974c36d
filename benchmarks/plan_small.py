"""Small planning problems drawn at random: is each plan proven optimal, and how far is it from the bound?

    python benchmarks/plan_small.py                       # 80 problems of up to 32 GPUs, seed 0
    python benchmarks/plan_small.py --seed 5 --count 60 --most 64

Each problem is a cluster of at most 8 hosts (g6e hosts; two- and
three-tier leaf-spine fabrics; rails; NVLink racks; mixed 4- and 8-GPU
hosts; one degraded cable) and a plan shape: up to ``--most`` GPUs, a
ring of any divisor, Ulysses 1, 2, 4 or 8, 256, 2,048 or 8,192 tokens per
GPU. Problems this size are the exact search's (up to 8 hosts or 32 GPUs):
the target is every plan proven optimal (exhaustive search finished, or
the plan meets the bound). Printed per problem: the proof, the gap of an
unproven plan to the bound, the planning time, and a warning where aware
is slower than Ray's order; then the counts.
"""

from __future__ import annotations

import argparse
import random
import time

from topology.network.model import Topology
from topology.network.presets import g6e, leaf_spine, nvl_domains, rails
from topology.planning.planner import make_plan

KINDS = ("g6e", "leafspine", "three tiers", "rails", "nvlink", "mixed hosts", "degraded cable")


def cluster(rng: random.Random) -> tuple[str, Topology]:
    kind = rng.choice(KINDS)
    if kind == "g6e":
        hosts = rng.randint(1, 4)
        return f"g6e({hosts})", g6e(hosts)
    if kind == "leafspine":
        hosts, per_leaf, over = rng.randint(2, 8), rng.choice([1, 2, 4]), rng.choice([1.0, 2.0, 4.0])
        return (f"leafspine({hosts}, {per_leaf}/leaf, {over:g}:1)",
                leaf_spine(hosts, hosts_per_leaf=per_leaf, oversubscription=over))
    if kind == "three tiers":
        hosts, per_leaf, core = rng.randint(4, 8), rng.choice([1, 2]), rng.choice([1.0, 2.0])
        return (f"three tiers({hosts}, {per_leaf}/leaf, core {core:g}:1)",
                leaf_spine(hosts, hosts_per_leaf=per_leaf, leaves_per_pod=2, core_oversubscription=core))
    if kind == "rails":
        hosts, nics = rng.randint(2, 4), rng.choice([2, 4])
        return f"rails({hosts}, {nics} NICs)", rails(hosts, nics=nics)
    if kind == "nvlink":
        trays = rng.choice([2, 3, 4])
        return f"NVLink racks(2 x {trays} trays)", nvl_domains(2, trays=trays, hosts_per_leaf=2)
    hosts = rng.randint(2, 8 if kind == "degraded cable" else 6)
    sizes = [rng.choice([4, 8]) for _ in range(hosts)]
    if kind == "mixed hosts":
        per_leaf = rng.choice([1, 2])
        return f"mixed hosts({sizes}, {per_leaf}/leaf)", leaf_spine(hosts, hosts_per_leaf=per_leaf, gpus=sizes)
    bad = {rng.randrange(hosts): rng.choice([1.0, 3.125, 6.25])}
    per_leaf = rng.choice([1, 2, 4])
    return (f"degraded cable({sizes}, {per_leaf}/leaf, {bad})",
            leaf_spine(hosts, hosts_per_leaf=per_leaf, degraded=bad, gpus=sizes))


def shape(rng: random.Random, topo: Topology, most: int) -> tuple[int, int, int, int] | None:
    """(GPUs, cp, ulysses, tokens per GPU), or None when the cluster has no ring of two or more to offer."""
    for _ in range(100):
        gpus = rng.randint(2, min(topo.num_gpus, most))
        rings = [c for c in range(2, gpus + 1) if gpus % c == 0]
        if rings:
            cp = rng.choice(rings)
            return gpus, cp, rng.choice([u for u in (1, 2, 4, 8) if cp % u == 0]), rng.choice([256, 2048, 8192])
    return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--count", type=int, default=80, help="problems to draw")
    parser.add_argument("--most", type=int, default=32, help="most GPUs a plan takes")
    args = parser.parse_args()
    rng = random.Random(args.seed)
    proven = slower = 0
    gaps: list[float] = []
    seconds = 0.0
    print(f"{'#':>3} {'cluster':48} {'GPUs':>4} {'cp':>3} {'u':>2} {'tokens':>6} {'plan s':>7}  proof")
    for k in range(args.count):
        name, topo = cluster(rng)
        drawn = shape(rng, topo, args.most)
        if drawn is None:
            continue
        gpus, cp, ulysses, tokens = drawn
        start = time.perf_counter()
        aware = make_plan(topo, gpus, cp, ulysses, seq_len=tokens * cp)
        took = time.perf_counter() - start
        seconds += took
        naive = make_plan(topo, gpus, cp, ulysses, seq_len=tokens * cp, strategy="naive")
        cost, search = aware.cost, aware.cost["search"]
        if search["optimal"]:
            proven += 1
            verdict = search["proof"]
        else:
            gaps.append(cost["step_time_s"] / cost["bound_step_s"] - 1)
            verdict = f"none, {gaps[-1]:.3%} above the bound"
        if cost["step_time_s"] > naive.cost["step_time_s"] * (1 + 1e-7):
            slower += 1
            verdict += "; SLOWER THAN RAY'S ORDER"
        print(f"{k:3d} {name:48} {gpus:4d} {cp:3d} {ulysses:2d} {tokens:6d} {took:7.2f}  {verdict}", flush=True)
    drawn = proven + len(gaps)
    print(f"problems {drawn}; proven optimal {proven}; unproven {len(gaps)} "
          f"(above the bound by at most {max(gaps, default=0):.3%}, {sum(g > 0.01 for g in gaps)} by more than 1%); "
          f"aware slower than Ray's order in {slower}; planning {seconds:.1f} s in all")


if __name__ == "__main__":
    main()
