"""How busy each link is when all of a plan's rings step at once.

A host pair's single-flow bandwidth (the slowest link of its path) says
nothing about sharing: on a 2:1 oversubscribed leaf-spine, every host pair
gets 12.5 GB/s alone, yet eight rings leaving one leaf at once get half of
it each. The utilisation of a directed link is the sum of what the flows
crossing it would move alone (each its single-flow rate) over what the link
carries; above 1.0 the link holds every one of them back.

``link_loads`` is the one place that turns flows into per-link figures; both
it and ``flow_loads`` read routes from ``FlowModel`` (equal-cost multi-path:
a flow split over two spines puts half of itself on each), the same routes
the cost model and the planner use.

>>> from topology.network.presets import load_topology
>>> topo = load_topology("leafspine-64x-2to1")
>>> out = [(f"h{i:02d}/gpu0", f"h{i + 8:02d}/gpu0") for i in range(8)]  # leaf0 -> leaf1, eight at once
>>> load = link_loads(topo, out)[("leaf0", "spine")]
>>> load.flows, load.bw_gbps, load.utilisation
(8, 50.0, 2.0)
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from typing import Iterable

from topology.cost import gpu_nodes, ring_hops
from topology.network.routing import FlowModel
from topology.network.model import Topology
from topology.planning.plan import Plan


@dataclass(frozen=True)
class LinkLoad:
    """One direction of one link under concurrent traffic."""

    src: str
    dst: str
    bw_gbps: float
    flows: int
    """Flows crossing the link in this direction (a flow split over several paths counts once per link)."""
    demand_gbps: float
    """What those flows would move over it if each were alone: its single-flow rate times its share of the link."""
    load: float = 0.0
    """Sum of the flows' fractions on the link (ECMP splits): the link gives each whole flow ``bw_gbps / load``."""

    @property
    def share_gbps(self) -> float:
        """What each flow crossing the link can get here with all of them running."""
        return self.bw_gbps / self.load if self.load else self.bw_gbps

    @property
    def utilisation(self) -> float:
        """Demand over capacity: 1.0 is a full link, 2.0 a link asked for twice what it carries."""
        return self.demand_gbps / self.bw_gbps


def link_loads(topo: Topology, flows: Iterable[tuple[str, str]], model: FlowModel | None = None) -> dict[tuple[str, str], LinkLoad]:
    """Per directed link ``(u, v)``, the load of ``flows`` (GPU node pairs) running at once.

    Parameters
    ----------
    topo
        The cluster.
    flows
        (source, destination) node pairs, all sending at the same time.
    model
        A ``FlowModel`` whose path cache to reuse.

    Returns
    -------
    dict
        ``(u, v) -> LinkLoad`` for every link some flow crosses in that direction.

    Notes
    -----
    A flow's single-flow rate is the smallest ``capacity / fraction`` over its
    route's links. O(F * L) for F flows of at most L links each.
    """
    model = model or FlowModel(topo)
    count: dict[tuple[str, str], int] = defaultdict(int)
    demand: dict[tuple[str, str], float] = defaultdict(float)
    load: dict[tuple[str, str], float] = defaultdict(float)
    for a, b in flows:
        route = model.path(a, b)
        if not route:
            continue
        alone = _alone(model, route)
        for hop, fraction in route:
            count[hop] += 1
            demand[hop] += alone * fraction
            load[hop] += fraction
    return {(u, v): LinkLoad(u, v, model.capacity((u, v)), count[u, v], demand[u, v], load[u, v]) for u, v in count}


def _alone(model: FlowModel, route) -> float:
    """A flow's rate with nothing else on the network: its tightest link for the fraction it puts there."""
    return min(model.capacity(hop) / fraction for hop, fraction in route)


def ring_flows(plan: Plan, topo: Topology) -> list[tuple[str, str]]:
    """The (sender GPU, receiver GPU) node pairs of one ring step of every ring at once."""
    nodes = gpu_nodes(plan, topo)
    return [(nodes[a], nodes[b]) for a, b in ring_hops(plan)]


@dataclass(frozen=True)
class FlowLoad:
    """One flow among all the others: the busiest link on its way and the rate it gets."""

    src: str
    dst: str
    busiest: LinkLoad
    """The link of its path with the highest utilisation."""
    alone_gbps: float
    """Its single-flow rate: the slowest link of its path."""
    rate_gbps: float
    """Its rate with every flow running: its smallest fair share of a link."""


def flow_loads(topo: Topology, flows: list[tuple[str, str]], model: FlowModel | None = None) -> list[FlowLoad | None]:
    """Each flow's ``FlowLoad`` with all ``flows`` running at once (None for a flow that stays on its GPU)."""
    model = model or FlowModel(topo)
    links = link_loads(topo, flows, model)
    out: list[FlowLoad | None] = []
    for a, b in flows:
        route = model.path(a, b)
        if not route:
            out.append(None)
            continue
        path = [links[hop] for hop, _ in route]
        busiest = max(path, key=lambda l: l.utilisation)
        rate = min(links[hop].share_gbps / fraction for hop, fraction in route)
        out.append(FlowLoad(a, b, busiest, _alone(model, route), rate))
    return out
