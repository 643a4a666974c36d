"""Exact rank orders for small problems: branch and bound over GPU sequences, up to twins.

Algorithm
---------
Ranks are placed one at a time, rank 0 first. A GPU is named by its twin
class (``topology.search.twin_classes``: GPUs no route tells apart), and a
class hands out its GPUs in listed order, so each distinct order is visited
once. Placing rank ``i`` completes every flow whose later end is ``i``: the
ring hop into it (and the ring's closing hop at its last rank), the Ulysses
all-to-all pairs with earlier ranks of its group, and the gradient ring's
hop from rank ``i - 1``. Their routes go onto the link loads at once.

A partial order's step time is bounded from below by the same step model
over the flows placed so far with zero latency: flows placed later only add
load, which only slows the slowest flow of each kind. A branch whose bound
cannot beat the best order known (the constructions' and local search's) is
cut. Children are tried GPUs of the previous rank's host first, so good
orders are met early.

The search counts the nodes it visits; when it finishes under ``node_cap``
the best order is proven optimal, otherwise the caller keeps what it had.
"""

from __future__ import annotations

import math

import numpy as np

from topology.cost import StepModel, transfer
from topology.delta import REL_TOL, link_shares


class _Aborted(Exception):
    """The node budget ran out before the search finished."""


def branch_and_bound(sm: StepModel, classes: list[list[str]], best: list[str], best_step: float,
                     node_cap: int) -> tuple[list[str], float, bool]:
    """The best order for ``sm`` among sequences of GPUs from ``classes``, starting from ``best``.

    Returns
    -------
    (order, step, proven)
        ``proven`` is True when the search finished within ``node_cap`` nodes:
        no order beats ``order``.
    """
    world = sm.world
    fm = sm.flows
    bw = fm.link_bandwidths()
    kinds = (sm.hops, sm.a2a_pairs, [(i, (i + 1) % world) for i in range(world)] if world > 1 else [])
    completes: list[list[tuple[int, int, int]]] = [[] for _ in range(world)]
    for k, pairs in enumerate(kinds):
        for a, b in pairs:
            completes[max(a, b)].append((k, a, b))
    loads = [np.zeros(len(bw)) for _ in kinds]
    host = [[sm.topo.host_of(g) for g in c] for c in classes]
    order: list[str | None] = [None] * world
    left, used = [len(c) for c in classes], [0] * len(classes)
    state = {"best": list(best), "step": best_step, "nodes": 0}
    efficiency = sm.rates.network_efficiency

    def slowest(load: np.ndarray) -> float:
        return float(link_shares(bw, load).min()) if len(bw) else math.inf

    def lower() -> float:
        hop = slowest(loads[0]) * efficiency
        a2a = 2 * transfer(sm.a2a_per_peer, slowest(loads[1]) * efficiency, 0.0) if kinds[1] else 0.0
        return sm.dense + sm.attention(hop, 0.0, a2a) + sm.gradients(slowest(loads[2])) + sm.rates.step_overhead_s

    def place(i: int, sign: int) -> None:
        for k, a, b in completes[i]:
            ids, fracs = fm.compiled(order[a], order[b])
            np.add.at(loads[k], ids, sign * np.asarray(fracs))

    def visit(i: int) -> None:
        if i == world:
            step = sm.step(order)
            if step < state["step"] * (1 - REL_TOL):
                state["best"], state["step"] = list(order), step
            return
        prev = sm.topo.host_of(order[i - 1]) if i else None
        for c in sorted(range(len(classes)), key=lambda c: (left[c] == 0, host[c][0] != prev, c)):
            if not left[c]:
                break
            state["nodes"] += 1
            if state["nodes"] > node_cap:
                raise _Aborted
            order[i] = classes[c][used[c]]
            left[c] -= 1
            used[c] += 1
            place(i, +1)
            if lower() < state["step"] * (1 - REL_TOL):
                visit(i + 1)
            place(i, -1)
            left[c] += 1
            used[c] -= 1
        order[i] = None

    try:
        visit(0)
    except _Aborted:
        return state["best"], state["step"], False
    return state["best"], state["step"], True
