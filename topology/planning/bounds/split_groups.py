"""Ring hops, gradient flows or split Ulysses groups: what a unit of the cluster must pay for the ranks it holds.

With Ulysses groups of ``u`` ranks and rings of ``ring`` ranks, a unit (a
socket or a PCIe switch with its GPUs, a host, or the hosts under a
switch) that holds a whole Ulysses group holds a
rank of each of the ``u`` rings of its cp group; every one of those rings
that the unit does not hold whole leaves it, so the unit sends out that
many ring hops. A unit that keeps its ring hops few must instead split its
Ulysses groups across its border: a group of which it holds ``k`` ranks
sends ``k (u - k)`` all-to-all flows out. And whichever ranks it holds,
the gradient ring (rank order, cyclically) leaves it once per run of them:
ranks a ring apart (``u`` apart in rank order) are separate runs unless the
unit holds the ranks between them too, with their rings. Every kind of
flow leaving over links of ``C`` GB/s in all is ``k`` flows that cannot all
run faster than ``C / k`` (``topology.network.routing``: a flow's rate is its
smallest share of a link it crosses). A host's links out are not all open
to each rank: one holding ``n`` ranks holds at most ``min(n, u)`` of a
group, so each rank sends ``u - min(n, u)`` all-to-all flows or more to
other hosts, all where its own GPU's flows leave (its NIC); a host holding
one rank sends its ring hop and gradient flow there too.

The bound splits on the slowest ring hop's rate and on the gradient bus
(before efficiency), each into ranges between the units' figures ``C / k``.
In a cell of ranges ``(tau, next] x (beta, top]`` a unit of ``C`` GB/s out
sends fewer than ``C / tau`` ring hops and fewer than ``C / beta``
gradient flows out. ``_unit_table`` gives, for a host holding ``n`` ranks
of ``p`` cp groups with at most ``e`` hops and ``g`` gradient flows out,
the fewest all-to-all flows it sends out: exact, by a dynamic programme
over rank order, where that is cheap (``_rank_table``), for hosts and the
units inside them; the units above hosts, and all units where the
programme is too large, get a relaxation that counts split ranks, not
which groups they split (``_family_table``). Which units hold how
many ranks is the placement's choice: ``_least_share`` finds, by a sum
over the tree of units, the smallest ``t`` at which every unit can keep
its all-to-all flows out at most ``t C`` and still hold the world (with
every cp group wider than a host in parts on several hosts), so in every
order of the cell some unit sends ``t C`` or more: they share at most
``1 / t`` GB/s each. The cell's bound is the attention at a hop of at most ``next`` with
that all-to-all, plus the gradient term at a bus of at most ``top``; the
smallest over the cells (the last ranges reaching down to 0 with no claim)
bounds every order.

Where the bus is fast enough that every host (or every leaf, pod) holds
one run of the rank order (and the units under one whose links out are
too slow for the bus hold none), the runs tile it, and a cell also needs a
tiling whose runs keep within the units' limits
(``topology.planning.bounds.run_tiling``): where none exists the cell is
empty, and its all-to-all is at least what the best tiling leaves. Without
Ulysses groups the hosts' tables price no all-to-all, but still say how
many ranks a host can hold with so few ring hops and gradient flows out
(a host on a slow card holds whole rings or none), so a cell the hosts
cannot fill is empty too; without rings, the cells split on the gradient
bus alone. A cell's forced all-to-all transfer
pays the latency of a route that can run that slow
(``topology.planning.bounds.hop_latency``).

Dropped for a lower bound: that the units' sets of ranks are disjoint
(each unit is priced on its own, save in the tiling), and the ranks'
positions inside rings.
"""

from __future__ import annotations

import math
from collections import Counter
from functools import lru_cache

import numpy as np

from topology.network.routing import NVLINK_KIND
from topology.planning.bounds.hop_latency import a2a_latency, hop_latency
from topology.planning.bounds.rates import all_units, host_units, ring_bandwidth_bound
from topology.planning.bounds.run_tiling import RunTiling

SPLIT_GPUS = 256
"""Worlds of at most this many ranks get the argument: the table and the sums over units grow with the world."""
INSIDE_GPUS, INSIDE_BUILDS = 64, 64
"""Worlds of at most this many ranks on clusters of at most this many kinds of host (``Topology.host_build_key``)
get units inside hosts (sockets, PCIe switches): the sums over units grow with the world, and finding them reads
one host of each kind."""
PARTS_GPUS = 64
"""Worlds of at most this many ranks count the parts of cp groups hosts hold (``_least_share``)."""
SPLIT_RANGES = 8
"""Thresholds each kind of unit brings to split the slowest hop (and the bus) on at most, its fastest first; slower
ones merge into the last range."""
_TOL = 1e-9


def split_step(sm, hop: float, a2a: float, bus: float) -> float:
    """A lower bound on ``sm.attention`` plus ``sm.gradients`` of every order whose slowest hop is at most ``hop``
    (GB/s, after efficiency), whose all-to-all takes at least ``a2a`` and whose gradient bus is at most ``bus``: the
    smallest over the cells of ``_ranges``, each cell's hop at the shortest latency a hop that slow has, forced
    crossings counted (``topology.planning.bounds.hop_latency``)."""
    ranges = _ranges(sm) or [(math.inf, 0.0, math.inf)]
    eff = sm.rates.network_efficiency
    slowest = hop_latency(sm) if sm.ring > 1 else None

    def attention(rate: float, a2a: float) -> float:
        if slowest is None:
            return sm.attention(rate, 0.0, a2a)
        return slowest.least(lambda r, lat: sm.attention(r, lat, a2a), rate)

    # The attention term reads a cell's hop and all-to-all, the gradient term its bus: each pair of the first is
    # priced once, with the fastest bus any of its cells allows.
    fastest_bus: dict[tuple[float, float], float] = {}
    for top, forced, bus_cap in ranges:
        key = (min(hop, top * eff), max(a2a, forced))
        fastest_bus[key] = max(fastest_bus.get(key, 0.0), min(bus, bus_cap))
    return min(attention(rate, seconds) + sm.gradients(cap) for (rate, seconds), cap in fastest_bus.items())


def _ranges(sm) -> list[tuple[float, float, float]]:
    """(highest raw rate of the slowest hop, all-to-all seconds and highest raw gradient bus of every order in the
    cell) of each cell an order can be in."""
    if (sm.ring < 2 and sm.ulysses < 2) or sm.world > SPLIT_GPUS:
        return []
    cache = sm.topo.__dict__.setdefault("_bound_cache", {})
    key = ("split", sm.dp, sm.ring, sm.ulysses, sm.a2a_per_peer, sm.rates)
    if key not in cache:
        cache[key] = _compute_ranges(sm)
    return cache[key]


def _compute_ranges(sm) -> list[tuple[float, float, float]]:
    topo, world = sm.topo, sm.world
    inside = world <= INSIDE_GPUS and sm.ulysses > 1  # rings alone: no all-to-all
    units, unit_hosts = _unit_tree_hosts(topo, sm.flows, inside)
    if units is None:
        return []
    caps = {cap for _, cap, _, _ in units if cap > 0}
    hop_ranges = (_rate_ranges(caps, ring_bandwidth_bound(topo, sm.dp * sm.ulysses, sm.ring), sm.ulysses)
                  if sm.ring > 1 else [(math.inf, 0.0)])
    bus_ranges = _rate_ranges(caps, ring_bandwidth_bound(topo, 1, world), sm.ulysses)
    widest = max(n for n, _, _, kind in units if kind == "host")
    # Parts are no claim where a host may hold each cp group whole, or where their sums grow too long.
    sets = _PartSets(world, sm.dp * -(-sm.cp // widest) if widest < sm.cp and world <= PARTS_GPUS else 0)
    tables = {}
    # With rings alone a host that can hold the world holds it with no flow out: the tables would claim nothing.
    for exact in (True, False) if sm.ulysses > 1 or widest < world else ():  # hosts and units inside, then above
        kinds = [(n, cap) for n, cap, _, kind in units if (kind != "above") == exact]
        if not kinds:
            continue
        most = min(world, max(n for n, _ in kinds))
        # A unit's ranks each send one ring hop and at most one gradient flow: more than it holds are no limit.
        hops = min(most, max(_flows_out(cap, tau) or 0 for _, cap in kinds for _, tau in hop_ranges))
        runs = min(most, max(_flows_out(cap, tau) or 0 for _, cap in kinds for _, tau in bus_ranges))
        if exact:
            tables[exact] = _unit_table(sm.ring, sm.ulysses, sm.dp, most, hops, runs, sets.need > 0)
        elif sm.ulysses > 1:
            tables[exact] = _family_table(sm.ring, sm.ulysses, most, hops, runs, world)
        else:  # rings alone: no all-to-all, and no claim above hosts
            tables[exact] = np.zeros((most + 1, hops + 2, runs + 2), dtype=np.int64)
    a2a_lat = a2a_latency(sm)  # a transfer that slow runs on a route that can slow so far
    # The flows a unit sends out run between hosts, or (out of a unit inside a host) maybe inside one.
    inter = sm.rates.inter_host_gbps or math.inf
    if any(kind == "inside" for *_, kind in units):
        inter = max(inter, sm.rates.intra_host_gbps or math.inf)
    eff = sm.rates.network_efficiency
    # A level with a unit that can hold the world claims nothing: its runs are not read.
    levels = [level for level in _levels(units) if max(units[i][0] for i in level) < world]
    tiling = RunTiling(sm.dp, sm.ring, sm.ulysses, max((units[i][0] for level in levels for i in level), default=1))
    exits = _rank_exits(topo)
    shapes, top = _unit_shapes(units, [exits.get(h, ()) for h in unit_hosts])
    level_kinds = {tau: _level_kinds(units, levels, world, tau) for _, tau in bus_ranges}
    cells, shares = [], _CellShares(shapes, top, tables, sets, sm.ulysses) if tables else None
    # A cell allows each unit at least the flows out of the cells before it in its row and column (their ranges
    # are faster), so the units' share there holds here too: the search starts below it.
    above: list[float | None] = [None] * len(bus_ranges)
    for hop_top, hop_tau in hop_ranges:
        left = None
        for j, (bus_top, bus_tau) in enumerate(bus_ranges):
            known = [x for x in (above[j], left) if x is not None]
            tree = shares(hop_tau, bus_tau, min(known, default=None)) if shares else 0.0
            above[j] = left = tree
            t = tree if tree is None else _tiled_share(tiling, level_kinds[bus_tau], tree, hop_tau, bus_tau)
            if t is None:  # no order has its slowest hop and its bus in these ranges
                continue
            rate = math.inf if t == 0 else min(eff / t, inter)
            forced = 0.0 if t == 0 else 2 * (sm.a2a_per_peer / (rate * 1e9) + a2a_lat.at(rate) * 1e-6)
            cells.append((hop_top, forced, bus_top))
    return cells


def _level_kinds(units: list[tuple[int, float, int, str]], levels: list[list[int]], world: int,
                 bus_tau: float) -> list[Counter]:
    """Per level where units each hold one run (``_levels``), how many units of each kind hold ranks at a bus
    faster than ``bus_tau``: (GPUs their ranks can be on, GB/s out, their parts as (GPUs, GB/s out)). A unit whose
    links out carry no gradient flow that fast holds no rank, nor does any unit under it: those are left out of the
    levels below too."""
    empty = [False] * len(units)
    for i in range(len(units) - 1, -1, -1):  # parents come after their children: walk down from the top
        n, cap, parent, _ = units[i]
        empty[i] = (parent >= 0 and empty[parent]) or (n < world and _flows_out(cap, bus_tau) == 0)
    # A unit's run is its parts' runs one after another where each of them holds one run too; what they can hold.
    inner: list[list[tuple[int, float]]] = [[] for _ in units]
    parts_of: list[list[int]] = [[] for _ in units]
    for i, (*_, parent, kind) in enumerate(units):
        if parent >= 0 and kind != "inside":
            parts_of[parent].append(i)
    usable = [0] * len(units)  # GPUs a unit's ranks can be on: its own, or those of its parts that hold any
    for i, (n, cap, parent, kind) in enumerate(units):  # children come before their parents
        usable[i] = sum(usable[c] for c in parts_of[i] if not empty[c]) if parts_of[i] else n
        if parent >= 0 and kind != "inside" and not empty[i]:
            inner[parent].append((n, cap))
    return [Counter((usable[i], units[i][1], tuple(sorted(inner[i]))) for i in level if not empty[i])
            for level in levels]


def _tiled_share(tiling: RunTiling, level_kinds: list[Counter], t: float, hop_tau: float,
                 bus_tau: float) -> float | None:
    """``t`` raised to what the tiling leaves at each level where units each hold one run (``RunTiling``; the
    units of each level by kind, ``_level_kinds``); None where no tiling fits the cell."""
    for level in level_kinds:
        if t is None:
            break
        found: Counter = Counter()
        for (usable, cap, inner), count in level.items():
            found[usable, cap, _one_run_parts(inner, hop_tau, bus_tau)] += count
        kinds = [(n, cap, count) for (n, cap, _), count in found.items()]
        tiled = tiling.least_share(kinds, [_flows_out(cap, hop_tau) for _, cap, _ in kinds],
                                   [_flows_out(cap, bus_tau) for _, cap, _ in kinds],
                                   [parts for _, _, parts in found]) if kinds else None
        t = None if tiled is None else max(t, tiled)
    return t


def _one_run_parts(parts: tuple[tuple[int, float], ...], hop_tau: float, bus_tau: float) -> tuple | None:
    """(GPUs, how many, most hops out) of each kind of ``parts`` when every one of them holds one run at this bus
    (a part sending no gradient flow out holds none and is left out before); None otherwise."""
    if not parts or any(_flows_out(cap, bus_tau) != 1 for _, cap in parts):
        return None
    return tuple(sorted((n, count, _flows_out(cap, hop_tau)) for (n, cap), count in Counter(parts).items()))


def _levels(units: list[tuple[int, float, int, str]]) -> list[list[int]]:
    """The partitions of the GPUs into units, level by level, as unit indices: the hosts, then each unit above them
    with the hosts and units not under one at its height."""
    height = [0] * len(units)
    for i, (_, _, parent, kind) in enumerate(units):  # children come before their parents
        if kind == "inside":
            height[i] = -1
        elif parent >= 0:
            height[parent] = max(height[parent], height[i] + 1)
    return [[i for i, (*_, parent, _) in enumerate(units) if 0 <= height[i] <= level
             and (parent < 0 or height[parent] > level)] for level in range(max(height) + 1)]


def _rate_ranges(caps: set[float], top: float, u: int) -> list[tuple[float, float]]:
    """(highest, lowest) raw rate of each range a flow's rate is split into: below ``top``, at each kind of unit's
    fastest ``SPLIT_RANGES`` figures ``cap / k`` (``k`` flows out, up to ``8 u``); the last reaches down to 0."""
    thresholds = sorted({x for c in caps
                         for x in sorted((c / k for k in range(1, u * 8 + 1) if c / k <= top * (1 + _TOL)),
                                         reverse=True)[:SPLIT_RANGES]}, reverse=True)
    ranges, above = [], top
    for tau in thresholds:
        if above > tau * (1 + _TOL):  # the range (tau, above]; empty when tau is the top itself
            ranges.append((above, tau))
        above = tau
    return ranges + [(above, 0.0)]


def _flows_out(cap: float, tau: float) -> int | None:
    """The most flows out of a unit of ``cap`` GB/s that all run faster than ``tau`` (None: no limit)."""
    return None if tau <= 0 else max(0, math.ceil(cap / tau * (1 - _TOL)) - 1)


def _flows_through(caps: tuple[float, ...], tau: float) -> int | None:
    """``_flows_out`` of ``caps[0]`` GB/s in all, each flow also leaving by one of ``caps[1:]`` where given."""
    whole = _flows_out(caps[0], tau)
    if len(caps) == 1 or whole is None:
        return whole
    return min(whole, sum(_flows_out(c, tau) for c in caps[1:]))


def _unit_tree(topo, fm, inside: bool) -> list[tuple[int, float, int, str]] | None:
    """The units as a tree, children before parents: (GPUs, GB/s out, parent's index or -1, kind); cached on the
    topology. Kinds: ``inside`` a host (a socket, a PCIe switch with its GPUs; only if ``inside`` and the cluster
    has at most ``INSIDE_BUILDS`` kinds of host), a ``host``, or ``above`` hosts.

    Units with the same GPUs are one, at the smaller figure (their flows out cross both cuts). ``None`` where the
    units do not nest (a host under two switches of one level).
    """
    return _unit_tree_hosts(topo, fm, inside)[0]


def _unit_tree_hosts(topo, fm, inside: bool) -> tuple[list[tuple[int, float, int, str]] | None, list[str | None]]:
    """``_unit_tree`` and, per unit, the host it is (None for units inside or above hosts); cached on the topology."""
    cache = topo.__dict__.setdefault("_bound_cache", {})
    inside = inside and len(topo.host_builds()) <= INSIDE_BUILDS
    if ("unit_tree", inside) not in cache:
        cache["unit_tree", inside] = _build_unit_tree(topo, fm, inside)
    return cache["unit_tree", inside]


def _build_unit_tree(topo, fm, inside: bool) -> tuple[list[tuple[int, float, int, str]] | None, list[str | None]]:
    merged: dict[frozenset[str], tuple[int, float]] = {}
    for members, n_gpus, cap in all_units(topo):
        key = frozenset(g for h in members for g in topo.gpus(h))
        merged[key] = (n_gpus, min(cap, merged.get(key, (n_gpus, math.inf))[1]))
    host_sets = {frozenset(topo.gpus(h)) for h in topo.hosts if topo.gpus(h)}
    if inside:
        for key, cap in _inside_units(topo, fm, host_sets).items():
            merged[key] = (len(key), min(cap, merged.get(key, (0, math.inf))[1]))
    order = sorted(merged, key=len)
    around: dict[str, list[int]] = {}  # per GPU, the units holding it, smallest first
    for i, a in enumerate(order):
        for g in a:
            around.setdefault(g, []).append(i)
    parent, covered = [], [0] * len(order)
    for i, a in enumerate(order):
        chain = around[next(iter(a))]
        j = chain[chain.index(i) + 1] if chain[-1] != i else -1
        if j >= 0:
            if not a <= order[j]:
                return None, []
            covered[j] += len(a)
        parent.append(j)
    if any(covered[j] != len(order[j]) for j in range(len(order)) if covered[j]):
        return None, []  # children overlap: the units do not nest
    kind = ["host" if a in host_sets else "inside" if any(a < h for h in host_sets) else "above" for a in order]
    hosts = [topo.host_of(next(iter(a))) if k == "host" else None for a, k in zip(order, kind)]
    return [(*merged[a], parent[i], kind[i]) for i, a in enumerate(order)], hosts


def _inside_units(topo, fm, host_sets: set[frozenset[str]]) -> dict[frozenset[str], float]:
    """Units inside hosts that nest, with their GB/s out: each host cut in two by the most even of its cuts
    (``host_units``: a socket, a PCIe switch with its GPUs, and the rest) whose both sides are cuts too, and each
    side cut so in turn, down to pieces of two GPUs. Sides with the same GPUs take their smallest figure."""
    bw = fm.link_bandwidths()
    found: dict[frozenset[str], float] = {}
    for hosts in topo.host_builds().values():  # hosts built alike have the same units, by GPU index
        units = _host_inside_units(topo, fm, bw, hosts[0], frozenset(topo.gpus(hosts[0])))
        for host in hosts:
            if frozenset(topo.gpus(host)) in host_sets:
                found.update((frozenset(topo.gpu_id(host, i) for i in indices), cap) for indices, cap in units.items())
    return found


def _host_inside_units(topo, fm, bw: np.ndarray, host: str, whole: frozenset[str]) -> dict[frozenset[int], float]:
    """``_inside_units`` of one host, as sets of GPU indices."""
    sides: dict[frozenset[str], float] = {}
    for held, exits, _ in host_units(topo, fm, sorted(whole)):
        if len(held) >= 2:
            sides[held] = min(float(bw[exits].sum()), sides.get(held, math.inf))
    found: dict[frozenset[int], float] = {}

    def split(part: frozenset[str]) -> None:
        halves = [s for s in sides if s < part and part - s in sides]
        if not halves:
            return
        best = max(halves, key=lambda s: (min(len(s), len(part) - len(s)), sorted(s)))
        for piece in (best, part - best):
            found[frozenset(topo.graph.nodes[g]["index"] for g in piece)] = sides[piece]
            split(piece)

    split(whole)
    return found


DP_WORK = 250_000_000
"""Table cells times state pairs times steps the exact table (``_rank_table``) may cost (about 0.8 s on one core);
larger shapes get the families' relaxation."""
_FAR = 1 << 30
"""No arrangement: larger than any count of flows."""


@lru_cache(maxsize=32)
def _unit_table(ring: int, u: int, dp: int, most: int, hops: int, runs: int, parts: bool = True) -> np.ndarray:
    """``table[n, e, g, p]``: the fewest all-to-all flows a unit holding ``n`` ranks of ``p`` cp groups sends out,
    when at most ``e`` ring hops and at most ``g`` gradient flows leave it; index ``hops + 1`` (``runs + 1``) stands
    for no limit, ``p`` runs up to ``min(dp, most)``; without ``parts``, one column for any ``p``.

    Exact (``_rank_table``) where that is cheap; otherwise the families' count (``_family_table``), for any ``p``
    (with rings alone, no claim).
    """
    width = min(dp, most) + 1 if parts else 1
    work = 4 * 8 ** u * (most + 1) * (hops + 2) * (runs + 2) * width * ring * dp
    if work <= DP_WORK:
        table = _rank_table(ring, u, dp, most, hops, runs, parts)
    elif u > 1:
        table = _family_table(ring, u, most, hops, runs, ring * u * dp)[..., None].repeat(width, axis=-1)
    else:  # rings alone, too large to count: no claim
        table = np.zeros((most + 1, hops + 2, runs + 2, width), dtype=np.int32)
    return np.minimum.accumulate(np.minimum.accumulate(table, axis=1), axis=2)


def _rank_table(ring: int, u: int, dp: int, most: int, hops: int, runs: int, parts: bool = True) -> np.ndarray:
    """``_unit_table`` by dynamic programming over the world's Ulysses groups in rank order.

    Which of a group's ``u`` ranks the unit holds is a mask; the state is the previous group's mask (its ring hops
    out, and whether the gradient ring leaves between the two groups), the mask of its cp group's first group (the
    hops that close the rings come back to it), whether the unit holds a rank of the cp group so far, and whether
    it holds rank 0 (the gradient ring's closing flow comes back to it). A group of ``k`` ranks held sends
    ``k (u - k)`` all-to-all flows out. Without ``parts`` the cp groups touched are not counted.
    """
    masks = range(1 << u)
    top = (1 << u) - 1
    bit = [[m >> j & 1 for j in range(u)] for m in masks]
    held = [sum(b) for b in bit]
    a2a = [k * (u - k) for k in held]
    ends_in = [sum(b[j] and not b[j + 1] for j in range(u - 1)) for b in bit]
    leave = [[ends_in[c] + (bit[p][-1] and not bit[c][0]) for c in masks] for p in masks]  # gradient flows out
    out = [[held[p & ~c & top] for c in masks] for p in masks]  # ring hops from a group held as p to one held as c
    shape = (most + 1, hops + 2, runs + 2, min(dp, most) + 1 if parts else 1)
    # [rank 0 held, first, previous, cp group touched, n, e, g, p]
    value = np.full((2, 1 << u, 1 << u, 2, *shape), _FAR, dtype=np.int32)
    for c in masks:
        if held[c] <= most:
            value[c & 1, c, c, int(c > 0), held[c], 0, min(ends_in[c], runs + 1), 0] = a2a[c]
    for step in range(1, ring * dp):
        nxt = np.full_like(value, _FAR)
        for c in masks:
            if step % ring:  # the next group of the same cp group: ring hops from the previous group
                for p in masks:
                    for touched in (0, 1):
                        _min_into(nxt[:, :, c, int(touched or c > 0)], value[:, :, p, touched],
                                  (held[c], out[p][c], leave[p][c], 0), a2a[c])
            else:  # a new cp group: the previous one's rings close on its first group
                for first in masks:
                    for p in masks:
                        for touched in (0, 1):
                            _min_into(nxt[:, c, c, int(c > 0)], value[:, first, p, touched],
                                      (held[c], out[p][first], leave[p][c], touched * parts), a2a[c])
        value = nxt
    table = np.full(shape, _FAR, dtype=np.int32)
    for zero in (0, 1):
        for first in masks:
            for p in masks:
                for touched in (0, 1):
                    _min_into(table, value[zero, first, p, touched],
                              (0, out[p][first], int(bit[p][-1] and not zero), touched * parts), 0)
    return table


def _min_into(target: np.ndarray, src: np.ndarray, by: tuple[int, int, int, int], add: int) -> None:
    """``target = min(target, src + add)`` with ``src``'s last axes (n, e, g, p) moved up by ``by``: ``n`` and ``p``
    past the end drop out, ``e`` and ``g`` past their last finite index go to the no-limit one."""
    dn, de, dg, dparts = by
    n, parts = target.shape[-4] - dn, target.shape[-1] - dparts
    if n <= 0 or parts <= 0:
        return
    src = src[..., :n, :, :, :parts] + np.int32(add)
    target = target[..., dn:, :, :, dparts:]
    for axis, d in ((-3, de), (-2, dg)):
        if d:
            size = src.shape[axis]
            d = min(d, size - 1)
            moved = np.full_like(src, _FAR)
            _axis(moved, axis, slice(d, size - 1))[...] = _axis(src, axis, slice(0, size - 1 - d))
            _axis(moved, axis, slice(size - 1, size))[...] = _axis(src, axis, slice(size - 1 - d, size)).min(
                axis=axis, keepdims=True)
            src = moved
    np.minimum(target, src, out=target)


def _axis(a: np.ndarray, axis: int, part: slice) -> np.ndarray:
    """The view of ``a`` taking ``part`` along ``axis``."""
    index = [slice(None)] * a.ndim
    index[axis] = part
    return a[tuple(index)]


def _family_table(ring: int, u: int, most: int, hops: int, runs: int, world: int) -> np.ndarray:
    """``_unit_table`` from ``_nonsplit_table``: a unit whose whole Ulysses groups hold ``w`` of its ``n`` ranks (at
    most what the table allows for its hops out, in steps of ``u``) holds ``s = n - w`` split ranks, which send at
    least ``_split_flows(u, s)`` all-to-all flows out and at least ``s / (2 (u - 1))`` gradient flows (their groups
    are runs of the rank order the gradient ring follows: it crosses the unit's border inside each, and leaves on
    half the crossings); the fewest over every such ``w``. A unit holding some of the ``world``'s ranks but not all
    sends the gradient ring out at least once, whole groups or not."""
    whole = _nonsplit_table(ring, u, most)[:, [min(e, most) for e in range(hops + 1)] + [most]]
    n = np.arange(most + 1)[:, None]
    allowed = np.array([2 * (u - 1) * g for g in range(runs + 1)] + [math.inf])
    flows = np.array([_split_flows(u, s) for s in range(most + 1)])
    table = np.full((most + 1, hops + 2, runs + 2), _FAR, dtype=np.int64)
    for w in range(0, most + 1, u):
        split = np.broadcast_to(n - w, whole.shape)
        fits = (whole >= w)[:, :, None] & (split[:, :, None] <= allowed[None, None, :])
        table = np.where(fits, np.minimum(table, flows[np.clip(split, 0, most)][:, :, None]), table)
    table[1: min(most + 1, world), :, 0] = _FAR
    return table


def _split_flows(u: int, s: int) -> int:
    """The fewest all-to-all flows ``s`` ranks of split Ulysses groups of ``u`` send out of a unit: a group of which
    it holds ``k`` sends ``k (u - k)``, concave in ``k``, so the sum is least with the parts as unequal as they can
    be: groups of ``u - 1`` (or ``s``, if fewer) and what is left."""
    if s == 0:
        return 0
    most = min(u - 1, s)
    whole, rest = divmod(s, most)
    return whole * most * (u - most) + rest * (u - rest)


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


def _unit_shapes(units: list[tuple[int, float, int, str]],
                 exits: list[tuple[float, ...]]) -> tuple[list[tuple[int, float, str, tuple, tuple]], list[int]]:
    """The units' tree with alike subtrees (alike hosts with their sockets and switches) as one shape: (GPUs, GB/s
    out, kind, GB/s out of each exit, child shapes) per shape, children first, and the shapes of the units at the
    top. ``exits``: per unit, the GB/s out of each place its GPUs' flows leave it (``_rank_exits``; none: no
    limit)."""
    shapes: dict[tuple, int] = {}
    below: list[list[int]] = [[] for _ in units]
    top: list[int] = []
    for i, (n_gpus, cap, parent, kind) in enumerate(units):  # children come before their parents
        shape = shapes.setdefault((n_gpus, cap, kind, exits[i], tuple(sorted(below[i]))), len(shapes))
        (below[parent] if parent >= 0 else top).append(shape)
    return list(shapes), top


def _rank_exits(topo) -> dict[str, tuple[float, ...]]:
    """Per host, the GB/s out of each of its parts with links out of it (its NICs), fastest first: a flow from one of
    its GPUs to another host leaves by one of them. None where a host's GPUs reach others over NVLink. One host of
    each build (``Topology.host_build_key``: links out alike) stands for all."""
    g, found = topo.graph, {}
    for host, *alike in topo.host_builds().values():
        nvlink = any(g.nodes[v]["kind"] == NVLINK_KIND for a in topo.gpus(host) for v in g.adj[a])
        parts = set(topo.parts(host))
        out = [sum(d["bw_gbps"] for v, d in g.adj[x].items() if v not in parts) for x in parts]
        found.update((h, () if nvlink else tuple(sorted((bw for bw in out if bw > 0), reverse=True)))
                     for h in (host, *alike))
    return found


class _CellShares:
    """``_least_share`` of the cells of one cluster, each answer found once.

    A cell's answer depends only on the units' rows (the all-to-all flows each kind of unit sends to hold ``n``
    ranks, ``_unit_row``), and the ranges of neighbouring cells mostly differ at figures of units whose rows they
    leave alone: on clusters with many kinds of links most cells repeat an answer already found.
    """

    def __init__(self, shapes: list[tuple[int, float, str, tuple, tuple]], top: list[int],
                 tables: dict[bool, np.ndarray], sets: "_PartSets", u: int):
        self.shapes, self.top, self.sets, self.u = shapes, top, sets, u
        self.kinds = {(n_gpus, cap, kind, exits): tables[kind != "above"] for n_gpus, cap, kind, exits, _ in shapes}
        self._flows: dict[float, list[tuple]] = {}  # rate -> per kind of unit, the flows out it lets run faster
        self._rows: dict[tuple, tuple[np.ndarray, int]] = {}  # (kind of unit, flows out) -> (row, its id)
        self._ids: dict[tuple, int] = {}
        self._shares: dict[tuple[int, ...], float | None] = {}

    def __call__(self, hop_tau: float, bus_tau: float, known: float | None = None) -> float | None:
        rows, signature = {}, []
        for (key, table), hops, runs in zip(self.kinds.items(), self._flows_faster(hop_tau), self._flows_faster(bus_tau)):
            if (key, hops, runs) not in self._rows:
                row = _unit_row(key, table, self.sets.world, hop_tau, bus_tau, self.u)
                self._rows[key, hops, runs] = row, self._ids.setdefault((row.shape, row.tobytes()), len(self._ids))
            rows[key], row_id = self._rows[key, hops, runs]
            signature.append(row_id)
        found = tuple(signature)
        if found not in self._shares:
            self._shares[found] = _least_share(rows, self.shapes, self.top, self.sets, known)
        return self._shares[found]

    def _flows_faster(self, tau: float) -> list[tuple]:
        """Per kind of unit, the flows its links out carry faster than ``tau``: through all its exits, and through
        the first (a lone rank's)."""
        if tau not in self._flows:
            self._flows[tau] = [(_flows_through((cap, *exits), tau), exits and _flows_through(exits[:1], tau))
                                for _, cap, _, exits in self.kinds]
        return self._flows[tau]


def _unit_row(key: tuple[int, float, str, tuple], table: np.ndarray, world: int, hop_tau: float, bus_tau: float,
              u: int) -> np.ndarray:
    """A kind of unit's all-to-all flows out to hold ``n`` ranks (of ``p`` cp groups), ``inf`` where none fits: its
    table's row at the ring hops and gradient flows its links out carry faster than ``hop_tau`` (``bus_tau``).

    A host holding ``n`` ranks of Ulysses groups of ``u`` holds at most ``min(n, u)`` of any one group: each of its
    ranks sends ``u - min(n, u)`` all-to-all flows or more to other hosts, all out of the one place its GPU's
    flows leave the host (its shape's exits: one NIC of a host with several), which must carry them. Every flow
    leaves by one exit, so no more flows than the exits carry one by one run faster than a rate; and a host holding
    one rank sends every flow of it, ring hops and gradient flows too, out of one exit.
    """
    n_gpus, cap, kind, exits = key
    row = _row(table, min(n_gpus, world, table.shape[0] - 1), (cap, *exits), hop_tau, bus_tau, kind == "inside")
    if kind == "host" and exits:
        # A lone rank's flows out, counted as the share of the host's links out they take from its NIC's.
        out = exits[0]
        lone = np.array([u - min(n, u) if n else 0 for n in range(len(row))], dtype=float)
        row = np.maximum(row, (lone * cap / out)[:, None])
        if out < cap and len(row) > 1:
            row[1] = np.maximum(row[1], _row(table, 1, (out,), hop_tau, bus_tau, False)[1] * cap / out)
    return row


def _least_share(rows: dict[tuple[int, float, str, tuple], np.ndarray], shapes: list[tuple[int, float, str, tuple, tuple]],
                 top: list[int], sets: "_PartSets", known: float | None = None) -> float | None:
    """The smallest ``t`` such that the world's ranks fit in the units with every unit sending at most ``t x`` its
    GB/s out in all-to-all flows, where each kind of unit sends ``rows[kind][n, p]`` to hold ``n`` ranks of ``p``
    cp groups (``_unit_row``); ``None`` if none fits. ``known``: a share known to fit (that of a cell allowing
    fewer flows out), or None.

    Each cp group spreads over at least ``ceil(cp / G)`` hosts of at most ``G`` GPUs, so the hosts hold parts of
    cp groups ``dp ceil(cp / G)`` times or more (``sets.need``): the sum over the tree counts parts with ranks (a
    host's ranks of ``p`` cp groups cost what its table says for ``p``).
    """
    candidates = np.unique(np.concatenate([[0.0], *(row[np.isfinite(row)] / key[1] for key, row in rows.items()
                                                     if key[1] > 0)]))

    def fits(t: float) -> bool:
        allowed = {key: sets.encode(row <= t * key[1] * (1 + _TOL) + _TOL) for key, row in rows.items()}
        held: list[int] = []  # per shape, the (ranks, parts) its unit can hold, as a bit set
        for n_gpus, cap, kind, exits, children in shapes:
            held.append(allowed[n_gpus, cap, kind, exits] & sets.total([held[c] for c in children]) if children
                        else allowed[n_gpus, cap, kind, exits])
        return sets.holds_world(sets.total([held[c] for c in top]))

    lo, hi = -1, len(candidates) - 1  # candidates hold 0 at least
    if known is not None:  # a share known to fit: the least one is a candidate no larger
        hi = int(np.searchsorted(candidates, known * (1 + _TOL), side="right")) - 1
    elif not fits(candidates[hi]):
        return None
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if fits(candidates[mid]) else (mid, hi)
    return float(candidates[hi])


def _row(table: np.ndarray, most: int, caps: tuple[float, ...], hop_tau: float, bus_tau: float,
         inside: bool) -> np.ndarray:
    """``table``'s all-to-all flows (inf: none fits) for 0 to ``most`` ranks, per count of parts (one column inside
    a host: parts are counted at hosts only), when ring hops and gradient flows leave only as fast as ``hop_tau``
    and ``bus_tau`` allow: out of ``caps[0]`` GB/s in all and, where more are given, each flow out of one of
    ``caps[1:]``."""
    hops, runs = table.shape[1] - 2, table.shape[2] - 2
    e, g = _flows_through(caps, hop_tau), _flows_through(caps, bus_tau)
    full = table[: most + 1, hops + 1 if e is None else min(e, hops + 1), runs + 1 if g is None else min(g, runs + 1)]
    if inside:
        full = full.min(axis=1)
    if full.ndim == 1:
        full = full[:, None]
    return np.where(full < _FAR, full, np.inf)


class _PartSets:
    """Sets of (ranks, parts) pairs as bits ``p W + n`` of an int: ranks above the world drop out, parts from
    ``need`` on count as ``need``."""

    def __init__(self, world: int, need: int):
        self.world, self.need = world, need
        self.width = 2 * (world + 1)  # room for a sum of two counts of ranks before they are cut
        self.row = (1 << (world + 1)) - 1

    def encode(self, allowed: np.ndarray) -> int:
        """``allowed[n, p]`` as a set; a single column stands for any count of parts."""
        if allowed.shape[1] == 1:
            columns = [allowed[:, 0]] * (self.need + 1)
        else:  # parts from need on count as need
            columns = [allowed[:, p] for p in range(min(self.need, allowed.shape[1]))]
            columns += [np.zeros(len(allowed), dtype=bool)] * (self.need - len(columns))
            columns.append(allowed[:, self.need:].any(axis=1))
        bits = np.zeros((len(columns), self.width), dtype=bool)  # column p's bits from p x width on
        for p, column in enumerate(columns):
            bits[p, : len(column)] = column
        return int.from_bytes(np.packbits(bits.ravel(), bitorder="little").tobytes(), "little")

    def add(self, a: int, b: int) -> int:
        out = 0
        while b:
            low = b & -b
            out |= a << (low.bit_length() - 1)
            b ^= low
        return self._cut(out)

    def _cut(self, x: int) -> int:
        out = 0
        for p in range(2 * self.need + 1):
            out |= ((x >> (p * self.width)) & self.row) << (min(p, self.need) * self.width)
        return out

    def total(self, sets: list[int]) -> int:
        """The (ranks, parts) one member of each of ``sets`` can add up to: alike sets by doubling."""
        out = 1
        for held, k in Counter(sets).items():
            power = held
            while k:
                if k & 1:
                    out = self.add(out, power)
                k >>= 1
                if k:
                    power = self.add(power, power)
        return out

    def holds_world(self, x: int) -> bool:
        return bool(x >> (self.need * self.width + self.world) & 1)
