"""Ring hops or split Ulysses groups: what a unit of the cluster must pay for the ranks it holds.

With Ulysses groups of ``u`` ranks and rings of ``ring`` ranks, a unit (a
host, or the hosts under a switch) that holds a whole Ulysses group holds a
rank of each of the ``u`` rings of its cp group; every one of those rings
that the unit does not hold whole leaves it, so the unit sends out that
many ring hops. A unit that keeps its ring hops few must instead split its
Ulysses groups across its border: each rank of a split group sends an
all-to-all flow out. Either way the unit's links out carry the flows, and
``k`` flows across links of ``C`` GB/s in all cannot all run faster than
``C / k`` (``topology.network.routing``: a flow's rate is its smallest share
of a link it crosses). So a fast slowest ring hop forces split groups, and
split groups slow the all-to-all.

A split group costs the gradient ring too: its ``u`` ranks are consecutive
in the rank order the gradient ring follows, so the ring crosses the unit's
border inside every group split across it, and half of those crossings
leave the unit: ``s`` split ranks send at least ``s / (2 (u - 1))``
gradient flows out.

The bound splits on the slowest ring hop's rate ``r`` (before efficiency).
In the range ``(tau, next]`` below a threshold ``next``, a unit of external
bandwidth ``C`` sends fewer than ``C / tau`` ring hops out.
``_nonsplit_table`` gives, for ``n`` ranks in a unit and at most ``e`` hops
out, the most ranks whose Ulysses group the unit holds whole (or that no
such arrangement exists); the rest are split. Which units hold how many
ranks is the placement's choice: ``_least_share`` finds, by a sum over the
tree of units, the smallest ``t`` at which every unit can keep its split
ranks ``s <= t C`` and still hold the world, so in every order some unit
splits ``t C`` ranks or more: its all-to-all flows share at most ``1 / t``
GB/s each and its gradient flows ``2 (u - 1) / t``. The range's bound is
the attention at a hop of at most ``next`` with that all-to-all, plus the
gradient term at that bus; the smallest over the ranges (the last reaching
down to 0 with no claim on the units) bounds every order.

Dropped for a lower bound: which cp group or ring a rank belongs to across
units (each unit is priced on its own), the number of cp groups, and the
ranks' positions inside rings.
"""

from __future__ import annotations

import math
from collections import Counter
from functools import lru_cache

import numpy as np

from topology.planning.bounds.rates import min_route_latency, ring_bandwidth_bound, all_units

SPLIT_GPUS = 256
"""Worlds of at most this many ranks get the argument: the table and the sums over units grow with the world."""
SPLIT_RANGES = 8
"""Thresholds of the slowest hop the bound splits on at most, the fastest first; slower ones merge into the last."""
_TOL = 1e-9


def split_step(sm, hop: float, hop_lat: float, a2a: float, bus: float) -> float:
    """A lower bound on ``sm.attention`` plus ``sm.gradients`` of every order whose slowest hop is at most ``hop``
    (GB/s, after efficiency), whose all-to-all takes at least ``a2a`` and whose gradient bus is at most ``bus``: the
    smallest over the ranges of ``_ranges``."""
    ranges = _ranges(sm) or [(math.inf, 0.0, math.inf)]
    eff = sm.rates.network_efficiency
    return min(sm.attention(min(hop, top * eff), hop_lat, max(a2a, forced)) + sm.gradients(min(bus, bus_cap))
               for top, forced, bus_cap in ranges)


def _ranges(sm) -> list[tuple[float, float, float]]:
    """(highest raw rate of the slowest hop, all-to-all seconds and highest gradient bus of every order in the range)
    of each range."""
    if sm.ulysses < 2 or sm.ring < 2 or sm.world > SPLIT_GPUS:
        return []
    cache = sm.topo.__dict__.setdefault("_bound_cache", {})
    key = ("split", sm.dp, sm.ring, sm.ulysses, sm.a2a_per_peer, sm.rates)
    if key not in cache:
        cache[key] = _compute_ranges(sm)
    return cache[key]


def _compute_ranges(sm) -> list[tuple[float, float, float]]:
    topo, world = sm.topo, sm.world
    units = _unit_tree(topo)
    if units is None:
        return []
    top = ring_bandwidth_bound(topo, sm.dp * sm.ulysses, sm.ring)  # no hop runs faster
    caps = {cap for _, cap, _ in units}
    # A unit's figure over 1 .. 8u hops out; the fastest at or below ``top`` split, slower ones merge into the last.
    thresholds = sorted({c / k for c in caps if c > 0 for k in range(1, sm.ulysses * 8 + 1)
                         if c / k <= top * (1 + _TOL)},
                        reverse=True)[:SPLIT_RANGES]
    table = _nonsplit_table(sm.ring, sm.ulysses, world)
    lat = min_route_latency(topo)
    inter = sm.rates.inter_host_gbps or math.inf
    eff = sm.rates.network_efficiency
    ranges, above = [], top
    for tau in thresholds:
        if above > tau * (1 + _TOL):  # the range (tau, above]; empty when tau is the top itself
            t = _least_share(units, table, world, tau)
            if t is None:  # no order has its slowest hop in this range
                ranges.append((above, math.inf, 0.0))
            elif t == 0:  # no unit need split a group
                ranges.append((above, 0.0, math.inf))
            else:
                forced = 2 * (sm.a2a_per_peer / (min(eff / t, inter) * 1e9) + lat * 1e-6)
                ranges.append((above, forced, 2 * (sm.ulysses - 1) / t))
        above = tau
    ranges.append((above, 0.0, math.inf))  # every slower hop: no claim on the units
    return ranges


def _unit_tree(topo) -> list[tuple[int, float, int]] | None:
    """The units as a tree, children before parents: (GPUs, GB/s out, parent's index or -1); cached on the topology.

    Units with the same hosts are one, at the smaller figure (their flows out cross both cuts). ``None`` where the
    units do not nest (a host under two switches of one level).
    """
    cache = topo.__dict__.setdefault("_bound_cache", {})
    if "unit_tree" not in cache:
        cache["unit_tree"] = _build_unit_tree(topo)
    return cache["unit_tree"]


def _build_unit_tree(topo) -> list[tuple[int, float, int]] | None:
    merged: dict[frozenset[str], tuple[int, float]] = {}
    for members, n_gpus, cap in all_units(topo):
        key = frozenset(members)
        merged[key] = (n_gpus, min(cap, merged.get(key, (n_gpus, math.inf))[1]))
    order = sorted(merged, key=len)
    around: dict[str, list[int]] = {}  # per host, the units holding it, smallest first
    for i, a in enumerate(order):
        for h in a:
            around.setdefault(h, []).append(i)
    parent, covered = [], [0] * len(order)
    for i, a in enumerate(order):
        chain = around[next(iter(a))]
        j = chain[chain.index(i) + 1] if chain[-1] != i else -1
        if j >= 0:
            if not a <= order[j]:
                return None
            covered[j] += len(a)
        parent.append(j)
    if any(covered[j] != len(order[j]) for j in range(len(order)) if covered[j]):
        return None  # children overlap: the units do not nest
    return [(*merged[a], parent[i]) for i, a in enumerate(order)]


@lru_cache(maxsize=32)
def _nonsplit_table(ring: int, u: int, most: int) -> np.ndarray:
    """``table[n, e]``: the most of ``n`` ranks in a unit whose Ulysses group lies wholly in it when at most ``e``
    ring hops leave it; -1 where no arrangement of ``n`` ranks sends so few out.

    A unit's ranks come from cp groups, each one of: the whole cp group (no hop out); a whole ring alone (no hop
    out, its ranks' groups split); part of a ring (one hop out, groups split); or ``c < u`` whole rings with part of
    each of the other ``u - c``, holding ``m`` whole groups (``u - c`` hops out, ``u m`` ranks unsplit,
    ``c ring + (u - c) m`` to ``c ring + (u - c)(ring - 1)`` ranks). An exact-count knapsack over these.
    """
    cp = ring * u
    families = [(np.array([cp]), 0, np.array([cp])), (np.array([ring]), 0, np.array([0])),
                (np.arange(1, ring), 1, np.zeros(ring - 1, dtype=int))]
    for c in range(u):
        x = u - c
        ks = np.arange(c * ring + x, c * ring + x * (ring - 1) + 1)
        families.append((ks, x, u * np.minimum(ring - 1, (ks - c * ring) // x)))
    table = np.full((most + 1, most + 1), -1, dtype=np.int64)
    table[0, 0] = 0
    for n in range(1, most + 1):
        row = table[n]
        for ks, x, gain in families:
            fit = ks <= n
            if not fit.any():
                continue
            prev = table[n - ks[fit], : most + 1 - x]
            best = np.where(prev >= 0, prev + gain[fit, None], -1).max(axis=0)
            row[x:] = np.maximum(row[x:], best)
    return np.maximum.accumulate(table, axis=1)


def _least_share(units: list[tuple[int, float, int]], table: np.ndarray, world: int, tau: float) -> float | None:
    """The smallest ``t`` such that ``world`` ranks fit in the units with every unit of ``n`` ranks splitting at most
    ``t x`` its GB/s out, when each sends only the ring hops its links out carry faster than ``tau``; ``None`` if
    none fits."""
    most = table.shape[0] - 1
    rows: dict[tuple[int, float], np.ndarray] = {}  # per kind of unit, the ranks it must split to hold n (inf: never)
    for n_gpus, cap, _ in units:
        if (n_gpus, cap) not in rows:
            e = min(most, max(0, math.ceil(cap / tau * (1 - _TOL)) - 1))  # hops out at a rate above tau
            full = table[: min(n_gpus, world) + 1, e]
            rows[n_gpus, cap] = np.where(full >= 0, np.arange(len(full)) - full, np.inf)
    candidates = np.unique(np.concatenate([[0.0], *(row[np.isfinite(row)] / cap for (_, cap), row in rows.items()
                                                     if cap > 0)]))

    def fits(t: float) -> bool:
        allowed = {kind: sum(1 << int(n) for n in np.flatnonzero(row <= t * kind[1] * (1 + _TOL) + _TOL))
                   for kind, row in rows.items()}
        children: list[list[int]] = [[] for _ in units]  # the counts each child can hold, as bit sets
        top = []
        for i, (n_gpus, cap, parent) in enumerate(units):
            held = allowed[n_gpus, cap]
            if children[i]:
                held &= _sum_all(children[i], world)
            (children[parent] if parent >= 0 else top).append(held)
        return bool(_sum_all(top, world) >> world & 1)

    lo, hi = -1, len(candidates) - 1  # candidates hold 0 at least
    if not fits(candidates[hi]):
        return None
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if fits(candidates[mid]) else (mid, hi)
    return float(candidates[hi])


def _sumset(a: int, b: int, most: int) -> int:
    """The counts ``x + y`` (``x`` in ``a``, ``y`` in ``b``, as bit sets) up to ``most``."""
    out, k = 0, 0
    while b:
        if b & 1:
            out |= a << k
        b >>= 1
        k += 1
    return out & ((1 << (most + 1)) - 1)


def _sum_all(sets: list[int], most: int) -> int:
    """The counts one member of each of ``sets`` can add up to, up to ``most``: alike sets by doubling."""
    out = 1
    for held, k in Counter(sets).items():
        power = held
        while k:
            if k & 1:
                out = _sumset(out, power, most)
            k >>= 1
            if k:
                power = _sumset(power, power, most)
    return out
