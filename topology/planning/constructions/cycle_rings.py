"""Rings cut from a gradient cycle where the hosts' cards allow: its host runs reordered within each leaf.

A cycle through every rank (``topology.planning.constructions.gradient_cycle``) fixes which
links the gradient ring crosses, not where the rings begin: rings are the
blocks of ``cp`` consecutive ranks, and a ring that holds part of a host's run
sends one flow out over the host's cards (and one in). A 16-GPU host on one
card, cut 2 + 6 + 6 + 2 by the ring borders, sends two rings out where 6 + 6 + 4
sends one. Inside one leaf, the runs may come in any order without changing
the gradient ring's load on the leaf's uplinks (two runs of one host must not
meet: their hop would take the host's inner link), so the ring borders can be
lined up with the runs.

For each offset of the first run from a ring border, each leaf's runs are
ordered on their own (the leaf's share of the order starts at the same rank
whichever order they take, and its rings out of the leaf are the same): a
depth-first search, branch and bound within a node budget, for the least
largest ratio of rings leaving a run to its cards' bandwidth. The caller
prices each offset's order with the step model and keeps the best.
"""

from __future__ import annotations

import math

from topology.network.model import Topology

TILING_NODES = 20_000
"""Partial orders the searches visit at most, over every offset and leaf."""


def ring_crossings(start: int, size: int, cp: int) -> int:
    """Rings of ``cp`` consecutive ranks that hold part of the ranks ``start .. start + size - 1`` and part of others."""
    first, last = start // cp, (start + size - 1) // cp
    inside = sum(1 for k in range(first, last + 1) if k * cp >= start and (k + 1) * cp <= start + size)
    return last - first + 1 - inside


def host_runs(topo: Topology, cycle: list[str]) -> list[list[str]]:
    """The cycle cut where the host changes (its last run joined to its first when both are one host's)."""
    runs: list[list[str]] = []
    for g in cycle:
        if runs and topo.host_of(runs[-1][-1]) == topo.host_of(g):
            runs[-1].append(g)
        else:
            runs.append([g])
    if len(runs) > 1 and topo.host_of(runs[0][0]) == topo.host_of(runs[-1][-1]):
        runs[0] = runs.pop() + runs[0]
    return runs


def tiled_orders(topo: Topology, cycle: list[str], cp: int, nodes: int = TILING_NODES) -> list[list[str]]:
    """Orders of ``cycle``'s GPUs, one per offset of the ring borders: the cycle's host runs permuted within each
    leaf so that rings leave runs as little as their cards' bandwidth allows (an offset at which the cycle would
    close from one host's run into another of its own gives none)."""
    runs = host_runs(topo, cycle)
    host = [topo.host_of(r[0]) for r in runs]
    cards = [_card_gbps(topo, r) for r in runs]
    leaf = [topo.leaf_of(h) for h in host]
    stretches: list[list[int]] = []
    for i in range(len(runs)):
        if stretches and leaf[stretches[-1][-1]] == leaf[i]:
            stretches[-1].append(i)
        else:
            stretches.append([i])
    lengths = [len(r) for r in runs]
    sizes = [sum(lengths[i] for i in st) for st in stretches]
    each = max(1, nodes // max(1, cp * len(stretches)))
    best_inside: dict[tuple[int, int], tuple[float, list[int]]] = {}  # (stretch, start mod cp) -> its best order

    def inside(k: int, start: int) -> tuple[float, list[int]]:
        key = (k, start % cp)
        if key not in best_inside:
            best_inside[key] = _order_runs(stretches[k], lengths, cards, host, key[1], cp, each)
        return best_inside[key]

    orders = []
    for offset in range(cp if len(cycle) > cp else 1):  # one ring: every offset cuts the same
        pos, seq = offset, []
        for k in range(len(stretches)):
            seq += inside(k, pos)[1]
            pos += sizes[k]
        if len(seq) > 1 and host[seq[-1]] == host[seq[0]]:
            continue  # the cycle would close from one host's run into another of its own
        gpus = [g for i in seq for g in runs[i]]
        orders.append(gpus[len(gpus) - offset:] + gpus[:len(gpus) - offset])
    return orders


def _ratio(out: int, gbps: float) -> float:
    """Rings out per GB/s: the inverse of each one's share."""
    return out / gbps if gbps else (math.inf if out else 0.0)


def _order_runs(runs: list[int], sizes: list[int], cards: list[float], host: list[str], start: int, cp: int,
                nodes: int) -> tuple[float, list[int]]:
    """The order of ``runs`` (starting at rank ``start``) whose largest rings-out-per-GB/s over its runs is least
    (two runs of one host never next to each other), by branch and bound within ``nodes``; the runs as given
    where the search finds none."""
    best: list = [math.inf, list(runs)]
    budget = [nodes]

    def place(pos: int, left: list[int], seq: list[int], worst: float) -> None:
        if worst >= best[0] or budget[0] <= 0:
            return
        budget[0] -= 1
        if not left:
            best[0], best[1] = worst, list(seq)
            return
        for i in sorted(left, key=lambda i: cards[i]):
            if seq and host[seq[-1]] == host[i]:
                continue
            left.remove(i)
            seq.append(i)
            place(pos + sizes[i], left, seq, max(worst, _ratio(ring_crossings(pos, sizes[i], cp), cards[i])))
            seq.pop()
            left.append(i)

    place(start, list(runs), [], 0.0)
    return best[0], best[1]


def _card_gbps(topo: Topology, run: list[str]) -> float:
    """Bandwidth out of the host over the cards the run's GPUs use."""
    h = topo.host_of(run[0])
    nics = {topo.routes.nic_of(g) for g in run} - {None}
    return sum(d["bw_gbps"] for n in nics for v, d in topo.graph.adj[n].items() if topo.graph.nodes[v].get("host") != h)
