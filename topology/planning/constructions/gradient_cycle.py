"""The gradient ring as one widest cycle, built directly: every flow at the bus bound, or as near as can be.

ZeRO's collectives walk the ranks in order (rank ``r`` sends to ``r + 1``,
the last to the first), so the gradient bus is the slowest flow of one cycle
through every rank. Where it decides the step, the best order is a cycle in
which every flow runs at the bound ``t`` of
``topology.planning.bounds.rates.ring_bandwidth_bound``, and the flow model
(a flow's rate is its links' smallest share) makes that a capacity question:
every flow runs at ``t`` or faster exactly when no link carries more than
``bw / t`` of them.

Constructions that order hosts first and GPUs second miss such cycles where
a host's GPUs share one NIC (the host must then be one run of the order,
entered and left once) or where some GPUs reach nothing fast (a socket
behind a slow link). This search builds the cycle GPU by GPU instead, over
the routes of ``t`` GB/s or more, keeping each link's load within its
capacity: GPUs of the current host first (runs stay whole), then hosts not
yet visited, closer ones (more switches shared) first. A partial cycle
goes on only while the GPUs not yet used still lead from its last GPU back
to its first, and are enough to fill it: a cycle through nearly every GPU
(leaves joined only through hosts with a NIC on each) otherwise spends the
budget under an early step that cut its way home. It backtracks within
a node budget, at the bound and then at the next slower rates, on clusters
small enough to read every pair's route
(``topology.planning.bounds.rates.reads_every_pair``). A depth-first
search that errs early (a host that two leaves reach only through it,
filled in one run, where the cycle must pass it twice) spends its budget under that error; so the budget is split over
restarts: the first as above; the second taking hosts under more shared
switches before hosts not yet visited (a leaf whose uplink carries one flow
at the rate must be one run of the cycle, even where that leaves half of a
host, behind a slow socket link, for later in the run); the others seeded
alike every time (plans stay reproducible), starting elsewhere and leaving a
host early now and then.
"""

from __future__ import annotations

import random

import numpy as np

from topology.network.model import Topology
from topology.network.routing import FlowModel
from topology.planning.bounds.rates import cycle_pieces, pair_matrix, ring_bandwidth_bound
from topology.planning.constructions.ring_order import locality_order

SEARCH_NODES = 20_000
"""GPUs placed (and taken back) at most, over every rate tried: the search gives up after that many."""
RATES_TRIED = 4
"""The bus bound and at most this many slower rates below it are tried, fastest first."""
RESTARTS = 32
"""Depth-first searches per rate and piece, sharing its part of the budget (each gets at least twice the cycle's
GPUs), besides the one taking nearer hosts first: the first as the heuristic says, the others shuffled. Many short
searches beat a few long ones: a search that errs early rarely recovers."""
GUIDED_SHARE = 0.5
"""Share of a rate and piece's budget for its two searches that follow the heuristic (half each); the shuffled ones
split the rest. The heuristic's search often needs a few backtracks per host to finish (55 GPUs of 20 hosts under
seven leaves, some NICs degraded: 276 GPUs placed); an even split left it 156, and the plan a slower rate."""
LEAVE_EARLY = 0.2
"""Chance, in a shuffled search, that a step leaves the current host before its GPUs run out."""
_TOL = 1e-9


def widest_gradient_cycle(topo: Topology, flows: FlowModel, pool: list[str], size: int,
                          nodes: int = SEARCH_NODES) -> list[str] | None:
    """A cycle of ``size`` GPUs of ``pool`` whose flows, all running at once, are as fast as the search finds;
    None where it finds none (or the cluster is too large to read every route)."""
    found = pair_matrix(topo)
    if found is None or size < 3 or size > len(pool):
        return None
    bound = ring_bandwidth_bound(topo, 1, size)
    index = {g: i for i, g in enumerate(found[0])}
    at = np.array([index[g] for g in pool])
    rates = found[1][np.ix_(at, at)]
    levels = sorted(set(rates[(rates > 0) & (rates <= bound)].tolist()), reverse=True)
    tries = []  # (rate, its routes that fast, a piece of them that may hold the cycle), largest pieces first
    for t in levels[:RATES_TRIED]:
        fast = rates >= t
        tries += [(t, fast, piece) for piece in sorted(cycle_pieces(fast, size), key=len, reverse=True)]
    for t, fast, piece in tries:
        gpus = [pool[i] for i in piece]
        succ = {pool[i]: [pool[j] for j in piece[fast[i, piece]]] for i in piece}
        # As the heuristic says; then staying under the switches the cycle is under first; then shuffled.
        searches = [(None, False), (None, True)] + [(random.Random(k), False) for k in range(1, RESTARTS)]
        share = nodes / len(tries)
        for shuffle, close_first in searches:
            part = GUIDED_SHARE / 2 if shuffle is None else (1 - GUIDED_SHARE) / (RESTARTS - 1)
            budget = [max(int(share * part), 2 * size)]
            cycle = _cycle_at(topo, flows, succ, t, size, gpus, budget, shuffle, close_first)
            if cycle is not None:
                return cycle
    return None


def _cycle_at(topo: Topology, flows: FlowModel, succ: dict[str, list[str]], t: float, size: int, gpus: list[str],
              budget: list[int], shuffle: random.Random | None = None, close_first: bool = False) -> list[str] | None:
    """Depth-first search for a cycle of ``size`` of ``gpus`` over the routes ``succ`` (each GPU's fast routes out,
    to GPUs of ``gpus``) with every link's load
    within ``bw / t``; ``budget[0]`` counts down the GPUs placed. ``close_first`` takes hosts under more shared
    switches before hosts visited fewer times. ``shuffle`` starts at a random GPU, breaks ties
    between hosts at random and leaves a host early now and then."""
    cap = (flows.link_bandwidths() / t * (1 + _TOL)).tolist()
    load = [0.0] * len(cap)
    host = {g: topo.host_of(g) for g in gpus}
    position = {g: i for i, g in enumerate(gpus)}
    rank = {g: i for h in dict.fromkeys(host.values()) for i, g in enumerate(locality_order(topo, h))}

    def place(a: str, b: str, sign: float) -> bool:
        """Add (or, with ``sign`` -1, take back) the flow ``a -> b``; False, changing nothing, if a link overflows."""
        ids, fracs = flows.compiled(a, b)
        if sign > 0 and any(load[i] + f > cap[i] for i, f in zip(ids, fracs)):
            return False
        for i, f in zip(ids, fracs):
            load[i] += sign * f
        return True

    order: list[str] = []
    used: set[str] = set()
    visited: dict[str, int] = {}

    tie = {h: 0.0 for h in host.values()}

    def successors(a: str) -> list[str]:
        here = host[a]
        nxt = [b for b in succ[a] if b not in used]
        stay = True
        if shuffle is not None:
            stay = shuffle.random() >= LEAVE_EARLY
            for h in tie:
                tie[h] = shuffle.random()
        def key(b: str) -> tuple:
            near, new = -topo.shared_switches(here, host[b]), visited.get(host[b], 0)
            return ((host[b] != here) == stay, *((near, new) if close_first else (new, near)), tie[host[b]],
                    position[b] if host[b] != here else rank[b])

        return sorted(nxt, key=key)

    def can_close() -> bool:
        """Whether the GPUs not yet used, walked from the last one, still reach the first and number enough."""
        first, last, need = order[0], order[-1], size - len(order)
        seen, stack, back = {last}, [last], False
        while stack:
            for b in succ[stack.pop()]:
                if b == first:
                    back = True
                elif b not in seen and b not in used:
                    seen.add(b)
                    stack.append(b)
            if back and len(seen) > need:  # the walk need go no further
                return True
        return False

    def extend() -> bool:
        if budget[0] <= 0:
            return False
        if len(order) < size and not can_close():
            return False
        if len(order) == size:
            first, last = order[0], order[-1]
            if first in succ[last] and place(last, first, 1):
                place(last, first, -1)
                return True
            return False
        for b in successors(order[-1]):
            budget[0] -= 1
            if not place(order[-1], b, 1):
                continue
            order.append(b)
            used.add(b)
            visited[host[b]] = visited.get(host[b], 0) + 1
            if extend():
                return True
            visited[host[b]] -= 1
            used.discard(b)
            order.pop()
            place(order[-1], b, -1)
            if budget[0] <= 0:
                return False
        return False

    first: dict[str, str] = {}
    for g in gpus:
        first.setdefault(host[g], g)
    # Each host's first GPU in turn (a GPU the cycle leaves out may be the first tried), or one at random.
    for start in first.values() if shuffle is None else [shuffle.choice(gpus)]:
        order[:], used, visited = [start], {start}, {host[start]: 1}
        if extend():
            return order
        if budget[0] <= 0:
            return None
    return None
