"""Random messy fabrics of up to 24 hosts: how far is each plan from the bound, and how long does it take?

    python benchmarks/plan_random.py                          # seeds 0 to 199, a random share of each cluster
    python benchmarks/plan_random.py --seeds 100:150 --full   # every GPU of each cluster
    python benchmarks/plan_random.py --seeds 0:800 --small    # only the exact search's sizes

Each seed draws one fabric and one plan shape. Fabrics: leaf-spine with one
spine, or two or three (ECMP), three tiers (pods of 1 to 3 leaves under a
core), rails (2 or 4 NICs per 8-GPU host, one rail switch per NIC and
group of hosts) and NVLink racks; L40S hosts of 1, 2, 4 or 8 GPUs with 2
or 4 per PCIe switch and 1, 2 or 4 NICs of 12.5, 25 or 50 GB/s; 1:1, 2:1
or 4:1 oversubscription; a quarter of the uplinks at a quarter of their
rate, and a quarter of the hosts with their first NIC's cable at half or a
quarter. Plans: rings of 2 to 16, Ulysses 1, 2 or 4, a random multiple of
the cp group (``--full``: as many as the cluster holds), 8,192 tokens per
GPU. ``--small`` keeps clusters of at most 8 hosts or 32 GPUs, the sizes the
exact search is to prove optimal. Printed per seed: the fabric, GPUs used of the cluster's, aware over
the bound and over Ray's order, the proof, the construction kept and the
planning time; then the counts, the worst and median ratios and the time.
"""

from __future__ import annotations

import argparse
import random
import statistics
import time

from topology.errors import ConfigError
from topology.network.model import Topology
from topology.network.presets import add_l40s_host, nvl_domains
from topology.planning.planner import make_plan
from topology.planning.search.optimise import EXACT_GPUS, EXACT_HOSTS

KINDS = ("leaf-spine", "leaf-spine", "ECMP", "three tiers", "rails", "NVLink racks")


def fabric(rng: random.Random) -> tuple[str, Topology]:
    """One random fabric: its kind and topology."""
    kind = rng.choice(KINDS)
    if kind == "NVLink racks":
        topo = nvl_domains(domains=rng.randint(1, 4), trays=rng.randint(1, 6), gpus_per_tray=rng.choice([2, 4]),
                           planes=rng.choice([1, 2]), hosts_per_leaf=rng.randint(1, 6), oversubscription=rng.choice([1, 2, 4]))
        data = topo.to_dict()
        cables = [link for link in data["links"] if "/nic" in link["a"] + link["b"] and "leaf" in link["a"] + link["b"]]
        for _ in range(rng.randint(0, 3)):  # a few NIC cables negotiated down
            rng.choice(cables)["bw_gbps"] = rng.choice([6.25, 12.5, 25.0])
        return kind, Topology.from_dict(data)
    topo = Topology(name="random")
    hosts, per_leaf = rng.randint(2, 24), rng.randint(1, 8)
    leaves = -(-hosts // per_leaf)
    nic_gbps, over = rng.choice([12.5, 25.0, 50.0]), rng.choice([1, 2, 4])
    if kind == "rails":
        nics = rng.choice([2, 4])
        topo.add_node("spine", "spine")
        for leaf in range(leaves):
            for r in range(nics):
                topo.add_node(f"rail{leaf}.{r}", "leaf")
                topo.add_link(f"rail{leaf}.{r}", "spine", rng.choice([1, 1, 0.5]) * per_leaf * nic_gbps / over, 2.0)
        for i in range(hosts):
            add_l40s_host(topo, f"h{i:02d}", nic_gbps=nic_gbps, nics=nics, gpus=8,
                          leaf=[f"rail{i // per_leaf}.{r}" for r in range(nics)],
                          gpus_per_switch=rng.choice([2, 4]) if nics == 2 else 2)
        return kind, topo
    if kind == "three tiers":
        per_pod = rng.randint(1, 3)
        topo.add_node("core", "core")
        for pod in range(-(-leaves // per_pod)):
            topo.add_node(f"pod{pod}", "pod")
            topo.add_link(f"pod{pod}", "core", rng.choice([0.25, 0.5, 1]) * per_pod * per_leaf * nic_gbps / over, 2.0)
        parents = lambda leaf: [f"pod{leaf // per_pod}"]  # noqa: E731
    else:
        spines = [f"spine{s}" for s in range(rng.randint(2, 3) if kind == "ECMP" else 1)]
        for spine in spines:
            topo.add_node(spine, "spine")
        parents = lambda leaf: spines  # noqa: E731
    for leaf in range(leaves):
        topo.add_node(f"leaf{leaf}", "leaf")
        for up in parents(leaf):
            topo.add_link(f"leaf{leaf}", up, rng.choice([1, 1, 1, 0.25]) * per_leaf * nic_gbps / over / len(parents(leaf)),
                          2.0)
    for i in range(hosts):
        gpus = rng.choice([1, 2, 4, 8, 8, 8])
        per_switch = rng.choice([2, 4]) if gpus >= 4 else 2
        switches = -(-gpus // per_switch)
        add_l40s_host(topo, f"h{i:02d}", nic_gbps=nic_gbps, gpus=gpus, gpus_per_switch=per_switch,
                      nics=rng.choice([n for n in (1, 2, 4) if switches % n == 0]), leaf=f"leaf{i // per_leaf}",
                      leaf_link_gbps=rng.choice([None] * 6 + [nic_gbps / 4, nic_gbps / 2]))
    return kind, topo


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", default="0:200", help="first:last seed (last excluded)")
    parser.add_argument("--full", action="store_true", help="plan every GPU a cluster holds in whole cp groups")
    parser.add_argument("--small", action="store_true",
                        help="only clusters of at most 8 hosts or 32 GPUs: the exact search's, each plan to be proven")
    args = parser.parse_args()
    first, last = map(int, args.seeds.split(":"))
    rows = []
    print(f"{'seed':>4} {'fabric':12} {'GPUs':>9} {'ring':>4} {'u':>2} {'x bound':>8} {'x naive':>8} {'proof':12} "
          f"{'plan s':>7}  construction")
    for seed in range(first, last):
        rng = random.Random(seed)
        kind, topo = fabric(rng)
        ring, ulysses = rng.choice([2, 3, 4, 5, 6, 8, 12, 16]), rng.choice([1, 1, 1, 2, 4])
        cp, total = ring * ulysses, topo.num_gpus
        if total < cp:
            continue
        gpus = cp * (total // cp if args.full else rng.randint(1, total // cp))
        if args.small and len(topo.hosts) > EXACT_HOSTS and total > EXACT_GPUS:
            continue
        start = time.perf_counter()
        try:
            aware = make_plan(topo, gpus, cp, ulysses, seq_len=cp * 8192)
        except ConfigError as exc:  # a drawn shape the cluster cannot hold (e.g. a ring wider than it allows)
            print(f"{seed:4d} {kind:12} {'':>9} {ring:4d} {ulysses:2d}  {exc}")
            continue
        took = time.perf_counter() - start
        naive = make_plan(topo, gpus, cp, ulysses, seq_len=cp * 8192, strategy="naive")
        cost, search = aware.cost, aware.cost["search"]
        over_bound = cost["step_time_s"] / cost["bound_step_s"]
        over_naive = cost["step_time_s"] / naive.cost["step_time_s"]
        rows.append((over_bound, over_naive, bool(search["optimal"]), took))
        print(f"{seed:4d} {kind:12} {f'{gpus}/{total}':>9} {ring:4d} {ulysses:2d} {over_bound:8.4f} {over_naive:8.4f} "
              f"{search['proof'] or 'none':12} {took:7.2f}  {search['construction']}", flush=True)
    if not rows:
        return
    bound, naive, proven, took = zip(*rows)
    print(f"plans {len(rows)}; proven optimal {sum(proven)}; above the bound by more than 1% {sum(b > 1.01 for b in bound)}, "
          f"6% {sum(b > 1.06 for b in bound)}; aware slower than Ray's order {sum(n > 1 + 1e-7 for n in naive)}")
    print(f"aware/bound  worst {max(bound):.3f}  median {statistics.median(bound):.3f}")
    print(f"aware/naive  worst {max(naive):.3f}  median {statistics.median(naive):.3f}")
    print(f"plan_s       worst {max(took):.2f}  median {statistics.median(took):.2f}  total {sum(took):.1f}")


if __name__ == "__main__":
    main()
