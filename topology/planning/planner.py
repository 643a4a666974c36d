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
  the bus bound where one exists (``topology.planning.constructions.gradient_cycle``), or
  run by run, each host entered and left behind the NICs that keep its flows
  fastest (rails joined rail to rail: ``topology.planning.constructions.block_cycle``);
  and, short of the bound, every construction's cp groups restrung for the
  gradient ring (their sequence and where each starts; rings and all-to-all
  as built);
* cp groups fit to the cards, with Ulysses groups: at the fastest rate
  where the world fits, each host holds what its NICs carry (whole groups,
  kept to one cp group on slow cards, or one lone rank partnered on fast
  hosts: ``topology.planning.constructions.card_fit``);
* ``naive`` itself, so the plan is never worse than Ray's order.

Hosts are chosen under the widest uplinks first (a leaf behind a degraded
uplink is left out when the GPUs allow) and in switch order, any depth.
``topology.planning.search.optimise`` then searches small pools exhaustively or improves the
best construction by local search, and says when the plan is optimal.

Baselines: ``naive`` (hosts as listed, i.e. Ray's order, GPUs by CUDA index)
and ``random`` (seeded shuffle). Deterministic for the same input.
"""

from __future__ import annotations

import math
import random
from typing import Callable

from topology.cost import LLAMA3_8B, FlowModel, HardwareRates, ModelShape, StepModel, estimate, step_bound
from topology.errors import ConfigError
from topology.network.model import Topology
from topology.planning.bounds.rates import reads_every_pair
from topology.planning.constructions.block_cycle import cp_groups_reordered
from topology.planning.constructions.card_fit import card_fit_order
from topology.planning.constructions.cycles import bus_cycle_order, host_run_orders, tiled_runs_order, widest_cycle_order
from topology.planning.constructions.gradient_cycle import widest_gradient_cycle
from topology.planning.constructions.hierarchical import hierarchical_order
from topology.planning.constructions.hosts import group_path
from topology.planning.constructions.inside_hosts import rings_inside_hosts_orders
from topology.planning.constructions.packing import grouped_ring_orders, whole_host_order
from topology.planning.constructions.rings_apart import rings_apart_orders
from topology.planning.constructions.segments import segment_orders
from topology.planning.plan import Plan, RankPlacement
from topology.planning.request import PlanRequest
from topology.planning.search.delta import REL_TOL
from topology.planning.search.optimise import default_budget, optimise

TOKENS_PER_GPU = 16384
"""Default sequence length per GPU: the recipe's long stages hold 16K tokens per GPU."""
CYCLE_HOSTS = 32
"""Clusters with at most this many hosts also get a construction that orders all hosts as one cycle."""
TILED_GPUS = 1024
"""Plans of at most this many GPUs (on at most ``CYCLE_HOSTS`` hosts) also get runs tiled to ring borders."""


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


STRATEGIES: dict[str, Callable[[PlanRequest], list[str]]] = {
    "aware": aware_order,
    "naive": naive_order,
    "random": random_order,
}
"""Strategy name -> function from a checked request to the GPU of every rank, in rank order."""
