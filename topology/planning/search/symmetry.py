"""Symmetries of a cluster that no rank order can tell apart, for exact search.

Two rank orders that a graph automorphism maps onto each other have the same
step time: every route, and so every link load, maps along. Exact search
(``topology.planning.search.exact``) therefore tries, for its next rank, one GPU of each
orbit of the automorphisms that fix the ranks already placed (isomorphism
pruning); every other child's subtree is a relabelled copy of a sibling's.

Algorithm
---------
Two kinds of automorphisms are used, and the orbits of the group they
generate (a subgroup of the cluster's automorphism group, so its orbits are
no coarser than the true ones: the pruning stays exact):

* Host swaps: hosts built alike (same layout in (kind, index) labels) whose
  parts link to the same switches over links of the same bandwidth and
  latency. Among such hosts that hold no placed rank yet, only the first is
  tried.
* In-host automorphisms: permutations of one host's parts that keep every
  link (with its bandwidth and latency), every part's links to the outside
  and the NIC each GPU uses (``networkx`` VF2 over the host's subgraph).
  For a host holding placed ranks, the ones that fix those GPUs give the
  orbits. A host with more than ``MAX_AUTOMORPHISMS`` of them (many GPUs on
  one switch) falls back to swapping twin GPUs (same links to the same
  parts, and the same NIC: ``twin_key``), each of which is itself an
  automorphism.
"""

from __future__ import annotations

import networkx as nx
from networkx.algorithms.isomorphism import GraphMatcher

from topology.cost import StepModel, transfer
from topology.network.model import Topology
from topology.planning.plan import GroupLayout

MAX_AUTOMORPHISMS = 4096
"""In-host automorphisms enumerated at most; beyond, twin swaps alone are used."""


class Symmetry:
    """Orbit representatives of the next rank's GPU, given the GPUs already placed.

    Parameters
    ----------
    topo
        The cluster.
    pool
        GPUs a plan may use; hosts are interchangeable only with the same pool GPUs.
    """

    def __init__(self, topo: Topology, pool: list[str]):
        self.topo = topo
        self.pool = list(pool)
        in_pool = set(pool)
        self.hosts = list(dict.fromkeys(topo.host_of(g) for g in pool))
        self.gpus = {h: [g for g in topo.gpus(h) if g in in_pool] for h in self.hosts}
        keys = {h: topo.host_class_key(h, self.gpus[h]) for h in self.hosts}
        classes: dict[tuple, str] = {}
        self.host_class = {h: classes.setdefault(keys[h], h) for h in self.hosts}
        # Alike hosts share their automorphisms, in GPU indices; cached on the topology across plans.
        cache = topo.__dict__.setdefault("_symmetry_cache", {})
        self.perms: dict[str, list[dict[str, str]]] = {}
        for h in self.hosts:
            if keys[h] not in cache:
                index = {x: topo.graph.nodes[x]["index"] for x in topo.gpus(h)}
                cache[keys[h]] = [{index[a]: index[b] for a, b in p.items()}
                                  for p in _automorphisms(topo, h, frozenset(self.gpus[h]))]
            node = {topo.graph.nodes[x]["index"]: x for x in topo.gpus(h)}
            self.perms[h] = [{node[a]: node[b] for a, b in p.items()} for p in cache[keys[h]]]
        self._orbits: dict[tuple[str, frozenset[str]], tuple[tuple[str, ...], ...]] = {}

    def orbits(self, host: str, placed: frozenset[str]) -> tuple[tuple[str, ...], ...]:
        """Orbits of ``host``'s unplaced pool GPUs under its automorphisms that fix ``placed``, in pool order."""
        key = (host, placed)
        if key not in self._orbits:
            free = [g for g in self.gpus[host] if g not in placed]
            parent = {g: g for g in free}

            def find(x: str) -> str:
                while parent[x] != x:
                    x = parent[x]
                return x

            for perm in self.perms[host]:
                if all(perm[g] == g for g in placed):
                    for g in free:
                        a, b = find(g), find(perm[g])
                        if a != b:
                            parent[max(a, b, key=free.index)] = min(a, b, key=free.index)
            groups: dict[str, list[str]] = {}
            for g in free:
                groups.setdefault(find(g), []).append(g)
            self._orbits[key] = tuple(tuple(v) for v in groups.values())
        return self._orbits[key]

    def choices(self, placed_by_host: dict[str, frozenset[str]]) -> list[tuple[str, ...]]:
        """Orbits of the GPUs the next rank may take: one host per class of untouched alike hosts.

        Each orbit is listed with its members in pool order; the caller
        places the first. ``placed_by_host`` maps a host to its placed GPUs
        (hosts with none may be left out).
        """
        out: list[tuple[str, ...]] = []
        seen_class: set[str] = set()
        for h in self.hosts:
            placed = placed_by_host.get(h, frozenset())
            if not placed:
                if self.host_class[h] in seen_class:
                    continue
                seen_class.add(self.host_class[h])
            out.extend(self.orbits(h, placed))
        return out


def _automorphisms(topo: Topology, host: str, pool: frozenset[str]) -> list[dict[str, str]]:
    """Permutations of ``host``'s GPUs induced by automorphisms of its parts that keep routes (see module docstring)."""
    g = topo.graph
    parts = set(topo.parts(host))
    sub = nx.Graph()
    for u in parts:
        outside = frozenset((v, d["bw_gbps"], d["lat_us"]) for v, d in g.adj[u].items() if v not in parts)
        sub.add_node(u, key=(g.nodes[u]["kind"], u in pool, outside))
    sub.add_edges_from((u, v, d) for u, v, d in g.edges(parts, data=True) if u in parts and v in parts)
    gpus = [n for n in topo.gpus(host)]
    routes = topo.routes
    nic = {x: routes.nic_of(x) for x in gpus}
    matcher = GraphMatcher(sub, sub, node_match=lambda a, b: a["key"] == b["key"],
                           edge_match=lambda a, b: (a["bw_gbps"], a["lat_us"]) == (b["bw_gbps"], b["lat_us"]))
    perms: list[dict[str, str]] = []
    for n, iso in enumerate(matcher.isomorphisms_iter()):
        if n >= MAX_AUTOMORPHISMS:
            return _twin_swaps(topo, host, pool)
        if all(nic[iso[x]] == (None if nic[x] is None else iso[nic[x]]) for x in gpus):
            perms.append({x: iso[x] for x in gpus})
    return perms


def twin_key(topo: Topology, gpu: str) -> tuple:
    """What makes two GPUs of a host twins, so that swapping them keeps every route: the same neighbours over links
    of the same bandwidth and latency, and the same NIC (GPUs on one PCIe switch with several NICs are shared out
    among them by index: alike in their links, they still leave the host apart)."""
    g = topo.graph
    return (g.nodes[gpu]["host"], frozenset((v, d["bw_gbps"], d["lat_us"]) for v, d in g.adj[gpu].items()),
            topo.routes.nic_of(gpu))


def _twin_swaps(topo: Topology, host: str, pool: frozenset[str]) -> list[dict[str, str]]:
    """Transpositions of twin GPUs (``twin_key``)."""
    gpus = [x for x in topo.gpus(host) if x in pool]
    key = {x: twin_key(topo, x) for x in gpus}
    perms = []
    for i, a in enumerate(gpus):
        for b in gpus[i + 1:]:
            if key[a] == key[b]:
                perm = {x: x for x in topo.gpus(host)}
                perm[a], perm[b] = b, a
                perms.append(perm)
    return perms


class RingRotation:
    """Rank rotations that keep every flow of the step: only one rotation of each order is searched.

    Algorithm
    ---------
    Shifting every rank by ``s`` (mod the world size) keeps the gradient
    ring (rank ``i`` to ``i + 1``) and, with ``s`` one cp group (several
    data-parallel groups) or one Ulysses group (a single cp group, where it
    turns the rings by one position), the ring hops and all-to-all pairs
    too: the step time is unchanged. Without rings a single cp group is one
    Ulysses group (or one rank), which any shift keeps: ``s`` is one rank.
    The world falls into ``m`` segments of ``s`` ranks that the shift cycles
    through. Each segment has anchor hops: its first ring position's hop to
    the next position, one per Ulysses index; without rings, the gradient
    ring's hop out of its first rank. Key a hop by the seconds a ring step's
    bytes take on its route alone (read from the route, so every
    automorphism of the cluster keeps it); among the ``m`` rotations of an
    order, one puts a segment whose slowest anchor is the slowest of all
    first: call it canonical. Exact
    search extends only canonical partial orders: once segment 0's anchors
    are placed, no anchor placed may be slower than the slowest of them
    (beyond float noise). Canonical form is kept by the cluster's
    automorphisms, so it combines with the orbits of ``Symmetry``.
    """

    def __init__(self, sm: StepModel, sequence: list[int] | None = None):
        self.sm = sm
        cp, u, world = sm.cp, sm.ulysses, sm.world
        step = {r: k for k, r in enumerate(sequence or range(world))}
        self.shift = cp if sm.dp > 1 else u if sm.ring > 1 else 1
        segments = world // self.shift
        self.anchors: list[list[tuple[int, int, int]]] = [[] for _ in range(world)]
        """Per placement step (``sequence``: ranks in the order they are placed), the anchor hops it completes:
        (segment, from rank, to rank)."""
        self.first: list[tuple[int, int]] = []
        """Segment 0's anchors."""
        self.ready = 0
        """The step whose placement completes segment 0's anchors."""
        self._keys: dict[tuple[str, str], float] = {}
        if segments < 2:
            return
        if sm.ring > 1:  # each Ulysses index's hop to the next rank of its ring
            rings = GroupLayout.from_grid(sm.dp, sm.ring, sm.ulysses).ring_groups
            after, per_segment = {r: g[(i + 1) % len(g)] for g in rings for i, r in enumerate(g)}, u
        else:  # the gradient ring's hop
            after, per_segment = {r: (r + 1) % world for r in range(world)}, 1
        for j in range(segments):
            for a in range(j * self.shift, j * self.shift + per_segment):
                b = after[a]
                self.anchors[max(step[a], step[b])].append((j, a, b))
                if j == 0:
                    self.first.append((a, b))
        self.ready = max(max(step[a], step[b]) for a, b in self.first)

    def key(self, a: str, b: str) -> float:
        """Seconds a ring step's bytes take on the route ``a -> b`` alone (``topology.cost.transfer``)."""
        if (a, b) not in self._keys:
            fm = self.sm.flows
            ids, fracs = fm.compiled(a, b)
            bw = fm.link_bandwidths()
            rate = min((float(bw[x]) / f for x, f in zip(ids, fracs)), default=float("inf"))
            self._keys[a, b] = transfer(self.sm.bytes_fwd, rate, fm.route_latency(a, b))
        return self._keys[a, b]

    def canonical(self, i: int, order: list[str | None]) -> bool:
        """Whether the ranks of steps ``0..i`` placed in ``order`` (by rank) can still be a canonical order."""
        if not self.first or i < self.ready or (i > self.ready and not self.anchors[i]):
            return True
        top = max(self.key(order[a], order[b]) for a, b in self.first) * (1 + 1e-9)
        done = (hop for r in (range(i + 1) if i == self.ready else (i,)) for hop in self.anchors[r])
        return all(self.key(order[a], order[b]) <= top for j, a, b in done if j)

