"""Cp groups fit to the cards: what each host's NICs carry decides what it holds, with Ulysses groups.

A host holding whole Ulysses groups of a cp group it does not hold whole
sends a ring hop of each of the group's ``u`` rings out, so its card is
shared ``u`` ways (pairs on a 6.25 GB/s card: two flows at 3.125 GB/s),
and ``2 u`` ways if it holds parts of two cp groups. The construction takes
the fastest rate ``tau`` at which the world fits:

* hosts with a cp group's worth of GPUs hold whole cp groups (the slowest
  first: they can do nothing better);
* hosts whose NICs carry ``u`` flows at ``tau`` hold Ulysses groups whole,
  each kept inside one cp group unless its NICs carry ``2 u`` (the cp
  groups are packed with those blocks first, faster hosts filling the rest);
* where those fall short of the world, hosts whose fastest NIC carries one
  flow at ``tau`` lend one GPU each, fastest first, as few as the world
  needs. A lone rank sends one ring hop, leaves the gradient ring once and
  pays one all-to-all flow to its partners on fast hosts, all at the card's
  full rate, where several GPUs of one slow host would share it. Its
  partners are GPUs left over (which would otherwise split a group across
  hosts) before a group is broken, from its own switch first.

The bound prices the same three kinds of flow per host
(``topology.planning.bounds.split_groups``). The order runs switch by switch,
so the gradient ring crosses each uplink few times.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

from topology.network.model import Topology
from topology.planning.constructions.ring_order import locality_order, nic_groups, nic_spread_order


@dataclass
class _Shape:
    """Which hosts hold what at one rate (GB/s): whole cp groups, GPUs for whole Ulysses groups, lone ranks."""

    rate: float
    whole: dict[str, int]
    grouped: dict[str, int]
    lone: list[str]


def card_fit_order(topo: Topology, hosts: list[str], gpus: int, cp: int, ulysses: int,
                   where: Callable[[str], tuple]) -> tuple[list[str], int] | None:
    """``gpus`` ranks in cp groups of ``cp`` with Ulysses groups of ``ulysses``, and how many of them are lone ranks
    on slow hosts; ``where`` places a host (its switches, outermost first). None where nothing fits."""
    if ulysses < 2 or cp == ulysses:
        return None
    egress = {}
    for alike in topo.host_builds().values():  # hosts built alike have links out alike: one stands for all
        nics = [_nic_egress(topo, alike[0], gs[0]) for gs in nic_groups(topo, alike[0])]
        egress.update((h, nics) for h in alike)
    total = {h: sum(egress[h]) if egress[h] else math.inf for h in hosts}
    single = {h: max(egress[h], default=math.inf) for h in hosts}
    hosts = sorted(hosts, key=lambda h: (where(h), -total[h]))  # switch by switch, the fastest first
    shape = _fit(hosts, {h: len(topo.gpus(h)) for h in hosts}, total, single, gpus, cp, ulysses)
    if shape is None:
        return None
    # Each host's Ulysses groups across its NICs (so its rings leave by different NICs), per switch, a leftover GPU
    # a group of one; its whole cp groups from the GPUs they leave.
    spread = {h: nic_spread_order(topo, h, ulysses)[: n] for h, n in shape.grouped.items()}
    whole = {h: [g for g in locality_order(topo, h) if g not in spread.get(h, ())][: k * cp]
             for h, k in shape.whole.items()}
    pools: dict[tuple, list[list[str]]] = {}
    for h, gs in spread.items():
        cut = len(gs) // ulysses * ulysses
        pool = pools.setdefault(where(h), [])
        pool += [gs[i:i + ulysses] for i in range(0, cut, ulysses)] + [[g] for g in gs[cut:]]
    blocks: list[tuple[str | None, bool, list[list[str]]]] = []  # (host, kept in one cp group, its groups)
    lone_groups: dict[tuple, list[list[str]]] = {}
    for h in shape.lone:
        fastest = nic_groups(topo, h)[egress[h].index(single[h])]  # the GPUs behind its fastest NIC
        lone_groups.setdefault(where(h), []).append([fastest[0]] + _partners(pools, where(h), ulysses - 1))
    for key in sorted(set(pools) | set(lone_groups)):  # switch by switch
        blocks += [(None, False, [group]) for group in lone_groups.get(key, [])]
        by_host: dict[str, list[list[str]]] = {}
        for group in pools.get(key, []):
            by_host.setdefault(topo.host_of(group[0]), []).append(group)
        for h, groups in by_host.items():
            blocks.append((h, total[h] < 2 * ulysses * shape.rate, [g for g in groups if len(g) == ulysses]))
            blocks += [(None, False, [g]) for g in groups if len(g) < ulysses]
    headed, rest = _pack(blocks, gpus // cp - sum(shape.whole.values()), cp, list(whole))
    # A host's whole cp groups come right before the cp group its other groups start: one run of the gradient ring.
    order = []
    for h in sorted(whole, key=where):
        order += whole[h] + [g for group in headed.get(h, []) for g in group]
    order += [g for groups in rest for group in groups for g in group]
    return (order, len(shape.lone)) if len(order) == gpus == len(set(order)) else None


def _pack(blocks: list[tuple[str | None, bool, list[list[str]]]], bins: int, cp: int,
          heads: list[str]) -> tuple[dict[str, list[list[str]]], list[list[list[str]]]]:
    """The Ulysses groups of ``blocks`` in ``bins`` cp groups of ``cp`` ranks: those that start with a block kept
    whole of a host of ``heads`` (one each, while cp groups last), by host, and the others. Blocks kept whole go
    first, each in the first cp group with room for it (all of them, as large first, where that fails); the rest
    follow in order, cut where a cp group fills."""
    rigid = [(h, groups) for h, keep, groups in blocks if keep]
    anchored = [(h, groups) for h, groups in rigid if h in heads][:bins]
    for attempt in (rigid, sorted(rigid, key=lambda b: -sum(map(len, b[1])))):
        packed = [list(groups) for _, groups in anchored] + [[] for _ in range(bins - len(anchored))]
        room = [cp - sum(map(len, groups)) for groups in packed]
        placed = {id(groups) for _, groups in anchored}
        for _, groups in attempt:
            size = sum(map(len, groups))
            i = next((i for i in range(bins) if room[i] >= size), None) if id(groups) not in placed else None
            if i is not None:
                packed[i] += groups
                room[i] -= size
                placed.add(id(groups))
        if all(id(groups) in placed for _, groups in rigid):
            break
    rest = [g for _, _, groups in blocks if id(groups) not in placed for g in groups]
    for i in range(bins):
        while room[i] > 0 and rest:
            packed[i].append(rest.pop(0))
            room[i] -= len(packed[i][-1])
    return {h: packed[i] for i, (h, _) in enumerate(anchored)}, packed[len(anchored):]


def _fit(hosts: list[str], size: dict[str, int], total: dict[str, float], single: dict[str, float], gpus: int,
         cp: int, u: int) -> _Shape | None:
    """The shape at the fastest rate where the world fits, with as few lone ranks as it needs, for hosts of ``size``
    GPUs whose NICs carry ``total`` GB/s out, the fastest ``single``; None if it never does."""
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
        if lone <= len(slow) and lone * (u - 1) <= have:
            # The fastest hosts first, those with whole cp groups last (their gradient run would break in two);
            # whole Ulysses groups first, single GPUs only for what is left.
            grouped, need = dict.fromkeys(free, 0), left * cp - lone
            pick = sorted(free, key=lambda h: (h in whole, -total[h]))
            for step in (u, 1):
                for h in pick:
                    take = min((free[h] - grouped[h]) // step * step, need // step * step)
                    grouped[h] += take
                    need -= take
            return _Shape(tau, whole, {h: n for h, n in grouped.items() if n}, slow[:lone])
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
