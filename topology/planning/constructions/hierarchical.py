"""The textbook construction: the fewest, fastest hosts, rings over runs of them in bottleneck-cycle order."""

from __future__ import annotations

import itertools

from topology.planning.constructions.hosts import gpu_sequence, group_path, host_cycle, host_egress, needed_egress
from topology.planning.plan import GroupLayout
from topology.planning.request import PlanRequest


EXHAUSTIVE_HOSTS = 8
"""Clusters with at most this many hosts get every host choice and split scored."""


def hierarchical_order(req: PlanRequest) -> list[str]:
    """The textbook construction: fewest hosts, rings over leaf runs, bottleneck host cycles, PCIe order."""
    topo = req.topo
    egress = {h: host_egress(topo, h) for h in req.hosts}
    sizes = {req.gpu_count(h) for h in req.hosts}
    per_host = sizes.pop() if len(sizes) == 1 else 0
    spans_hosts = per_host and req.ring > 1 and req.cp > per_host and req.cp % per_host == 0
    if spans_hosts and len(req.hosts) <= EXHAUSTIVE_HOSTS:
        return _best_split(req, egress, per_host)
    hosts = select_hosts(req, egress)
    if spans_hosts:
        return gpu_sequence(req, _ring_host_order(req, hosts, req.cp // per_host))
    return gpu_sequence(req, hosts)[: req.gpus]


def select_hosts(req: PlanRequest, egress: dict[str, float]) -> list[str]:
    """The hosts to use, leaf by leaf (the list the ring runs are cut from).

    The fewest hosts whose links are as fast as possible (a host on a
    degraded cable is taken only when the GPUs need it), then from the
    leaves that hold the most of them, so rings span few switches.
    """
    topo = req.topo
    threshold = needed_egress(egress, {h: req.gpu_count(h) for h in req.hosts}, req.gpus)
    by_leaf: dict[object, list[str]] = {}
    for h in req.hosts:
        if egress[h] >= threshold:
            by_leaf.setdefault(group_path(topo, h), []).append(h)
    leaves = sorted(by_leaf.values(), key=lambda hs: -sum(req.gpu_count(h) for h in hs))
    chosen, total = [], 0
    for members in leaves:
        for h in sorted(members, key=lambda h: -egress[h]):
            if total >= req.gpus:
                return chosen
            chosen.append(h)
            total += req.gpu_count(h)
    return chosen


def _ring_host_order(req: PlanRequest, hosts: list[str], k: int) -> list[str]:
    """Cut the leaf-sorted hosts into runs of ``k`` and order each run as a bottleneck cycle."""
    out: list[str] = []
    for i in range(0, len(hosts), k):
        out.extend(host_cycle(req.topo, hosts[i:i + k]))
    return out


def _best_split(req: PlanRequest, egress: dict[str, float], per_host: int) -> list[str]:
    """Small clusters: try every host subset and split into rings; keep the best by the cost model."""
    k, need = req.cp // per_host, req.gpus // per_host
    rings = GroupLayout.from_grid(req.gpus // req.cp, req.ring, req.ulysses).ring_groups
    best_key, best = None, None
    for subset in itertools.combinations(req.hosts, need):
        for split in _splits(list(subset), k):
            seq = gpu_sequence(req, [h for ring in split for h in host_cycle(req.topo, ring)])
            rate, lat, cross = _score(req, rings, seq)
            key = (-rate, cross, -min(egress[h] for h in subset), lat)
            if best_key is None or key < best_key:
                best_key, best = key, seq
    assert best is not None  # need <= len(hosts) was checked, so one split exists
    return best


def _splits(hosts: list[str], k: int):
    """Every way to cut ``hosts`` into unordered groups of ``k`` (first host anchors each group)."""
    if not hosts:
        yield []
        return
    first, rest = hosts[0], hosts[1:]
    for others in itertools.combinations(rest, k - 1):
        remaining = [h for h in rest if h not in others]
        for tail in _splits(remaining, k):
            yield [[first, *others], *tail]


def _score(req: PlanRequest, rings: list[list[int]], seq: list[str]) -> tuple[float, float, int]:
    """(slowest hop GB/s, its latency µs, cross-switch hops) of a rank order with these ring groups."""
    hops = [(seq[g[i]], seq[g[(i + 1) % len(g)]]) for g in rings for i in range(len(g))]
    rates = req.flows.bandwidths(hops)
    rate, lat = min(rates, key=lambda r: (r[0], -r[1]))
    topo = req.topo
    cross = sum(topo.leaf_of(topo.host_of(a)) != topo.leaf_of(topo.host_of(b)) for a, b in hops)
    return rate, lat, cross
