"""Exact rank orders for small problems: branch and bound over GPU sequences, up to symmetry.

Algorithm
---------
Ranks are placed one at a time, rank 0 first. The next rank tries one GPU
of each orbit of the cluster's symmetries that fix the ranks already placed
(``topology.planning.search.symmetry``: alike hosts not yet used, automorphisms of a host's
parts), so orders that only relabel each other are visited once, and only
one of the rank rotations that keep every flow (``RingRotation``: turning
a single cp group's rings, shifting whole cp groups, or, without rings,
shifting a single cp group's ranks) is extended. Placing
rank ``i`` completes every flow whose later end is ``i``: the ring hop into
it (and the ring's closing hop at its last rank), the Ulysses all-to-all
pairs with earlier ranks of its group, and the gradient ring's hop from
rank ``i - 1``. Their routes go onto the link loads at once.

With Ulysses groups larger than the rings, rank order completes a ring
hop only a whole Ulysses group after its first end (rank ``i`` to
``i + u``), so the ring term stays unbounded while a group is placed and
proofs run long (two g6e hosts, cp 16 with Ulysses 8: about 630,000
nodes). Placed ring by ring instead (``placement_sequence``), each hop is
priced at its second end, and the gradient ring's crossings that a ring
pairing forces show soon; but good orders are met later. So a budgeted
search runs in rank order first, for ``RANK_ORDER_SHARE`` of its nodes,
and then ring by ring from the best order met: the same two g6e hosts
prove in about 36,000. The orbits, bounds and rotations are the same in
either order, keyed by the placement step instead of the rank.

A partial order's step time is bounded from below by the same step model
over the flows placed so far, since flows placed later only add load, each
term no better than what no placement beats (``topology.cost.step_bound``):

* gradient ring: its slowest flow's rate now;
* all-to-all: the largest transfer of the pairs placed, each at its rate now
  (a pair's latency is fixed once both ends are placed);
* ring hops: the slowest hop now runs at ``r``; the finished order's slowest
  hop either runs at ``r`` too, and then it is at least as late as the
  latest hop at ``r`` now, or runs at the next achievable rate below ``r``
  (link bandwidth over a multiple of the routes' smallest flow fraction);
  a hop that slow waits at least the shortest latency of a route that can
  run as slow (``topology.planning.bounds.hop_latency``);
* forced crossings: when the rings cannot all fit inside hosts (or inside
  NVLink domains, or the hosts under one switch, at any level), some hop
  crosses between two of them, and the same argument applies to it with
  the fastest rate and the shortest latency of a route between two of them
  (``HopLatency.least``); a unit whose GPUs are no whole number of rings,
  with too few GPUs to spare to make them so, sends a hop over its own
  routes out; and where the hosts' exits cannot carry the rings' runs at
  a rate, a hop between hosts runs no faster, at a route's latency
  between hosts.
* all-to-all of the whole order: at least the joint floor of all groups
  over the pool (``topology.planning.bounds.a2a_floor``), when the caller gives it, and the
  ring and all-to-all together at least their joint floor
  (``topology.planning.bounds.ring_floor``);
* all-to-all still to come: every Ulysses group not wholly placed needs
  free GPUs close enough to each other (and to its placed members) over
  the links as loaded now; the soonest its slowest transfer can end bounds
  the term too (``topology.planning.search.lookahead``). Pairs of GPUs that would be fast
  alone but share a PCIe link with a placed pair are seen at once, not
  when the rank that pays for it is reached.

A branch whose bound cannot beat the best order known (the constructions'
and local search's) is cut. Children are tried lowest bound first, then
(given a ``guide``, a partition into Ulysses groups) a GPU of the group the
guide gives the rank's Ulysses group, or of a group none of whose GPUs is
placed yet, then GPUs of the previous rank's host, so good orders are met
early. Any GPU of an orbit may stand for it: the guide picks which.

The search counts the nodes it visits; when it finishes under ``node_cap``
the best order is proven optimal, otherwise the caller keeps what it had.
"""

from __future__ import annotations

import math
from functools import lru_cache

import numpy as np

from topology.planning.bounds.hop_latency import hop_latency
from topology.planning.bounds.rates import min_route_latency, ring_bandwidth_bound
from topology.cost import StepModel, all_to_all_bound, transfer, transfers
from topology.planning.search.delta import REL_TOL, USED
from topology.planning.search.lookahead import PairRates, all_to_all_reach
from topology.planning.plan import GroupLayout
from topology.planning.search.symmetry import RingRotation, Symmetry


RANK_ORDER_SHARE = 0.5
"""Share of the node budget the search placing ranks in rank order gets before the one placing them ring by ring."""
LOOKAHEAD_GPUS = 64
"""Pools of at most this many GPUs bound the flows still to come (``topology.planning.search.lookahead``): its pair matrix
grows with the square of the pool."""


class _Aborted(Exception):
    """The node budget ran out before the search finished."""


def branch_and_bound(sm: StepModel, pool: list[str], best: list[str], best_step: float,
                     node_cap: float, joint_a2a: float = 0.0,
                     joint_attention: float = 0.0,
                     guide: list[list[str]] | None = None) -> tuple[list[str], float, bool, int]:
    """The best order for ``sm`` among sequences of GPUs from ``pool``, starting from ``best``.

    With Ulysses groups larger than the rings, the search runs twice over the same orders: first placing ranks
    in rank order (the gradient ring's flows complete at once, which meets good orders early) for
    ``RANK_ORDER_SHARE`` of the nodes, then ring by ring (``placement_sequence``: ring hops complete at once,
    which cuts more) from the best order the first found, for the rest. Either finishing proves its result.
    ``joint_a2a`` etc. are as for ``_search``.

    Returns
    -------
    (order, step, proven, nodes)
        ``proven`` is True when a search finished within ``node_cap`` nodes in all:
        no order beats ``order``. ``nodes`` is how many partial orders they visited.
    """
    ring_first = placement_sequence(sm)
    rank_first = list(range(sm.world))
    if ring_first == rank_first:
        return _search(sm, pool, best, best_step, node_cap, joint_a2a, joint_attention, guide, rank_first)
    first_cap = node_cap * RANK_ORDER_SHARE
    best, best_step, proven, nodes = _search(sm, pool, best, best_step, first_cap, joint_a2a, joint_attention, guide,
                                             rank_first)
    if proven:
        return best, best_step, True, nodes
    best, best_step, proven, more = _search(sm, pool, best, best_step, node_cap - nodes, joint_a2a, joint_attention,
                                            guide, ring_first)
    return best, best_step, proven, nodes + more


def _search(sm: StepModel, pool: list[str], best: list[str], best_step: float, node_cap: float, joint_a2a: float,
            joint_attention: float, guide: list[list[str]] | None, sequence: list[int]) -> tuple[list[str], float, bool, int]:
    """Branch and bound placing ranks in the order ``sequence``, starting from ``best``.

    ``joint_a2a`` is a lower bound of the all-to-all term of every order (``topology.planning.bounds.a2a_floor``),
    used with the rest; ``joint_attention`` one of the ring and all-to-all terms together, plus the gradient
    term's excess over its own bound (``topology.planning.bounds.ring_floor``). ``guide``, a partition of (some of)
    the pool into Ulysses groups, only orders the children: the result is the same without it.

    Returns
    -------
    (order, step, proven, nodes)
        ``proven`` is True when the search finished within ``node_cap`` nodes:
        no order beats ``order``. ``nodes`` is how many partial orders it visited.
    """
    world = sm.world
    fm = sm.flows
    topo = sm.topo
    bw = fm.link_bandwidths()
    sym = Symmetry(topo, pool)
    kinds = (sm.hops, sm.a2a_pairs, [(i, (i + 1) % world) for i in range(world)] if world > 1 else [])
    step_of = {r: k for k, r in enumerate(sequence)}
    completes: list[list[tuple[int, int, int]]] = [[] for _ in range(world)]
    """Per placement step, the flows whose later end it places."""
    for k, pairs in enumerate(kinds):
        for a, b in pairs:
            completes[max(step_of[a], step_of[b])].append((k, a, b))
    loads = [np.zeros(len(bw)) for _ in kinds]
    placed_flows: list[list[tuple[np.ndarray, float]]] = [[] for _ in kinds]
    on_link: list[list[float]] = [[] for _ in bw]
    """Latencies of the ring hops placed on each link."""
    order: list[str | None] = [None] * world
    by_host: dict[str, frozenset[str]] = {}
    state = {"best": list(best), "step": best_step, "nodes": 0}
    rates = sm.rates
    efficiency = rates.network_efficiency
    capped = bool(rates.intra_host_gbps or rates.inter_host_gbps)
    l_min = min_route_latency(topo, pool)
    slowest_hop = hop_latency(sm, pool)
    hop_lat = slowest_hop.at  # the shortest latency of a hop that slow: more than l_min where it is long
    # What no placement beats (``topology.cost.step_bound``'s terms): the flows placed so far only tighten them.
    hop_cap = ring_bandwidth_bound(topo, sm.dp * sm.ulysses, sm.ring) if sm.ring > 1 else math.inf
    bus_cap = ring_bandwidth_bound(topo, 1, world)
    a2a_floor = max(all_to_all_bound(sm, l_min) if kinds[1] else 0.0, joint_a2a)

    below = slowest_hop.patterns.below

    flows: dict[tuple[str, str], tuple[np.ndarray, np.ndarray, float]] = {}
    rotation = RingRotation(sm, sequence)
    # The flows still to come (``topology.planning.search.lookahead``): the free GPUs and the loads placed bound them too.
    index = {g: k for k, g in enumerate(pool)}
    free = np.ones(len(pool), dtype=bool)
    lookahead = bool(kinds[1]) and len(pool) <= LOOKAHEAD_GPUS
    a2a_groups = GroupLayout.from_grid(sm.dp, sm.ring, sm.ulysses).ulysses_groups if kinds[1] else []

    @lru_cache(maxsize=1)  # built on first use: many searches end before any bound needs it
    def pair_rates() -> PairRates:
        return PairRates(fm, pool)

    def flow(a: str, b: str) -> tuple[np.ndarray, np.ndarray, float]:
        """Route of ``a -> b``: link indices, fractions and latency (a route crosses a link once)."""
        if (a, b) not in flows:
            ids, fracs = fm.compiled(a, b)
            flows[a, b] = (np.asarray(ids, dtype=np.int64), np.asarray(fracs), fm.route_latency(a, b))
        return flows[a, b]

    def shares(load: np.ndarray) -> np.ndarray:
        # Links without flow (or with float residue of flows taken off) get a share above any link's.
        return bw / np.maximum(load, USED)

    def slowest(load: np.ndarray) -> float:
        return float(shares(load).min()) if len(bw) else math.inf

    def a2a_term(share: np.ndarray | None, rate: float) -> float:
        if not kinds[1]:
            return 0.0
        if share is None:
            return max(a2a_floor, 2 * transfer(sm.a2a_per_peer, rate * efficiency, l_min))
        # Every placed pair at its share now, all at once: the slowest transfer.
        placed = placed_flows[1]
        ids = np.concatenate([x for x, _ in placed])
        starts = np.cumsum([0] + [len(x) for x, _ in placed[:-1]])
        rate = np.minimum.reduceat(share[ids], starts) * efficiency
        return max(a2a_floor, 2 * float(transfers(sm.a2a_per_peer, rate, np.array([lat for _, lat in placed])).max()))

    @lru_cache(maxsize=1 << 16)  # rates and latencies come from a small set: most bounds repeat
    def total(hop: float, hop_lat: float, a2a: float, bus: float) -> float:
        return rates.with_step_overhead(sm.dense + sm.attention(hop, hop_lat, a2a) + sm.gradients(bus))

    def a2a_ahead(i: int) -> float:
        """Seconds of the slowest all-to-all still to come, the ranks of steps ``0..i`` placed (0 when none is)."""
        groups = [([index[order[r]] for r in g if step_of[r] <= i], sum(step_of[r] > i for r in g))
                  for g in a2a_groups if max(step_of[r] for r in g) > i]
        if not lookahead or not groups:
            return 0.0
        return 2 * all_to_all_reach(pair_rates(), loads[1], sm.a2a_per_peer, efficiency, free, groups, sm.ulysses)

    def lower(i: int) -> float:
        """A lower bound of the step time of every completion of the current partial order (steps ``0..i``)."""
        target = state["step"] * (1 - REL_TOL)
        hop_r, a2a_r, bus = (slowest(x) for x in loads)
        bus = min(bus, bus_cap)
        quick = total(min(hop_r, hop_cap) * efficiency, hop_lat(min(hop_r, hop_cap) * efficiency), a2a_term(None, a2a_r),
                      bus)
        if joint_attention:  # it holds the gradient term's excess over the bus bound: add that bound, not this bus
            quick = max(quick, rates.with_step_overhead(sm.dense + joint_attention + sm.gradients(bus_cap)))
        if quick >= target:
            return quick
        a2a = a2a_term(shares(loads[1]), a2a_r) if placed_flows[1] else a2a_term(None, a2a_r)
        a2a = max(a2a, a2a_ahead(i))
        floor = quick
        if slowest_hop.crossings:  # the slowest hop is a crossing hop (as late), or slower still
            floor = max(floor, slowest_hop.least(lambda rate, lat: total(rate, lat, a2a, bus), hop_cap * efficiency))
        if not placed_flows[0] or capped or hop_cap < hop_r:
            return max(floor, total(min(hop_r, hop_cap) * efficiency, hop_lat(min(hop_r, hop_cap) * efficiency), a2a, bus))
        share = shares(loads[0])
        # A hop on a link that gives the smallest share runs at that share: the slowest hops are those.
        at_r = max(max(on_link[i]) for i in np.flatnonzero(share <= hop_r * (1 + 1e-12)))
        same = total(hop_r * efficiency, max(at_r, hop_lat(hop_r * efficiency)), a2a, bus)
        if i == world - 1:  # every flow is placed: no later one slows a hop
            return max(floor, same)
        slower = total(below(hop_r) * efficiency, hop_lat(below(hop_r) * efficiency), a2a, bus)
        return max(floor, min(same, slower))

    def place(i: int, sign: int) -> None:
        for k, a, b in completes[i]:
            ids, fracs, lat = flow(order[a], order[b])
            if sign > 0:
                loads[k][ids] += fracs
            else:
                loads[k][ids] -= fracs
            if k < 2:
                if sign > 0:
                    placed_flows[k].append((ids, lat))
                else:
                    placed_flows[k].pop()  # this rank's flows are the last ones on: which one goes first is moot
            if k == 0:
                for x in ids.tolist():
                    (on_link[x].append if sign > 0 else on_link[x].remove)(lat)

    def put(i: int, gpu: str | None) -> None:
        """Give step ``i``'s rank to ``gpu``, or (None) take its GPU back."""
        rank = sequence[i]
        host = topo.host_of(gpu or order[rank])
        free[index[gpu or order[rank]]] = gpu is None
        if gpu is None:
            place(i, -1)
            by_host[host] = by_host[host] - {order[rank]}
        else:
            by_host[host] = by_host.get(host, frozenset()) | {gpu}
        order[rank] = gpu
        if gpu is not None:
            place(i, +1)

    group_of = {g: k for k, grp in enumerate(guide or []) for g in grp}
    ulysses_of = {r: grp for grp in GroupLayout.from_grid(sm.dp, sm.ring, sm.ulysses).ulysses_groups for r in grp}

    def preferred(i: int) -> set[str]:
        """GPUs the guide's groups suggest for step ``i``'s rank: its Ulysses group's guide group (that of its first
        member placed), or an untouched one."""
        if not group_of:
            return set()
        first = next((order[r] for r in ulysses_of[sequence[i]] if order[r] is not None), None)
        if first in group_of:
            k = group_of[first]
            return set(guide[k]) - set(order)
        touched = {group_of.get(g) for g in order if g is not None}
        return {g for g, k in group_of.items() if k not in touched}

    def visit(i: int) -> None:
        if i == world:
            step = sm.step(order)
            if step < state["step"] * (1 - REL_TOL):
                state["best"], state["step"] = list(order), step
            return
        prev = topo.host_of(order[sequence[i - 1]]) if i else None
        wanted = preferred(i)
        children = []
        for n, orbit in enumerate(sym.choices(by_host)):
            state["nodes"] += 1
            if state["nodes"] > node_cap:
                raise _Aborted
            # Any member of an orbit stands for it: the one the guide prefers, when there is one.
            gpu = next((g for g in orbit if g in wanted), orbit[0])
            put(i, gpu)
            if not rotation.canonical(i, order):
                put(i, None)
                continue
            children.append((lower(i), gpu not in wanted, topo.host_of(gpu) != prev, n, gpu))
            put(i, None)
        # Most promising first: the best order is met early, and a better incumbent cuts more.
        for bound, *_, gpu in sorted(children):
            if bound >= state["step"] * (1 - REL_TOL):
                break
            put(i, gpu)
            visit(i + 1)
            put(i, None)

    try:
        visit(0)
    except _Aborted:
        return state["best"], state["step"], False, state["nodes"]
    return state["best"], state["step"], True, state["nodes"]


def placement_sequence(sm: StepModel) -> list[int]:
    """Ranks in the order the second search places them: ring by ring (each cp group's rings in turn, a ring's
    ranks in ring order), where Ulysses groups are larger than rings; otherwise rank order.

    In rank order a ring hop is priced ``ulysses`` steps after its first end is placed; ring by ring it is
    priced at once, but a gradient hop ``ring`` steps after its first end (and an all-to-all pair up to
    ``ring`` times later than in rank order): worth it only where the ring hop waits longer.
    """
    if sm.ring < 2 or sm.ulysses <= sm.ring:
        return list(range(sm.world))
    return [r for ring in GroupLayout.from_grid(sm.dp, sm.ring, sm.ulysses).ring_groups for r in ring]
