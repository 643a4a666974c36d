"""Rings that visit a unit in several pieces leave it once per piece: a bound on the slowest hop from exits.

Argument (2) of ``topology.planning.bounds.rates.ring_bandwidth_bound`` counts one exit per ring that touches a
unit (a host, or the hosts under a switch). A ring may need more. Take the routes between the unit's GPUs that
run at ``t`` GB/s or more alone; they split the unit's GPUs into pieces (connected, either way). Consecutive
ranks of a ring whose hops all reach ``t`` lie in one piece, so a ring that crosses the unit's border visits the
unit in runs, one piece each, and every run ends with a hop out of the unit: a flow over the unit's links out,
which carry at most ``sum(bw) / t`` flows at ``t``. A host of two PCIe halves joined by a socket link slower than
``t``, under a leaf whose one uplink carries one flow at ``t``, thus gives a ring one of its halves, not both.

Per unit, bottom-up (GPUs, hosts, the hosts under each switch), the most GPUs rings at ``t`` can use there: a
piece holds whole rings (a multiple of the ring size) and, only if a run of a crossing ring ends there, more, up
to what its members' own units allow; the unit's exits allow that many runs. At the top the rings that fit are
whole rings inside the pieces. The answer is the largest ``t`` at which the count reaches the rings asked for;
the count only changes where ``t`` passes a route's rate or a unit's ``sum(bw) / j``, so the answer is one of
those values. Needs every route's rate (``rates.pair_matrix``): clusters of at most ``rates.PAIR_GPUS`` GPUs.

Counted by GPUs, runs from different units add up freely. Counted as runs (``_rings_of_runs``), a run holds at
most ``size - 1`` GPUs, a ring closed inside a unit from its parts' runs takes two of them or more, and every run
a unit sends on takes one of its exits: two hosts under one single-exit leaf, each sending a run of two into rings
of three, close one ring between them and send nothing on. A host's exits are its maximum flow out
(``rates.host_exit_flow``): cards behind slower PCIe links count at those links' rate. Both counts must reach the
rings asked for.
"""

from __future__ import annotations

import math

import numpy as np
from scipy.sparse import csr_matrix
from scipy.sparse.csgraph import connected_components

from topology.network.model import Topology
from topology.planning.bounds.rates import pair_matrix, unit_levels

_EPS = 1e-12


def piece_exit_bound(topo: Topology, rings: int, size: int, across: int | None = None) -> float:
    """GB/s no placement's slowest hop exceeds when ``rings`` rings of ``size`` GPUs each run hops that fast
    (``inf``: no claim, on large clusters or a switch tree this argument cannot read).

    With ``across``, a level of ``rates.unit_levels`` (0: hosts, 1: the hosts under each leaf, ...), GB/s no
    placement's slowest hop *between two units of that level* exceeds, whatever its hops inside them run at: each
    unit is then one piece, and only the routes between units must reach ``t``. That hop pays a route's latency
    between two units, longer than one inside a unit (``topology.planning.bounds.hop_latency``)."""
    found = pair_matrix(topo)
    if found is None or size < 2 or rings < 1:
        return math.inf
    cache = topo.__dict__["_bound_cache"]
    key = ("piece exits", rings, size, across)
    if key not in cache:
        cache[key] = _bound(topo, found[0], found[1], rings, size, across)
    return cache[key]


def _bound(topo: Topology, gpus: list[str], rates: np.ndarray, rings: int, size: int, across: int | None) -> float:
    tree = _unit_tree(topo, gpus)
    if tree is None:
        return math.inf
    fast = np.maximum(rates, rates.T)  # pieces join either way
    if across is not None:  # hops inside a unit of that level may run at any rate: each unit is one piece
        levels = unit_levels(topo)
        if across >= len(levels):
            return math.inf
        index = {g: i for i, g in enumerate(gpus)}
        for hosts, _, _ in levels[across]:
            own = [index[g] for h in hosts for g in topo.gpus(h)]
            fast[np.ix_(own, own)] = math.inf
        below = sum(map(len, levels[:across]))  # the tree lists units level by level: these lie inside the free ones
        tree = [(own, children, math.inf if k < below else cap) for k, (own, children, cap) in enumerate(tree)]
    np.fill_diagonal(fast, 0.0)
    values = set(np.unique(fast[(fast > 0) & np.isfinite(fast)]).tolist())
    for members, _, cap in tree:
        values.update(cap / j for j in range(1, len(members) + 1) if 0 < cap < math.inf)
    values = sorted(values)

    def fits(t: float) -> bool:
        linked = fast >= t * (1 - _EPS)
        pieces = [connected_components(csr_matrix(linked[np.ix_(own, own)]), directed=False) for own, _, _ in tree]
        return _rings_at(tree, pieces, t, size) >= rings and _rings_of_runs(tree, pieces, t, size) >= rings

    if not values:
        return math.inf
    if fits(values[-1]):  # no two GPUs join above the fastest route: no ring runs faster
        return values[-1] if across is None else math.inf  # (rings may all stay inside units: none between them)
    lo, hi = -1, len(values) - 1  # values[lo] holds the rings (lo = -1: none known to), values[hi] does not
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(values[mid]) else (lo, mid)
    return values[lo] if lo >= 0 else 0.0


def _unit_tree(topo: Topology, gpus: list[str]) -> list[tuple[np.ndarray, list[int], float]] | None:
    """Every unit bottom-up as (its GPUs' indices into ``gpus``, its children's positions in this list, GB/s of its
    links out), hosts first, then each switch level; the last entry is the whole cluster (no links out). None where
    the units of two levels do not nest."""
    index = {g: i for i, g in enumerate(gpus)}
    tree: list[tuple[np.ndarray, list[int], float]] = []
    below: list[int] = []  # positions of the level below
    for units in unit_levels(topo):
        level = []
        for hosts, _, cap in units:
            own = np.array(sorted(index[g] for h in hosts for g in topo.gpus(h)), dtype=int)
            children = [c for c in below if np.isin(tree[c][0], own).all()]
            if below and sum(len(tree[c][0]) for c in children) != len(own):
                return None
            tree.append((own, children, float(cap)))
            level.append(len(tree) - 1)
        below = level
    everyone = np.arange(len(gpus))
    if sum(len(tree[c][0]) for c in below) != len(everyone):
        return None
    tree.append((everyone, below, 0.0))
    return tree


def _rings_at(tree: list[tuple[np.ndarray, list[int], float]], pieces: list[tuple[int, np.ndarray]], t: float,
              size: int) -> int:
    """Rings of ``size`` whose hops all reach ``t`` that the units allow (``pieces``: per unit, its count of pieces
    joined by routes at ``t`` or more and each of its GPUs' piece)."""
    most: list[float] = []  # per unit, the most of its GPUs such rings use
    for k, (own, children, cap) in enumerate(tree):
        n, label = pieces[k]
        if not children:  # a host: each of its GPUs once
            cover = np.bincount(label, minlength=n).astype(float)
        else:  # each unit below gives a piece no more than its own GPUs there, nor than it gives in all
            cover = np.zeros(n)
            where = {int(g): i for i, g in enumerate(own)}
            for c in children:
                counts = np.bincount(label[[where[int(g)] for g in tree[c][0]]], minlength=n).astype(float)
                cover += np.minimum(counts, most[c])
        whole = size * np.floor(cover / size + _EPS)
        if k == len(tree) - 1:
            return int(whole.sum() // size)
        runs = _exits(cap, t, own)
        extra = np.sort(cover - whole)[::-1][:runs].sum() if runs > 0 else 0.0
        most.append(min(float(len(own)), float(whole.sum() + extra)))
    return 0


# ------------------------------------------------------------------ runs, counted
MAX_OPTIONS = 256
"""Options a unit keeps in ``_rings_of_runs``; a unit with more makes it claim nothing."""

Option = tuple[int, int, int, int]
"""(whole rings inside the unit, runs it sends out, GPUs in those runs, GPUs in its longest run)."""


def _exits(cap: float, t: float, own: np.ndarray) -> int:
    """Flows at ``t`` a unit's links out carry (one per run through it; any number out of a unit whose hops out are
    free)."""
    return math.floor(cap / t * (1 + _EPS)) if 0 < t and cap < math.inf else len(own)


def _rings_of_runs(tree: list[tuple[np.ndarray, list[int], float]], pieces: list[tuple[int, np.ndarray]], t: float,
                   size: int) -> float:
    """Rings of ``size`` at ``t`` the units allow, counting runs, not GPUs (``inf``: no claim).

    ``_rings_at`` lets the GPUs of runs from different units add up freely. But a run holds at most
    ``size - 1`` GPUs (else it would be a ring), a ring closed inside a unit from runs of its parts takes at least
    two of them (and as many as its longest run needs to reach ``size``), and each run the unit sends on is one
    of its exits. In rings of 3, a leaf with one exit over two hosts whose single exits each send a run of two
    closes one ring of them, not one and a third, and sends nothing on. Per unit, bottom-up, the options it
    leaves its parent: whole rings inside, and the count, GPUs and longest of the runs it sends out. Each count
    here is no smaller than a placement's, so the options bound what placements do.
    """
    options: list[list[Option]] = []
    for k, (own, children, cap) in enumerate(tree):
        exits = _exits(cap, t, own)
        found: list[Option] = [(0, 0, 0, 0)]
        if not children:  # a host: whole rings inside one piece, every other GPU a run of its own at most
            n, label = pieces[k]
            for c in np.bincount(label, minlength=n).tolist():
                ways = [(a, c - a * size, c - a * size, min(c - a * size, size - 1)) for a in range(c // size + 1)]
                found = _frontier([_join(x, y) for x in found for y in ways], exits, size)
                if found is None:
                    return math.inf
        else:
            for c in children:
                found = _frontier([_join(x, y) for x in found for y in options[c]], None, size)
                if found is None:
                    return math.inf
            found = _frontier([z for x in found for z in _closed(x, exits, size)], exits, size)
            if found is None:
                return math.inf
        if k == len(tree) - 1:
            return max(w for w, *_ in found)
        options.append(found)
    return math.inf


def _join(x: Option, y: Option) -> Option:
    return x[0] + y[0], x[1] + y[1], x[2] + y[2], max(x[3], y[3])


def _closed(x: Option, exits: int, size: int) -> list[Option]:
    """What a unit can make of its parts' runs ``x``: ``r`` rings closed inside it, each of at least two runs (and
    of ``size / longest`` rounded up), and of the runs left, at most ``exits`` sent out, each up to ``size - 1``."""
    whole, runs, gpus, longest = x
    if not runs:
        return [x]
    need = max(2, -(-size // longest))
    out = []
    for r in range(min(gpus // size, runs // need) + 1):
        left, spare = runs - r * need, gpus - r * size
        sent = min(exits, left) if spare else 0
        out.append((whole + r, sent, min(spare, sent * (size - 1)), min(spare, size - 1) if sent else 0))
    return out


def _frontier(options: list[Option], exits: int | None, size: int) -> list[Option] | None:
    """The options no other beats on every count, runs capped at ``exits`` (None: uncapped); None past
    ``MAX_OPTIONS``. Each count only helps a ring, so an option beaten on all four is never needed."""
    if exits is not None:
        options = [(w, min(n, exits), min(g, min(n, exits) * (size - 1)), m if min(n, exits) else 0)
                   for w, n, g, m in options]
    kept: list[Option] = []
    for o in sorted(set(options), reverse=True):
        if not any(all(a >= b for a, b in zip(k, o)) for k in kept):
            kept.append(o)
            if len(kept) > MAX_OPTIONS:
                return None
    return kept
