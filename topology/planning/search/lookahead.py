"""What the ranks not yet placed can still reach: lower bounds on the transfers of flows whose ends are free.

Exact search (``topology.planning.search.exact``) bounds a partial rank order by the flows
it has placed. The flows still to come are bounded here, from the GPUs left
free and the loads the placed flows already put on the links: a flow from
``x`` to ``y`` added now would run at ``min(bw / (load + f))`` over its
route's links (``f`` its own fraction there), and later flows only add load,
so that is the fastest it can ever run, and its transfer (bytes over that
rate, plus the route's latency) the soonest it can end. A rank not yet
placed will sit on one free GPU, and the ranks of one group on distinct
ones; so the slowest transfer still to come takes no less than what the
free GPUs allow every group.

Algorithm
---------
``PairRates`` keeps, for every ordered pair of pool GPUs, its route as a
padded row of link indices and fractions, so the rate every pair would get
on top of a load vector is one vectorised gather and minimum (an ``n x n``
matrix for ``n`` pool GPUs).

``all_to_all_reach`` bounds the slowest all-to-all transfer still to come.
Two GPUs can hold two members of one Ulysses group within ``t`` seconds only
if the transfers both ways between them end within ``t``. A group with
members placed needs, for each member left, a free GPU within ``t`` of every
placed member: the ``k``-th soonest such GPU bounds ``t`` when ``k`` members
are left. A group with no member placed needs ``u`` free GPUs each with
``u - 1`` free partners within ``t``: over ``m`` such groups, the ``(u m)``-th
smallest of the free GPUs' ``(u - 1)``-th soonest partner times bounds it.
Both are necessary conditions of any completion (they drop the conditions
between groups and the load the new flows add to each other), so the largest
of them is a true lower bound. O(n^2) per call.
"""

from __future__ import annotations

import math

import numpy as np

from topology.cost import transfers
from topology.network.routing import FlowModel


class PairRates:
    """The rate each ordered pair of pool GPUs would get on top of a load vector, all pairs at once.

    Parameters
    ----------
    flows
        Routes and link bandwidths.
    pool
        The GPUs, in the order of the matrix's rows and columns.
    """

    def __init__(self, flows: FlowModel, pool: list[str]):
        n = len(pool)
        bw = flows.link_bandwidths()
        self.links = len(bw)
        routes = [[flows.compiled(a, b) if a != b else ([], []) for b in pool] for a in pool]
        width = max((len(ids) for row in routes for ids, _ in row), default=0)
        # Padding points at one extra link of infinite bandwidth: it never decides a minimum.
        self.ids = np.full((n, n, max(width, 1)), self.links, dtype=np.int64)
        self.fracs = np.zeros((n, n, max(width, 1)))
        for i, row in enumerate(routes):
            for j, (ids, fracs) in enumerate(row):
                self.ids[i, j, :len(ids)] = ids
                self.fracs[i, j, :len(fracs)] = fracs
        self.bw_at = np.append(bw, math.inf)[self.ids]
        """Bandwidth of each route's links (padding: inf)."""
        self.diagonal = np.eye(n, dtype=bool)
        self.latency = np.array([[flows.route_latency(a, b) if a != b else 0.0 for b in pool] for a in pool])
        """µs of each pair's route."""

    def matrix(self, load: np.ndarray, among: np.ndarray | None = None) -> np.ndarray:
        """``[i, j]``: GB/s a flow from pool GPU ``i`` to ``j`` would get on top of ``load``; 0 on the diagonal.

        With ``among`` (distinct pool indices), only the pairs among those GPUs, in that order.
        """
        pick = (slice(None), slice(None)) if among is None else np.ix_(among, among)
        ext = np.append(load, 0.0)
        with np.errstate(divide="ignore"):
            rates = (self.bw_at[pick] / (ext[self.ids[pick]] + self.fracs[pick])).min(axis=2)
        np.fill_diagonal(rates, 0.0)
        return rates

    def seconds(self, load: np.ndarray, nbytes: float, scale: float = 1.0, among: np.ndarray | None = None) -> np.ndarray:
        """``[i, j]``: seconds ``nbytes`` from pool GPU ``i`` to ``j`` would take at least, on top of ``load``.

        The rate is scaled by ``scale`` (the network's efficiency), the time
        priced as ``topology.cost.transfer``; ``inf`` on the diagonal.
        ``among`` as for ``matrix``.
        """
        latency = self.latency if among is None else self.latency[np.ix_(among, among)]
        out = transfers(nbytes, self.matrix(load, among) * scale, latency)
        np.fill_diagonal(out, math.inf)
        return out


def kth_smallest(values: np.ndarray, k: int) -> float:
    """The ``k``-th smallest of ``values`` (1-based); inf when there are fewer than ``k``, 0 for ``k`` of 0."""
    if k <= 0:
        return 0.0
    if k > len(values):
        return math.inf
    return float(np.partition(values, k - 1)[k - 1])


def all_to_all_reach(pairs: PairRates, load: np.ndarray, nbytes: float, scale: float, free: np.ndarray,
                     groups: list[tuple[list[int], int]], size: int) -> float:
    """Lower bound on the slowest all-to-all transfer of the groups still to place (see the module docstring).

    Parameters
    ----------
    pairs, load, nbytes, scale
        The pool's routes, the all-to-all load now, one peer's bytes and the network's efficiency
        (``PairRates.seconds``).
    free
        Mask of the pool GPUs no rank holds.
    groups
        Every Ulysses group not wholly placed: (pool indices of its placed members, members left).
    size
        Ulysses degree ``u``.

    Returns
    -------
    float
        Seconds; 0 when no group is left.
    """
    free_ids = np.flatnonzero(free)
    placed = sorted({x for members, _ in groups for x in members})
    # Only pairs that touch a free GPU count: the free GPUs first, then the placed members of open groups.
    among = np.concatenate([free_ids, np.asarray(placed, dtype=np.int64)])
    seconds = pairs.seconds(load, nbytes, scale, among)
    both = np.maximum(seconds, seconds.T)  # two members exchange both ways: the later transfer counts
    at = {x: len(free_ids) + k for k, x in enumerate(placed)}
    n_free = len(free_ids)
    reach = 0.0
    fresh = 0
    for members, left in groups:
        if not members:
            fresh += 1
            continue
        reach = max(reach, kth_smallest(both[[at[x] for x in members], :n_free].max(axis=0), left))
    if fresh:
        if size - 1 > n_free:
            return math.inf
        partners = np.partition(both[:n_free, :n_free], size - 2, axis=1)[:, size - 2]  # (u - 1)-th soonest partner
        reach = max(reach, kth_smallest(partners, size * fresh))
    return reach
