"""The shortest latency the slowest ring hop (or all-to-all transfer) can have, given how slow it is.

The step model waits on the ring hop with the smallest rate (the latest
of them where rates tie), and pays that hop's route latency on every ring
step. A bound that knows only that the slowest hop runs at ``r`` GB/s or
less used to charge it the shortest latency of any route, an in-host
one, although in-host routes seldom slow to ``r``: a rate that low is
often reached only across a slow cable or an oversubscribed uplink, whose
routes are longer.

A route slows to ``r`` only on a link carrying ``bw / r`` flows or more.
Every rank sends one ring hop and receives one, so a link carries at most
the sum, over the GPUs, of the largest fraction any route from that GPU
puts on it (the same over destinations), and never more than the world's
hops. A route whose every link stays above ``r`` at that load is never the
slowest hop at ``r``; the shortest latency among the others bounds the
slowest hop's. More: the slowest hop's rate is its busiest link's share,
so that link carries ``n >= bw / r`` hops, all as slow, and the step
model charges the latest of them; they leave ``n`` distinct GPUs, so the
``n``-th shortest of the GPUs' shortest routes over that link bounds it
(without caps, which tie rates off any link). Rates here are the step
model's: after ``network_efficiency`` and the in-host and host-to-host
caps.

Forced crossings: where the rings cannot all fit inside hosts (or NVLink
domains, or the hosts under one switch, at any level), some hop runs
between two of them, no faster than the fastest route between two and no
sooner than the shortest. And where one unit's GPUs are not a whole number
of rings, and the GPUs the plan leaves out are too few to make them so
(an 8-GPU host, rings of 5, every GPU used), a hop leaves that very unit
and one enters it: no faster, and no sooner, than the routes out of it
(and into it). And where the links out of hosts (or of the hosts under
a switch, at any level) cannot carry every ring's runs at a rate, whatever
the hops inside them run at (``piece_exit_bound(across=level)``), some hop
between two of them runs no faster than that, and no sooner than a route
between two of them: a socket link shared by four hops inside a host may be
as slow, but the hop the cards force is the one that pays the cable's
latency. Either that hop is the slowest (as slow as the slowest, and at
least as late: ties go to the latest), or the slowest runs at an
achievable rate below it (``RoutePatterns.below``). The smaller of the two
prices bounds the slowest hop's (``HopLatency.least``).
"""

from __future__ import annotations

import math
from fractions import Fraction
from typing import Callable

import numpy as np

from topology.network.routing import nvlink_domain
from topology.planning.bounds.piece_exits import piece_exit_bound
from topology.planning.bounds.rates import min_route_latency, unit_levels

LATENCY_GPUS = 64
"""Clusters (or pools) of at most this many GPUs get the latency floors: they read the route of every pair of GPUs."""
REPRESENTATIVE_GPUS = 96
"""Routes among at most this many GPUs are read to learn the flow fractions ECMP makes."""
_TOL = 1e-9


class RoutePatterns:
    """What the routes among the pool allow: rates strictly below a given one, and the fastest hops between units.

    A link of ``bw`` GB/s shares itself among flow fractions summing to a
    multiple of ``q``, the largest fraction dividing every route's fractions
    (1 without ECMP), so its shares are ``bw / (k q)``. Routes are read
    among two hosts of each class of alike hosts, which meet every route
    pattern (in a host, between alike hosts, across classes); with more than
    ``REPRESENTATIVE_GPUS`` GPUs there, nothing is claimed.
    """

    def __init__(self, sm, pool: list[str]):
        topo = sm.topo
        in_pool = set(pool)
        self.hosts = list(dict.fromkeys(topo.host_of(g) for g in pool))
        self.gpus = {h: [g for g in topo.gpus(h) if g in in_pool] for h in self.hosts}
        classes: dict[tuple, str] = {}
        host_class = {h: classes.setdefault(topo.host_class_key(h, self.gpus[h]), h) for h in self.hosts}
        self.host_class = host_class
        """Each host's class of alike hosts, named by its first host: alike hosts share their switches."""
        reps: dict[str, list[str]] = {}
        for h in self.hosts:
            if len(reps.setdefault(host_class[h], [])) < 2:
                reps[host_class[h]].append(h)
        gpus = [g for hosts in reps.values() for h in hosts for g in self.gpus[h]]
        self.scale: np.ndarray | None = None
        self.pairs: list[tuple[str, str, float, float]] = []
        """(host, host, rate alone, latency) of the routes between two hosts."""
        paths = {h: topo.switch_path(h) for h in self.hosts}
        self.levels: list[dict[str, object]] = [{h: h for h in self.hosts}]
        """Units, finest first: each host, the hosts of each NVLink domain, then the hosts under each switch,
        bottom-up."""
        domains = {h: nvlink_domain(topo, self.gpus[h][0]) for h in self.hosts}
        if any(d is not None for d in domains.values()):
            self.levels.append({h: h if domains[h] is None else ("nvlink", domains[h]) for h in self.hosts})
        for depth in range(max(map(len, paths.values()), default=0), 1, -1):
            self.levels.append({h: paths[h][:depth] for h in self.hosts})
        if len(gpus) > REPRESENTATIVE_GPUS:
            return
        fm, host_of = sm.flows, topo.host_of
        bw = fm.link_bandwidths()
        fracs: set[float] = set()
        for a in gpus:
            for b in gpus:
                if a == b:
                    continue
                ids, fr = fm.compiled(a, b)
                fracs.update(fr)
                if host_of(a) != host_of(b) and ids:
                    self.pairs.append((host_of(a), host_of(b), float(np.min(bw[ids] / np.asarray(fr))),
                                       fm.route_latency(a, b)))
        denominators = [Fraction(f).limit_denominator(1 << 12).denominator for f in fracs] or [1]
        self.scale = bw * math.lcm(*denominators)  # bw / (k q) = scale / k

    def across(self, unit: dict[str, object]) -> tuple[float, float] | None:
        """(fastest rate alone, shortest latency) of a route between two different units; None when unknown."""
        between = [(rate, lat) for a, b, rate, lat in self.pairs if unit[a] != unit[b]]
        if not between:
            return None
        return max(r for r, _ in between), min(lat for _, lat in between)

    def border(self, unit: dict[str, object], hosts: list[str]) -> list[tuple[float, float]]:
        """(fastest rate alone, shortest latency) of the routes leaving the unit of ``hosts``, and of those entering
        it, where known: a ring that runs across the unit's border takes one of each.

        Alike hosts share their switches, so a class lies inside one unit of every level above the host, and the
        routes out of a host are those out of its class's first host: the class's routes read stand for every
        host of the unit."""
        classes = {self.host_class[h] for h in hosts}
        out = [(r, lat) for a, b, r, lat in self.pairs if unit[a] != unit[b] and self.host_class[a] in classes]
        into = [(r, lat) for a, b, r, lat in self.pairs if unit[a] != unit[b] and self.host_class[b] in classes]
        return [(max(r for r, _ in x), min(lat for _, lat in x)) for x in (out, into) if x]

    def below(self, rate: float) -> float:
        """The largest share any link can give that is strictly below ``rate`` (``rate`` itself when unknown)."""
        if self.scale is None or math.isinf(rate) or rate <= 0:
            return rate
        k = np.floor(self.scale / rate * (1 + 1e-12)) + 1  # the smallest k with scale / k < rate
        return float((self.scale / k).max())


class HopLatency:
    """``at(rate)``: a lower bound, µs, on the latency of the slowest ring hop when it runs at ``rate`` GB/s or
    slower, among ``gpus``; ``least(price, rate)``: the least a price of the slowest hop can be, forced crossings counted.

    Built once per shape (the world caps the load a link can carry); see the module's docstring. With
    ``per_gpu`` flows out of and into each GPU instead of one (``u - 1`` all-to-all flows), ``at`` bounds the
    latency of an all-to-all transfer that slow the same way; crossings are the ring's alone.
    """

    def __init__(self, sm, gpus: list[str], per_gpu: int = 1):
        self.l_min = min_route_latency(sm.topo, gpus)
        self.floors = self.latency = np.zeros(0)
        self.route_links: np.ndarray | None = None
        self.kth_out: np.ndarray | None = None
        self._at: dict[float, float] = {}
        self._slower: dict[float, list[tuple[float, float]]] = {}
        self.efficiency = sm.rates.network_efficiency
        self.patterns = route_patterns(sm, gpus)
        self.crossings: list[tuple[float, float]] = []
        """(fastest rate alone, raw GB/s; shortest latency, µs) of the routes between two units of a level whose
        units cannot hold every ring whole: some hop takes one of those routes."""
        # Caps make rates tie at the cap, below any link's share: no achievable rate is known under them.
        capped = bool(sm.rates.intra_host_gbps or sm.rates.inter_host_gbps)
        if per_gpu == 1 and sm.ring > 1 and not capped:
            spare = len(gpus) - sm.world
            crossings = set()
            for unit in self.patterns.levels:
                members: dict[object, list[str]] = {}
                for h in self.patterns.hosts:
                    members.setdefault(unit[h], []).append(h)
                sizes = {u: sum(len(self.patterns.gpus[h]) for h in hosts) for u, hosts in members.items()}
                if sum(n // sm.ring for n in sizes.values()) < sm.dp * sm.ulysses:
                    crossing = self.patterns.across(unit)
                    if crossing is not None:
                        crossings.add(crossing)
                for u, hosts in members.items():
                    if sizes[u] % sm.ring > spare:  # no GPUs left out make the unit's rings whole
                        crossings.update(self.patterns.border(unit, hosts))
            for level, units in enumerate(unit_levels(sm.topo)):
                slowest = piece_exit_bound(sm.topo, sm.dp * sm.ulysses, sm.ring, across=level)
                unit_of = {h: k for k, (hosts, _, _) in enumerate(units) for h in hosts}
                if math.isinf(slowest) or any(h not in unit_of for h in self.patterns.hosts):
                    continue  # no claim (most levels, and every cluster the pair routes are not read on): no pair scan
                between = self.patterns.across(unit_of)
                if between is not None and slowest < between[0]:  # the exits force a slower hop between units
                    crossings.add((slowest, between[1]))
            self.crossings = sorted(crossings)
        if len(gpus) > LATENCY_GPUS or per_gpu < 1 or (per_gpu == 1 and sm.ring < 2):
            return
        fm, host_of, rates = sm.flows, sm.topo.host_of, sm.rates
        bw = fm.link_bandwidths()
        index = {g: k for k, g in enumerate(gpus)}
        out_most = np.zeros((len(gpus), len(bw)))
        in_most = np.zeros((len(gpus), len(bw)))
        out_soonest = np.full((len(gpus), len(bw)), math.inf)  # per GPU and link, the shortest route out over it
        in_soonest = np.full((len(gpus), len(bw)), math.inf)
        routes = []
        for a in gpus:
            for b in gpus:
                if a == b:
                    continue
                ids, fracs = fm.compiled(a, b)
                ids, fracs = np.asarray(ids, dtype=np.int64), np.asarray(fracs)
                lat = fm.route_latency(a, b)
                np.maximum.at(out_most[index[a]], ids, fracs)
                np.maximum.at(in_most[index[b]], ids, fracs)
                np.minimum.at(out_soonest[index[a]], ids, lat)
                np.minimum.at(in_soonest[index[b]], ids, lat)
                routes.append((a, b, ids, lat))
        most = per_gpu * np.minimum(np.minimum(out_most.sum(axis=0), in_most.sum(axis=0)), sm.world)
        if not capped:
            self.per_gpu, self.link_bw, self.link_most = per_gpu, bw, most
            # [k - 1, link]: the k-th shortest of the GPUs' shortest routes out of (into) them over the link.
            self.kth_out, self.kth_in = np.sort(out_soonest, axis=0), np.sort(in_soonest, axis=0)
        with np.errstate(divide="ignore"):
            slowest = np.where(most > 0, bw / most, math.inf)
        floors, latency = [], []
        width = max((len(ids) for _, _, ids, _ in routes), default=1)
        self.route_links = np.full((len(routes), max(width, 1)), len(bw), dtype=np.int64)
        """Each route's links, padded with one past the last link."""
        for k, (a, b, ids, lat) in enumerate(routes):
            floor = float(slowest[ids].min()) * rates.network_efficiency if len(ids) else math.inf
            cap = rates.intra_host_gbps if host_of(a) == host_of(b) else rates.inter_host_gbps
            floors.append(min(floor, cap) if cap else floor)
            latency.append(lat)
            self.route_links[k, :len(ids)] = ids
        self.floors, self.latency = np.array(floors), np.array(latency)

    def at(self, rate: float) -> float:
        """A lower bound on the latency of the slowest hop (transfer) when it runs at ``rate`` or slower: the shortest
        latency of a route that can slow that far, or more where its link's flows tie (``l_min`` when nothing is
        known)."""
        if not len(self.floors) or math.isinf(rate):
            return self.l_min
        if rate not in self._at:  # rates come from a small set: the search asks the same ones again and again
            if self.kth_out is not None:
                self._at[rate] = self._tied(rate)
            else:
                can = self.floors <= rate * (1 + _TOL)
                self._at[rate] = max(self.l_min, float(self.latency[can].min())) if can.any() else self.l_min
        return self._at[rate]

    def _tied(self, rate: float) -> float:
        """``at`` from the link the slowest flow's rate comes from: it carries ``n >= bw / rate`` flows, every one
        as slow (a flow's rate is the smallest share of its links, and this one's is the least of all), so the
        step model's latest tie is at least as late as each. They leave at least ``n / per_gpu`` distinct GPUs
        (and reach as many), each no sooner than its shortest route over the link: the ``n / per_gpu``-th
        shortest of those bounds the tie. The least over the links that can carry that load bounds the slowest."""
        need = self.link_bw * self.efficiency / rate * (1 - _TOL)
        can = self.link_most >= need
        if not can.any():
            return self.l_min
        k = np.ceil(np.ceil(need[can]) / self.per_gpu).astype(np.int64)
        gpus = self.kth_out.shape[0]
        rows = np.minimum(k, gpus) - 1
        cols = np.flatnonzero(can)
        tied = np.maximum(self.kth_out[rows, cols], self.kth_in[rows, cols])
        tied[k > gpus] = math.inf
        return max(self.l_min, float(tied.min())) if np.isfinite(tied).any() else self.l_min

    def least(self, price: Callable[[float, float], float], rate: float) -> float:
        """A lower bound on ``price(slowest hop's rate, its latency)`` over every order whose slowest hop runs at
        ``rate`` GB/s (after efficiency) or slower; ``price`` falls as the rate rises and grows with the latency.

        Each forced crossing gives one: its hop is the slowest (no faster than the route there, at least as late),
        or the slowest runs at an achievable rate below that route's (``slower``); the largest of them counts.
        """
        best = price(rate, self.at(rate))
        for fastest, lat in self.crossings:
            fast = min(rate, fastest * self.efficiency)
            below = min((price(min(rate, r), lt) for r, lt in self.slower(fastest)), default=math.inf)
            best = max(best, min(price(fast, max(lat, self.at(fast))), below))
        return best

    def slower(self, fastest: float) -> list[tuple[float, float]]:
        """(rate after efficiency, latency) pairs such that a hop running strictly slower than ``fastest`` (raw GB/s)
        runs no faster than one of the rates with no less than its latency.

        A route runs at the share one of its links gives (``RoutePatterns``), so per route the largest share of
        its links below ``fastest``, if the route can slow that far, with its latency; the fastest per latency.
        Without routes read, the largest share of any link with the shortest latency that slow.
        """
        if fastest not in self._slower:
            scale = self.patterns.scale
            if self.route_links is None or scale is None:
                rate = self.patterns.below(fastest) * self.efficiency
                self._slower[fastest] = [(rate, self.at(rate))]
            else:
                padded = np.append(scale, 0.0)[self.route_links]
                k = np.floor(padded / fastest * (1 + 1e-12)) + 1  # the smallest k with scale / k < fastest
                below = (padded / k).max(axis=1) * self.efficiency
                can = below >= self.floors * (1 - _TOL)
                self._slower[fastest] = _pareto(zip(below[can], self.latency[can]))
        return self._slower[fastest]


def _pareto(pairs) -> list[tuple[float, float]]:
    """The (rate, latency) pairs no other pair beats on both (as fast or faster, and as soon or sooner).

    A price that falls with the rate and grows with the latency is least at
    one of these, so ``least`` prices only them.
    """
    front: list[tuple[float, float]] = []
    for rate, lat in sorted(pairs, key=lambda p: (p[1], -p[0])):
        if not front or rate > front[-1][0]:
            front.append((float(rate), float(lat)))
    return front


def route_patterns(sm, gpus: list[str]) -> RoutePatterns:
    """The ``RoutePatterns`` among ``gpus``, cached on the topology: they depend on the pool, not on the shape."""
    cache = sm.topo.__dict__.setdefault("_bound_cache", {})
    key = ("route patterns", frozenset(gpus))
    if key not in cache:
        cache[key] = RoutePatterns(sm, gpus)
    return cache[key]


def hop_latency(sm, gpus: list[str] | None = None, per_gpu: int = 1) -> HopLatency:
    """The ``HopLatency`` of ``sm``'s shape among ``gpus`` (default: the whole cluster), cached on the topology;
    ``per_gpu``: flows each GPU sends and receives (1 for ring hops)."""
    topo = sm.topo
    cache = topo.__dict__.setdefault("_bound_cache", {})
    r = sm.rates
    # The whole cluster keys as None: a set of every GPU of a large cluster would be rebuilt on every call.
    key = ("hop latency", None if gpus is None else frozenset(gpus), sm.dp, sm.ring, sm.ulysses, per_gpu,
           r.network_efficiency, r.intra_host_gbps, r.inter_host_gbps)
    if key not in cache:
        cache[key] = HopLatency(sm, topo.gpus() if gpus is None else gpus, per_gpu)
    return cache[key]


def a2a_latency(sm) -> HopLatency:
    """The latency floor of the all-to-all's transfers over the whole cluster: ``u - 1`` flows out of each GPU."""
    return hop_latency(sm, None, sm.ulysses - 1)
