"""Rings of whole hosts: mixed host sizes packed into rings so that each host serves one ring through its card."""

from __future__ import annotations

from topology.planning.bounds.rates import switch_headroom
from topology.planning.constructions.hosts import (choose_hosts, gpu_sequence, group_path, host_egress, needed_egress,
                                                   open_cycle)
from topology.planning.request import PlanRequest


def whole_host_order(req: PlanRequest) -> list[str] | None:
    """Rings made of whole hosts (mixed sizes packed first-fit in switch order, or largest first where that leaves
    rings unfilled): each host serves one ring.

    A host split between two rings takes a flow of each through its NIC; with
    4- and 8-GPU hosts in one cluster, packing whole hosts into rings of
    ``cp`` avoids that. None when the hosts cannot fill enough rings.
    """
    if req.ring < 2:
        return None
    sizes = {h: req.gpu_count(h) for h in req.hosts}
    hosts = choose_hosts(req, {h: n for h, n in sizes.items() if n <= req.cp} | {h: 0 for h, n in sizes.items() if n > req.cp}, 1)
    need = req.gpus // req.cp
    # The chosen hosts alone first: hosts outside them (behind a degraded uplink) join only where those cannot
    # fill the rings whole.
    for candidates in (hosts, hosts + [h for h in req.hosts if h not in set(hosts) and 0 < sizes[h] <= req.cp]):
        full = _pack_rings(candidates, sizes, req.cp, newest_first=True, enough=need)[:need]
        if len(full) < need:  # sizes that complete each other sit under different switches: largest first
            full = _pack_rings(sorted(candidates, key=lambda h: -sizes[h]), sizes, req.cp, enough=need)[:need]
        if len(full) == need:
            break
    else:
        return None
    return [g for ring in full for g in gpu_sequence(req, ring)]


def grouped_ring_orders(req: PlanRequest) -> dict[str, list[str]]:
    """Rings of whole hosts packed inside each group of close hosts, then whole groups' remainders packed together.

    Taking "enough hosts" in switch order cuts rings across group borders
    when a group's GPUs are not a multiple of the ring (an NVLink domain of
    18 trays holds one ring of 16); here each group first contributes the
    rings it fills alone, the best-connected groups first. What each group
    has left is then one piece, and rings are made of whole pieces whose
    sizes add up to the ring (``_pack_pieces``): leaves of 12, 12 and 4 GPUs
    make a ring of 28 that leaves each of them once, where cutting the
    leaves in order would make two rings share a leaf's uplink. Groups are
    hosts sharing the first ``d`` entries of ``group_path`` (NVLink domain,
    then switches top-down), one construction per depth ``d`` that fills
    enough rings, and with GPUs to spare a second that may use a group's
    last host in part (``group_rings``); none when a host is larger than a
    ring. Each is built on the fastest hosts that hold the GPUs (a host on a
    degraded cable only where the GPUs need it), and on all hosts.
    """
    sizes = {h: req.gpu_count(h) for h in req.hosts}
    if req.ring < 2 or max(sizes.values()) > req.cp:
        return {}
    egress = {h: host_egress(req.topo, h) for h in req.hosts}
    threshold = needed_egress(egress, sizes, req.gpus)
    fast = [h for h in req.hosts if egress[h] >= threshold]
    out: dict[str, list[str]] = {}
    for hosts, suffix in [(fast, ", fastest hosts"), (req.hosts, "")][len(fast) == len(req.hosts):]:
        for name, order in _grouped_rings(req, hosts, sizes).items():
            if order not in out.values():
                out[name + suffix] = order
    return out


def _grouped_rings(req: PlanRequest, hosts: list[str], sizes: dict[str, int]) -> dict[str, list[str]]:
    """``grouped_ring_orders`` on ``hosts``."""
    headroom = switch_headroom(req.topo)
    paths = {h: group_path(req.topo, h) for h in hosts}
    out: dict[str, list[str]] = {}
    for depth in range(1, max(map(len, paths.values()), default=0) + 1):
        groups: dict[tuple, list[str]] = {}
        for h in hosts:
            groups.setdefault(paths[h][:depth], []).append(h)
        # Whole hosts only where there are groups that rings do not divide (elsewhere the other constructions keep
        # rings inside groups); hosts in part wherever GPUs are spare, for rings that hosts do not divide.
        packed = len(groups) > 1 and any(sum(sizes[h] for h in members) % req.cp for members in groups.values())
        cut = sum(sizes[h] for h in hosts) > req.gpus
        ordered = widest_first(groups, headroom)
        for partial in [p for p, wanted in ((False, packed), (True, cut)) if wanted]:
            rings = group_rings(ordered, sizes, req.cp, req.gpus // req.cp, partial)
            if rings is None:
                continue
            order = [g for hosts, take in rings for h in open_cycle(req.topo, hosts) for g in gpu_sequence(req, [h])[:take.get(h)]]
            if order not in out.values():
                out[f"rings {'cut' if partial else 'packed'} inside groups of depth {depth}"] = order
    return out


def widest_first(groups: dict[tuple, list[str]], headroom: dict[str, float]) -> list[list[str]]:
    """Groups of close hosts (keyed by their ``group_path``), those whose switches have the most headroom first."""
    return [members for _, members in sorted(groups.items(), key=lambda kv: (-min(headroom[h] for h in kv[1]), kv[0]))]


def group_rings(groups: list[list[str]], sizes: dict[str, int], cp: int, need: int,
                 partial: bool) -> list[tuple[list[str], dict[str, int]]] | None:
    """``need`` rings of ``cp`` GPUs: each group's own first, then the groups' remainders packed whole; None if
    they make fewer.

    A ring is its hosts and, for a host it uses only in part, how many of its GPUs. With ``partial`` (a cluster
    with GPUs to spare), a group whose whole hosts cannot fill a ring exactly still makes one from its largest
    hosts, the last in part, leaving that host's other GPUs free rather than sending two rings through its card.
    """
    rings: list[tuple[list[str], dict[str, int]]] = []
    pieces: list[list[str]] = []
    for members in groups:
        rest = sorted(members, key=lambda h: -sizes[h])
        inside = _pack_rings(rest, sizes, cp)
        rings.extend((ring, {}) for ring in inside)
        used = {h for ring in inside for h in ring}
        rest = [h for h in rest if h not in used]
        while partial and len(rings) < need and sum(sizes[h] for h in rest) >= cp:
            ring, total = [], 0
            while total < cp:
                ring.append(rest.pop(0))
                total += sizes[ring[-1]]
            rings.append(_in_part(ring, sizes, total - cp))
        if rest:
            pieces.append(rest)
    if len(rings) < need:
        rings.extend((ring, {}) for ring in _pack_pieces(pieces, sizes, cp, need - len(rings)))
    while partial and len(rings) < need and sum(sizes[h] for piece in pieces for h in piece) >= cp:
        # The largest piece, then the smallest that completes the ring (its last host in part): each piece joins
        # one ring, and what a ring leaves of its last piece stays free.
        pieces.sort(key=lambda piece: -sum(sizes[h] for h in piece))
        ring, total = [], 0
        while total < cp and pieces:
            short = cp - total
            fits = [piece for piece in pieces if sum(sizes[h] for h in piece) >= short]
            piece = min(fits, key=lambda piece: sum(sizes[h] for h in piece)) if total and fits else pieces[0]
            pieces.remove(piece)
            for h in sorted(piece, key=lambda h: -sizes[h]):
                if total >= cp:
                    break
                ring.append(h)
                total += sizes[h]
        if total < cp:
            break
        rings.append(_in_part(ring, sizes, total - cp))
    return rings[:need] if len(rings) >= need else None


def _in_part(ring: list[str], sizes: dict[str, int], surplus: int) -> tuple[list[str], dict[str, int]]:
    """A ring whose hosts hold ``surplus`` GPUs more than it needs, with its last host used in part."""
    return ring, {ring[-1]: sizes[ring[-1]] - surplus} if surplus else {}


def _pack_rings(hosts: list[str], sizes: dict[str, int], cp: int, newest_first: bool = False,
                enough: int | None = None) -> list[list[str]]:
    """Whole hosts packed into rings of ``cp`` GPUs, in ``hosts`` order; the rings filled exactly.

    Each host goes into the first open ring with room (the most recently
    opened first with ``newest_first``, which keeps neighbours in the given
    order together), else opens a new one; packing stops once ``enough``
    rings are full.
    """
    bins: list[list[str]] = []
    room: list[int] = []
    for h in hosts:
        order = range(len(bins) - 1, -1, -1) if newest_first else range(len(bins))
        fit = next((i for i in order if room[i] >= sizes[h]), None)
        if fit is None:
            bins.append([])
            room.append(cp)
            fit = len(bins) - 1
        bins[fit].append(h)
        room[fit] -= sizes[h]
        if enough is not None and sum(r == 0 for r in room) >= enough:
            break
    return [b for b, r in zip(bins, room) if r == 0]


def _pack_pieces(pieces: list[list[str]], sizes: dict[str, int], cp: int, want: int) -> list[list[str]]:
    """Up to ``want`` rings of ``cp`` GPUs, each made of whole pieces (lists of hosts) whose sizes add up to ``cp``.

    Each ring takes the fewest pieces that fill it exactly (a 0/1 knapsack over the pieces' sizes, so each
    piece it joins is left once), until no set of the remaining pieces fills one; a set of sizes found once is
    taken again while the remaining pieces still have those sizes. Hosts keep their piece's order; ``pieces``
    keeps the pieces no ring took.
    """
    left = [(sum(sizes[h] for h in piece), piece) for piece in pieces]
    rings: list[list[str]] = []
    chosen: list[int] = []
    while len(rings) < want and left:
        picked = _with_sizes(left, chosen) if chosen else None
        if picked is None:
            chosen = _fewest_exact([n for n, _ in left], cp) or []
            picked = _with_sizes(left, chosen) if chosen else None
            if picked is None:
                break
        rings.append([h for i in picked for h in left[i][1]])
        for i in reversed(picked):
            del left[i]
    pieces[:] = [piece for _, piece in left]
    return rings


def _fewest_exact(values: list[int], target: int) -> list[int] | None:
    """Sizes of the fewest of ``values`` that add up to ``target`` exactly, or None."""
    inf = len(values) + 1
    best = [0] + [inf] * target
    took: list[list[bool]] = []
    for v in values:
        row = [False] * (target + 1)
        for total in range(target, v - 1, -1):
            if best[total - v] + 1 < best[total]:
                best[total] = best[total - v] + 1
                row[total] = True
        took.append(row)
    if best[target] >= inf:
        return None
    out, total = [], target
    for i in range(len(values) - 1, -1, -1):
        if took[i][total]:
            out.append(values[i])
            total -= values[i]
    return out


def _with_sizes(left: list[tuple[int, list[str]]], wanted: list[int]) -> list[int] | None:
    """Indices into ``left`` of one piece of each size in ``wanted`` (the first ones, in order), or None."""
    need = list(wanted)
    picked = []
    for i, (n, _) in enumerate(left):
        if n in need:
            need.remove(n)
            picked.append(i)
    return None if need else picked
