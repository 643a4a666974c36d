"""What no placement can beat: an upper bound on a ring layout's slowest hop.

A ring whose hops all reach ``t`` GB/s lives inside one connected piece of
the links of at least ``t`` GB/s; and a ring that spans several hosts (or
leaves) leaves each of them at least once, sharing their external links with
the other rings that leave. Both facts hold for any placement, so the GB/s
they allow bounds every plan, and the cost model turns it into a lower bound
on the ring step time.
"""

from __future__ import annotations

import math

from topology.model import Topology


def ring_bandwidth_bound(topo: Topology, rings: int, size: int) -> float:
    """Upper bound on the slowest hop of any placement of ``rings`` disjoint rings of ``size`` GPUs.

    Parameters
    ----------
    topo
        The cluster.
    rings, size
        Number of ring groups running at once and GPUs in each.

    Returns
    -------
    float
        GB/s no placement's slowest hop can exceed (``inf`` for rings of one).

    Notes
    -----
    Two arguments, the smaller wins. (1) Components: drop every link slower
    than ``t``; a ring whose hops all reach ``t`` lies in one component, so
    ``t`` is feasible only if the components hold ``rings`` disjoint rings.
    (2) Exits: a ring over more GPUs than a host (leaf) has touches at least
    ``ceil(size / largest)`` hosts (leaves) and leaves each; a unit can send
    at most ``sum(floor(bw / t))`` such flows over its external links.
    O(E log E) for (1), O(units x links x 60) for (2).
    """
    if size < 2:
        return math.inf
    bound = _component_bound(topo, rings, size)
    hosts = [h for h in topo.hosts if topo.gpus(h)]
    units_by_level = [{h: [h] for h in hosts}]
    leaves = {h: topo.leaf_of(h) for h in hosts}
    if all(leaves.values()):
        by_leaf: dict[str, list[str]] = {}
        for h in hosts:
            by_leaf.setdefault(leaves[h], []).append(h)
        units_by_level.append(by_leaf)
    for units in units_by_level:
        bound = min(bound, _exit_bound(topo, units, rings, size))
    return bound


def _component_bound(topo: Topology, rings: int, size: int) -> float:
    parent = {n: n for n in topo.graph.nodes}
    gpus = {n: int(k == "gpu") for n, k in topo.graph.nodes(data="kind")}

    def find(x: str) -> str:
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    fits = 0
    edges = sorted(topo.graph.edges(data="bw_gbps"), key=lambda e: -e[2])
    for i, (u, v, bw) in enumerate(edges):
        ru, rv = find(u), find(v)
        if ru != rv:
            fits -= gpus[ru] // size + gpus[rv] // size
            parent[rv] = ru
            gpus[ru] += gpus[rv]
            fits += gpus[ru] // size
        last_of_value = i + 1 == len(edges) or edges[i + 1][2] < bw
        if last_of_value and fits >= rings:
            return bw
    return 0.0


def _exit_bound(topo: Topology, units: dict[str, list[str]], rings: int, size: int) -> float:
    g = topo.graph
    gpus = {name: sum(len(topo.gpus(h)) for h in hosts) for name, hosts in units.items()}
    largest = max(gpus.values())
    if size <= largest:
        return math.inf
    exits = rings * math.ceil(size / largest)
    caps = []  # (GPUs of the unit, bandwidths of its external links)
    for name, hosts in units.items():
        nodes = {n for h in hosts for n in (h, *topo.parts(h))}
        if name in g:  # a leaf unit owns its switch
            nodes.add(name)
        caps.append((gpus[name], [d["bw_gbps"] for u in nodes for v, d in g.adj[u].items() if v not in nodes]))

    def feasible(t: float) -> bool:
        return sum(min(n, sum(int(bw / t + 1e-9) for bw in bws)) for n, bws in caps) >= exits

    lo, hi = 0.0, max((bw for _, bws in caps for bw in bws), default=0.0)
    if hi == 0.0 or not feasible(lo + 1e-12):
        return 0.0
    if feasible(hi):
        return hi
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if feasible(mid) else (lo, mid)
    return lo
