"""The shortest latency the slowest ring hop can have, given how slow it is.

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
slowest hop's. Rates here are the step model's: after
``network_efficiency`` and the in-host and host-to-host caps.
"""

from __future__ import annotations

import math

import numpy as np

from topology.planning.bounds.rates import min_route_latency

LATENCY_GPUS = 64
"""Clusters (or pools) of at most this many GPUs get the argument: it reads the route of every pair of GPUs."""
_TOL = 1e-9


class HopLatency:
    """``at(rate)``: the shortest latency, µs, of a ring hop running at ``rate`` GB/s or slower, among ``gpus``.

    Built once per shape (the world caps the load a link can carry); see the module's docstring.
    """

    def __init__(self, sm, gpus: list[str]):
        self.l_min = min_route_latency(sm.topo, gpus)
        self.floors = self.latency = np.zeros(0)
        self._at = {}
        if len(gpus) > LATENCY_GPUS or sm.ring < 2:
            return
        fm, host_of, rates = sm.flows, sm.topo.host_of, sm.rates
        bw = fm.link_bandwidths()
        index = {g: k for k, g in enumerate(gpus)}
        out_most = np.zeros((len(gpus), len(bw)))
        in_most = np.zeros((len(gpus), len(bw)))
        routes = []
        for a in gpus:
            for b in gpus:
                if a == b:
                    continue
                ids, fracs = fm.compiled(a, b)
                ids, fracs = np.asarray(ids, dtype=np.int64), np.asarray(fracs)
                np.maximum.at(out_most[index[a]], ids, fracs)
                np.maximum.at(in_most[index[b]], ids, fracs)
                routes.append((a, b, ids))
        most = np.minimum(np.minimum(out_most.sum(axis=0), in_most.sum(axis=0)), sm.world)
        with np.errstate(divide="ignore"):
            slowest = np.where(most > 0, bw / most, math.inf)
        floors, latency = [], []
        for a, b, ids in routes:
            floor = float(slowest[ids].min()) * rates.network_efficiency if len(ids) else math.inf
            cap = rates.intra_host_gbps if host_of(a) == host_of(b) else rates.inter_host_gbps
            floors.append(min(floor, cap) if cap else floor)
            latency.append(fm.route_latency(a, b))
        self.floors, self.latency = np.array(floors), np.array(latency)
        self._at: dict[float, float] = {}

    def at(self, rate: float) -> float:
        """The shortest latency of a route that can slow to ``rate`` (``l_min`` when every route can, or none)."""
        if not len(self.floors) or math.isinf(rate):
            return self.l_min
        if rate not in self._at:  # rates come from a small set: the search asks the same ones again and again
            can = self.floors <= rate * (1 + _TOL)
            self._at[rate] = max(self.l_min, float(self.latency[can].min())) if can.any() else self.l_min
        return self._at[rate]


def hop_latency(sm, gpus: list[str] | None = None) -> HopLatency:
    """The ``HopLatency`` of ``sm``'s shape among ``gpus`` (default: the whole cluster), cached on the topology."""
    topo = sm.topo
    cache = topo.__dict__.setdefault("_bound_cache", {})
    r = sm.rates
    # The whole cluster keys as None: a set of every GPU of a large cluster would be rebuilt on every call.
    key = ("hop latency", None if gpus is None else frozenset(gpus), sm.world, sm.ring > 1, r.network_efficiency,
           r.intra_host_gbps, r.inter_host_gbps)
    if key not in cache:
        cache[key] = HopLatency(sm, topo.gpus() if gpus is None else gpus)
    return cache[key]
