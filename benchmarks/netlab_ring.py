"""Ring attention's traffic on a real (emulated) network: topology-aware rank order vs naive.

    sudo python benchmarks/netlab_ring.py                # builds the lab, measures, tears it down
    sudo python benchmarks/netlab_ring.py --hosts 8 --per-leaf 4 --kv-tokens 1024
    sudo python benchmarks/netlab_ring.py --case mixed-hosts --plan other=plan.json

Builds one of tests/netlab.py's labs (``--case``, see ``CASES``; the default
``leafspine`` has 6 hosts, 2 leaves of 3 interleaved in address order,
100 Mbit/s host links, 50 Mbit/s uplinks, h4 degraded to 75 Mbit/s),
profiles it with ``ringleader profile``, plans the case's rings (default:
one leaf's size) with the ``aware`` and the ``naive`` strategy on the
measured topology, and runs each (and any ``--plan`` made on the lab's
declared topology, e.g. by another planner): one process per rank on its planned host, every
ring passing a K/V-sized block (what one rank holds of ``--kv-tokens``
tokens of Llama-3-8B in bf16) to its next rank, all rings at once, over
torch.distributed gloo. Prints the measured step time of both orders, their
ratio, and the cost model's prediction for each (``topology.cost.estimate``,
on the measured topology and on the lab's declared one) with its error.
The prediction adds the fixed cost of a ring step, measured on the same
ranks with 64-byte blocks right before the timed steps; with
``--neighbour`` a CPU-bound process runs through the profile, that
calibration and the timed steps alike.

Every lab host shares this machine's CPUs, which copy every byte through
the namespaces' links: the shaped links are the bottleneck only while all
flows at once stay well under what the CPUs can carry. On 2 cores, rings
of 6 hosts at 400 Mbit/s were limited by the CPUs (each hop at half the
rate the profile's 3 concurrent flows read); at 100 Mbit/s the profile
reads 95% of the set rates, beside a CPU-bound neighbour too. So the links
are slow by default, and the benchmark prints the profile's rate over the
set rate of same-leaf host pairs and warns when the machine, not the
network, sets the pace.

Inside an existing lab (the head's namespace) the measuring half runs alone::

    ip netns exec rlab-...-h0 python -m benchmarks.netlab_ring --address 198.18.0.1:6379 --profile topo.json --json
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from topology.cost import estimate  # noqa: E402
from topology.files import load_data  # noqa: E402
from topology.network.model import Topology  # noqa: E402
from topology.planning.plan import Plan, RankPlacement  # noqa: E402
from topology.planning.planner import make_plan  # noqa: E402


def run_ring(plan: Plan, steps: int, sizes: list[int], timeout_s: float = 120.0) -> list[list[float]]:
    """Seconds of each ring step at each of ``sizes`` bytes per hop, with every ring of ``plan`` running.

    One process per rank on its planned node joins one gloo group; each size
    runs ``steps`` ring steps on those same processes and connections, one
    size after the other.
    """
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    from topology.profiling.profile import HostProbe

    ranks = [HostProbe.options(scheduling_strategy=NodeAffinitySchedulingStrategy(p.node_id, soft=False)).remote(p.ip, timeout_s)
             for p in plan.placements]
    try:
        port = ray.get(ranks[0].listen.remote(), timeout=timeout_s)
        master = (plan.placements[0].ip, port)
        ray.get([r.join.remote(i, master, "gloo", plan.world_size) for i, r in enumerate(ranks)], timeout=timeout_s)
        ring_of = {rank: ring for ring in plan.groups.ring_groups for rank in ring}
        per_size = []
        for nbytes in sizes:
            times = ray.get([r.ring.remote(ring_of[i], nbytes, steps) for i, r in enumerate(ranks)], timeout=timeout_s)
            per_size.append([max(per_rank[s] for per_rank in times) for s in range(steps)])
        ray.get([r.leave.remote() for r in ranks], timeout=timeout_s)
    finally:
        for r in ranks:
            ray.kill(r)
    return per_size


def on_declared(plan: Plan, declared: Topology) -> float:
    """Predicted forward ring comm time of ``plan`` on the lab's declared leaf-spine topology (hosts matched by IP)."""
    from tests.netlab import LabPlan

    by_ip = {h.ip: h.name for h in LabPlan.from_topology(declared, prefix="").hosts}
    placements = [RankPlacement(p.rank, by_ip[p.ip], p.gpu) for p in plan.placements]
    mapped = Plan(plan.strategy, plan.dp, plan.cp, plan.ulysses, plan.seq_len, placements, topology=declared.name)
    return estimate(mapped, declared).ring_comm_fwd_s


def ring_size(measured: Topology, declared: Topology | None) -> int:
    """GPUs per ring: one leaf's worth, from the lab's declared layout when there is one.

    The leaves inferred from a profile (``topology.network.switches``) follow the
    measured bandwidths; under load one slow pair can leave a host in a leaf
    of its own, which made rings of one rank, and a rank "sending" to itself
    is what gloo rejects with "Pair is not connected". The ring size is the
    experiment's setting, so it comes from what the lab was built as.
    """
    topo = declared if declared is not None else measured
    leaves: dict[str, list[str]] = {}
    for h in topo.hosts:
        if topo.gpus(h):
            leaves.setdefault(topo.leaf_of(h), []).append(h)
    per_host = len(measured.gpus(measured.hosts[0]))
    cp = min(len(v) for v in leaves.values()) * per_host
    if cp < 2:
        raise SystemExit(f"netlab_ring: a leaf of {topo.name} holds one GPU, so rings would have one rank; "
                         "pass --declared with the lab's layout or build leaves of two hosts or more")
    return cp


SATURATED = 0.8
"""Profiled over set host-link rate below which the lab's traffic is limited by this machine's CPUs."""


def profiled_over_set(topo: Topology, declared: Topology) -> float:
    """Median, over host pairs under one leaf, of the profiled rate over the rate the lab set for the pair."""
    from tests.netlab import LabPlan

    name_at = {h.ip: h.name for h in LabPlan.from_topology(declared, prefix="").hosts}
    names = {h: name_at[topo.graph.nodes[h].get("ip")] for h in topo.hosts}
    ratios = [topo.host_bandwidth(a, b) / declared.host_bandwidth(names[a], names[b])
              for i, a in enumerate(topo.hosts) for b in topo.hosts[i + 1:]
              if declared.leaf_of(names[a]) == declared.leaf_of(names[b])]
    return statistics.median(ratios) if ratios else float("nan")


def declared_plan(path: str, topo: Topology, declared: Topology) -> Plan:
    """A plan made on the lab's declared topology (host names ``h0``...), moved onto the measured one by IP."""
    from tests.netlab import LabPlan

    ip_of = {h.name: h.ip for h in LabPlan.from_topology(declared, prefix="").hosts}
    host_at = {topo.graph.nodes[h].get("ip"): h for h in topo.hosts}
    plan = Plan.from_dict(load_data(path))
    placements = []
    for p in plan.placements:
        host = host_at[ip_of[p.host]]
        node = topo.graph.nodes[host]
        placements.append(RankPlacement(p.rank, host, p.gpu, node.get("node_id"), node.get("ip")))
    moved = Plan(plan.strategy, plan.dp, plan.cp, plan.ulysses, plan.seq_len, placements, topology=topo.name)
    moved.cost = estimate(moved, topo).to_dict()
    return moved


def measure(measured: dict[str, Any], kv_tokens: int, steps: int, declared: Topology | None,
            cp: int | None = None, world: int | None = None, others: dict[str, str] | None = None) -> dict[str, Any]:
    """Plan both orders on the measured topology, run them (and ``others``: name -> plan file on ``declared``),
    and compare with the predictions."""
    topo = Topology.from_measured(measured)
    cp = cp or ring_size(topo, declared)
    world = world or cp * (topo.num_gpus // cp)
    others = others or {}
    out: dict[str, Any] = {"cp": cp, "world_size": world, "kv_tokens": kv_tokens, "steps": steps, "orders": ["aware", "naive", *others],
                           "profiled_over_set": profiled_over_set(topo, declared) if declared is not None else None}
    for strategy in out["orders"]:
        if strategy in others:
            plan = declared_plan(others[strategy], topo, declared)
        else:
            plan = make_plan(topo, world, cp, seq_len=kv_tokens * cp, strategy=strategy)
        # The fixed cost of a ring step (barrier, gloo progress, scheduling: what a CPU-bound neighbour
        # stretches), measured on the same ranks right before the timed steps, under the same load.
        small, times = run_ring(plan, steps, [64, plan.cost["ring_bytes_fwd"]])
        fixed = statistics.median(small)
        rings = [[plan.placements[r].host for r in ring] for ring in plan.groups.ring_groups]
        out[strategy] = {
            "rings": rings,
            "ring_leaves": [sorted({topo.leaf_of(h) for h in ring}) for ring in rings],
            "bytes": plan.cost["ring_bytes_fwd"],
            "step_s": statistics.median(times),
            "step_times_s": times,
            "fixed_s": fixed,
            "predicted_s": plan.cost["ring_comm_fwd_s"] + fixed,
            "predicted_declared_s": on_declared(plan, declared) + fixed if declared is not None else None,
        }
    out["speedup"] = out["naive"]["step_s"] / out["aware"]["step_s"]
    return out


def report(res: dict[str, Any]) -> str:
    lines = [f"ring of {res['cp']} ranks x {res['world_size'] // res['cp']} rings, {res['aware']['bytes'] / 2**20:.2f} MiB per hop"
             f" ({res['kv_tokens']} tokens of Llama-3-8B K/V), median of {res['steps']} steps"]
    ratio = res.get("profiled_over_set")
    if ratio is not None:
        lines.append(f"profile / set rate of same-leaf host links: median {ratio:.2f}"
                     + ("" if ratio >= SATURATED else "; WARNING: this machine's CPUs, not the shaped links, limit the "
                        "lab's traffic, so measured times are not the network's: lower --host-mbit and --uplink-mbit"))
    lines.append(f"{'order':<6} {'measured':>10} {'model(measured topo)':>21} {'error':>7} {'model(declared)':>16} {'error':>7}  rings")
    for s in res.get("orders", ("aware", "naive")):
        r = res[s]
        decl = r["predicted_declared_s"]
        err = lambda p: f"{100 * (p - r['step_s']) / r['step_s']:+6.0f}%"  # noqa: E731
        lines.append(f"{s:<6} {1e3 * r['step_s']:8.1f}ms {1e3 * r['predicted_s']:19.1f}ms {err(r['predicted_s'])}"
                     + (f" {1e3 * decl:14.1f}ms {err(decl)}" if decl is not None else f" {'-':>16} {'':>7}")
                     + "  " + " | ".join(",".join(ring) for ring in r["rings"]))
    lines.append(f"aware is {res['speedup']:.2f}x faster than naive (measured); "
                 f"model says {res['naive']['predicted_s'] / res['aware']['predicted_s']:.2f}x")
    for s in res.get("orders", ())[2:]:
        lines.append(f"{s} is {res[s]['step_s'] / res['aware']['step_s']:.2f}x aware's time (measured); "
                     f"model says {res[s]['predicted_s'] / res['aware']['predicted_s']:.2f}x")
    return "\n".join(lines)


def inside(args: argparse.Namespace) -> int:
    """The measuring half: a driver on a lab host, connected to its Ray cluster."""
    import ray

    ray.init(address=args.address, logging_level="warning")
    try:
        if args.profile:
            measured = load_data(args.profile)
        else:
            from topology.profiling.profile import profile_cluster

            measured = profile_cluster(transfer_mb=2, repeats=3)
        declared = Topology.load(args.declared) if args.declared else None
        res = measure(measured, args.kv_tokens, args.steps, declared, args.ring, args.gpus, dict(args.plan))
    finally:
        ray.shutdown()
    print(json.dumps(res) if args.json else report(res))
    return 0


def lab_run(args: argparse.Namespace) -> dict[str, Any]:
    """Build ``args.case``'s lab, profile it, run the measuring half in the head's namespace, tear down;
    returns the measuring half's figures (``measure``).

    Raises
    ------
    LabUnavailable
        No network lab on this machine (not root, no iproute2, ...).
    """
    from tests.netlab import NetLab

    case = CASES[args.case]
    declared = case.topology(args)
    if args.save_declared:
        declared.save(args.save_declared)
    lab = NetLab(declared)
    with lab, tempfile.TemporaryDirectory(prefix="rlab-bench-") as tmp, cpu_neighbour(args.neighbour):
        # The neighbour (when asked for) runs from before the profile to after the last ring step, so the
        # profile the predictions are made from is measured under the same load as the rings it predicts.
        print(f"lab {args.case}: {case.about}; {len(lab.hosts)} hosts, {args.host_mbit:g} Mbit/s host links, "
              f"{args.uplink_mbit:g} Mbit/s uplinks" + (", a CPU-bound neighbour running" if args.neighbour else ""), flush=True)
        profile, decl = Path(tmp) / "topology.json", Path(tmp) / "declared.yaml"
        declared.save(decl)
        prof = lab.run(["python", "-m", "launcher", "profile", "--address", lab.address, "-o", str(profile),
                        "--transfer-mb", "2", "--repeats", "3", "--cache-dir", tmp])
        print(prof.stdout, flush=True)
        if args.save_profile:
            Path(args.save_profile).write_text(profile.read_text())
        done = lab.run(["python", "-m", "benchmarks.netlab_ring", "--address", lab.address, "--profile", str(profile),
                        "--declared", str(decl), "--kv-tokens", str(args.kv_tokens), "--steps", str(args.steps), "--json",
                        *(["--ring", str(case.ring)] if case.ring else []), *(["--gpus", str(case.gpus)] if case.gpus else []),
                        *(f for name, path in args.plan for f in ("--plan", f"{name}={Path(path).resolve()}"))])
    return json.loads(done.stdout.strip().splitlines()[-1])


def outside(args: argparse.Namespace) -> int:
    """Build a lab, profile it, measure inside it, tear down, print the figures."""
    from tests.netlab import LabUnavailable

    try:
        res = lab_run(args)
    except LabUnavailable as exc:
        print(f"netlab_ring: {exc}", file=sys.stderr)
        return 2
    print(report(res))
    return 0


@dataclass(frozen=True)
class LabCase:
    """One experiment: the lab to build and the rings to place on it."""

    about: str
    topology: Callable[[argparse.Namespace], Topology]
    ring: int | None = None
    """GPUs per ring; default one leaf's worth."""
    gpus: int | None = None
    """World size; default every whole ring the GPUs hold."""


def _leafspine(a: argparse.Namespace) -> Topology:
    from tests.netlab import lab_topology

    return lab_topology(a.hosts, a.per_leaf, a.host_mbit, a.uplink_mbit, {"h4": a.host_mbit * 0.75} if a.hosts > 4 else None)


def _mixed_hosts(a: argparse.Namespace) -> Topology:
    from tests.netlab import lab_topology

    return lab_topology(4, 2, a.host_mbit, a.uplink_mbit, {"h0": a.host_mbit / 2}, gpus_per_host=(3, 1, 2, 2), interleaved=False)


CASES = {
    "leafspine": LabCase("one GPU per host, leaves interleaved in Ray's order, one degraded host link", _leafspine),
    # Hosts of different sizes and one slow NIC: the hop-by-hop planner that preceded the step-time optimiser
    # put the 3-GPU host h0 (the slow NIC) in both rings of 3 and sent both across the uplink, twice Ray's
    # time; whole-host rings on one leaf halve it.
    "mixed-hosts": LabCase("hosts of 3, 1, 2 and 2 GPUs, two leaves in Ray's order, h0's link at half rate; "
                           "2 rings of 3", _mixed_hosts, ring=3, gpus=6),
}


def _named_file(item: str) -> tuple[str, str]:
    name, sep, path = item.partition("=")
    if not sep or not name or not path:
        raise argparse.ArgumentTypeError(f"--plan {item!r}: expected NAME=PLAN.json, e.g. old=plan.json")
    return name, path


@contextlib.contextmanager
def cpu_neighbour(on: bool) -> Iterator[None]:
    """A process that keeps one core busy for the duration (another job on the machine), or nothing."""
    if not on:
        yield
        return
    proc = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        yield
    finally:
        proc.kill()
        proc.wait()


def parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--address", help="run inside an existing lab: its Ray GCS address")
    parser.add_argument("--profile", help="with --address: measured topology to plan on (default: profile now)")
    parser.add_argument("--declared", help="with --address: the lab's node/link topology, for the second prediction")
    parser.add_argument("--json", action="store_true", help="with --address: print the figures as JSON")
    parser.add_argument("--case", choices=sorted(CASES), default="leafspine", help="which lab to build (see CASES)")
    parser.add_argument("--ring", type=int, help="with --address: GPUs per ring (default: one leaf's worth)")
    parser.add_argument("--gpus", type=int, help="with --address: world size (default: every whole ring)")
    parser.add_argument("--plan", type=_named_file, action="append", default=[], metavar="NAME=PLAN.json",
                        help="also run this plan, made on the lab's declared topology (host names h0, h1, ...)")
    parser.add_argument("--save-declared", metavar="FILE", help="write the lab's declared topology here (to plan on it)")
    parser.add_argument("--save-profile", metavar="FILE", help="write the lab's measured topology here (to replay its predictions)")
    parser.add_argument("--hosts", type=int, default=6)
    parser.add_argument("--per-leaf", type=int, default=3)
    parser.add_argument("--host-mbit", type=float, default=100.0, help="host link rate (default 100: see the module docstring)")
    parser.add_argument("--uplink-mbit", type=float, default=50.0)
    parser.add_argument("--kv-tokens", type=int, default=512, help="tokens per rank whose K/V block travels each step (4 KiB each)")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--neighbour", action="store_true",
                        help="keep one core busy with another process through profile and measurement (a loaded machine)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    return inside(args) if args.address else outside(args)


if __name__ == "__main__":
    sys.exit(main())
