"""The gradient ring through blocks of ranks (whole host runs, or cp groups), each entered and left where its flows
run fastest.

A host that holds one run of the rank order is entered by the gradient
ring at the run's first GPU and left at its last, so the NICs those two
GPUs sit behind decide the links its two flows to other hosts take. On a
rail-optimised fabric (NIC ``i`` of every host on rail switch ``i``) a flow
between GPUs behind NICs of different rails crosses the spine, and behind a
degraded cable or uplink it is slow; orders built host by host take each
host's GPUs in PCIe order, so every host is left by its last NIC and the
next entered by its first, and every flow changes rails.

The GPU-by-GPU search (``topology.planning.constructions.gradient_cycle``) can choose
those ends, but only by backtracking through a host's GPUs one at a time,
which it rarely finishes for hosts of eight. This search places whole runs:
each host's run is one of its GPU sequences from a NIC's GPUs to a NIC's
GPUs (the NIC groups in PCIe order, the entry's first and the exit's last),
and the cycle is built run by run, keeping every link's load within
``bw / t`` (every flow at ``t`` or faster), hosts under more shared
switches first, then the run whose entry is reached by the shortest route.
Depth-first within a node budget, at the bus bound and the next slower
rates. The runs' borders are host borders, so where each run is a whole
number of cp groups (or rings of whole hosts) the ring borders fall on them.

The same search strings a construction's cp groups anew
(``cp_groups_reordered``): each group is a block, turned by whole Ulysses
groups to start at any NIC border, so its rings and all-to-all stay as
built and only the gradient ring changes.

Given the rings' hops (as rank pairs, the cycle's first GPU rank 0), each
hop is priced when its later end is placed, on loads of its own (ring hops
and gradient flows do not run at once), at the same rate: a ring of two
hosts is closed by a flow from the second's last GPU back to the first's
first, which on rails must share a rail too.
"""

from __future__ import annotations

from topology.network.model import Topology
from topology.network.routing import FlowModel
from topology.planning.bounds.rates import ring_bandwidth_bound
from topology.planning.constructions.ring_order import locality_order, nic_groups

SEARCH_NODES = 20_000
"""Runs placed (and taken back) at most, over every rate tried."""
RATES_TRIED = 4
"""The bus bound and at most this many slower rates below it (links' figures over a few flows) are tried."""
TURNS = 8
"""Ways each cp group may be turned, at most (its first and those at the next NIC borders)."""
_TOL = 1e-9


def host_run_cycle(topo: Topology, flows: FlowModel, runs: dict[str, int], hops: list[tuple[int, int]] = (),
                   ulysses: int = 1, size: int | None = None, nodes: int = SEARCH_NODES) -> list[str] | None:
    """A cycle through ``runs`` (host -> how many of its GPUs, one run each, hosts in order of preference), its flows
    (and the ring ``hops`` between its ranks) as fast as the search finds; None where it finds none. A run keeps
    Ulysses groups of ``ulysses`` consecutive GPUs under one NIC where they were. With ``size``, the cycle holds that
    many GPUs, in the runs of some of the hosts (the first always)."""
    hosts = [h for h, n in runs.items() if n]
    if len(hosts) < 2 or sum(runs[h] for h in hosts) < 3:
        return None
    return block_cycle(topo, flows, [_run_sequences(topo, h, runs[h], ulysses) for h in hosts], hops, nodes, size)


def cp_groups_reordered(topo: Topology, flows: FlowModel, order: list[str], cp: int, ulysses: int = 1,
                        nodes: int = SEARCH_NODES) -> list[str] | None:
    """``order``'s cp groups in the sequence, each turned to the start, that keeps the gradient ring's flows
    fastest; None where the search finds no cycle.

    The ring hops and the all-to-all stay as they are: a group turned by whole Ulysses groups keeps its rings
    (each turned by one place) and its Ulysses groups, and the groups' sequence is the gradient ring's alone.
    Constructions that build good groups string them in an order of their own (rings inside hosts, then the
    remainders'), which can enter a leaf behind a slow uplink several times.
    """
    groups = [order[i:i + cp] for i in range(0, len(order), cp)]
    if len(groups) < 2:
        return None
    return block_cycle(topo, flows, [_turns(topo, g, ulysses) for g in groups], (), nodes)


def block_cycle(topo: Topology, flows: FlowModel, blocks: list[list[list[str]]], hops: list[tuple[int, int]] = (),
                nodes: int = SEARCH_NODES, size: int | None = None) -> list[str] | None:
    """A cycle through every block (or, given ``size``, through blocks of that many GPUs in all, the first among
    them), each as one of its GPU sequences, its flows (and the ring ``hops`` between its ranks) at the bus bound or
    the fastest slower rate the search reaches; None where it finds none."""
    size = size or sum(len(variants[0]) for variants in blocks)
    bw = flows.link_bandwidths()
    bound = ring_bandwidth_bound(topo, 1, size)
    rates = sorted({float(x) / k for x in set(bw.tolist()) for k in range(1, 5) if x / k <= bound * (1 + _TOL)},
                   reverse=True)[:RATES_TRIED]
    for t in rates:
        budget = [nodes // len(rates)]
        cycle = _cycle_at(topo, flows, blocks, hops, t, budget, size)
        if cycle is not None:
            return cycle
    return None


def _turns(topo: Topology, group: list[str], ulysses: int) -> list[list[str]]:
    """A cp group as it is and turned by whole Ulysses groups to start where the GPU before sits behind another NIC
    or host (so the gradient ring enters and leaves it elsewhere); at most ``TURNS``."""
    nic = topo.routes.nic_of
    starts = [0] + [i for i in range(ulysses, len(group), ulysses) if nic(group[i - 1]) != nic(group[i])]
    return [group[i:] + group[:i] for i in starts[:TURNS]]


def _run_sequences(topo: Topology, host: str, count: int, ulysses: int = 1) -> list[list[str]]:
    """``count`` of the host's GPUs in PCIe order, once for each (entry NIC, exit NIC): the entry NIC's GPUs first,
    the exit's last, the others between (one NIC's GPUs split at a Ulysses group's border); a run shorter than the
    host keeps its first and last ``ulysses`` GPUs."""
    groups = nic_groups(topo, host)
    if len(groups) == 1:
        return [locality_order(topo, host)[:count]]
    out = []
    for a, entry in enumerate(groups):
        for b, leave in enumerate(groups):
            if a == b:
                half = len(entry) // 2 // ulysses * ulysses
                if not half:
                    continue
                seq = entry[:half] + [g for k, grp in enumerate(groups) if k != a for g in grp] + entry[half:]
            else:
                seq = entry + [g for k, grp in enumerate(groups) if k not in (a, b) for g in grp] + leave
            keep = min(ulysses, count)
            out.append(seq[: count - keep] + seq[len(seq) - keep:] if count < len(seq) else seq)
    return out


def _cycle_at(topo: Topology, flows: FlowModel, blocks: list[list[list[str]]], hops: list[tuple[int, int]], t: float,
              budget: list[int], size: int) -> list[str] | None:
    """Depth-first search for a cycle of ``size`` GPUs, one GPU sequence per block it takes (the first block always),
    with every link's load within ``bw / t``, the gradient ring's and the ring hops' each. Blocks under more switches
    shared with the last are tried first, then the sequences whose first GPU the shortest route reaches; a partial
    cycle goes on only while some block left can close it. ``budget[0]``: nodes for each way into the first block."""
    cap = (flows.link_bandwidths() / t * (1 + _TOL)).tolist()
    loads = {"gradient": [0.0] * len(cap), "rings": [0.0] * len(cap)}
    ending: dict[int, list[tuple[int, int]]] = {}  # rank -> the ring hops whose later end it is
    for a, b in hops:
        ending.setdefault(max(a, b), []).append((a, b))
    placed: list[str] = []  # GPU of each rank so far

    def routed(pairs: list[tuple[str, str]]) -> dict[int, float]:
        """The flows ``pairs`` as load per link."""
        out: dict[int, float] = {}
        for a, b in pairs:
            for i, f in zip(*flows.compiled(a, b)):
                out[i] = out.get(i, 0.0) + f
        return out

    def place(added: dict[int, float], sign: float, kind: str = "gradient") -> bool:
        """Add (or take back) the load ``added``; False, changing nothing, if a link would overflow."""
        load = loads[kind]
        if sign > 0 and any(load[i] + f > cap[i] for i, f in added.items()):
            return False
        for i, f in added.items():
            load[i] += sign * f
        return True

    def fits(pairs: list[tuple[str, str]]) -> bool:
        """Whether the gradient flows ``pairs`` fit on the links as loaded now."""
        load = loads["gradient"]
        return all(load[i] + f <= cap[i] for i, f in routed(pairs).items())

    def add(seq: list[str], added: dict[int, float]) -> dict[int, float] | None:
        """Place a sequence with its gradient flows' load ``added`` and the ring hops it ends; None, changing nothing,
        if a link would overflow. Returns the ring hops' load (to take back)."""
        if not place(added, 1):
            return None
        start = len(placed)
        placed.extend(seq)
        ring = routed([(placed[a], placed[b]) for r in range(start, len(placed)) for a, b in ending.get(r, ())])
        if place(ring, 1, "rings"):
            return ring
        del placed[start:]
        place(added, -1)
        return None

    def drop(seq: list[str], added: dict[int, float], ring: dict[int, float]) -> None:
        place(ring, -1, "rings")
        del placed[len(placed) - len(seq):]
        place(added, -1)

    inside = [[routed(list(zip(seq, seq[1:]))) for seq in variants] for variants in blocks]
    left = set(range(len(blocks)))

    def following(last: str) -> list[tuple[int, int]]:
        here = topo.host_of(last)

        def key(o: tuple[int, int]) -> tuple:
            entry = blocks[o[0]][o[1]][0]
            return -topo.shared_switches(here, topo.host_of(entry)), len(flows.compiled(last, entry)[0]), o

        return sorted(((b, k) for b in left for k in range(len(blocks[b]))), key=key)

    def extend() -> bool:
        last = placed[-1]
        if len(placed) == size:
            closing = routed([(last, placed[0])])
            if place(closing, 1):
                place(closing, -1)
                return True
            return False
        if len(placed) + sum(len(blocks[b][0]) for b in left) < size:  # the blocks left cannot fill the cycle
            return False
        if not any(fits([(blocks[b][k][-1], placed[0])]) for b in left for k in range(len(blocks[b]))):
            return False  # no block left could close the cycle
        for b, k in following(last):
            if len(placed) + len(blocks[b][k]) > size:
                continue
            if budget[0] <= 0:
                return False
            budget[0] -= 1
            added = routed([(last, blocks[b][k][0])])
            for i, f in inside[b][k].items():
                added[i] = added.get(i, 0.0) + f
            ring = add(blocks[b][k], added)
            if ring is None:
                continue
            left.discard(b)
            if extend():
                return True
            left.add(b)
            drop(blocks[b][k], added, ring)
        return False

    # Each way into the first block gets its share of the budget: a search that errs in its first step spends the
    # whole budget under it.
    share = budget[0] // len(blocks[0])
    for k, seq in enumerate(blocks[0]):
        budget[0] = share
        ring = add(seq, inside[0][k])
        if ring is None:
            continue
        left.discard(0)
        if extend():
            return list(placed)
        left.add(0)
        drop(seq, inside[0][k], ring)
    return None
