"""``ringleader viz``: draw a topology and a plan's rings to HTML, PNG or SVG.

    ringleader viz g6e-4x -o g6e-4x.html                       # topology only
    ringleader viz leafspine-64x-2to1 --plan plan.json -o rings.html
    ringleader viz clusters/topologies/g6e-64x.yaml --plan plan.json --dp -o rings.png
    ringleader viz RUN/STAGE/topology.json --plan RUN/STAGE/plan.json --cpu-slots -o stage.html   # a run without GPUs

A plan made for another topology (another name, or hosts and GPUs it lacks) is refused.
"""

from __future__ import annotations

import argparse

from topology.planning.plan import Plan
from topology.network.presets import load_topology
from topology.viz.page import save


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("topology", help="preset name, or a topology / measured-profile YAML or JSON file")
    parser.add_argument("--plan", help="plan JSON/YAML (from `ringleader plan` or a run directory) whose rings to draw")
    parser.add_argument("--dp", action="store_true", help="show data-parallel groups from the start (the page can toggle them)")
    parser.add_argument("--cpu-slots", action="store_true",
                        help="the plan's ranks ran on CPU slots (a run without GPUs): leave out its GPU predictions")
    parser.add_argument("-o", "--output", required=True, help="FILE.html (interactive, offline), FILE.png or FILE.svg")


def run(args: argparse.Namespace) -> int:
    topo = load_topology(args.topology)
    plan = Plan.load(args.plan) if args.plan else None
    save(topo, plan, args.output, show_dp=args.dp, on_gpus=not args.cpu_slots)  # checks the suffix, and the plan against the topology, before writing
    rings = f", {len(plan.groups.ring_groups)} rings" if plan else ""
    print(f"wrote {args.output} ({topo.name}: {len(topo.hosts)} hosts, {topo.num_gpus} GPUs{rings})")
    return 0
