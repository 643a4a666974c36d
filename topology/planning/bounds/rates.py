"""What no placement can beat: upper bounds on the rates a placement's flows can reach.

A ring whose hops all reach ``t`` GB/s lives inside one connected piece of
the host links of at least ``t`` GB/s; a ring that spans several hosts (or
leaves, or pods) leaves each of them at least once, so the flows that leave
a unit share its external links; and a GPU's flows share its own links.
These facts hold for any placement, so the rates they allow bound every
plan, and the cost model turns them into lower bounds on the ring step, the
all-to-all and the gradient traffic (``topology.cost.step_bound``).

Equal-cost multi-path routing splits a flow over parallel links, so a flow
can run faster than any one switch-to-switch link (or any one of a GPU's
links to its NVLink switch planes): the arguments below count a unit's
external capacity as a sum, and never cut the fabric at a switch-to-switch
or GPU-to-NVLink-switch link. The routes themselves say how ECMP splits:
a flow across a unit's border runs at most as fast as the fastest route
across it does alone (``crossing_rate``).
"""

from __future__ import annotations

import math

import networkx as nx
import numpy as np
from scipy.sparse import csr_matrix
from scipy.sparse.csgraph import connected_components

from topology.errors import ConfigError
from topology.network.model import Topology
from topology.network.routing import NVLINK_KIND, FlowModel, nvlink_domain

PAIR_GPUS = 256
"""Clusters of at most this many GPUs get ``partner_bound`` and ``route_component_bound``: they read the route of
every pair of GPUs (``pair_matrix``)."""
HOST_PAIRS = 16_384
"""... and of at most this many ordered pairs of GPUs that share a host: each such route is a search of its own
(routes between hosts are priced leg by leg), and a node of 250 CPU slots would take seconds."""


def ring_bandwidth_bound(topo: Topology, rings: int, size: int, without: frozenset[str] = frozenset()) -> float:
    """Upper bound on the slowest hop of any placement of ``rings`` disjoint rings of ``size`` GPUs.

    Parameters
    ----------
    topo
        The cluster.
    rings, size
        Number of ring groups running at once and GPUs in each.
    without
        Hosts no ring may use: their GPUs hold no rank (their links still carry flows between others).

    Returns
    -------
    float
        GB/s no placement's slowest hop can exceed (``inf`` for rings of one).

    Notes
    -----
    The smallest of five arguments. (1) Components: drop every link slower
    than ``t`` except switch-to-switch links; a ring whose hops all reach
    ``t`` lies in one component, so ``t`` is feasible only if the components
    hold ``rings`` disjoint rings. (2) Exits: at most ``floor(n / size)``
    rings fit inside a unit of ``n`` GPUs (a host, then the hosts under each
    switch level); every other ring touches at least two units (and at
    least ``ceil(size / largest)``) and leaves each; a unit can send at most
    ``sum(bw) / t`` such flows over its external links. (3) Access: every
    GPU sends one hop, no faster than one flow can run alone
    (``single_flow_bound``), nor faster than its own fastest route to
    another GPU (``partner_bound``, on small clusters; and (1) over those
    routes, ``route_component_bound``). (4) Crossings: a ring that touches
    two units or more leaves and enters each, and no hop out (or in) runs
    faster than the fastest route out (or in) does alone (``crossing_rate``):
    ECMP over a degraded uplink slows every such route, while the sum of the
    links out hardly drops. At ``t`` the rings must fit inside the units of
    slower borders or among the GPUs of faster ones (``_border_bound``).
    (5) Pieces: a ring visits a unit in runs, each inside one piece of the
    unit's routes at ``t``, and each run leaves over the unit's links out,
    counted by GPUs and as runs of at most ``size - 1`` GPUs
    (``topology.planning.bounds.piece_exits``, on small clusters). A host's
    links out carry no more than its maximum flow out (``host_exit_flow``). (1) also
    cuts a unit of hosts under a switch from the rest when its links out
    carry less than ``t`` in all: no flow at ``t`` leaves it. O(E log E)
    for (1), O(units x links x 60) for (2). Hosts ``without`` only take GPUs
    away from (1): a placement off them is one of the whole cluster, so (2)
    to (5) hold as they are.
    """
    if size < 2:
        return math.inf
    cache = topo.__dict__.setdefault("_bound_cache", {})
    if without:
        if (rings, size, without) not in cache:
            whole = ring_bandwidth_bound(topo, rings, size)
            _unit_levels(topo)
            # Most often the rings still fit at the whole cluster's bound: one pass, no bisection.
            fits = _fits_at(topo, whole, cache["seals"], size, without) >= rings
            cache[rings, size, without] = whole if fits else min(whole, _component_bound(topo, rings, size, without))
        return cache[rings, size, without]
    if (rings, size) not in cache:
        from topology.planning.bounds.piece_exits import piece_exit_bound  # it reads this module's units and routes

        bound = min(_component_bound(topo, rings, size), single_flow_bound(topo), partner_bound(topo, rings * size),
                    route_component_bound(topo, rings, size), piece_exit_bound(topo, rings, size))
        for caps in _unit_levels(topo):
            bound = min(bound, _exit_bound(caps, rings, size))
        cache[rings, size] = min(bound, _border_bound(topo, rings, size))
    return cache[rings, size]


def partner_bound(topo: Topology, used: int) -> float:
    """Part of argument (3) of ``ring_bandwidth_bound``: with ``used`` GPUs in rings, some hop runs no faster than
    the ``used``-th largest of the GPUs' partner rates (each GPU's fastest route out, or in, alone); ``inf`` on
    clusters too large for ``pair_matrix``.

    Routes, not links, say it: a GPU whose NIC is the one NCCL gives it may reach every other host only over a
    slow spine link while a link of the same GPU, or a NIC beside it, is fast; arguments over links alone then
    promise the fast link's rate.
    """
    return _ranked(topo, used, 1, share_links=False)


def all_to_all_rate_bound(topo: Topology, used: int, peers: int) -> float:
    """GB/s no placement's slowest all-to-all transfer beats, ``used`` GPUs each sending to ``peers`` others and
    receiving from as many.

    A GPU's ``peers`` transfers share its links (their sum, ``gpu_access_bound``), and each runs no faster than
    its ``peers``-th best route out (or in) alone: per GPU the smaller of the two, and some used GPU is no
    better than the ``used``-th best of them. On clusters too large for ``pair_matrix``, the best GPU's links.
    """
    if pair_matrix(topo) is None:
        return gpu_access_bound(topo) / peers
    return _ranked(topo, used, peers, share_links=True)


def _ranked(topo: Topology, used: int, peers: int, share_links: bool) -> float:
    """The ``used``-th largest, over the GPUs, of the ``peers``-th best route out and in (alone), capped by the GPU's
    links shared ``peers`` ways when ``share_links``; ``inf`` without pair rates."""
    found = pair_matrix(topo)
    if found is None:
        return math.inf
    gpus, rates = found
    cache = topo.__dict__["_bound_cache"]
    key = ("partners", peers, share_links)
    if key not in cache:
        figures = np.empty(0)
        if 1 <= peers < len(gpus):
            routes = rates.copy()
            np.fill_diagonal(routes, -math.inf)  # a GPU is not its own partner: sorted last
            out = -np.sort(-routes, axis=1)[:, peers - 1]
            into = -np.sort(-routes, axis=0)[peers - 1, :]
            figures = np.minimum(out, into)
            if share_links:
                links = np.array([sum(d["bw_gbps"] for d in topo.graph.adj[g].values()) for g in gpus])
                figures = np.minimum(figures, links / peers)
        cache[key] = -np.sort(-figures)
    figures = cache[key]
    return float(figures[used - 1]) if 1 <= used <= len(figures) else math.inf


def route_component_bound(topo: Topology, rings: int, size: int) -> float:
    """Argument (1) of ``ring_bandwidth_bound`` over routes: the largest ``t`` at which the GPUs' routes of ``t`` GB/s or more
    (alone) still hold the rings; ``inf`` on clusters too large for ``pair_matrix``.

    A ring whose hops all run at ``t`` is a directed cycle of routes that fast, so it lies inside one strongly
    connected piece of them. Links say a GPU reaches a fast NIC; the
    route NCCL gives it may not take that NIC, and a ring of GPUs may have no cycle as fast as each GPU's best
    partner. In a ring of three or more, a GPU whose fast routes all go to (and come from) one other GPU has no
    place: it is dropped before the pieces are counted, and so, in turn, are those it left alone. Such a ring is
    also a simple cycle, which never passes a cut vertex twice: it lies inside one biconnected block of the routes
    (taken either way). A host whose other GPUs reach the fast NIC's GPU only, for example, holds no ring that
    enters it through that GPU and visits the rest (``cycle_pieces``).
    """
    found = pair_matrix(topo)
    if found is None or size < 2:
        return math.inf
    rates = found[1]
    cache = topo.__dict__["_bound_cache"]
    key = ("route pieces", rings, size)
    if key not in cache:
        def fits(t: float) -> bool:
            return sum(len(piece) // size for piece in cycle_pieces(rates >= t, size)) >= rings

        values = np.unique(rates[~np.eye(len(rates), dtype=bool)]).tolist()
        lo, hi = -1, len(values)  # values[lo] holds the rings (lo = -1: none known to), values[hi:] do not
        while hi - lo > 1:
            mid = (lo + hi) // 2
            lo, hi = (mid, hi) if fits(values[mid]) else (lo, mid)
        cache[key] = values[lo] if lo >= 0 else 0.0
    return cache[key]


def cycle_pieces(fast: np.ndarray, size: int) -> list[np.ndarray]:
    """Pieces of the directed graph ``fast`` (``[i, j]``: an edge from GPU ``i`` to ``j``), as sorted arrays of
    GPU indices, such that every directed cycle of ``size`` GPUs lies inside one of them.

    A cycle lies in one strongly connected component; one of three or more GPUs also in one biconnected block of
    the undirected graph (a simple cycle is 2-connected), and uses no GPU with fewer than two neighbours. Each
    rule can break what another let through, so they run until nothing changes, component by component. A
    component in which every GPU has neighbours (either way) among at least half of the others passes all three
    at once: by Dirac's theorem it holds a Hamiltonian cycle, so it is 2-connected. Fast routes on a large
    cluster mostly form such dense components, which are then taken whole, without a block search.
    """
    fast = fast.astype(bool)  # a copy: the diagonal (no route from a GPU to itself) is cleared
    np.fill_diagonal(fast, False)
    count, label = connected_components(csr_matrix(fast), directed=True, connection="strong")
    sizes = np.bincount(label, minlength=count)
    pieces = []
    for c in np.flatnonzero(sizes >= max(size, 2)):
        members = np.flatnonzero(label == c)
        if size <= 2:
            pieces.append(members)
            continue
        within = fast[np.ix_(members, members)]
        if 2 * (within | within.T).sum(axis=1).min() >= len(members):
            pieces.append(members)
            continue
        g = nx.DiGraph()
        g.add_edges_from(zip(*np.nonzero(within)))
        pieces += [members[sorted(piece)] for piece in _split_to_cycle_pieces(g, size)]
    return pieces


def _split_to_cycle_pieces(g: nx.DiGraph, size: int) -> list[set]:
    """``cycle_pieces`` of one strongly connected component, by its three rules run until nothing changes."""
    while True:
        lone = [v for v in g if not g.pred[v] or not g.succ[v] or len(g.pred[v].keys() | g.succ[v].keys()) < 2]
        g.remove_nodes_from(lone)
        pieces = []
        for block in nx.biconnected_components(g.to_undirected(as_view=True)):
            pieces += [c for c in nx.strongly_connected_components(g.subgraph(block)) if len(c) >= size]
        keep = {(a, b) for piece in pieces for a, b in g.subgraph(piece).edges}
        if not lone and len(keep) == g.number_of_edges():
            return pieces
        g = nx.DiGraph(list(keep))


def pair_matrix(topo: Topology) -> tuple[list[str], np.ndarray] | None:
    """The GPUs, and ``[i, j]``: GB/s of the route from GPU ``i`` to GPU ``j`` alone (0 on the diagonal and where
    there is none); None on clusters of more than ``PAIR_GPUS`` GPUs or ``HOST_PAIRS`` pairs inside hosts.

    A route between hosts is the GPU's leg to its NIC, the fabric and the peer's leg from its NIC
    (``Routes.takes_network``), and a flow alone runs at its slowest leg's rate; NICs of one class
    (``_nic_classes``) have the same fabric rate to any other. So a cluster prices each GPU's two legs and one
    fabric route per pair of NIC classes, not a route per pair of GPUs.
    """
    cache = topo.__dict__.setdefault("_bound_cache", {})
    if "pair matrix" not in cache:
        gpus = topo.gpus()
        cache["pair matrix"] = (gpus, _pair_matrix(topo, gpus)) if reads_every_pair(topo) else None
    return cache["pair matrix"]


def reads_every_pair(topo: Topology) -> bool:
    """Whether the cluster is small enough for ``pair_matrix`` (``PAIR_GPUS``, ``HOST_PAIRS``)."""
    return topo.num_gpus <= PAIR_GPUS and sum(len(topo.gpus(h)) ** 2 for h in topo.hosts) <= HOST_PAIRS


def _pair_matrix(topo: Topology, gpus: list[str]) -> np.ndarray:
    """``pair_matrix``'s rates, leg by leg."""
    routes = topo.routes
    fabric = topo.__dict__["_bound_cache"].setdefault("fabric alone", {})  # shared with ``crossing_rate``

    def rate(a: str, b: str) -> float:
        try:
            return _alone(topo, routes.route(a, b))
        except ConfigError:  # no network path: no flow runs there (a plan that needs one fails)
            return 0.0

    nic_class = {nic: key for key, (_, _, nics, _) in _nic_classes(topo).items() for nic in nics}
    nic = [routes.nic_of(g) for g in gpus]
    legs = [(rate(g, n), rate(n, g), nic_class[n]) if n is not None else None for g, n in zip(gpus, nic)]
    rows = []
    for a, na, leg_a in zip(gpus, nic, legs):
        row = []
        for b, nb, leg_b in zip(gpus, nic, legs):
            if a == b:
                row.append(0.0)
            elif leg_a is not None and leg_b is not None and routes.takes_network(a, b):
                key = leg_a[2], leg_b[2]
                if key not in fabric:
                    fabric[key] = rate(na, nb)
                row.append(min(leg_a[0], fabric[key], leg_b[1]))
            else:
                row.append(rate(a, b))
        rows.append(row)
    return np.array(rows, dtype=float).reshape(len(gpus), len(gpus))


def gpu_access_bound(topo: Topology) -> float:
    """The fastest any one flow can leave a GPU: the largest sum of a GPU's link bandwidths."""
    cache = topo.__dict__.setdefault("_bound_cache", {})
    if "access" not in cache:
        g = topo.graph
        cache["access"] = max((sum(d["bw_gbps"] for _, _, d in g.edges(gpu, data=True)) for gpu in topo.gpus()),
                              default=math.inf)
    return cache["access"]


def single_flow_bound(topo: Topology) -> float:
    """The fastest one flow between two GPUs can run, alone on the cluster: no ring hop (each GPU sends one) runs
    faster, as sharing links only slows a flow.

    A GPU's links may not all serve one flow: in an NVLink domain a flow takes the NVLink switches or, to a GPU
    outside, the PCIe path to a NIC, never both. So per GPU the largest of: its routes to the GPUs of its host, as
    routed; the sum of its links to NVLink switches (any route in the domain); and its route off the host up to the
    node where it leaves, as routed, then that node's links out in all (ECMP may split there). One host of each
    build (``Topology.host_build_key``) stands for all.
    """
    cache = topo.__dict__.setdefault("_bound_cache", {})
    if "single" not in cache:
        g, routes = topo.graph, topo.routes
        access = gpu_access_bound(topo)
        best = 0.0
        for host, *_ in topo.host_builds().values():
            for a in topo.gpus(host):
                # No flow of ``a`` outruns its links together, nor any flow the access bound: a route that reaches
                # either ends the scan (a host of many alike GPUs, CPU slots say, reads one route, not all pairs').
                top = min(access, sum(d["bw_gbps"] for d in g.adj[a].values()))
                fastest = sum(d["bw_gbps"] for v, d in g.adj[a].items() if g.nodes[v]["kind"] == NVLINK_KIND)
                off = off_host_route(topo, a)
                if off is not None:
                    fastest = max(fastest, min(off))
                for b in topo.gpus(host):
                    if fastest >= top:
                        break
                    if b != a:
                        fastest = max(fastest, _alone(topo, routes.route(a, b)))
                best = max(best, fastest)
                if best >= access:
                    break
        cache["single"] = min(best, access) if best > 0 else access
    return cache["single"]


def off_host_route(topo: Topology, gpu: str) -> tuple[float, float] | None:
    """(GB/s of the GPU's route to other hosts inside its host, alone; GB/s of all the links out of the node where
    it leaves the host): every flow to a GPU of another host outside its NVLink domain takes that route and leaves
    there (ECMP may split beyond). None where no GPU of another host is reached but over NVLink."""
    host, routes = topo.host_of(gpu), topo.routes
    away = (routes.route(gpu, x) for x in topo.gpus() if topo.host_of(x) != host)
    route = next((r for r in away if not _via_nvlink(topo, r)), None)
    if route is None:
        return None
    inside = set(topo.parts(host))
    own = tuple(step for step in route if step[0][0] in inside and step[0][1] in inside)
    exits = {u for (u, v), _ in route if u in inside and v not in inside}
    out = sum(d["bw_gbps"] for u in exits for v, d in topo.graph.adj[u].items() if v not in inside)
    return _alone(topo, own), out


def crossing_rate(topo: Topology, hosts: list[str]) -> float:
    """The fastest a flow between a GPU of ``hosts`` and one elsewhere runs alone, the slower direction of the two.

    A route between hosts is the source GPU's way to its NIC, the fabric's
    route between the NICs, and the NIC's way to the destination GPU
    (``topology.network.routing``), so its rate alone is the least of the
    three. NICs alike in all three (the switches they plug into, their links'
    bandwidths, the best rate of a GPU that uses them) stand for each other:
    one fabric route per pair of such classes. ``inf`` where an NVLink domain
    spans the border (its flows never take a NIC).
    """
    cache = topo.__dict__.setdefault("_bound_cache", {})
    key = ("crossing", tuple(hosts))
    if key in cache:
        return cache[key]
    inside = set(hosts)
    classes = _nic_classes(topo)
    domains = _host_domains(topo)
    if any(domains.values()):
        within = set().union(*(domains.get(h, ()) for h in hosts))
        if any(within & d for h, d in domains.items() if h not in inside):
            cache[key] = math.inf
            return math.inf
    fabric = cache.setdefault("fabric alone", {})

    own = {c for h in hosts for c in _classes_of(topo).get(h, ())}
    by_tail = sorted(classes, key=lambda c: -classes[c][1])
    by_head = sorted(classes, key=lambda c: -classes[c][0])

    def fastest(out: bool) -> float:
        """Out of the unit (``out``), or into it (``inf`` where no route crosses: nothing to say)."""
        best = -math.inf
        for c in own:  # the unit's end of the route; the other end's classes, fastest first
            for other in (c, *(by_tail if out else by_head)):
                a, b = (c, other) if out else (other, c)
                if min(classes[a][0], classes[b][1]) <= best:
                    if other != c:
                        break  # no later class runs faster than the best so far
                    continue
                if not classes[other][3] - inside:
                    continue
                if (a, b) not in fabric:
                    src = next(n for n in classes[a][2] if (topo.host_of(n) in inside) == out)
                    dst = next(n for n in classes[b][2] if (topo.host_of(n) in inside) != out)
                    fabric[a, b] = _alone(topo, topo.routes.route(src, dst))
                best = max(best, min(classes[a][0], fabric[a, b], classes[b][1]))
        return best if best >= 0 else math.inf

    cache[key] = min(fastest(True), fastest(False))
    return cache[key]


def _host_domains(topo: Topology) -> dict[str, frozenset[int]]:
    """Each host's NVLink domains (those of its GPUs; none outside any)."""
    cache = topo.__dict__.setdefault("_bound_cache", {})
    if "host domains" not in cache:
        cache["host domains"] = {h: frozenset(nvlink_domain(topo, x) for x in topo.gpus(h)) - {None} for h in topo.hosts}
    return cache["host domains"]


def _classes_of(topo: Topology) -> dict[str, list[tuple]]:
    """Per host, the classes of its NICs (``_nic_classes``)."""
    cache = topo.__dict__.setdefault("_bound_cache", {})
    if "classes of" not in cache:
        out: dict[str, list[tuple]] = {}
        for key, (*_, hosts) in _nic_classes(topo).items():
            for h in hosts:
                out.setdefault(h, []).append(key)
        cache["classes of"] = out
    return cache["classes of"]


def _nic_classes(topo: Topology) -> dict[tuple, tuple[float, float, list[str], frozenset[str]]]:
    """NICs that GPUs use, by what a route through them depends on (the links out of the NIC, the best GB/s of a
    GPU's way to it and of its way to a GPU): ``{key: (way in GB/s, way out GB/s, NICs, their hosts)}``, each way
    capped by the NIC's links out."""
    cache = topo.__dict__.setdefault("_bound_cache", {})
    if "nic classes" not in cache:
        routes, g = topo.routes, topo.graph
        head: dict[str, float] = {}
        tail: dict[str, float] = {}
        for first, *alike in topo.host_builds().values():  # hosts built alike route alike inside: one stands for all
            ways: dict[str, tuple[float, float]] = {}
            for x in topo.gpus(first):
                nic = routes.nic_of(x)
                if nic is not None:
                    h, t = ways.get(nic, (0.0, 0.0))
                    ways[nic] = (max(h, _alone(topo, routes.route(x, nic))), max(t, _alone(topo, routes.route(nic, x))))
            for nic, (h, t) in ways.items():
                head[nic], tail[nic] = h, t
            for host in alike:  # alike hosts' parts have distinct indices (``Topology.host_signature``)
                twin = {g.nodes[n].get("index"): n for n in topo.nics(host)}
                for nic, (h, t) in ways.items():
                    head[twin[g.nodes[nic].get("index")]] = h
                    tail[twin[g.nodes[nic].get("index")]] = t
        members: dict[tuple, list[str]] = {}
        for nic in head:
            inside = set(topo.parts(topo.host_of(nic)))
            links = tuple(sorted((v, d["bw_gbps"]) for v, d in g.adj[nic].items() if v not in inside))
            # No route through the NIC runs faster than its links out together: counted in, the ways in and out
            # say at once which pairs of classes cannot beat the best so far (the fabric route costs a walk).
            wire = sum(bw for _, bw in links)
            members.setdefault((links, min(head[nic], wire), min(tail[nic], wire)), []).append(nic)
        cache["nic classes"] = {key: (key[1], key[2], nics, frozenset(map(topo.host_of, nics)))
                                for key, nics in members.items()}
    return cache["nic classes"]


def _alone(topo: Topology, route) -> float:
    """GB/s of a flow alone on its route (``inf`` for none): its smallest link bandwidth over its share there."""
    return min((topo.graph.edges[u, v]["bw_gbps"] / share for (u, v), share in route if share > 0), default=math.inf)


def _via_nvlink(topo: Topology, route) -> bool:
    """Whether a route crosses an NVLink switch."""
    return any(topo.graph.nodes[v]["kind"] == NVLINK_KIND for (_, v), _ in route)


def _unit_levels(topo: Topology) -> list[list[tuple[int, float]]]:
    """(GPUs, external GB/s in all) of every unit: hosts, then the hosts under each switch level, bottom-up.

    Cached on the topology: it depends on nothing else.
    """
    cache = topo.__dict__.setdefault("_bound_cache", {})
    if "units" in cache:
        return cache["units"]
    g = topo.graph
    hosts = [h for h in topo.hosts if topo.gpus(h)]
    paths = {h: topo.switch_path(h) for h in hosts}
    groupings = [{h: ([h], set()) for h in hosts}]
    depth = min((len(p) for p in paths.values()), default=0)
    for cut in range(depth, 1, -1):  # leaf groups first; the whole-cluster group bounds nothing
        by: dict[str, tuple[list[str], set[str]]] = {}
        for h in hosts:
            members, switches = by.setdefault(paths[h][cut - 1], ([], set()))
            members.append(h)
            switches.update(s for s in paths[h][cut - 1:] if s in g)
        groupings.append(by)
    levels, headroom, reach, seals, members_of = [], {h: math.inf for h in hosts}, {h: math.inf for h in hosts}, [], []
    for k, by in enumerate(groupings):
        caps = []
        for members, switches in by.values():
            nodes = {n for h in members for n in (h, *topo.parts(h))} | switches
            n_gpus = sum(len(topo.gpus(h)) for h in members)
            out = [(u, v, d["bw_gbps"]) for u in nodes for v, d in g.adj[u].items() if v not in nodes]
            cap = sum(bw for *_, bw in out) if k else host_exit_flow(topo, members[0])
            caps.append((n_gpus, cap))
            members_of.append((members, n_gpus, cap))
            if k:
                # Flows leave a switch's uplinks split equally (ECMP): where they are all its links out, the
                # slowest fills first, so they carry its figure as many times as there are links.
                uplinks = out and all(u in switches and topo.is_switch(v) for u, v, _ in out)
                spread = len(out) * min(bw for *_, bw in out) if uplinks else cap
                for h in members:
                    headroom[h] = min(headroom[h], spread / n_gpus)
                    reach[h] = min(reach[h], spread)
                seals.append((cap, [(u, v) for u in switches for v in g.adj[u] if v not in nodes and topo.is_switch(v)]))
        levels.append(caps)
    cache["units"], cache["headroom"], cache["reach"], cache["seals"], cache["members"] = (levels, headroom, reach, seals,
                                                                                            members_of)
    return levels


def host_exit_flow(topo: Topology, host: str) -> float:
    """GB/s the host's GPUs can send out at once: the maximum flow from its GPUs over its own links to its links out.

    No more than its links out add up to, and less where they sit behind slower links inside it: two 50 GB/s
    cards each behind a 25 GB/s PCIe link let 50 GB/s out, not 100. Every flow out of the host crosses that cut,
    so the flows at ``t`` it sends out (a ring's runs through it) number at most this over ``t``. Cached per kind
    of host (``Topology.host_build_key``).
    """
    cache = topo.__dict__.setdefault("_bound_cache", {}).setdefault("host exit flow", {})
    key = topo.host_build_key(host)
    if key not in cache:
        g, parts = topo.graph, set(topo.parts(host))
        net = nx.DiGraph()
        for u in parts:
            if topo.kind(u) == "gpu":
                net.add_edge("source", u)  # no capacity: unbounded
            for v, d in g.adj[u].items():
                if v in parts:
                    net.add_edge(u, v, capacity=d["bw_gbps"])
                elif net.has_edge(u, "sink"):
                    net[u]["sink"]["capacity"] += d["bw_gbps"]
                else:
                    net.add_edge(u, "sink", capacity=d["bw_gbps"])
        reaches = "source" in net and "sink" in net
        cache[key] = float(nx.maximum_flow_value(net, "source", "sink")) if reaches else 0.0
    return cache[key]


def all_units(topo: Topology) -> list[tuple[list[str], int, float]]:
    """(hosts, GPUs, GB/s of their links out in all) of every unit: each host, then the hosts under each switch."""
    _unit_levels(topo)
    return topo.__dict__["_bound_cache"]["members"]


def unit_levels(topo: Topology) -> list[list[tuple[list[str], int, float]]]:
    """``all_units`` level by level: the hosts, then the hosts under each switch level, bottom-up."""
    out, start = [], 0
    members = all_units(topo)
    for caps in _unit_levels(topo):
        out.append(members[start:start + len(caps)])
        start += len(caps)
    return out


def small_units(topo: Topology, ranks: int) -> list[tuple[list[str], float]]:
    """(hosts, GB/s of their links out in all) of every unit (a host, or the hosts under a switch) of fewer GPUs
    than ``ranks``.

    A ring over ``ranks`` ranks that puts some of them in such a unit enters
    and leaves it over those links, which carry at most their sum to one
    flow: a ring whose flows all run faster keeps out of the unit. For the
    gradient ring this says which hosts an order at a given bus leaves out
    (``topology.planning.bounds.gradient_gate``).
    """
    return [(members, cap) for members, n_gpus, cap in all_units(topo) if n_gpus < ranks]


def switch_headroom(topo: Topology) -> dict[str, float]:
    """Per host, the smallest share per GPU of the uplinks above it (leaf, pod, ...): low under a degraded uplink,
    and under a switch whose uplinks differ (ECMP splits flows equally, so the slowest sets the pace)."""
    _unit_levels(topo)
    return topo.__dict__["_bound_cache"]["headroom"]


def switch_reach(topo: Topology) -> dict[str, float]:
    """Per host, the GB/s the uplinks above it (leaf, pod, ...) carry in all at the slowest level, ECMP's equal split
    counted (``switch_headroom``): no flow between it and a host under other switches runs faster."""
    _unit_levels(topo)
    return topo.__dict__["_bound_cache"]["reach"]


def _component_bound(topo: Topology, rings: int, size: int, without: frozenset[str] = frozenset()) -> float:
    """Argument (1) of ``ring_bandwidth_bound``: the largest ``t`` at which the pieces joined by links of ``t``
    GB/s or more still hold the rings.

    Switch-to-switch links are never cut on their own (ECMP may combine them), but a unit of hosts under a switch
    whose links out carry less than ``t`` in all sends no flow at ``t``: at ``t`` its switch links to the rest
    are cut too. The pieces only shrink as ``t`` grows, so the answer is a link's or a unit's figure, found by
    bisection over them.
    """
    _unit_levels(topo)
    seals = topo.__dict__["_bound_cache"]["seals"]
    if _fits_at(topo, math.inf, seals, size, without) >= rings:
        return math.inf  # the rings fit where no link is a cut: this argument bounds nothing
    values = sorted({*(bw for *_, bw in topo.graph.edges(data="bw_gbps")), *(cap for cap, _ in seals)})
    lo, hi = -1, len(values)  # values[lo] holds the rings (lo = -1: none known to), values[hi:] do not
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if _fits_at(topo, values[mid], seals, size, without) >= rings else (lo, mid)
    return values[lo] if lo >= 0 else 0.0


def _fits_at(topo: Topology, t: float, seals: list[tuple[float, list[tuple[str, str]]]], size: int,
             without: frozenset[str] = frozenset()) -> int:
    """Rings of ``size`` that fit in the pieces of the cluster joined by links of ``t`` GB/s or more: switch
    links and a GPU's NVLink switch planes included, unless they leave a unit whose links out carry less than
    ``t``. GPUs of hosts ``without`` hold none."""
    g = topo.graph
    parent = {n: n for n in g.nodes}

    def find(x: str) -> str:
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    cut = {frozenset(e) for cap, edges in seals if cap < t for e in edges}
    nvlink = {n for n in g.nodes if topo.kind(n) == NVLINK_KIND}
    for u, v, bw in g.edges(data="bw_gbps"):
        if topo.is_switch(u) and topo.is_switch(v):
            keep = frozenset((u, v)) not in cut
        else:
            keep = bw >= t or u in nvlink or v in nvlink
        if keep:
            parent[find(u)] = find(v)
    count: dict[str, int] = {}
    for gpu in topo.gpus():
        if without and topo.host_of(gpu) in without:
            continue
        root = find(gpu)
        count[root] = count.get(root, 0) + 1
    return sum(n // size for n in count.values())


def _border_bound(topo: Topology, rings: int, size: int) -> float:
    """Argument (4) of ``ring_bandwidth_bound``: at each level of units, the largest ``t`` at which rings whose hops
    all run at ``t`` still fit.

    A ring keeps inside one unit or touches two or more, entering and leaving each it touches over routes no
    faster than the fastest route across that unit's border alone (``crossing_rate``). At ``t``, then, rings
    that touch a unit whose border is slower keep inside it: the rings number at most those inside the slower
    units plus what the faster units' GPUs hold together. Adding units fastest border first, the first at which
    that reaches ``rings`` gives ``t``.
    """
    bound = math.inf
    for units in unit_levels(topo):
        inside = sum(n // size for _, n, _ in units)
        if len(units) < 2 or inside >= rings:
            continue
        fast = 0
        for rate, n in sorted(((crossing_rate(topo, hosts), n) for hosts, n, _ in units), key=lambda x: -x[0]):
            inside, fast = inside - n // size, fast + n
            if inside + fast // size >= rings:
                bound = min(bound, rate)
                break
    return bound


def _exit_bound(caps: list[tuple[int, float]], rings: int, size: int) -> float:
    """Argument (2) of ``ring_bandwidth_bound`` over one level of units, ``caps``: (GPUs, GB/s out) of each."""
    largest = max(n for n, _ in caps)
    crossing = rings - sum(n // size for n, _ in caps)  # rings that cannot each stay inside one unit
    if crossing <= 0:
        return math.inf
    exits = crossing * max(2, math.ceil(size / largest))

    def feasible(t: float) -> bool:
        return sum(min(n, int(bw / t + 1e-9)) for n, bw in caps) >= exits

    lo, hi = 0.0, max((bw for _, bw in caps), default=0.0)
    if hi == 0.0 or not feasible(lo + 1e-12):
        return 0.0
    if feasible(hi):
        return hi
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if feasible(mid) else (lo, mid)
    return lo


def min_route_latency(topo: Topology, gpus: list[str] | None = None) -> float:
    """The shortest latency, µs, of any route between two different GPUs of ``gpus`` (default: all).

    A route leaves its source over the source GPU's links and enters its
    destination over the destination's (the fractions on each side sum to
    one), so it takes at least the fastest link of each end, unless the two
    GPUs are linked directly, when that link is the whole route.
    """
    if gpus is None:
        cache = topo.__dict__.setdefault("_bound_cache", {})
        if "latency" not in cache:
            cache["latency"] = min_route_latency(topo, topo.gpus())
        return cache["latency"]
    g = topo.graph
    if len(gpus) < 2:
        return 0.0
    members = set(gpus)
    fastest = sorted(min((d["lat_us"] for d in g.adj[x].values()), default=math.inf) for x in gpus)
    direct = min((d["lat_us"] for x in gpus for v, d in g.adj[x].items() if v in members), default=math.inf)
    return min(fastest[0] + fastest[1], direct)


def cut_rate(bws: list[float], whole: bool, k: int) -> float:
    """The most GB/s ``k`` flows across links of ``bws`` can all reach.

    ``whole``: no route splits across these links, so each carries whole
    flows and ``k`` flows at ``t`` need ``sum(floor(bw / t)) >= k``; the
    best ``t`` is some ``bw / j`` with ``j <= k``. Otherwise the flows share
    the links' sum.
    """
    if k <= 0:
        return math.inf
    if not whole:
        return sum(bws) / k
    candidates = sorted({b / j for b in bws for j in range(1, k + 1)}, reverse=True)
    return next((t for t in candidates if sum(math.floor(b / t * (1 + 1e-12)) for b in bws) >= k), 0.0)


def host_units(topo: Topology, fm: FlowModel, gpus: list[str]) -> list[tuple[frozenset[str], list[int], list[int]]]:
    """The cuts inside hosts that flows among ``gpus`` cross: every host, and each side of every link between two
    of a host's parts (a socket, a PCIe switch with its GPUs).

    Returns (the GPUs of ``gpus`` inside, exit link ids, entrance link ids) per unit; a side holding none or all of
    ``gpus`` cuts nothing and is left out, and sides with the same GPUs and exits are one.
    """
    found: dict[tuple, tuple[frozenset[str], list[int], list[int]]] = {}
    members = set(gpus)
    for host in dict.fromkeys(topo.host_of(g) for g in gpus):
        parts = set(topo.parts(host))
        sub = topo.graph.subgraph(parts)
        cuts = (nx.connected_components(nx.restricted_view(sub, [], [edge])) for edge in sub.edges)
        for side in [parts, *(side for cut in cuts for side in cut)]:
            held = frozenset(x for x in side if x in members)
            if not held or len(held) == len(members):
                continue
            exits = sorted(fm.link_index((a, b)) for a in side for b in topo.graph.adj[a] if b not in side)
            entrances = sorted(fm.link_index((b, a)) for a in side for b in topo.graph.adj[a] if b not in side)
            found.setdefault((held, tuple(exits)), (held, exits, entrances))
    return list(found.values())
