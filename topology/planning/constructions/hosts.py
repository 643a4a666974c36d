"""Which hosts a construction takes, and in what order: egress, switch paths, host cycles, each host's GPU sequence.

Every construction starts from the same questions (which hosts are fast
enough, which switches they sit under, in what cycle a ring visits them,
where a ring enters and leaves each host), so they are answered here once.
"""

from __future__ import annotations

import math
import statistics
from functools import lru_cache

from topology.planning.bounds.rates import switch_headroom, switch_reach
from topology.network.model import Topology
from topology.network.routing import nvlink_domain
from topology.planning.constructions.ring_order import bottleneck_cycle, locality_order, through_order
from topology.planning.request import PlanRequest


def group_path(topo: Topology, host: str) -> tuple[str, ...]:
    """Where a host sits, outermost first: its NVLink domain (if any), then the switches above it.

    Hosts sharing a prefix are close: constructions keep a ring's hosts
    under one prefix, so a ring stays inside an NVLink domain before it
    stays under one leaf (NVLink outruns any NIC).
    """
    gpus = topo.gpus(host)
    domain = nvlink_domain(topo, gpus[0]) if gpus else None
    return (() if domain is None else (f"nvlink domain {domain}",)) + topo.switch_path(host)


def host_egress(topo: Topology, host: str) -> float:
    """Bandwidth a host's NIC has to the rest of the cluster (median over its external links)."""
    links = [d["bw_gbps"] for nic in topo.nics(host) for v, d in topo.graph.adj[nic].items()
             if topo.graph.nodes[v].get("host") != host]
    return statistics.median(links) if links else math.inf


def needed_egress(egress: dict[str, float], gpus_on: dict[str, int], want: int) -> float:
    """The slowest egress among hosts taken fastest first until they hold ``want`` GPUs (all of them if they never
    do): the hosts at least that fast hold the GPUs, and one on a degraded cable joins only when they need it."""
    total, threshold = 0, math.inf
    for h in sorted((h for h in gpus_on if gpus_on[h]), key=lambda h: -egress[h]):
        total += gpus_on[h]
        threshold = egress[h]
        if total >= want:
            break
    return threshold


def choose_hosts(req: PlanRequest, per_host: dict[str, int], s: int) -> list[str]:
    """Enough hosts for ``req.gpus``, fastest first, from the best-connected switches, in switch order."""
    topo = req.topo
    gpus_on = {h: n * s for h, n in per_host.items()}
    # Hosts whose switches let out the most first (ECMP's equal split counted: a leaf with one slow uplink of two
    # lets out twice that), then the fastest cards among them.
    reach = switch_reach(topo)
    far = needed_egress({h: reach.get(h, math.inf) for h in req.hosts}, gpus_on, req.gpus)
    egress = {h: host_egress(topo, h) for h in req.hosts}
    threshold = needed_egress(egress, {h: n for h, n in gpus_on.items() if reach.get(h, math.inf) >= far}, req.gpus)
    paths = {h: group_path(topo, h) for h in req.hosts}
    headroom = switch_headroom(topo)
    groups: dict[tuple, list[str]] = {}
    for h in req.hosts:
        if per_host[h] and reach.get(h, math.inf) >= far and egress[h] >= threshold:
            groups.setdefault(paths[h], []).append(h)
    # Leaves under the widest uplinks first, the fullest first, in switch order (a pod's leaves stay together).
    chosen, total = [], 0
    for members in sorted(groups.values(), key=lambda hs: (-min(headroom[h] for h in hs), -sum(per_host[h] for h in hs),
                                                           paths[hs[0]])):
        for h in sorted(members, key=lambda h: (paths[h], -egress[h])):
            if total >= req.gpus:
                break
            chosen.append(h)
            total += per_host[h] * s
    return sorted(chosen, key=lambda h: (paths[h], -per_host[h]))


def host_cycle(topo: Topology, hosts: list[str]) -> list[str]:
    """``hosts`` in the cycle whose slowest link between neighbours is fastest, then that changes switch group
    fewest times (``bottleneck_cycle``)."""
    bw = topo.host_bandwidth_matrix(hosts)
    leaf_ids: dict[object, int] = {}
    groups = tuple(leaf_ids.setdefault(group_path(topo, h), len(leaf_ids)) for h in hosts)
    return [hosts[i] for i in _cycle_indices(tuple(map(tuple, bw)), groups)]


def open_cycle(topo: Topology, hosts: list[str]) -> list[str]:
    """``host_cycle`` turned to start where it crosses the highest switch: the ring's hops are the same, and the
    gradient ring, which walks the ranks in order, then enters and leaves each group of the ring once."""
    cycle = host_cycle(topo, hosts)
    paths = [group_path(topo, h) for h in cycle]

    def shared(i: int) -> int:  # switches above both hosts i - 1 and i
        return next((k for k, (a, b) in enumerate(zip(paths[i - 1], paths[i])) if a != b), len(paths[i]))

    start = min(range(len(cycle)), key=shared)
    return cycle[start:] + cycle[:start]


@lru_cache(maxsize=4096)
def _cycle_indices(bw: tuple[tuple[float, ...], ...], groups: tuple[int, ...]) -> tuple[int, ...]:
    # Rings of a regular fabric repeat the same bandwidth pattern: solve each pattern once.
    return tuple(bottleneck_cycle(range(len(bw)), lambda i, j: bw[i][j], groups.__getitem__))


def gpu_sequence(req: PlanRequest, hosts: list[str]) -> list[str]:
    """Concatenate each host's GPU order: PCIe order, rotated to the NIC when a ring passes through."""
    seq: list[str] = []
    for h in hosts:
        if req.ring > 1 and req.cp > req.gpu_count(h):
            seq.extend(through_order(req.topo, h, req.ulysses, req.flows, req.cuts))
        else:
            seq.extend(locality_order(req.topo, h))
    return seq
