"""Rings inside hosts first: each host as many whole rings as it holds, the remainders strung across hosts."""

from __future__ import annotations

from topology.network.model import Topology
from topology.planning.bounds.rates import switch_headroom
from topology.planning.constructions.hosts import group_path, host_egress, needed_egress, open_cycle
from topology.planning.constructions.packing import group_rings, widest_first
from topology.planning.constructions.ring_order import locality_order, nic_groups
from topology.planning.request import PlanRequest


def rings_inside_hosts_orders(req: PlanRequest) -> dict[str, list[str]]:
    """Each host as many whole rings as it holds, the hosts' remainders then strung into rings across hosts.

    A ring inside a host sends no hop through its NIC, so a host of 8 GPUs on
    a slow card still serves a ring of 6 at PCIe speed; only its other 2 GPUs
    need the card, and with GPUs to spare they (and small hosts on slow cards)
    are the ones left out. Orders that fill rings host after host cut them
    across host borders instead. The inside rings are cut from the host's
    GPUs in PCIe order, or, on hosts with several NICs, from each NIC's GPUs
    ("inside NIC groups"): a ring of 4 in each 6-GPU half of a 12-GPU host
    keeps off the link between the halves. Two ways to string the remainders:

    - packed as ``grouped_ring_orders`` packs them (close hosts together, on
      the fastest hosts that hold the GPUs), or where whole pieces cannot fill
      them, cut in switch order;
    - with each remainder of a host that has rings of its own at a ring's
      first or last place (``_rings_with_ends``).

    Each ring across hosts comes next to the inside rings of its first and
    last host, so the gradient ring enters those hosts once; a remainder in
    the middle of a ring leaves its host's inside rings elsewhere in the
    order, and the gradient ring then takes that host's card twice. Empty
    where no host holds a ring.

    Both are built on every host, and, where the world fits on the hosts at
    least as fast as some egress (``needed_egress``), again on those alone
    ("hosts the bus allows"): a ring inside a slow host costs its card
    nothing, but its ranks join the gradient ring, which then runs no faster
    than that card.
    """
    if req.ring < 2 or max(req.gpu_count(h) for h in req.hosts) < req.cp:
        return {}
    topo = req.topo
    egress = {h: host_egress(topo, h) for h in req.hosts}
    pools = {"": req.hosts}
    bus = needed_egress(egress, {h: req.gpu_count(h) for h in req.hosts}, req.gpus)
    if any(egress[h] < bus for h in req.hosts):  # hosts too slow for the gradient bus the world needs
        pools[", hosts the bus allows"] = [h for h in req.hosts if egress[h] >= bus]
    orders: dict[str, list[str]] = {}
    for which, pool in pools.items():
        fastest = sorted(pool, key=lambda h: (-egress[h], group_path(topo, h)))
        cuts = {"hosts": {h: [locality_order(topo, h)] for h in fastest}}
        if any(len(topo.nics(h)) > 1 for h in fastest):
            cuts["NIC groups"] = {h: nic_groups(topo, h) for h in fastest}
        seen: list[dict[str, list[list[str]]]] = []
        for where, parts in cuts.items():
            inside = {h: [part[i:i + req.cp] for part in parts[h] for i in range(0, len(part) - req.cp + 1, req.cp)]
                      for h in fastest}
            if not any(inside.values()) or inside in seen:  # no host holds a ring, or NIC groups cut as hosts do
                continue
            seen.append(inside)
            spare = {h: [g for part in parts[h] for g in part[len(part) // req.cp * req.cp:]] for h in fastest}
            for how, cross in _remainder_rings(req, inside, spare, egress).items():
                order = _with_inside_rings(inside, cross, req.gpus // req.cp, fastest, topo)
                if len(order) == req.gpus:
                    orders[f"rings inside {where}, remainders {how}{which}"] = order
    return orders


def _remainder_rings(req: PlanRequest, inside: dict[str, list[list[str]]], spare: dict[str, list[str]],
                     egress: dict[str, float]) -> dict[str, list[list[str]]]:
    """The rings across hosts that ``rings_inside_hosts_orders`` strings from the GPUs ``spare`` holds, by how."""
    topo, cp = req.topo, req.cp
    want = req.gpus // cp - sum(map(len, inside.values()))
    if want <= 0:
        return {"across": []}
    rest = {h: len(gpus) for h, gpus in spare.items() if gpus}
    threshold = needed_egress(egress, rest, want * cp)
    groups: dict[tuple, list[str]] = {}
    for h in rest:
        if egress[h] >= threshold:
            groups.setdefault(group_path(topo, h), []).append(h)
    ordered = widest_first(groups, switch_headroom(topo))
    out: dict[str, list[list[str]]] = {}
    rings = group_rings(ordered, rest, cp, want, partial=True)
    if rings is not None:
        out["across"] = [[g for h in open_cycle(topo, hosts) for g in spare[h][:take.get(h)]] for hosts, take in rings]
    else:  # two rings may share a host's card: cut in switch order
        hosts = [h for members in ordered for h in sorted(members, key=lambda h: (-egress[h], -rest[h]))]
        run = [g for h in hosts for g in spare[h]]
        if len(run) >= want * cp:
            out["across"] = [run[i * cp:(i + 1) * cp] for i in range(want)]
    in_switch_order = [h for members in ordered for h in sorted(members, key=lambda h: -egress[h])]
    at_ends = [h for h in in_switch_order if inside[h] and rest[h] < cp]  # (NIC groups may leave a ring or more)
    ends = _rings_with_ends(at_ends, [h for h in in_switch_order if h not in at_ends], rest, cp, want)
    if ends is not None:
        left, strung = dict(spare), []
        for ring in ends:
            strung.append([])
            for h, n in ring:  # a host cut between two rings gives its first GPUs to the first
                strung[-1] += left[h][:n]
                left[h] = left[h][n:]
        out["at ring ends"] = strung
    return out


def _with_inside_rings(inside: dict[str, list[list[str]]], cross: list[list[str]], need: int, fastest: list[str],
                       topo: Topology) -> list[str]:
    """The order: each ring across hosts between the inside rings of its first and last host, then the fastest
    hosts' inside rings until ``need`` rings are placed."""
    left = need - len(cross)
    inside = {h: list(rings) for h, rings in inside.items()}

    def inside_of(h: str) -> list[str]:
        nonlocal left
        out = []
        while inside[h] and left > 0:
            out += inside[h].pop(0)
            left -= 1
        return out

    order: list[str] = []
    for ring in cross:
        order += inside_of(topo.host_of(ring[0])) + ring + inside_of(topo.host_of(ring[-1]))
    for h in fastest:
        order += inside_of(h)
    return order


def _rings_with_ends(ends: list[str], middle: list[str], sizes: dict[str, int], cp: int,
                     want: int) -> list[list[tuple[str, int]]] | None:
    """``want`` rings of ``cp`` GPUs as (host, GPUs) pieces: each of ``ends`` (fewer GPUs than a ring) whole at a
    ring's first or last place, ``middle`` hosts anywhere; None if they make fewer.

    A ring starts with the rest of a host the previous ring cut (so the cut
    host's GPUs stay next to each other in the order), else with an end
    host; it closes with an end host where middle hosts fill the room
    before it exactly, else with a middle host cut in two. Hosts are taken
    in the given order (switch order, fastest first), so with GPUs to spare
    the last hosts are the ones left out.
    """
    ends, middle = list(ends), list(middle)
    pieces = {h: sizes[h] for h in ends + middle}
    rings: list[list[tuple[str, int]]] = []
    carry: tuple[str, int] | None = None
    while len(rings) < want:
        ring: list[tuple[str, int]] = []
        if carry is not None:
            h, n = carry
            ring.append((h, min(n, cp)))
            carry = (h, n - cp) if n > cp else None
        elif ends:
            h = ends.pop(0)
            ring.append((h, pieces[h]))
        room = cp - sum(n for _, n in ring)
        fills: dict[int, list[str] | None] = {}  # by the closing host's size: ends are many, their sizes few

        def fill_for(n: int) -> list[str] | None:
            if n not in fills:
                fills[n] = _fills(middle, pieces, room - n)
            return fills[n]

        closing = next((h for h in ends if pieces[h] <= room and fill_for(pieces[h]) is not None), None)
        if closing is not None:
            ends.remove(closing)
            fill = fill_for(pieces[closing])
            ring += [(h, pieces[h]) for h in fill] + [(closing, pieces[closing])]
            middle = [h for h in middle if h not in fill]
        else:
            while room and middle:
                h = middle.pop(0)
                n = min(pieces[h], room)
                ring.append((h, n))
                room -= n
                if n < pieces[h]:
                    carry = (h, pieces[h] - n)
            if room:
                return None
        rings.append(ring)
    return rings


def _fills(hosts: list[str], sizes: dict[str, int], room: int) -> list[str] | None:
    """Whole hosts, taken in order where they fit, whose sizes add up to ``room`` exactly; None if that fails."""
    fill, left = [], room
    for h in hosts:
        if sizes[h] <= left:
            fill.append(h)
            left -= sizes[h]
        if not left:
            return fill
    return fill if not left else None
