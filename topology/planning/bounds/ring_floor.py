"""The ring term priced together with the all-to-all: what the ring hops between Ulysses groups must load.

A step's attention time adds the slowest ring hop's transfers to the
all-to-all (``topology.cost.StepModel.attention``). Bounded one at a time
(``topology.planning.bounds.rates``, ``topology.planning.bounds.a2a_floor``), each may take a layout the
other cannot share: the groups that minimise the all-to-all (e.g. one
socket each) may leave the ring hops between them nothing but shared
network cards. This module prices, for a partition of the pool into Ulysses
groups, the ring hops such a partition forces, so the partition search of
``topology.planning.bounds.a2a_floor`` bounds the sum over every partition at once.

Ring ``j`` of a cp group visits its Ulysses groups in a cycle and takes the
``j``-th member of each: the hops from one group go, one per member, to the
members of the next group, and the cp groups' cycles cover every group. So
a rank order sets a cover of the groups by ``dp`` directed cycles of
``ring`` groups, and each of its edges ``(G, H)`` is a bijection of ring
hops from ``G``'s members onto ``H``'s.

Algorithm
---------
Two facts bound the hops of an edge, whichever bijection the order takes:

* Forced loads: a hop from ``x`` to some member of ``H`` surely loads every
  link common to ``x``'s routes to all of ``H`` (at its smallest fraction
  there); summed over the senders this bounds the load, and so does the
  same sum over the receivers (so their larger one, link by link).
* Cuts: a unit (the GPUs on one side of a link inside a host, or a whole
  host) holding more members of ``G`` than of ``H`` sends at least the
  difference out over its exit links, and takes as many in when it holds
  more of ``H``. With every route crossing an exit wholly (no ECMP split
  there), ``k`` flows at ``t`` GB/s need ``sum(floor(bw / t)) >= k``.

The edges of a cover carry distinct hops, so both add up over a cover.
Some hop crosses each busy link, or leaves each crowded unit, at no more
than the rate they allow: the slowest hop runs at that rate (and then
waits at least the quickest route through such a link) or slower, at the
next rate any link can give, after the shortest latency of any route (the
argument ``topology.planning.search.exact`` makes for placed hops).

The gradient ring (``StepModel.gradients``) walks the ranks in order: each
Ulysses group's members in a row, then on to the next group. A group with
members on both sides of a unit's cut crosses it inside its own stretch, so
a unit splitting ``s`` groups is crossed ``s`` times at least, and left
``ceil(s / 2)`` times; all the ring's flows run at the bus rate, which the
cut rates above cap. What that costs beyond the gradient term's own bound
(``topology.planning.bounds.rates.ring_bandwidth_bound`` over the world) is added to the
partition's price: the floor is then of the attention time plus that excess,
which ``topology.cost.step_bound`` adds to the gradient bound.

A complete partition is priced by its best cover: depth-first over cycles
(each starts at the first group no cycle holds), cut when a partial cover
already costs no less than the best known, stopped after ``COVER_NODES``
steps (an open branch then counts at its own bound, which still bounds
it). A partial partition is bounded by its complete groups: each one's hops
go out to another complete group or to GPUs in none yet (priced over all of
those at once), and come in from one.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import numpy as np

from topology.planning.bounds.rates import cut_rate, host_units, ring_bandwidth_bound
from topology.cost import StepModel

COVER_NODES = 20_000
"""Steps of the search over cycle covers of one partition, at most."""


@dataclass
class _Units:
    """Cuts of the pool: which GPUs each unit holds and the rate ``k`` flows across its exits (or entrances) allow."""

    members: np.ndarray
    """``[unit, gpu]``: 1 when the pool GPU is in the unit."""
    rate_out: np.ndarray
    """``[unit, k]``: the most GB/s ``k`` flows leaving the unit can all reach (inf for k = 0)."""
    rate_in: np.ndarray
    lat_out: np.ndarray
    """µs of the quickest route through an exit of the unit."""
    lat_in: np.ndarray
    free: np.ndarray
    """``[unit, i]``: GPUs of the unit from pool index ``i`` on (the free ones while ``i`` is the next to place)."""


def _cut_rates(bws: list[float], whole: bool, most: int) -> np.ndarray:
    """``[k]``: the most GB/s ``k`` flows across links of ``bws`` can all reach (``topology.planning.bounds.rates.cut_rate``)."""
    return np.array([cut_rate(bws, whole, k) for k in range(most + 1)])


def pool_units(sm: StepModel, gpus: list[str], dense: np.ndarray, lat_via: np.ndarray) -> _Units:
    """The units of ``gpus``: every host, and each side of every link between two of a host's parts."""
    fm = sm.flows
    index = {g: i for i, g in enumerate(gpus)}
    n = len(gpus)
    bw = fm.link_bandwidths()
    units = [(frozenset(index[g] for g in held), exits, entrances)
             for held, exits, entrances in host_units(sm.topo, fm, gpus)]
    members = np.zeros((len(units), n))
    rate_out, rate_in = np.full((len(units), n + 1), math.inf), np.full((len(units), n + 1), math.inf)
    lat_out, lat_in = np.zeros(len(units)), np.zeros(len(units))
    for k, (held, exits, entrances) in enumerate(units):
        inside = np.array(sorted(held))
        outside = np.array([i for i in range(n) if i not in held])
        members[k, inside] = 1
        for ids, src, dst, rate, lat in ((exits, inside, outside, rate_out, lat_out),
                                         (entrances, outside, inside, rate_in, lat_in)):
            fr = dense[np.ix_(src, dst, ids)]
            whole = bool(np.all((np.abs(fr) < 1e-12) | (np.abs(fr - 1) < 1e-12)))
            rate[k] = _cut_rates([float(bw[i]) for i in ids], whole, n)
            lat[k] = float(lat_via[ids].min())
    free = np.concatenate([np.cumsum(members[:, ::-1], axis=1)[:, ::-1], np.zeros((len(units), 1))], axis=1)
    return _Units(members, rate_out, rate_in, lat_out, lat_in, free)


class RingPricer:
    """Lower bounds of the attention time (ring hops and all-to-all) of the orders a partition allows.

    Parameters
    ----------
    sm
        The shape and its flow model.
    dense
        ``[x, y, link]``: the fraction of the route from pool GPU ``x`` to ``y`` on each link (last: padding).
    bw
        GB/s of every link, padding last (inf).
    lat_via
        µs of the quickest route through each link.
    units
        Cuts of the pool (``pool_units``).
    l_min
        µs of the quickest route between two pool GPUs.
    hop_cap
        GB/s no placement's slowest hop exceeds (``topology.planning.bounds.rates.ring_bandwidth_bound``).
    below
        The next rate below a given one that any link can give (``topology.planning.search.exact``).
    """

    def __init__(self, sm: StepModel, dense: np.ndarray, bw: np.ndarray, lat_via: np.ndarray, units: _Units,
                 l_min: float, hop_cap: float, below: Callable[[float], float]):
        self.sm, self.dense, self.bw, self.lat_via, self.units = sm, dense, bw, lat_via, units
        self.l_min, self.hop_cap, self.below = l_min, hop_cap, below
        self.gradient_base = sm.gradients(ring_bandwidth_bound(sm.topo, 1, sm.world))
        """The gradient term's own bound (as ``topology.cost.step_bound`` counts it)."""
        self.eff = sm.rates.network_efficiency
        self.capped = bool(sm.rates.intra_host_gbps or sm.rates.inter_host_gbps)
        self.nodes = 0
        self._prices: dict[tuple[float, float, float], float] = {}
        self._unit_idx = np.arange(len(units.members))
        n = dense.shape[0]
        # [x, i]: links x's route to every GPU from i on (or every GPU from i on to x's) crosses: a suffix minimum.
        self.suffix_out = np.zeros((n, n + 1, dense.shape[2]))
        self.suffix_in = np.zeros((n, n + 1, dense.shape[2]))
        for i in range(n - 1, -1, -1):
            last = i == n - 1
            self.suffix_out[:, i] = dense[:, i] if last else np.minimum(dense[:, i], self.suffix_out[:, i + 1])
            self.suffix_in[:, i] = dense[i] if last else np.minimum(dense[i], self.suffix_in[:, i + 1])

    # -------------------------------------------------------------- pricing
    def limits(self, load: np.ndarray, k_out: np.ndarray, k_in: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(GB/s, µs) per row: the rate some ring hop runs at most, and the least latency it then has.

        Rows of ``load`` (link loads) and ``k_out``/``k_in`` (flows out of and into each unit) are what
        the hops of a set of edges surely make; ``inf`` GB/s where they bound nothing.
        """
        u = self.units
        with np.errstate(divide="ignore", invalid="ignore"):
            ratio = np.where(load > 1e-9, self.bw / load, math.inf)
        rates, lats = [ratio.min(axis=1)], [self._lat_at(ratio, self.lat_via)]
        for k, table, lat in ((k_out, u.rate_out, u.lat_out), (k_in, u.rate_in, u.lat_in)):
            cut = np.where(k > 0, table[self._unit_idx, np.minimum(k, table.shape[1] - 1).astype(int)], math.inf)
            rates.append(cut.min(axis=1))
            lats.append(self._lat_at(cut, lat))
        rates, lats = np.stack(rates, axis=1), np.stack(lats, axis=1)
        rate = rates.min(axis=1)
        return rate, self._lat_at(rates, lats)

    @staticmethod
    def _lat_at(rates: np.ndarray, lat: np.ndarray) -> np.ndarray:
        """Per row, the largest latency among the columns at the row's smallest rate (-inf where none is finite)."""
        low = rates.min(axis=1, keepdims=True)
        at = (rates <= low * (1 + 1e-12)) & np.isfinite(rates)
        return np.where(at, lat, -math.inf).max(axis=1)

    def price(self, rate: float, lat: float, a2a: float) -> float:
        """Least attention time (``StepModel.attention``) when some ring hop runs at ``rate`` at most, after ``lat``."""
        key = (rate, lat, a2a)
        if key not in self._prices:
            sm, cap = self.sm, self.hop_cap
            if math.isinf(rate) or cap < rate or self.capped:
                value = sm.attention(min(rate, cap) * self.eff, self.l_min, a2a)
            else:
                # The slowest hop runs at this rate (then a hop limited so is one of them), or slower still.
                value = min(sm.attention(rate * self.eff, max(lat, self.l_min), a2a),
                            sm.attention(min(self.below(rate), cap) * self.eff, self.l_min, a2a))
            self._prices[key] = value
        return self._prices[key]

    def prices(self, load: np.ndarray, k_out: np.ndarray, k_in: np.ndarray, a2a: float) -> np.ndarray:
        """``price`` of every row of ``limits``."""
        rate, lat = self.limits(load, k_out, k_in)
        return np.array([self.price(float(r), float(x), a2a) for r, x in zip(rate, lat)])

    def edges(self, groups: list[list[int]], first_free: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``[a, b]``: what the hops from group ``a``'s placed members onto group ``b`` surely load and cross.

        GPUs from ``first_free`` on are free: a group with room may still take any of them, so a hop
        counts only what its route shares with the routes to all of them. Row and column ``m`` (one past
        the groups) stand for a group of free GPUs alone.
        """
        n, u, units = self.dense.shape[0], self.sm.ulysses, self.units
        m, i = len(groups), first_free
        member = np.zeros((m + 1, n))
        for a, g in enumerate(groups):
            member[a, g] = 1
        sizes = np.array([len(g) for g in groups] + [0])
        room = (sizes < u) & (n - i > 0)
        # Per group, what a hop to (or from) it surely crosses, for every sender (or receiver).
        to = np.stack([self.dense[:, g].min(axis=1) if g else np.full(self.dense.shape[::2], math.inf)
                       for g in groups] + [np.full(self.dense.shape[::2], math.inf)])
        frm = np.stack([self.dense[g].min(axis=0) if g else np.full(self.dense.shape[::2], math.inf)
                        for g in groups] + [np.full(self.dense.shape[::2], math.inf)])
        to[room] = np.minimum(to[room], self.suffix_out[:, i])
        frm[room] = np.minimum(frm[room], self.suffix_in[:, i])
        to, frm = np.where(np.isinf(to), 0.0, to), np.where(np.isinf(frm), 0.0, frm)
        sent = np.einsum("ax,bxl->abl", member, to)
        received = np.einsum("by,ayl->abl", member, frm)
        load = np.maximum(sent, received)
        held = member @ units.members.T
        reach = held + np.minimum(units.free[:, i][None, :], np.where(room, u - sizes, 0)[:, None])
        k_out = np.maximum(held[:, None, :] - reach[None, :, :], 0)
        k_in = np.maximum(held[None, :, :] - reach[:, None, :], 0)
        return load, k_out, k_in

    def gradient_excess(self, groups: list[list[int]]) -> float:
        """Seconds the gradient term of any order with these groups (members placed so far) takes beyond its bound.

        A unit splitting ``s`` groups is left ``ceil(s / 2)`` times by the gradient ring (each group's stretch
        crosses the cut once at least, and the ring leaves as often as it enters); the bus runs no faster
        than those flows can all cross.
        """
        if not groups or self.sm.world < 2:
            return 0.0
        u = self.units
        member = np.zeros((len(groups), self.dense.shape[0]))
        for a, g in enumerate(groups):
            member[a, g] = 1
        held = member @ u.members.T
        split = ((held > 0) & (held < member.sum(axis=1)[:, None])).sum(axis=0)
        exits = np.minimum(np.ceil(split / 2), u.rate_out.shape[1] - 1).astype(int)
        busy = exits > 0
        if not busy.any():
            return 0.0
        rows = self._unit_idx[busy]
        bus = float(min(u.rate_out[rows, exits[busy]].min(), u.rate_in[rows, exits[busy]].min()))
        return max(0.0, self.sm.gradients(bus) - self.gradient_base)

    # -------------------------------------------------------------- a complete partition
    def leaf(self, groups: list[list[int]], a2a: float, best: float) -> float:
        """Least attention time (plus gradient excess) of any order with Ulysses groups ``groups`` (pool indices)
        and all-to-all ``a2a``.

        Returns no less than ``best`` when no cover beats it.
        """
        excess = self.gradient_excess(groups)
        best -= excess
        m, length = len(groups), self.sm.ring
        load, k_out, k_in = self.edges(groups, self.dense.shape[0])
        state = {"best": best, "steps": 0}
        used = [False] * m

        def cost(acc: tuple[np.ndarray, np.ndarray, np.ndarray]) -> float:
            return float(self.prices(acc[0][None], acc[1][None], acc[2][None], a2a)[0])

        def plus(acc, a: int, b: int):
            return acc[0] + load[a, b], acc[1] + k_out[a, b], acc[2] + k_in[a, b]

        def extend(acc, first: int, last: int, size: int) -> float:
            """Least cost of the covers completing this partial one (its own bound when the budget is spent)."""
            own = cost(acc)
            if own >= state["best"]:
                return own
            state["steps"] += 1
            if state["steps"] > COVER_NODES:
                return own
            if size == length:  # close the cycle, then start the next at the first free group
                acc = plus(acc, last, first)
                nxt = next((k for k in range(m) if not used[k]), None)
                if nxt is None:
                    value = cost(acc)
                    state["best"] = min(state["best"], value)
                    return value
                used[nxt] = True
                out = extend(acc, nxt, nxt, 1)
                used[nxt] = False
                return out
            out = math.inf
            free = [k for k in range(m) if not used[k]]
            ahead = self.prices(acc[0] + load[last, free], acc[1] + k_out[last, free], acc[2] + k_in[last, free], a2a)
            for _, k in sorted(zip(ahead, free)):
                used[k] = True
                out = min(out, extend(plus(acc, last, k), first, k, size + 1))
                used[k] = False
            return out

        used[0] = True
        zero = np.zeros(load.shape[2]), np.zeros(k_out.shape[2]), np.zeros(k_in.shape[2])
        result = extend(zero, 0, 0, 1)
        self.nodes += state["steps"]
        return result + excess

    # -------------------------------------------------------------- a partial partition
    def partial(self, groups: list[list[int]], first_free: int, fresh: bool, a2a: float) -> float:
        """Least attention time (plus gradient excess) of any completion: each group with members needs an edge
        out and one in, and a group split by a cut stays split.

        ``groups`` are the groups with members (pool indices below ``first_free``); GPUs from
        ``first_free`` on are free, and (``fresh``) may form groups of their own.
        """
        m = len(groups)
        zero = np.zeros((1, len(self.bw))), np.zeros((1, len(self._unit_idx))), np.zeros((1, len(self._unit_idx)))
        best = float(self.prices(*zero, a2a)[0])
        if not groups:
            return best
        excess = self.gradient_excess(groups)
        load, k_out, k_in = self.edges(groups, first_free)
        size = m + 1
        costs = self.prices(load.reshape(size * size, -1), k_out.reshape(size * size, -1),
                            k_in.reshape(size * size, -1), a2a).reshape(size, size)
        np.fill_diagonal(costs, math.inf)
        if not (fresh and self.dense.shape[0] - first_free >= self.sm.ulysses):
            costs[m, :] = costs[:, m] = math.inf
        # Each group with members sends to one other group and receives from one.
        return max(best, float(costs[:m].min(axis=1).max()), float(costs[:, :m].min(axis=0).max())) + excess
