"""Ring planner: which GPU holds which rank, chosen by the cost model's step time.

NCCL, torchrun and Ray Train connect ranks in rank order, so the rank order
is the lever. The plan's rank grid is ``(dp, ring, ulysses)`` (see
``topology.planning.plan``): a context-parallel group is ``cp`` consecutive ranks,
and its ring visits them in order.

The ``aware`` strategy is an optimiser. Its objective is the predicted step
time (``topology.cost.StepModel``: ring hops, Ulysses all-to-all, ZeRO
gradient traffic over NCCL's rank-order ring, every flow sharing the links
it crosses). It scores these constructions and keeps the best:

* ``hierarchical``: the fewest, fastest hosts from as few leaves as
  possible, rings over runs of them in bottleneck-cycle order, GPUs in PCIe
  order entered and left next to the NIC (on 8 hosts or fewer, every host
  choice and split);
* segments: ``u`` GPUs of each host (fewer than all keeps a ring off a slow
  inner link), cut into runs of ``s`` that rings string together layer by
  layer or host by host (rings that do not divide a host);
* whole hosts per ring: mixed host sizes packed first-fit, so no host
  serves two rings through one NIC; or packed inside each group of close
  hosts (NVLink domain, then switches), so no ring straddles two;
* bus cycle: all hosts as one bottleneck cycle, for when gradient traffic
  decides; and the widest gradient cycle, built GPU by GPU with every flow at
  the bus bound where one exists (``topology.planning.gradient_cycle``), or
  run by run, each host entered and left behind the NICs that keep its flows
  fastest (rails joined rail to rail: ``topology.planning.block_cycle``);
  and, short of the bound, every construction's cp groups restrung for the
  gradient ring (their sequence and where each starts; rings and all-to-all
  as built);
* cp groups fit to the cards, with Ulysses groups: at the fastest rate
  where the world fits, each host holds what its NICs carry (whole groups,
  kept to one cp group on slow cards, or one lone rank partnered on fast
  hosts: ``topology.planning.card_fit``);
* ``naive`` itself, so the plan is never worse than Ray's order.

Hosts are chosen under the widest uplinks first (a leaf behind a degraded
uplink is left out when the GPUs allow) and in switch order, any depth.
``topology.planning.search.optimise`` then searches small pools exhaustively or improves the
best construction by local search, and says when the plan is optimal.

Baselines: ``naive`` (hosts as listed, i.e. Ray's order, GPUs by CUDA index)
and ``random`` (seeded shuffle). Deterministic for the same input.
"""

from __future__ import annotations

import itertools
import math
import random
import statistics
from dataclasses import dataclass, field, replace
from functools import lru_cache
from typing import Callable

from topology.planning.bounds.rates import reads_every_pair, switch_headroom, switch_reach
from topology.planning.gradient_cycle import widest_gradient_cycle
from topology.planning.block_cycle import cp_groups_reordered, host_run_cycle
from topology.planning.card_fit import card_fit_order
from topology.planning.bounds.run_tiling import RunTiling
from topology.cost import LLAMA3_8B, FlowModel, HardwareRates, ModelShape, StepModel, estimate, step_bound
from topology.planning.search.delta import REL_TOL
from topology.planning.search.optimise import default_budget, optimise
from topology.errors import ConfigError
from topology.network.model import Topology
from topology.planning.plan import GroupLayout, Plan, RankPlacement
from topology.network.routing import nvlink_domain
from topology.planning.ring_order import bottleneck_cycle, locality_order, nic_groups, nic_spread_order, through_order

TOKENS_PER_GPU = 16384
"""Default sequence length per GPU: the recipe's long stages hold 16K tokens per GPU."""
CYCLE_HOSTS = 32
"""Clusters with at most this many hosts also get a construction that orders all hosts as one cycle."""
TILED_GPUS = 1024
"""Plans of at most this many GPUs (on at most ``CYCLE_HOSTS`` hosts) also get runs tiled to ring borders."""
EXHAUSTIVE_HOSTS = 8
"""Clusters with at most this many hosts get every host choice and split scored."""


@dataclass
class PlanRequest:
    """One planning problem, checked; what every strategy receives."""

    topo: Topology
    gpus: int
    cp: int
    ulysses: int
    hosts: list[str]
    """Candidate hosts, in the order the cluster lists them (Ray's order)."""
    flows: FlowModel
    seed: int = 0
    cuts: dict = field(default_factory=dict)
    """Where ``through_order`` cut each host layout, so 2048 alike hosts cost one search."""
    seq_len: int = 0
    model: ModelShape = LLAMA3_8B
    rates: HardwareRates | None = None
    """The cost model's rates (calibrated or defaults): the search ranks orders by the same step time the plan reports."""
    budget_s: float = 0.5
    """Wall-clock budget of the local search."""
    recompute: bool = False
    """Activation checkpointing: the step the search ranks by runs every layer's forward again."""
    info: dict = field(default_factory=dict)
    """What the strategy found out: the construction it kept, moves, optimality."""

    @property
    def ring(self) -> int:
        return self.cp // self.ulysses

    def gpu_count(self, host: str) -> int:
        return len(self.topo.gpus(host))


def make_plan(
    topo: Topology,
    gpus: int,
    cp: int,
    ulysses: int = 1,
    seq_len: int | None = None,
    strategy: str = "aware",
    seed: int = 0,
    hosts: list[str] | None = None,
    model: ModelShape = LLAMA3_8B,
    flows: FlowModel | None = None,
    rates: HardwareRates | None = None,
    *,
    budget_s: float | None = None,
    recompute: bool = False,
) -> Plan:
    """Place ``gpus`` ranks in rings of ``cp`` GPUs on ``topo``.

    Parameters
    ----------
    topo
        The cluster.
    gpus
        World size; ``dp = gpus / cp`` sequences run at once.
    cp
        GPUs per sequence (the recipe's ring size) = ring degree x ``ulysses``.
    ulysses
        All-to-all degree inside the ring (USP style); innermost axis.
    seq_len
        Tokens per sequence; default ``16384 * cp``. Zigzag needs it divisible by ``2 * cp``.
    strategy
        ``aware``, ``naive`` or ``random``.
    seed
        For ``random``.
    hosts
        Restrict to these hosts (e.g. the ones Ray gave), in Ray's order.
    flows
        A ``FlowModel`` of ``topo`` to share path caches between plans.
    rates
        ``HardwareRates`` of the cost model (``HardwareRates.from_calibration``); default: the bare peak model.
    budget_s
        Seconds the ``aware`` local search may take (default: scaled to the
        problem, at most ``SEARCH_BUDGET_S``).
    recompute
        Activation checkpointing is on (the trainer's default): the cost model adds the recomputed forward.

    Returns
    -------
    Plan
        With ``cost`` filled from ``topology.cost.estimate``; an ``aware``
        plan adds ``cost["search"]``: the construction kept, the moves made,
        whether the plan is proven optimal and what it traded.

    Raises
    ------
    ConfigError
        On a shape that does not fit the topology, with the fix in the message.
    """
    seq_len = TOKENS_PER_GPU * cp if seq_len is None else seq_len
    req = _request(topo, gpus, cp, ulysses, seq_len, strategy, seed, hosts, flows)
    req.model, req.rates, req.recompute = model, rates, recompute
    req.budget_s = default_budget(gpus) if budget_s is None else budget_s
    order = STRATEGIES[strategy](req)
    placements = []
    for rank, gpu in enumerate(order):
        host = topo.host_of(gpu)
        data = topo.graph.nodes[host]
        placements.append(RankPlacement(rank, host, topo.graph.nodes[gpu]["index"], data.get("node_id"), data.get("ip")))
    plan = Plan(strategy, gpus // cp, cp, ulysses, seq_len, placements, topology=topo.name)
    plan.cost = estimate(plan, topo, model, flows=req.flows, rates=rates, recompute=recompute,
                         a2a_floor=req.info.get("a2a_floor_s", 0.0),
                         attention_floor=req.info.get("attention_floor_s", 0.0)).to_dict()
    if req.info:
        plan.cost["search"] = req.info
    return plan


def _request(topo, gpus, cp, ulysses, seq_len, strategy, seed, hosts, flows) -> PlanRequest:
    for name, value in (("gpus", gpus), ("ring size (cp)", cp), ("ulysses", ulysses), ("seq_len", seq_len)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ConfigError(f"{name} is {value!r}; it must be a positive integer")
    if strategy not in STRATEGIES:
        raise ConfigError(f"strategy {strategy!r} is unknown; use one of {', '.join(STRATEGIES)}")
    if gpus % cp:
        raise ConfigError(f"ring size (cp) {cp} does not divide gpus {gpus}; pick a ring size that divides the GPU count")
    if cp % ulysses:
        raise ConfigError(f"ulysses {ulysses} does not divide the ring size (cp) {cp}; pick a divisor of {cp}")
    if seq_len % (2 * cp):
        raise ConfigError(
            f"seq_len {seq_len} is not divisible by 2 x ring size = {2 * cp} (zigzag gives each rank two chunks); "
            f"use a multiple such as {math.ceil(seq_len / (2 * cp)) * 2 * cp}"
        )
    if hosts is None:
        hosts = [h for h in topo.hosts if topo.gpus(h)]
    else:
        unknown = [h for h in hosts if h not in topo.graph or topo.kind(h) != "host"]
        if unknown:
            raise ConfigError(f"host(s) {', '.join(map(str, unknown))} are not in topology {topo.name!r}")
        hosts = [h for h in dict.fromkeys(hosts) if topo.gpus(h)]
    have = sum(len(topo.gpus(h)) for h in hosts)
    if gpus > have:
        raise ConfigError(f"gpus {gpus} is more than the {have} GPUs of topology {topo.name!r}; ask for at most {have}")
    return PlanRequest(topo, gpus, cp, ulysses, hosts, flows or FlowModel(topo), seed, seq_len=seq_len)


# ------------------------------------------------------------------ baselines
def naive_order(req: PlanRequest) -> list[str]:
    """Hosts in the order the cluster lists them, GPUs by CUDA index: what torchrun and Ray Train do."""
    return [g for h in req.hosts for g in req.topo.gpus(h)][: req.gpus]


def random_order(req: PlanRequest) -> list[str]:
    """Enough hosts drawn at random, their GPUs shuffled (seeded)."""
    rng = random.Random(req.seed)
    hosts = list(req.hosts)
    rng.shuffle(hosts)
    pool: list[str] = []
    for h in hosts:
        if len(pool) >= req.gpus:
            break
        pool.extend(req.topo.gpus(h))
    rng.shuffle(pool)
    return pool[: req.gpus]


# ------------------------------------------------------------------ aware
def aware_order(req: PlanRequest) -> list[str]:
    """The topology-aware rank order: the best of the constructions, naive included, then search.

    Every construction is scored by the cost model's step time (``StepModel``);
    the best is improved by local search within ``req.budget_s``, and small
    problems are searched exhaustively (``topology.planning.search.optimise``).
    """
    sm = StepModel(req.topo, req.gpus // req.cp, req.ring, req.ulysses, req.seq_len, req.model, req.flows, req.rates,
                   recompute=req.recompute)
    pool = [g for h in req.hosts for g in req.topo.gpus(h)]
    candidates = {"naive": naive_order(req), "hierarchical": hierarchical_order(req)}
    cycles: list[list[str]] = []  # gradient cycles whose host runs the search re-cuts at ring borders last
    candidates.update(segment_orders(req))
    whole = whole_host_order(req)
    if whole is not None:
        candidates["whole hosts per ring"] = whole
    candidates.update(grouped_ring_orders(req))
    inside = rings_inside_hosts_orders(req)
    if inside:  # packings of one construction: the best one stands for it (the first where they tie)
        kept = min(inside, key=lambda name: sm.step(inside[name]))
        candidates[kept] = inside[kept]
    candidates.update(rings_apart_orders(req))
    fit = card_fit_order(req.topo, req.hosts, req.gpus, req.cp, req.ulysses, lambda h: group_path(req.topo, h))
    if fit is not None:
        order, lone = fit
        candidates["cp groups fit to the cards" + (", lone ranks on slow hosts" if lone else "")] = order
    few_hosts = len(req.hosts) <= CYCLE_HOSTS
    if few_hosts:
        candidates["bus cycle"] = bus_cycle_order(req, sm)
    # The cycle searches read every pair's route: not where a construction already meets the bound.
    searching = reads_every_pair(req.topo)
    if searching:
        bound = step_bound(sm)["step"] * (1 + REL_TOL)
        searching = not any(sm.step(o) <= bound for o in candidates.values())
    if searching:
        widest = widest_gradient_cycle(req.topo, req.flows, pool, req.gpus)
        if widest is not None:
            candidates["widest gradient cycle"] = widest_cycle_order(sm, widest)
            cycles.append(widest)
        candidates.update(host_run_orders(req, sm))
    if few_hosts:
        tiled = tiled_runs_order(req) if req.gpus <= TILED_GPUS else None
        if tiled is not None:
            candidates["runs tiled to ring borders"] = tiled
    if searching and req.gpus > req.cp:
        # Each construction's cp groups strung anew for the gradient ring: its rings and all-to-all stay as built.
        for name, order in list(candidates.items()):
            strung = cp_groups_reordered(req.topo, req.flows, order, req.cp, req.ulysses)
            if strung is not None and strung != order:
                candidates[name + ", cp groups restrung"] = strung
    seen: list[list[str]] = []
    for name in list(candidates):  # the same order under two names is scored once
        if candidates[name] in seen:
            del candidates[name]
        else:
            seen.append(candidates[name])
    result = optimise(sm, candidates, pool, req.budget_s, cycles=cycles)  # its own fixed seed: one plan per input
    req.info.update(result.info())
    req.info["trade"] = trade_note(req, result.construction, sm, result.order)
    return result.order


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
    hosts = _choose_hosts(req, {h: n for h, n in sizes.items() if n <= req.cp} | {h: 0 for h, n in sizes.items() if n > req.cp}, 1)
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
    return [g for ring in full for g in _gpu_sequence(req, ring)]


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
    least as fast as some egress (``_needed_egress``), again on those alone
    ("hosts the bus allows"): a ring inside a slow host costs its card
    nothing, but its ranks join the gradient ring, which then runs no faster
    than that card.
    """
    if req.ring < 2 or max(req.gpu_count(h) for h in req.hosts) < req.cp:
        return {}
    topo = req.topo
    egress = {h: host_egress(topo, h) for h in req.hosts}
    pools = {"": req.hosts}
    bus = _needed_egress(egress, {h: req.gpu_count(h) for h in req.hosts}, req.gpus)
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
    threshold = _needed_egress(egress, rest, want * cp)
    groups: dict[tuple, list[str]] = {}
    for h in rest:
        if egress[h] >= threshold:
            groups.setdefault(group_path(topo, h), []).append(h)
    ordered = _widest_first(groups, switch_headroom(topo))
    out: dict[str, list[list[str]]] = {}
    rings = _group_rings(ordered, rest, cp, want, partial=True)
    if rings is not None:
        out["across"] = [[g for h in _open_cycle(topo, hosts) for g in spare[h][:take.get(h)]] for hosts, take in rings]
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


def rings_apart_orders(req: PlanRequest) -> dict[str, list[str]]:
    """Each ring placed as a cp group of its own, and each Ulysses group made of one rank of each of ``u`` such rings.

    The other constructions keep a Ulysses group on one host, so every ring
    of its cp group leaves that host, and ``u`` ring flows share its links.
    Where a ring fits in a fast group of GPUs that a whole cp group does not
    (an NVLink domain, a leaf), the rings run inside those groups at their
    speed and only the all-to-all (and the gradient ring, which steps through
    each Ulysses group's ranks) crosses between them. Built from the
    hierarchical and grouped-ring orders for ``dp x u`` rings of ``ring``
    GPUs: rings ``d u .. d u + u - 1`` (neighbours in that order) make cp group ``d``.
    """
    if req.ulysses < 2 or req.ring < 2:
        return {}
    alone = replace(req, cp=req.ring, ulysses=1, cuts={}, info={})
    orders = {"hierarchical": hierarchical_order(alone), **grouped_ring_orders(alone)}
    r, u = req.ring, req.ulysses
    return {f"{name}, Ulysses groups across rings": [order[(d * u + k) * r + i] for d in range(req.gpus // req.cp)
                                                     for i in range(r) for k in range(u)]
            for name, order in orders.items()}


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
    last host in part (``_group_rings``); none when a host is larger than a
    ring. Each is built on the fastest hosts that hold the GPUs (a host on a
    degraded cable only where the GPUs need it), and on all hosts.
    """
    sizes = {h: req.gpu_count(h) for h in req.hosts}
    if req.ring < 2 or max(sizes.values()) > req.cp:
        return {}
    egress = {h: host_egress(req.topo, h) for h in req.hosts}
    threshold = _needed_egress(egress, sizes, req.gpus)
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
        ordered = _widest_first(groups, headroom)
        for partial in [p for p, wanted in ((False, packed), (True, cut)) if wanted]:
            rings = _group_rings(ordered, sizes, req.cp, req.gpus // req.cp, partial)
            if rings is None:
                continue
            order = [g for hosts, take in rings for h in _open_cycle(req.topo, hosts) for g in _gpu_sequence(req, [h])[:take.get(h)]]
            if order not in out.values():
                out[f"rings {'cut' if partial else 'packed'} inside groups of depth {depth}"] = order
    return out


def _widest_first(groups: dict[tuple, list[str]], headroom: dict[str, float]) -> list[list[str]]:
    """Groups of close hosts (keyed by their ``group_path``), those whose switches have the most headroom first."""
    return [members for _, members in sorted(groups.items(), key=lambda kv: (-min(headroom[h] for h in kv[1]), kv[0]))]


def _group_rings(groups: list[list[str]], sizes: dict[str, int], cp: int, need: int,
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


def bus_cycle_order(req: PlanRequest, sm: StepModel) -> list[str]:
    """Hosts in one bottleneck cycle (the gradient ring's host order), rings cut from it in turn.

    NCCL's all-reduce ring follows the rank order, so when gradient traffic
    decides, the hosts' order as one cycle matters more than each ring's own.
    The cycle's start decides where rings are cut, so which hosts and
    switches a ring crosses (a host that holds a whole ring and part of the
    next takes one crossing ring through its card, not two), and, with GPUs
    to spare, which ones are left out: each host border is tried as the
    start, by the step time.
    """
    per_host = {h: req.gpu_count(h) for h in req.hosts}
    hosts = _cycle(req.topo, _choose_hosts(req, per_host, 1))
    seq = _gpu_sequence(req, hosts)
    if req.ring < 2:
        return seq[: req.gpus]
    starts = list(dict.fromkeys(itertools.accumulate([0] + [per_host[h] for h in hosts[:-1]])))
    if len(seq) == req.gpus:
        starts = list(dict.fromkeys(i % req.cp for i in starts))  # the same cuts come back every ring
    return min(((seq[i:] + seq[:i])[: req.gpus] for i in starts), key=sm.step)


def widest_cycle_order(sm: StepModel, cycle: list[str]) -> list[str]:
    """The gradient ring built GPU by GPU at the bus bound (``topology.planning.gradient_cycle``) cut into rings where
    the step time is least: rings start at one of its host borders."""
    host_of = sm.topo.host_of
    starts = dict.fromkeys(i % sm.cp for i in range(len(cycle)) if host_of(cycle[i - 1]) != host_of(cycle[i]))
    return min((cycle[i:] + cycle[:i] for i in starts or [0]), key=sm.step)


def host_run_orders(req: PlanRequest, sm: StepModel) -> dict[str, list[str]]:
    """Hosts each one run of the rank order, on a cycle built run by run with each run's ends behind the NICs that
    keep the flows between hosts fastest (``topology.planning.block_cycle``): rails joined rail to rail, degraded
    cables and uplinks kept off. Runs of whole cp groups where hosts hold them, else of whole hosts; the cycle's
    flows alone at the bus bound, or its ring hops too.
    """
    out = {}
    sizes = {h: req.gpu_count(h) for h in req.hosts}
    groups = {h: min(n // req.cp, req.gpus // req.cp) for h, n in sizes.items()}
    for name, per_host, s in ((", cp groups whole", groups, req.cp), ("", sizes, 1)):
        if sum(per_host.values()) * s < req.gpus:
            continue
        chosen = _choose_hosts(req, per_host, s)
        if s == 1:  # whole hosts: the chosen, the last in part
            runs, left = {}, req.gpus
            for h in chosen:
                runs[h] = min(per_host[h], left)
                left -= runs[h]
        else:  # whole cp groups: the chosen hosts first, the others where the cycle needs them
            runs = {h: per_host[h] * s for h in chosen + [h for h in req.hosts if h not in chosen] if per_host[h]}
        for hops, rings in (((), ""), (sm.hops, ", rings too")):
            cycle = host_run_cycle(req.topo, req.flows, runs, hops, req.ulysses, req.gpus)
            if cycle is not None:
                out["cycle of host runs by NICs" + name + rings] = cycle if hops else widest_cycle_order(sm, cycle)
    return out


def tiled_runs_order(req: PlanRequest) -> list[str] | None:
    """Hosts in one cycle (as ``bus_cycle_order``), each holding one run of the rank order, of a length chosen so
    that runs start and end where rings send fewest hops out of each host (``RunTiling.lengths``).

    Spare GPUs are then spread over the hosts where they let runs end at ring borders, not left at the cycle's
    end: hosts of 8 GPUs in rings of 3 hold 8 and 7 ranks in turn, each sending one ring out. A run keeps its
    host's sequence's ends (entered and left through the NIC) and leaves out GPUs from the middle.
    """
    if req.ring < 2:
        return None
    topo = req.topo
    per_host = {h: req.gpu_count(h) for h in req.hosts}
    hosts = _cycle(topo, _choose_hosts(req, per_host, 1))
    tiling = RunTiling(req.gpus // req.cp, req.ring, req.ulysses, max(per_host[h] for h in hosts))
    found = tiling.lengths([per_host[h] for h in hosts], [host_egress(topo, h) for h in hosts])
    if found is None:
        return None
    start, runs = found
    seq: list[str] = []
    for h, n in zip(hosts, runs):
        gpus = through_order(topo, h, req.ulysses, req.flows, req.cuts) if n else []
        seq.extend(gpus[: (n + 1) // 2] + gpus[len(gpus) - n // 2:] if n else [])
    order = [""] * req.gpus
    for k, gpu in enumerate(seq):  # the first run starts at rank ``start``
        order[(start + k) % req.gpus] = gpu
    return order


def segment_orders(req: PlanRequest) -> dict[str, list[str]]:
    """Constructions that use ``u`` GPUs of each host, cut into segments of ``s`` GPUs that rings string together.

    ``u`` below a host's GPU count (halves of it, down to one) keeps a host's
    ring traffic off its slow inner links (one socket of an 8-GPU PCIe
    server), and where hosts are many gives each GPU more of its host's
    NIC: with short sequences, 32 GPUs in Ulysses groups of 4 run 5% faster
    on 32 hosts of a leaf-spine than on 8; ``s`` dividing the ring lets
    rings that do not divide a host visit several hosts in equal runs, and
    ``s`` below the Ulysses degree strings a group over several hosts.
    Segments are laid "layer by layer" (segment 0 of every host, then
    segment 1, ...) or "host by host"; either way consecutive segments come
    from hosts in switch order, so a ring spans few switches. The ``u`` GPUs
    are a host's first in PCIe order, or, on hosts with several NICs, taken
    from each NIC's GPUs in turn ("across NICs"), so every GPU that talks to
    other hosts has a NIC of its own; with Ulysses, each group of ``ulysses``
    consecutive GPUs spans as many NICs ("in Ulysses groups across NICs"):
    its members sit on different rings, which then leave a host through
    different NICs.
    """
    topo, out = req.topo, {}
    sizes = sorted({req.gpu_count(h) for h in req.hosts})
    uses = sorted({u for n in sizes for u in _halves(n)}, reverse=True)  # whole hosts, one socket's worth, ...
    for u in uses:
        fits = [d for d in _halves(u) if d % req.ulysses == 0 and req.cp % d == 0]
        for s in sorted({min(u, req.cp), *fits[:2]}, reverse=True):
            if s % req.ulysses and req.ulysses % s:  # segments hold whole Ulysses groups, or groups whole segments
                continue
            per_host = {h: min(u, req.gpu_count(h)) // s for h in req.hosts}
            if sum(per_host.values()) * s < req.gpus:
                continue
            hosts = _choose_hosts(req, per_host, s)
            spreads: dict[str, int | None] = {"": 0}
            if any(len(topo.nics(h)) > 1 for h in hosts):
                if u < max(sizes):
                    spreads[" across NICs"] = None
                if req.ulysses > 1:
                    spreads[" in Ulysses groups across NICs"] = req.ulysses
            for (label, width), layout in itertools.product(spreads.items(), ("layers", "hosts")):
                segments = {h: _segments(req, h, u, s, width) for h in hosts}
                name = f"{u}/host{label} x {s}-GPU segments by {layout}"
                if layout == "layers":
                    seq = [seg for j in range(max(per_host[h] for h in hosts)) for h in hosts if j < per_host[h] for seg in [segments[h][j]]]
                else:
                    seq = [seg for h in hosts for seg in segments[h][:per_host[h]]]
                order = [g for seg in seq for g in seg][: req.gpus]
                if len(order) == req.gpus and order not in out.values():
                    out[name] = order
    return out


def _halves(n: int) -> list[int]:
    """n, n/2, n/4, ... while whole: the GPU counts that keep a host's PCIe tree balanced."""
    out = [n]
    while out[-1] % 2 == 0 and out[-1] > 1:
        out.append(out[-1] // 2)
    return out


def _segments(req: PlanRequest, host: str, u: int, s: int, spread: int | None = 0) -> list[list[str]]:
    """Runs of ``s`` of the host's first ``u`` GPUs: in PCIe order (``spread`` 0), or NIC-spread ``spread`` NICs at a time (None: all)."""
    base = (locality_order(req.topo, host) if spread == 0 else nic_spread_order(req.topo, host, spread))[:u]
    return [base[i:i + s] for i in range(0, len(base) - s + 1, s)]


def _choose_hosts(req: PlanRequest, per_host: dict[str, int], s: int) -> list[str]:
    """Enough hosts for ``req.gpus``, fastest first, from the best-connected switches, in switch order."""
    topo = req.topo
    gpus_on = {h: n * s for h, n in per_host.items()}
    # Hosts whose switches let out the most first (ECMP's equal split counted: a leaf with one slow uplink of two
    # lets out twice that), then the fastest cards among them.
    reach = switch_reach(topo)
    far = _needed_egress({h: reach.get(h, math.inf) for h in req.hosts}, gpus_on, req.gpus)
    egress = {h: host_egress(topo, h) for h in req.hosts}
    threshold = _needed_egress(egress, {h: n for h, n in gpus_on.items() if reach.get(h, math.inf) >= far}, req.gpus)
    paths = {h: group_path(topo, h) for h in req.hosts}
    headroom = switch_headroom(topo)
    groups: dict[tuple, list[str]] = {}
    for h in req.hosts:
        if per_host[h] and reach.get(h, math.inf) >= far and egress[h] >= threshold:
            groups.setdefault(paths[h], []).append(h)
    # Leaves under the widest uplinks first, the fullest first, in switch order (a pod's leaves stay together).
    chosen, total = [], 0
    for members in sorted(groups.values(), key=lambda hs: (-min(headroom[h] for h in hs), -sum(per_host[h] for h in hs),
                                                           paths[hs[0]])):
        for h in sorted(members, key=lambda h: (paths[h], -egress[h])):
            if total >= req.gpus:
                break
            chosen.append(h)
            total += per_host[h] * s
    return sorted(chosen, key=lambda h: (paths[h], -per_host[h]))


def trade_note(req: PlanRequest, construction: str, sm: StepModel, order: list[str]) -> str:
    """One line on what the plan chose and what now limits it."""
    f = sm.figures(order)
    used = {}
    for g in order:
        used[req.topo.host_of(g)] = used.get(req.topo.host_of(g), 0) + 1
    counts = sorted(set(used.values()))
    parts = [f"{construction}", f"{'/'.join(map(str, counts))} GPUs on each of {len(used)} hosts"]
    if f["hop"] is not None:
        a, b = f["hop"]
        route = sm.flows.path(order[a], order[b])
        load = sm.flows.load((order[x], order[y]) for x, y in sm.hops)
        (u, v), _ = min(route, key=lambda ef: sm.flows.capacity(ef[0]) / load[ef[0]])
        parts.append(f"ring bottleneck {u} -> {v} at {f['hop_gbps']:.3g} GB/s per flow")
    return "; ".join(parts)


def hierarchical_order(req: PlanRequest) -> list[str]:
    """The textbook construction: fewest hosts, rings over leaf runs, bottleneck host cycles, PCIe order."""
    topo = req.topo
    egress = {h: host_egress(topo, h) for h in req.hosts}
    sizes = {req.gpu_count(h) for h in req.hosts}
    per_host = sizes.pop() if len(sizes) == 1 else 0
    spans_hosts = per_host and req.ring > 1 and req.cp > per_host and req.cp % per_host == 0
    if spans_hosts and len(req.hosts) <= EXHAUSTIVE_HOSTS:
        return _best_split(req, egress, per_host)
    hosts = select_hosts(req, egress)
    if spans_hosts:
        return _gpu_sequence(req, _ring_host_order(req, hosts, req.cp // per_host))
    return _gpu_sequence(req, hosts)[: req.gpus]


def group_path(topo: Topology, host: str) -> tuple[str, ...]:
    """Where a host sits, outermost first: its NVLink domain (if any), then the switches above it.

    Hosts sharing a prefix are close: constructions keep a ring's hosts
    under one prefix, so a ring stays inside an NVLink domain before it
    stays under one leaf (NVLink outruns any NIC).
    """
    gpus = topo.gpus(host)
    domain = nvlink_domain(topo, gpus[0]) if gpus else None
    return (() if domain is None else (f"nvlink domain {domain}",)) + topo.switch_path(host)


def host_egress(topo: Topology, host: str) -> float:
    """Bandwidth a host's NIC has to the rest of the cluster (median over its external links)."""
    links = [d["bw_gbps"] for nic in topo.nics(host) for v, d in topo.graph.adj[nic].items()
             if topo.graph.nodes[v].get("host") != host]
    return statistics.median(links) if links else math.inf


def _needed_egress(egress: dict[str, float], gpus_on: dict[str, int], want: int) -> float:
    """The slowest egress among hosts taken fastest first until they hold ``want`` GPUs (all of them if they never
    do): the hosts at least that fast hold the GPUs, and one on a degraded cable joins only when they need it."""
    total, threshold = 0, math.inf
    for h in sorted((h for h in gpus_on if gpus_on[h]), key=lambda h: -egress[h]):
        total += gpus_on[h]
        threshold = egress[h]
        if total >= want:
            break
    return threshold


def select_hosts(req: PlanRequest, egress: dict[str, float]) -> list[str]:
    """The hosts to use, leaf by leaf (the list the ring runs are cut from).

    The fewest hosts whose links are as fast as possible (a host on a
    degraded cable is taken only when the GPUs need it), then from the
    leaves that hold the most of them, so rings span few switches.
    """
    topo = req.topo
    threshold = _needed_egress(egress, {h: req.gpu_count(h) for h in req.hosts}, req.gpus)
    by_leaf: dict[object, list[str]] = {}
    for h in req.hosts:
        if egress[h] >= threshold:
            by_leaf.setdefault(group_path(topo, h), []).append(h)
    leaves = sorted(by_leaf.values(), key=lambda hs: -sum(req.gpu_count(h) for h in hs))
    chosen, total = [], 0
    for members in leaves:
        for h in sorted(members, key=lambda h: -egress[h]):
            if total >= req.gpus:
                return chosen
            chosen.append(h)
            total += req.gpu_count(h)
    return chosen


def _ring_host_order(req: PlanRequest, hosts: list[str], k: int) -> list[str]:
    """Cut the leaf-sorted hosts into runs of ``k`` and order each run as a bottleneck cycle."""
    out: list[str] = []
    for i in range(0, len(hosts), k):
        out.extend(_cycle(req.topo, hosts[i:i + k]))
    return out


def _cycle(topo: Topology, hosts: list[str]) -> list[str]:
    bw = topo.host_bandwidth_matrix(hosts)
    leaf_ids: dict[object, int] = {}
    groups = tuple(leaf_ids.setdefault(group_path(topo, h), len(leaf_ids)) for h in hosts)
    return [hosts[i] for i in _cycle_indices(tuple(map(tuple, bw)), groups)]


def _open_cycle(topo: Topology, hosts: list[str]) -> list[str]:
    """``_cycle`` turned to start where it crosses the highest switch: the ring's hops are the same, and the
    gradient ring, which walks the ranks in order, then enters and leaves each group of the ring once."""
    cycle = _cycle(topo, hosts)
    paths = [group_path(topo, h) for h in cycle]

    def shared(i: int) -> int:  # switches above both hosts i - 1 and i
        return next((k for k, (a, b) in enumerate(zip(paths[i - 1], paths[i])) if a != b), len(paths[i]))

    start = min(range(len(cycle)), key=shared)
    return cycle[start:] + cycle[:start]


@lru_cache(maxsize=4096)
def _cycle_indices(bw: tuple[tuple[float, ...], ...], groups: tuple[int, ...]) -> tuple[int, ...]:
    # Rings of a regular fabric repeat the same bandwidth pattern: solve each pattern once.
    return tuple(bottleneck_cycle(range(len(bw)), lambda i, j: bw[i][j], groups.__getitem__))


def _best_split(req: PlanRequest, egress: dict[str, float], per_host: int) -> list[str]:
    """Small clusters: try every host subset and split into rings; keep the best by the cost model."""
    k, need = req.cp // per_host, req.gpus // per_host
    rings = GroupLayout.from_grid(req.gpus // req.cp, req.ring, req.ulysses).ring_groups
    best_key, best = None, None
    for subset in itertools.combinations(req.hosts, need):
        for split in _splits(list(subset), k):
            seq = _gpu_sequence(req, [h for ring in split for h in _cycle(req.topo, ring)])
            rate, lat, cross = _score(req, rings, seq)
            key = (-rate, cross, -min(egress[h] for h in subset), lat)
            if best_key is None or key < best_key:
                best_key, best = key, seq
    assert best is not None  # need <= len(hosts) was checked, so one split exists
    return best


def _splits(hosts: list[str], k: int):
    """Every way to cut ``hosts`` into unordered groups of ``k`` (first host anchors each group)."""
    if not hosts:
        yield []
        return
    first, rest = hosts[0], hosts[1:]
    for others in itertools.combinations(rest, k - 1):
        remaining = [h for h in rest if h not in others]
        for tail in _splits(remaining, k):
            yield [[first, *others], *tail]


def _score(req: PlanRequest, rings: list[list[int]], seq: list[str]) -> tuple[float, float, int]:
    """(slowest hop GB/s, its latency µs, cross-switch hops) of a rank order with these ring groups."""
    hops = [(seq[g[i]], seq[g[(i + 1) % len(g)]]) for g in rings for i in range(len(g))]
    rates = req.flows.bandwidths(hops)
    rate, lat = min(rates, key=lambda r: (r[0], -r[1]))
    topo = req.topo
    cross = sum(topo.leaf_of(topo.host_of(a)) != topo.leaf_of(topo.host_of(b)) for a, b in hops)
    return rate, lat, cross


def _gpu_sequence(req: PlanRequest, hosts: list[str]) -> list[str]:
    """Concatenate each host's GPU order: PCIe order, rotated to the NIC when a ring passes through."""
    seq: list[str] = []
    for h in hosts:
        if req.ring > 1 and req.cp > req.gpu_count(h):
            seq.extend(through_order(req.topo, h, req.ulysses, req.flows, req.cuts))
        else:
            seq.extend(locality_order(req.topo, h))
    return seq


STRATEGIES: dict[str, Callable[[PlanRequest], list[str]]] = {
    "aware": aware_order,
    "naive": naive_order,
    "random": random_order,
}
"""Strategy name -> function from a checked request to the GPU of every rank, in rank order."""
