"""The ring hops an order must send out of a unit when its gradient ring runs at its best bus rate.

The step prices the gradient ring (``topology.cost.StepModel.gradients``: rank
``r`` to ``r + 1``, cyclically) in its own phase, after the ring attention, so
its flows never share a link with the ring hops; but both follow the same
rank order. Let ``B*`` be the best bus any order reaches
(``topology.planning.bounds.rates.ring_bandwidth_bound`` over the world) and ``B'``
the largest share any link gives strictly below it (on a cluster of more
than ``GATE_GPUS`` GPUs, ``B*`` itself: finding it reads every route). Every
order's bus is ``B*`` or at most ``B'``:

* exactly ``B*``: every gradient flow runs at ``B*`` or faster. A unit (a
  host, or the hosts under a switch) of fewer GPUs than the world whose
  links out sum to less than ``B*`` holds no rank
  (``topology.planning.bounds.rates.small_units``), so the rings live on the
  other hosts and their hops run no faster than those allow. Each link
  carries at most ``bw / B*`` gradient flows (counted by flow fraction;
  whole flows where no route splits on a unit's exits), and where the ranks
  fill the hosts left (on clusters of up to ``GATE_GPUS`` GPUs), a unit (a
  host, or one side of a link inside a host: a socket, a PCIe switch with
  its GPUs) holds its ranks in at most ``k_U`` runs of the cyclic rank
  order, ``k_U`` the gradient flows its exits (and its entrances) carry at
  ``B*``.
* at most ``B'``: the gradient term costs at least ``gradients(B')``, and
  the same exclusion splits the slower buses into ranges: an order whose
  bus is above a unit's figure keeps out of that unit (and out of every
  slower one), so each range between two figures has its own hop ceiling
  and its own gradient cost.

Ring hops (``rank -> rank + u`` inside a cp group, wrapping at the group's
end) restricted to a unit's ranks split into whole rings and paths; each path
sends one hop out of the unit and takes one in (``leaving_hops``). Those hops
share the unit's exits, so the slowest hop runs no faster than ``p`` flows
across them allow. The step bound is then the smallest over the cases
(``topology.cost.step_bound``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from fractions import Fraction

import numpy as np

from topology.planning.bounds.rates import cut_rate, host_units, ring_bandwidth_bound, small_units

GATE_GPUS = 64
"""Clusters of at most this many GPUs get the whole gate (``B'`` and ``leaving_hops``): they read the routes between
every pair of GPUs."""
SLOW_RANGES = 8
"""Ranges of slower buses the gate splits off at most, at the fastest units' figures below ``B'`` (a measured
cluster may give every host a figure of its own); the last range reaches down to 0 and leaves no unit out."""
_TOL = 1e-9


@dataclass(frozen=True)
class Gate:
    """What the gradient bus decides about an order of one shape."""

    bus: float
    """``B*``: the best bus any order reaches."""
    bus_below: float
    """``B'``: the largest link share below ``B*`` (``B*`` itself when unknown)."""
    hop_cap: float
    """GB/s the slowest ring hop cannot exceed in any order whose bus is ``B*`` (inf: no claim)."""
    slower: tuple[tuple[float, float, float], ...] = ()
    """(top, floor, hop cap) of ranges of slower buses, from ``B'`` down to 0: an order whose bus is above ``floor``
    and at most ``top`` has its slowest hop at no more than ``hop cap``."""


def _flows_at(bws: list[float], whole: bool, rate: float) -> int:
    """How many flows across links of ``bws`` can all run at ``rate`` or faster."""
    if whole:
        return sum(math.floor(b / rate * (1 + 1e-12)) for b in bws)
    return math.floor(sum(bws) / rate * (1 + 1e-12))


def leaving_hops(m: int, runs: int, u: int, ring: int) -> int:
    """Fewest ring hops out of a unit whose ``m`` ranks lie in at most ``runs`` runs of the rank order.

    For ``2 <= u`` and ``m <= u``: a run then spans fewer than ``u`` ranks,
    so its ranks lie in distinct rings (ranks of one ring are ``u`` or more
    apart): the longest run, at least ``ceil(m / runs)`` ranks, touches as
    many rings. A ring wholly inside the unit puts each of its ``ring``
    ranks in a run of its own (so needs ``runs >= ring``), at most
    ``m // ring`` of them; every other ring touched holds at least one path,
    and each path sends one hop out.

    For more ranks, at least one hop leaves unless the unit holds whole
    rings only. Lay a cp group out as ``ring`` rows of ``u`` ranks: its rings
    are the columns. A unit that holds whole columns of a group but not all
    of them holds a run (or more) in every row, so ``ring`` runs or more;
    with fewer, it holds whole cp groups only, so ``m`` is a multiple of cp.
    """
    if ring < 2 or m < 1 or runs < 1:
        return 0
    if u >= 2 and m <= u:
        whole = m // ring if runs >= ring else 0
        touched = -(-m // runs)
        return max(touched - whole, int(m > whole * ring))
    return int(m % (u * ring) != 0 and (u == 1 or runs < ring))


def _units(sm, gpus: list[str]) -> list[tuple[int, list[float], bool, list[float], bool]]:
    """Every host, and each side of every link between two of a host's parts (``topology.planning.bounds.rates.host_units``):
    (GPUs, exit GB/s, exits whole, entrance GB/s, entrances whole)."""
    fm = sm.flows
    bw = fm.link_bandwidths()
    units = []
    for held, exits, entrances in host_units(sm.topo, fm, gpus):
        inside, outside = [g for g in gpus if g in held], [g for g in gpus if g not in held]
        units.append((len(inside), [float(bw[i]) for i in exits], _whole(fm, inside, outside, set(exits)),
                      [float(bw[i]) for i in entrances], _whole(fm, outside, inside, set(entrances))))
    return units


def _whole(fm, src: list[str], dst: list[str], links: set[int]) -> bool:
    """Whether every route from ``src`` to ``dst`` crosses each of ``links`` wholly or not at all."""
    for a in src:
        for b in dst:
            ids, fracs = fm.compiled(a, b)
            if any(i in links and 1e-12 < f < 1 - 1e-12 for i, f in zip(ids, fracs)):
                return False
    return True


def share_below(sm, gpus: list[str], rate: float) -> float:
    """The largest share any link gives strictly below ``rate``: ``bw / (k q)``, ``q`` the largest fraction dividing
    every route's fractions among ``gpus`` (so every link's load is a multiple of it)."""
    fm = sm.flows
    fracs = {f for a in gpus for b in gpus if a != b for f in fm.compiled(a, b)[1]}
    denominators = [Fraction(f).limit_denominator(1 << 12).denominator for f in fracs] or [1]
    scale = fm.link_bandwidths() * math.lcm(*denominators)
    if math.isinf(rate) or rate <= 0 or not len(scale):
        return rate
    k = np.floor(scale / rate * (1 + 1e-12)) + 1
    return float((scale / k).max())


def gradient_gate(sm) -> Gate | None:
    """The gate of ``sm``'s shape on its cluster; None where it proves nothing (one rank, no ring, or caps on the
    measured rates).

    Clusters of more than ``GATE_GPUS`` GPUs get the slow units' part only, with ``B'`` taken as ``B*`` (the
    share below it needs every route's fractions): still a split on the bus at each unit's figure.
    """
    topo = sm.topo
    rates = sm.rates
    if sm.world < 2 or sm.ring < 2 or rates.intra_host_gbps or rates.inter_host_gbps:
        return None
    cache = topo.__dict__.setdefault("_bound_cache", {})
    key = ("gate", sm.dp, sm.ring, sm.ulysses)
    if key not in cache:
        cache[key] = _gate(sm, topo.gpus())
    return cache[key]


def _gate(sm, gpus: list[str]) -> Gate:
    topo = sm.topo
    small = len(gpus) <= GATE_GPUS
    bus = ring_bandwidth_bound(topo, 1, sm.world)
    below = share_below(sm, gpus, bus) if small else bus
    units = small_units(topo, sm.world)
    off = _off(units, bus, strictly=True)
    cap = _hop_cap(sm, off)
    left = [g for g in gpus if topo.host_of(g) not in off]
    if small and len(left) == sm.world:
        # The ranks fill the hosts left: a unit's GPUs all hold ranks, which ``leaving_hops`` needs.
        for m, out_bw, out_whole, in_bw, in_whole in _units(sm, left):
            # Runs leave through the exits and come back through the entrances, one gradient flow each way per run.
            runs = min(_flows_at(out_bw, out_whole, bus), _flows_at(in_bw, in_whole, bus))
            hops = leaving_hops(m, runs, sm.ulysses, sm.ring)
            if hops:
                cap = min(cap, cut_rate(out_bw, out_whole, hops), cut_rate(in_bw, in_whole, hops))
    # Below B*, each unit's figure that a bus may pass starts a range: faster buses leave that unit out too.
    slower, top = [], below
    for floor in sorted({c for _, c in units if c < top}, reverse=True)[:SLOW_RANGES]:
        slower.append((top, floor, _hop_cap(sm, _off(units, floor, strictly=False))))
        top = floor
    slower.append((top, 0.0, math.inf))
    return Gate(bus, below, cap, tuple(slower))


def _off(units: list[tuple[list[str], float]], rate: float, strictly: bool) -> set[str]:
    """Hosts of the units whose links out carry less than ``rate`` (or no more, unless ``strictly``)."""
    return {h for members, cap in units if (cap < rate if strictly else cap <= rate) for h in members}


def _hop_cap(sm, off: set[str]) -> float:
    """The slowest hop's ceiling when the gradient ring keeps out of the hosts ``off``: the rings live on the
    others (0: too few GPUs there)."""
    topo = sm.topo
    if not off:
        return math.inf
    if sum(len(topo.gpus(h)) for h in topo.hosts if h not in off) < sm.world:
        return 0.0
    return ring_bandwidth_bound(topo, sm.dp * sm.ulysses, sm.ring, frozenset(off))
