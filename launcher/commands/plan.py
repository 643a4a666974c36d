"""``ringleader plan``: place ranks on a topology and print the plan.

    ringleader plan --topology leafspine-64x-2to1 --gpus 512 --ring 64 --compare
    ringleader plan --topology profile.json --gpus 32 --ring 32 --ulysses 2 -o plan.json
"""

from __future__ import annotations

import argparse

from topology.calibration import load_calibration
from topology.cost import FlowModel, HardwareRates
from topology.files import check_writable
from topology.network.model import Topology
from topology.planning.plan import Plan
from topology.planning.planner import STRATEGIES, TOKENS_PER_GPU, make_plan
from topology.network.presets import PRESETS, load_topology

SHOWN_RINGS = 8
"""Rings printed in full; larger plans end with a count of the rest."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--topology", required=True, metavar="FILE|PRESET",
                        help=f"a topology YAML/JSON (node/link or measured form) or a preset: {', '.join(PRESETS)}")
    parser.add_argument("--gpus", type=int, required=True, help="GPUs to use (world size)")
    parser.add_argument("--ring", type=int, required=True, metavar="C", help="GPUs per sequence (ring size, cp)")
    parser.add_argument("--ulysses", type=int, default=1, metavar="U", help="all-to-all degree inside the ring (default 1)")
    parser.add_argument("--seq-len", type=int, default=None, metavar="S",
                        help=f"tokens per sequence (default {TOKENS_PER_GPU} x ring)")
    parser.add_argument("--strategy", choices=list(STRATEGIES), default="aware", help="placement strategy (default aware)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random strategy")
    parser.add_argument("--calibration", metavar="FILE", help="achieved rates for the cost model (`ringleader calibrate -o FILE`); "
                        "default: published achieved figures for the topology's GPU")
    parser.add_argument("-o", "--output", metavar="PLAN.json", help="write the plan here (JSON, or YAML by suffix)")
    parser.add_argument("--compare", action="store_true", help="also print every strategy side by side")


def run(args: argparse.Namespace) -> int:
    if args.output:
        check_writable(args.output)
    topo = load_topology(args.topology)
    flows = FlowModel(topo)
    rates = HardwareRates.from_calibration(load_calibration(args.calibration, topo.gpu))

    def plan_for(strategy: str) -> Plan:
        return make_plan(topo, args.gpus, args.ring, args.ulysses, args.seq_len, strategy, args.seed, flows=flows, rates=rates)

    plan = plan_for(args.strategy)
    print(summary(plan, topo))
    if args.compare:
        print()
        print(comparison([plan if s == args.strategy else plan_for(s) for s in STRATEGIES]))
    if args.output:
        plan.save(args.output)
        print(f"\nwrote {args.output}")
    return 0


def summary(plan: Plan, topo: Topology) -> str:
    """Readable plan: shape, rings as host:gpu runs, slowest hop and predicted times."""
    c = plan.cost
    lines = [
        f"plan: {plan.strategy} on {plan.topology}: {plan.world_size} GPUs = dp {plan.dp} x ring {plan.ring}"
        f" x ulysses {plan.ulysses}; seq_len {plan.seq_len:,} ({c['tokens_per_rank']:,} tokens per GPU)",
        f"hosts: {len(plan.hosts)} of {len(topo.hosts)}",
        "rings (host:gpus in ring order):",
    ]
    rings = plan.groups.ring_groups
    for i, ring in enumerate(rings[:SHOWN_RINGS]):
        lines.append(f"  {i:>3}: {ring_text(plan, ring)}")
    if len(rings) > SHOWN_RINGS:
        lines.append(f"  ... {len(rings) - SHOWN_RINGS} more rings")
    if c["slowest_hop"]:
        a, b = c["slowest_hop"]
        pa, pb = plan.placements[a], plan.placements[b]
        lines.append(
            f"slowest hop: {_gbps(c['slowest_hop_gbps'])} (rank {a} -> {b}, {pa.host}:{pa.gpu} -> {pb.host}:{pb.gpu});"
            f" bound {_gbps(c['bound_hop_gbps'])}; {c['inter_host_hops']} inter-host, {c['cross_switch_hops']} cross-switch hops"
        )
    lines.append(
        f"ring step per layer, forward: comm {_ms(c['ring_comm_fwd_s'])}, compute {_ms(c['ring_compute_fwd_s'])}"
        f" -> {_ms(c['ring_step_fwd_s'])} (bound {_ms(c['bound_ring_step_s'])}); comm hidden: {'yes' if c['hidden'] else 'no'}"
    )
    lines.append(
        f"step: {c['step_time_s']:.2f} s (attention {c['attention_s']:.2f} s, dense {c['dense_compute_s']:.2f} s,"
        f" gradients {c['dp_allreduce_s']:.2f} s; bound {c['bound_step_s']:.2f} s),"
        f" {c['tokens_per_s']:,.0f} tokens/s, MFU {c['mfu']:.0%}"
    )
    if "search" in c:
        found = c["search"]
        proof = (f"optimal ({found['proof']})" if found["optimal"]
                 else f"best found, gap {c['step_time_s'] / c['bound_step_s'] - 1:.1%} to bound (not proven optimal)")
        lines.append(f"search: kept {found['construction']!r} of {len(found['candidates'])} constructions scored,"
                     f" {found['moves']} improving moves; {proof}")
    if c.get("rates_source"):
        lines.append(f"rates: {c['rates_source']}")
    return "\n".join(lines)


def ring_text(plan: Plan, ring: list[int]) -> str:
    """``h00:0,2,3 -> h05:0,1``: runs of consecutive ranks on one host."""
    runs: list[tuple[str, list[int]]] = []
    for rank in ring:
        p = plan.placements[rank]
        if runs and runs[-1][0] == p.host:
            runs[-1][1].append(p.gpu)
        else:
            runs.append((p.host, [p.gpu]))
    return " -> ".join(f"{host}:{','.join(map(str, gpus))}" for host, gpus in runs)


def comparison(plans: list[Plan]) -> str:
    """One row per strategy: predicted ring step, slowest hop, cross-switch hops, step time and step time over its bound."""
    header = ("strategy", "ring step fwd", "slowest hop", "cross-switch hops", "step time", "tokens/s", "x bound")
    rows = [header]
    for p in plans:
        c = p.cost
        rows.append((
            p.strategy, _ms(c["ring_step_fwd_s"]), _gbps(c["slowest_hop_gbps"]), str(c["cross_switch_hops"]),
            f"{c['step_time_s']:.2f} s", f"{c['tokens_per_s']:,.0f}", f"{c['step_time_s'] / c['bound_step_s']:.2f}",
        ))
    c = plans[0].cost
    rows.append(("bound", _ms(c["bound_ring_step_s"]), _gbps(c["bound_hop_gbps"]), "-", f"{c['bound_step_s']:.2f} s", "-", "1.00"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
    for p in plans:
        if "search" in p.cost:
            lines.append(f"{p.strategy} traded: {p.cost['search']['trade']}")
    return "\n".join(lines)


def _ms(seconds: float) -> str:
    return f"{seconds * 1e3:.2f} ms"


def _gbps(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f} GB/s"
