"""Routing and link sharing: which links a flow crosses, and what it gets when flows run at once.

A flow between two GPUs of one host stays inside the host (PCIe, sockets,
NVLink: peer-to-peer or shared memory, never the network). A flow between
hosts leaves its GPU through the NIC NCCL gives that GPU, crosses the
fabric, and enters the peer GPU through its NIC. As ``ncclTopoGetLocalNet``
does: the NICs whose path from the GPU is widest (its narrowest link, the
NIC's own link to the network included), then shortest; among equally good
ones, the GPU's device index picks (bits mirrored where their count is a
power of two), so GPUs that share a PCIe switch with two NICs use one each.

The route depends on the destination where GPUs of several hosts share
NVLink switches (``nvswitch`` nodes, outside every host: a multi-node
NVLink domain such as a GB200 NVL72 rack). GPUs linked to the same
connected set of NVLink switches form one domain; a flow between two GPUs
of a domain, same host or not, crosses the NVLink switches (ECMP over
them), as NCCL prefers NVLink over PCIe and the network; a flow to a GPU
outside the domain takes the NIC as above.

On the fabric, equal-cost multi-path (ECMP) routing: among the shortest
switch paths, every switch splits a flow equally over its next hops, so
two spines carry half each. A route is therefore a list of directed links
with the fraction of the flow each carries; a single path has fraction 1
everywhere.

Sharing: all flows of a collective step run at once at the same rate, so a
link of ``bw`` GB/s carrying fractions summing to ``L`` gives each of them
at most ``bw / L``; a flow's rate is its smallest such share.

Algorithms
----------
* In a host: ECMP over the host's own links, solved once per host layout
  (hosts built alike share routes, relabelled).
* Fabric: breadth-first distances from every switch over the switch graph
  (computed lazily, one per destination switch), then a level walk from the
  source NIC that splits at each switch over its neighbours one hop nearer.
  Measured topologies link NICs directly: a direct link is the route.
"""

from __future__ import annotations

import math
from collections import defaultdict, deque
from typing import TYPE_CHECKING, Iterable

import numpy as np

from topology.errors import ConfigError

if TYPE_CHECKING:
    from topology.network.model import Topology

NVLINK_KIND = "nvswitch"
"""Node kind of an NVLink switch: GPUs of several hosts link to it directly; it carries no network traffic."""

Link = tuple[str, str]
Route = tuple[tuple[Link, float], ...]
"""Directed links of a flow with the fraction of the flow each carries."""


class Routes:
    """ECMP routes of one topology, cached per node pair."""

    def __init__(self, topo: "Topology"):
        self.topo = topo
        g = topo.graph
        self._switches = {n for n in g.nodes if topo.is_switch(n) and g.nodes[n]["kind"] != NVLINK_KIND}
        self._switch_adj = {s: sorted(v for v in g.adj[s] if v in self._switches) for s in self._switches}
        self._host = {n: d.get("host") for n, d in g.nodes(data=True)}
        self._label = {n: (d["kind"], d.get("index", n)) for n, d in g.nodes(data=True)}
        self._sig: dict[str, tuple] = {}
        self._build: dict[str, tuple] = {}
        self._routes: dict[Link, Route] = {}
        self._switch_dist: dict[str, dict[str, int]] = {}
        self._to: dict[tuple[str, ...], dict[str, int]] = {}
        self._fabric: dict[tuple, tuple] = {}
        self._templates: dict[tuple, Route | str | None] = {}
        self._labels: dict[str, dict[tuple, str]] = {}
        self._domain, self._domain_switches = _nvlink_domains(g)

    # ------------------------------------------------------------ public
    def route(self, a: str, b: str) -> Route:
        """Directed links from ``a`` to ``b`` with the share of the flow on each; () when ``a == b``."""
        key = (a, b)
        if key not in self._routes:
            self._routes[key] = self._route(a, b)
        return self._routes[key]

    def nic_of(self, node: str) -> str | None:
        """The NIC a GPU (or any part of a host) uses for traffic that leaves its host."""
        return self._in_host(node, None, want_nic=True)

    def takes_network(self, a: str, b: str) -> bool:
        """Whether a flow from part ``a`` of one host to part ``b`` of another leaves through NICs: the route is
        then ``route(a, nic_of(a)) + fabric_route(nic_of(a), nic_of(b)) + route(nic_of(b), b)``, three legs that
        share no link, so callers that price many pairs price each leg once."""
        ha, hb = self._host.get(a), self._host.get(b)
        domain = self._domain.get(a)
        return ha is not None and hb is not None and ha != hb and (domain is None or domain != self._domain.get(b))

    # ------------------------------------------------------------ routing
    def _route(self, a: str, b: str) -> Route:
        if a == b:
            return ()
        g = self.topo.graph
        for end in (a, b):
            if end not in self._host:
                raise ConfigError(f"{end!r} is not a node of topology {self.topo.name!r}")
        if self.takes_network(a, b):
            na, nb = self.nic_of(a), self.nic_of(b)
            if na is None or nb is None:
                host = self._host[a] if na is None else self._host[b]
                raise ConfigError(f"no network path from {a!r} to {b!r}: host {host!r} has no NIC; add one linked to a switch")
            head = self._in_host(a, na) if a != na else ()
            tail = self._in_host(nb, b) if b != nb else ()
            return head + self.fabric_route(na, nb) + tail
        domain = self._domain.get(a)
        if domain is not None and domain == self._domain.get(b):
            return _ecmp(g.adj, a, b, self._domain_switches[domain] | {a})
        if self._host[a] is None or self._host[b] is None:  # a switch endpoint: plain ECMP over the whole graph
            return _ecmp(g.adj, a, b, None)
        return self._in_host(a, b)

    def _in_host(self, a: str, b: str | None, want_nic: bool = False):
        """ECMP route between two parts of one host (or, with ``want_nic``, the NIC ``a`` uses).

        Solved on the host's layout in (kind, index) labels, so 2048 alike hosts cost one search.
        """
        topo, g = self.topo, self.topo.graph
        host = self._host[a]
        if want_nic:  # the NIC's choice depends on the speed of its link out, too
            if host not in self._build:
                self._build[host] = topo.host_build_key(host)
            sig = (self._build[host], self._label[a], "nic")
        else:
            if host not in self._sig:
                self._sig[host] = topo.host_signature(host)
            sig = (self._sig[host], self._label[a], self._label[b])
        tmpl = self._templates.get(sig, ())
        if tmpl != ():
            labels = self._labels[host] if host in self._labels else self._host_labels(host)
            if want_nic:
                return None if tmpl is None else labels[tmpl]
            return tuple(((labels[u], labels[v]), f) for (u, v), f in tmpl)
        labels = self._host_labels(host)
        if sig not in self._templates:
            parts = set(topo.parts(host))
            if want_nic:
                self._templates[sig] = _nccl_nic(g, a, parts)
                self._templates[sig] = None if self._templates[sig] is None else _label(g, self._templates[sig])
            else:
                r = _ecmp(g.adj, a, b, parts)
                self._templates[sig] = tuple(((_label(g, u), _label(g, v)), f) for (u, v), f in r)
        tmpl = self._templates[sig]
        if want_nic:
            return None if tmpl is None else labels[tmpl]
        return tuple(((labels[u], labels[v]), f) for (u, v), f in tmpl)

    def _host_labels(self, host: str) -> dict[tuple, str]:
        if host not in self._labels:
            g = self.topo.graph
            labels = {_label(g, n): n for n in self.topo.parts(host)}
            self._labels[host] = labels
        return self._labels[host]

    def fabric_route(self, na: str, nb: str) -> Route:
        """ECMP route from NIC ``na`` over the switches to NIC ``nb`` of another host (switches only in between)."""
        g = self.topo.graph
        if g.has_edge(na, nb):
            return (((na, nb), 1.0),)
        src = tuple(sorted(s for s in g.adj[na] if s in self._switches))
        dst = tuple(sorted(s for s in g.adj[nb] if s in self._switches))
        key = (src, dst)
        if key not in self._fabric:
            self._fabric[key] = self._switch_walk(src, dst)
        first, middle, last = self._fabric[key]
        if not first:
            raise ConfigError(f"no network path from {na!r} to {nb!r}; link their switches in the topology")
        return tuple(((na, s), f) for s, f in first) + middle + tuple(((s, nb), f) for s, f in last)

    def _switch_walk(self, src: tuple[str, ...], dst: tuple[str, ...]) -> tuple:
        """ECMP from the source NIC's switches to the destination NIC's: (first hops, switch links, last hops)."""
        if dst not in self._to:
            to: dict[str, int] = {}
            for m in (self._dist(s) for s in dst):
                for x, k in m.items():
                    if k < to.get(x, math.inf):
                        to[x] = k
            self._to[dst] = to
        d = self._to[dst].get
        inf = math.inf

        start = [(s, d(s, inf)) for s in src]
        best = min((x for _, x in start), default=math.inf)
        if math.isinf(best):
            return (), (), ()
        entry = [s for s, x in start if x == best]
        frac: dict[str, float] = defaultdict(float)
        for s in entry:
            frac[s] += 1.0 / len(entry)
        adj = self._switch_adj
        links, arrive = _split_down(frac, lambda u: [v for v in adj[u] if d(v, inf) == d(u) - 1] if d(u) else [])
        return tuple((s, 1.0 / len(entry)) for s in entry), tuple(links.items()), tuple(arrive.items())

    def _dist(self, switch: str) -> dict[str, int]:
        """Hops from every switch to ``switch`` over switch-to-switch links (NICs are never transit)."""
        if switch not in self._switch_dist:
            adj = self._switch_adj
            dist = {switch: 0}
            queue = deque([switch])
            while queue:
                u = queue.popleft()
                for v in adj[u]:
                    if v not in dist:
                        dist[v] = dist[u] + 1
                        queue.append(v)
            self._switch_dist[switch] = dist
        return self._switch_dist[switch]


def nvlink_domain(topo: "Topology", gpu: str) -> int | None:
    """The NVLink domain of ``gpu`` (an index), or None when it links to no NVLink switch."""
    return topo.routes._domain.get(gpu)


def same_nvlink_domain(topo: "Topology", a: str, b: str) -> bool:
    """Whether a flow from ``a`` to ``b`` stays on NVLink switches (both GPUs in one NVLink domain)."""
    domain = topo.routes._domain.get(a)
    return domain is not None and domain == topo.routes._domain.get(b)


def _nvlink_domains(g) -> tuple[dict[str, int], list[set[str]]]:
    """GPU -> domain index, and each domain's NVLink switches.

    A domain is a connected set of NVLink switches and the GPUs linked to
    them: separate switch planes are one domain through the GPUs they share.
    """
    domain: dict[str, int] = {}
    switches: list[set[str]] = []
    for s in g.nodes:
        if g.nodes[s]["kind"] != NVLINK_KIND or any(s in d for d in switches):
            continue
        members, queue = {s}, deque([s])
        while queue:
            u = queue.popleft()
            for v in g.adj[u]:
                kind = g.nodes[v]["kind"]
                if kind == NVLINK_KIND and v not in members:
                    members.add(v)
                    queue.append(v)
                elif kind == "gpu" and v not in domain:
                    domain[v] = len(switches)
                    queue.append(v)
        switches.append(members)
    return domain, switches


def _label(g, node: str) -> tuple:
    data = g.nodes[node]
    return data["kind"], data.get("index", node)


def _widest_shortest(g, source: str, parts: set[str]) -> dict[str, tuple[float, int]]:
    """``{part: (GB/s, hops)}`` from ``source`` inside its host: the hop count and the narrowest link of the widest
    shortest path (NCCL's path bandwidth and type, on this graph)."""
    best = {source: (math.inf, 0)}
    frontier = [source]
    while frontier:
        reached: dict[str, float] = {}
        for u in frontier:
            for v, d in g.adj[u].items():
                if v in parts and (v not in best or v in reached):
                    reached[v] = max(reached.get(v, 0.0), min(best[u][0], d["bw_gbps"]))
        hops = best[frontier[0]][1] + 1
        for v, bw in reached.items():
            best[v] = (bw, hops)
        frontier = [v for v in reached if g.nodes[v]["kind"] != "nic"]  # a NIC ends a path: no transit through it
    return best


def _mirror_bits(value: int, pow2: int) -> int:
    """NCCL's ``mirrorBits``: the low ``log2(pow2)`` bits of ``value`` in reverse order."""
    out, b, mb = 0, 1, pow2 >> 1
    while b < pow2:
        if value & b:
            out |= mb
        b, mb = b << 1, mb >> 1
    return out


def _nccl_nic(g, a: str, parts: set[str]) -> str | None:
    """The NIC ``ncclTopoGetLocalNet`` gives part ``a`` (channel 0): widest path, then shortest, then by device index."""
    if g.nodes[a]["kind"] == "nic":
        return a

    def speed(nic: str) -> float:  # the NIC's link to the network
        return max((d["bw_gbps"] for v, d in g.adj[nic].items() if v not in parts), default=0.0)

    paths = _widest_shortest(g, a, parts)
    nics = {n: (min(bw, speed(n)), -hops) for n, (bw, hops) in paths.items() if g.nodes[n]["kind"] == "nic"}
    if not nics:
        return None
    top = max(nics.values())
    tied = sorted((n for n, v in nics.items() if v == top), key=lambda n: (g.nodes[n].get("index", 0), n))
    if len(tied) == 1:
        return tied[0]
    # The GPUs as close to the first of them: NCCL's localGpuCount.
    from_nic = _widest_shortest(g, tied[0], parts)
    gpus = {n: (bw, -hops) for n, (bw, hops) in from_nic.items() if g.nodes[n]["kind"] == "gpu"}
    closest = max(gpus.values())
    local = sum(v == closest for v in gpus.values())
    net = int(g.nodes[a].get("index", 0)) % max(1, local)
    if len(tied) & (len(tied) - 1) == 0:
        net = _mirror_bits(net, len(tied))
    return tied[net % len(tied)]


def _ecmp(adj, a: str, b: str, allowed: set[str] | None) -> Route:
    """Equal split over all shortest paths from ``a`` to ``b`` through ``allowed`` nodes (None: any)."""
    dist = {b: 0}
    queue = deque([b])
    while queue and a not in dist:
        u = queue.popleft()
        for v in adj[u]:
            if v not in dist and (allowed is None or v in allowed):
                dist[v] = dist[u] + 1
                queue.append(v)
    if a not in dist:
        raise ConfigError(f"no path from {a!r} to {b!r}; link them in the topology")
    links, _ = _split_down({a: 1.0}, lambda u: sorted(v for v in adj[u] if dist.get(v, math.inf) == dist[u] - 1) if u != b else [])
    return tuple(links.items())


def _split_down(frac: dict[str, float], nearer) -> tuple[dict[Link, float], dict[str, float]]:
    """ECMP, level by level: every node splits its share of the flow equally over ``nearer(node)``, the
    next hops one step closer to the destination; returns the fraction on each link, and what arrived at
    the nodes with no next hop (the destinations)."""
    links: dict[Link, float] = defaultdict(float)
    arrive: dict[str, float] = defaultdict(float)
    level = sorted(frac)
    while level:
        nxt: dict[str, float] = defaultdict(float)
        for u in level:
            hops = nearer(u)
            if not hops:
                arrive[u] += frac[u]
                continue
            share = frac[u] / len(hops)
            for v in hops:
                links[u, v] += share
                nxt[v] += share
        frac = nxt
        level = sorted(nxt)
    return links, arrive


# ------------------------------------------------------------------ sharing
class FlowModel:
    """Rates of concurrent flows on a topology, with ECMP routes and link sharing.

    Routes are cached per node pair (in the topology's ``Routes``): a plan of
    16384 ranks has as many flows, and the same pairs recur across plans.
    """

    def __init__(self, topo: "Topology"):
        self.topo = topo
        self.routes = topo.routes
        self._id: dict[Link, int] = {}
        bw, lat = [], []
        for u, v, d in topo.graph.edges(data=True):
            for e in ((u, v), (v, u)):
                self._id[e] = len(bw)
                bw.append(d["bw_gbps"])
                lat.append(d["lat_us"])
        self._bw_arr, self._lat_arr = np.array(bw), np.array(lat)
        self._compiled: dict[Link, tuple[list[int], list[float]]] = {}

    def path(self, a: str, b: str) -> Route:
        return self.routes.route(a, b)

    def link_index(self, link: Link) -> int:
        """Index of a directed link in ``link_bandwidths`` and ``compiled``."""
        return self._id[link]

    def capacity(self, link: Link) -> float:
        """GB/s of a directed link."""
        return float(self._bw_arr[self._id[link]])

    def _compile(self, a: str, b: str) -> tuple[list[int], list[float]]:
        r = self.routes.route(a, b)
        out = self._compiled[a, b] = ([self._id[e] for e, _ in r], [f for _, f in r])
        return out

    def compiled(self, a: str, b: str) -> tuple[list[int], list[float]]:
        """The route from ``a`` to ``b`` as link indices (into ``link_bandwidths``) and flow fractions."""
        return self._compiled.get((a, b)) or self._compile(a, b)

    def route_latency(self, a: str, b: str) -> float:
        """µs from ``a`` to ``b``: the fraction-weighted sum over the route's links, as ``bandwidths`` gives it."""
        ids, fracs = self.compiled(a, b)
        return float(np.dot(self._lat_arr[ids], fracs)) if ids else 0.0

    def link_bandwidths(self) -> np.ndarray:
        """GB/s of every directed link, by the index ``compiled`` uses."""
        return self._bw_arr

    def load(self, flows: Iterable[tuple[str, str]]) -> dict[Link, float]:
        """Sum of flow fractions on every directed link the flows cross."""
        load: dict[Link, float] = defaultdict(float)
        for a, b in flows:
            for e, f in self.routes.route(a, b):
                load[e] += f
        return load

    def bandwidths(self, flows: Iterable[tuple[str, str]]) -> list[tuple[float, float]]:
        """(GB/s, latency µs) of each flow when all of them run at once.

        A flow gets, on each link it crosses, the link's per-direction
        bandwidth over the total flow fraction on it; its rate is the smallest
        of these. Latency is the fraction-weighted sum over its links (the
        mean over its equal-cost paths). Vectorised: one pass to gather the
        links, then numpy.
        """
        ids: list[int] = []
        fracs: list[float] = []
        lens: list[int] = []
        compiled = self._compiled
        for pair in flows:
            c = compiled.get(pair) or self._compile(*pair)
            ids.extend(c[0])
            fracs.extend(c[1])
            lens.append(len(c[0]))
        if not lens:
            return []
        idx = np.array(ids, dtype=np.int64)
        fr = np.array(fracs)
        load = np.bincount(idx, weights=fr, minlength=len(self._bw_arr))
        share = self._bw_arr[idx] / load[idx]
        delay = self._lat_arr[idx] * fr
        n = np.array(lens)
        rate = np.full(len(lens), math.inf)
        lat = np.zeros(len(lens))
        has = n > 0
        if has.any():
            starts = (np.cumsum(n) - n)[has]
            rate[has] = np.minimum.reduceat(share, starts)
            lat[has] = np.add.reduceat(delay, starts)
        return list(zip(rate.tolist(), lat.tolist()))

