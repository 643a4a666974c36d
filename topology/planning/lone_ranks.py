"""Ulysses groups with lone ranks: hosts too slow to send every ring of a cp group out lend one GPU each.

A host holding whole Ulysses groups of a cp group it does not hold whole
sends a ring hop of each of the group's ``u`` rings out, so its card is
shared ``u`` ways (pairs on a 6.25 GB/s card: two flows at 3.125 GB/s).
Where the fast hosts cannot hold the world, the rest must come from such
hosts, and there one GPU each does better than several GPUs of one: a lone
rank sends one ring hop, leaves the gradient ring once and pays one
all-to-all flow to its partners on fast hosts, all at the card's full rate.
The bound prices the same three kinds of flow per host
(``topology.planning.bounds.split_groups``); this is an order that meets it.

The construction takes the fastest rate ``tau`` at which the world fits:
hosts with a cp group's worth of GPUs hold whole cp groups (the slowest
first: they can do nothing better), hosts whose NICs carry ``u`` flows at
``tau`` hold Ulysses groups whole, and hosts whose fastest NIC carries one
flow at ``tau`` lend a lone rank each, fastest first, as few as the world
needs. A lone rank takes its partners from GPUs left over (which would
otherwise split a group across hosts) before it breaks a group, from its
own switch first; the order runs switch by switch, lone groups first, so
the gradient ring crosses each uplink once.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

from topology.network.model import Topology
from topology.planning.ring_order import locality_order, nic_groups, nic_spread_order


@dataclass
class _Shape:
    """Which hosts hold what, at one rate: whole cp groups, GPUs for whole Ulysses groups, lone ranks."""

    whole: dict[str, int]
    grouped: dict[str, int]
    lone: list[str]


def lone_rank_order(topo: Topology, hosts: list[str], gpus: int, cp: int, ulysses: int,
                    where: Callable[[str], tuple]) -> list[str] | None:
    """``gpus`` ranks in cp groups of ``cp`` with Ulysses groups of ``ulysses``, some of them lone ranks on slow
    hosts; ``where`` places a host (its switches, outermost first). None where the world fits without a lone
    rank (other constructions cover that) or not at all."""
    if ulysses < 2 or cp == ulysses:
        return None
    egress = {h: [_nic_egress(topo, h, gs[0]) for gs in nic_groups(topo, h)] for h in hosts}
    hosts = sorted(hosts, key=lambda h: (where(h), -sum(egress[h])))  # switch by switch, the fastest first
    shape = _fit(hosts, {h: len(topo.gpus(h)) for h in hosts}, egress, gpus, cp, ulysses)
    if shape is None:
        return None
    whole = {h: locality_order(topo, h)[: k * cp] for h, k in shape.whole.items()}
    order = [g for h in sorted(whole, key=where) for g in whole[h]]
    # Groups and leftovers per switch; a leftover GPU is a group of one.
    pools: dict[tuple, list[list[str]]] = {}
    for h in shape.grouped:
        gs = [g for g in nic_spread_order(topo, h, ulysses) if g not in whole.get(h, ())][: shape.grouped[h]]
        cut = len(gs) // ulysses * ulysses
        pool = pools.setdefault(where(h), [])
        pool += [gs[i:i + ulysses] for i in range(0, cut, ulysses)] + [[g] for g in gs[cut:]]
    lone_groups: dict[tuple, list[list[str]]] = {}
    for h in shape.lone:
        fastest = max(nic_groups(topo, h), key=lambda gs: _nic_egress(topo, h, gs[0]))
        lone_groups.setdefault(where(h), []).append([fastest[0]] + _partners(pools, where(h), ulysses - 1))
    for key in sorted(set(pools) | set(lone_groups)):
        rest = pools.get(key, [])
        order += [g for group in lone_groups.get(key, []) + sorted(rest, key=len, reverse=True) for g in group]
    return order if len(order) == gpus == len(set(order)) else None


def _fit(hosts: list[str], size: dict[str, int], egress: dict[str, list[float]], gpus: int, cp: int,
         u: int) -> _Shape | None:
    """The shape at the fastest rate where the world fits with at least one lone rank; None if it fits with
    none first (or never)."""
    total = {h: sum(egress[h]) if egress[h] else math.inf for h in hosts}
    single = {h: max(egress[h], default=math.inf) for h in hosts}
    for tau in sorted({*single.values(), *(total[h] / u for h in hosts)}, reverse=True):
        whole, left = {}, gpus // cp
        for h in sorted((h for h in hosts if size[h] >= cp and total[h] >= tau), key=lambda h: total[h]):
            whole[h] = min(left, size[h] // cp)
            left -= whole[h]
        whole = {h: k for h, k in whole.items() if k}
        free = {h: size[h] - whole.get(h, 0) * cp for h in hosts if total[h] >= u * tau}
        have = sum(free.values())
        slow = sorted((h for h in hosts if total[h] < u * tau <= u * single[h] and h not in whole),
                      key=lambda h: -single[h])
        lone = left * cp - min(have, left * cp)
        if lone == 0:
            return None
        if lone <= len(slow) and lone * (u - 1) <= have:
            grouped, need = {}, left * cp - lone
            for h in free:  # switch by switch, the fastest first
                grouped[h] = min(free[h], need)
                need -= grouped[h]
            return _Shape(whole, {h: n for h, n in grouped.items() if n}, slow[:lone])
    return None


def _partners(pools: dict[tuple, list[list[str]]], at: tuple, count: int) -> list[str]:
    """``count`` partners for a lone rank under switch path ``at``: leftovers first, then a broken group, each from
    ``at``'s pool first, then the largest; what a broken group has beyond them goes back as leftovers."""
    keys = [at] + sorted((k for k in pools if k != at), key=lambda k: -sum(map(len, pools[k])))
    got: list[str] = []
    for leftovers in (True, False):
        for key in keys:
            for group in [g for g in pools.get(key, []) if not leftovers or len(g) <= count]:
                if len(got) >= count:
                    break
                pools[key].remove(group)
                got += group
                if len(got) > count:  # a broken group: the rest stays with its switch
                    pools[key].extend([g] for g in got[count:])
    return got[:count]


def _nic_egress(topo: Topology, host: str, gpu: str) -> float:
    """GB/s out of the host through the NIC ``gpu`` leaves by (inf where it has none)."""
    nic = topo.routes.nic_of(gpu)
    if nic is None:
        return math.inf
    return sum(d["bw_gbps"] for v, d in topo.graph.adj[nic].items() if topo.graph.nodes[v].get("host") != host)
