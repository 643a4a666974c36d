"""Incremental step-time screening for local search: a move is priced by the flows it touches.

``StepModel.figures`` prices a rank order from scratch: every ring hop, all-to-all
pair and gradient-ring flow is routed and every link's load summed, O(world) per
order. A local-search move changes two ranks, so all but a handful of flows stay
where they were. ``DeltaOrder`` keeps the link loads of the current order and,
for a move, takes out the flows touching the moved ranks and puts them back on
their new routes, then reads the slowest flow of each kind from the loads.

Algorithm
---------
The rate of a flow is the smallest ``bandwidth / load`` over the links it
crosses, so the slowest flow of a set runs at the smallest ``bandwidth / load``
over every link the set loads: one vectorised minimum over the link array, no
per-flow pass. Among the flows on those argmin links (kept per link) the
largest latency is the slowest hop's latency, as ``StepModel.figures`` breaks
ties. The gradient ring has no latency term, so its rate is all it needs.

The figures this gives are a lower bound of the step time, exact whenever no
per-kind rate cap of ``HardwareRates`` binds (where one does, the latency is
taken as zero) and for the all-to-all's slowest flow (its largest transfer may
belong to another flow, so it too is a lower bound). The search rejects a move
whose bound is no better than the current step, and prices the others with
``StepModel.step`` before it accepts them: a plan's reported step time always
comes from the full model.
"""

from __future__ import annotations

import math

import numpy as np

from topology.cost import StepModel, transfer

USED = 1e-9
"""Link loads below this are float residue of flows taken off, not traffic."""
REL_TOL = 1e-9
"""Step times within this relative distance are equal (plan figures keep 9 significant digits)."""


def link_shares(bw: np.ndarray, load: np.ndarray) -> np.ndarray:
    """GB/s each loaded link gives each unit of flow on it (``bw / load``); inf where nothing flows.

    Its minimum is the rate of the slowest flow of the set that made ``load``.
    """
    share = np.full(len(bw), math.inf)
    used = load > USED
    share[used] = bw[used] / load[used]
    return share


class _FlowSet:
    """One kind of concurrent flows (ring hops, all-to-all pairs or the gradient ring) over rank indices."""

    def __init__(self, sm: StepModel, pairs: list[tuple[int, int]], order: list[str]):
        self.sm, self.pairs = sm, pairs
        self.bw = sm.flows.link_bandwidths()
        self.load = np.zeros(len(self.bw))
        self.touching: dict[int, list[int]] = {}
        for f, (a, b) in enumerate(pairs):
            self.touching.setdefault(a, []).append(f)
            self.touching.setdefault(b, []).append(f)
        fm, topo = sm.flows, sm.topo
        self.route = [fm.compiled(order[a], order[b]) for a, b in pairs]
        self.lat = np.array([fm.route_latency(order[a], order[b]) for a, b in pairs])
        self.intra = sum(topo.host_of(order[a]) == topo.host_of(order[b]) for a, b in pairs)
        self.on_link: dict[int, set[int]] = {}
        for f, (ids, fracs) in enumerate(self.route):
            for i in ids:
                self.on_link.setdefault(i, set()).add(f)
        if pairs:
            ids = np.fromiter((i for r in self.route for i in r[0]), dtype=np.int64)
            fracs = np.fromiter((x for r in self.route for x in r[1]), dtype=float)
            self.load = np.bincount(ids, weights=fracs, minlength=len(self.bw)).astype(float)

    def _place(self, f: int, order: list[str], sign: int) -> None:
        """Put flow ``f`` on its route under ``order`` (``sign`` +1), or take it off (-1)."""
        a, b = self.pairs[f]
        ga, gb = order[a], order[b]
        if sign > 0:
            ids, fracs = self.sm.flows.compiled(ga, gb)
            self.route[f] = (ids, fracs)
            self.lat[f] = self.sm.flows.route_latency(ga, gb)
        ids, fracs = self.route[f]
        np.add.at(self.load, ids, sign * np.asarray(fracs))
        for i in ids:
            members = self.on_link.setdefault(i, set())
            (members.add if sign > 0 else members.discard)(f)
        topo = self.sm.topo
        self.intra += sign * (topo.host_of(ga) == topo.host_of(gb))

    def move(self, ranks: list[int], old: list[str], new: list[str]) -> list[int]:
        """Re-route the flows touching ``ranks`` from ``old`` to ``new``; returns them (for ``undo``)."""
        flows = sorted({f for r in ranks for f in self.touching.get(r, ())})
        for f in flows:
            self._place(f, old, -1)
        for f in flows:
            self._place(f, new, +1)
        return flows

    def crowd(self) -> int:
        """Flows that run at this set's slowest rate: how many must move before that rate can rise."""
        if not self.pairs:
            return 0
        share = link_shares(self.bw, self.load)
        rate = float(share.min())
        return len({f for i in np.flatnonzero(share <= rate * (1 + 1e-12)) for f in self.on_link.get(int(i), ())})

    def slowest(self, scaled: bool = True) -> tuple[float, float]:
        """(GB/s, latency µs) of the slowest flow, as ``StepModel.hop_rates`` scales and caps it (or raw)."""
        self.capped = False
        if not self.pairs:
            return math.inf, 0.0
        share = link_shares(self.bw, self.load)
        rate = float(share.min())
        lat = max((self.lat[f] for i in np.flatnonzero(share <= rate * (1 + 1e-12)) for f in self.on_link.get(int(i), ())),
                  default=0.0)
        if not scaled:
            return rate, float(lat)
        r = self.sm.rates
        rate *= r.network_efficiency
        caps = [c for c, present in ((r.intra_host_gbps, self.intra > 0), (r.inter_host_gbps, self.intra < len(self.pairs)))
                if c and present]
        if caps and min(caps) < rate:
            self.capped = True  # which capped flow is slowest (its latency) is left to the full model
            return min(caps), 0.0
        self.capped = False
        return rate, float(lat)


class DeltaOrder:
    """A rank order and its link loads, for pricing moves of a few ranks at a time.

    ``bound(ranks, trial)`` applies a move tentatively and returns a lower
    bound of its step time (see the module docstring), and sets ``exact``
    when that bound is the step time itself; ``keep()`` makes the move the
    current order, ``undo()`` takes it back.
    """

    def __init__(self, sm: StepModel, order: list[str]):
        self.sm, self.order = sm, list(order)
        n = len(order)
        self.sets = [_FlowSet(sm, list(sm.hops), self.order), _FlowSet(sm, list(sm.a2a_pairs), self.order),
                     _FlowSet(sm, [(i, (i + 1) % n) for i in range(n)] if sm.world > 1 else [], self.order)]
        self._pending: tuple[list[int], list[str]] | None = None
        self.exact = False

    def bound(self, ranks: list[int], trial: list[str]) -> float:
        """Lower bound of the step time of ``trial``, which differs from the current order at ``ranks`` only."""
        self._pending = (ranks, trial)
        for s in self.sets:
            s.move(ranks, self.order, trial)
        hops, a2a, bus = self.sets
        sm = self.sm
        hop_gbps, hop_lat = hops.slowest()
        a2a_s = 0.0
        if a2a.pairs:
            rate, lat = a2a.slowest()
            a2a_s = 2 * transfer(sm.a2a_per_peer, rate, lat)
        bus_gbps = bus.slowest(scaled=False)[0]
        self.exact = not a2a.pairs and not hops.capped
        return sm.rates.with_step_overhead(sm.dense + sm.attention(hop_gbps, hop_lat, a2a_s) + sm.gradients(bus_gbps))

    def crowd(self) -> int:
        """Flows at their kind's slowest rate (ring hops, all-to-all pairs, gradient ring), under the loads as they
        stand (the current order, or the move last priced by ``bound``):
        a move that leaves the step time as it is but lowers this is progress on a plateau of the slowest flow."""
        return sum(s.crowd() for s in self.sets)

    def keep(self) -> None:
        """The move last priced by ``bound`` becomes the current order."""
        ranks, trial = self._pending
        self.order = list(trial)
        self._pending = None

    def undo(self) -> None:
        """Take back the move last priced by ``bound``."""
        ranks, trial = self._pending
        for s in self.sets:
            s.move(ranks, trial, self.order)
        self._pending = None
