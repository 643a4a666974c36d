"""Hierarchical ring planner: which GPU holds which rank.

NCCL, torchrun and Ray Train connect ranks in rank order, so the rank order
is the lever. The plan's rank grid is ``(dp, ring, ulysses)`` (see
``topology.plan``): a context-parallel group is ``cp`` consecutive ranks,
and its ring visits them in order. The ``aware`` strategy builds that order
top-down:

1. Hosts: the fewest hosts, the fastest-connected first (a degraded cable
   is left out when the GPUs allow), drawn from as few leaf switches as
   possible.
2. Rings over hosts: when a ring is larger than a host, its hosts are a
   run of the leaf-sorted host list (so a ring sits under as few switches
   as possible) ordered as a bottleneck cycle (``topology.ring_order``);
   on 8 hosts or fewer every host choice and split is tried and scored by
   the cost model's link sharing.
3. GPUs in a host: PCIe order (a depth-first walk of the host's links from
   the NIC), so rings smaller than a host fill switches and sockets; a host
   that a ring passes through is entered and left by the GPUs nearest its
   NIC, with Ulysses groups kept whole.

DP peers line up because every ring repeats the same in-host order.
Baselines: ``naive`` (hosts as listed, i.e. Ray's order, GPUs by CUDA index)
and ``random`` (seeded shuffle). Deterministic for the same input.
"""

from __future__ import annotations

import itertools
import math
import random
import statistics
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Callable

from topology.cost import LLAMA3_8B, FlowModel, HardwareRates, ModelShape, estimate
from topology.errors import ConfigError
from topology.model import Topology
from topology.plan import GroupLayout, Plan, RankPlacement
from topology.ring_order import bottleneck_cycle, locality_order, through_order

TOKENS_PER_GPU = 16384
"""Default sequence length per GPU: the recipe's long stages hold 16K tokens per GPU."""
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

    Returns
    -------
    Plan
        With ``cost`` filled from ``topology.cost.estimate``.

    Raises
    ------
    ConfigError
        On a shape that does not fit the topology, with the fix in the message.
    """
    seq_len = TOKENS_PER_GPU * cp if seq_len is None else seq_len
    req = _request(topo, gpus, cp, ulysses, seq_len, strategy, seed, hosts, flows)
    order = STRATEGIES[strategy](req)
    placements = []
    for rank, gpu in enumerate(order):
        host = topo.host_of(gpu)
        data = topo.graph.nodes[host]
        placements.append(RankPlacement(rank, host, topo.graph.nodes[gpu]["index"], data.get("node_id"), data.get("ip")))
    plan = Plan(strategy, gpus // cp, cp, ulysses, seq_len, placements, topology=topo.name)
    plan.cost = estimate(plan, topo, model, flows=req.flows, rates=rates).to_dict()
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
    return PlanRequest(topo, gpus, cp, ulysses, hosts, flows or FlowModel(topo), seed)


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
    """The topology-aware rank order; see the module docstring."""
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


def host_egress(topo: Topology, host: str) -> float:
    """Bandwidth a host's NIC has to the rest of the cluster (median over its external links)."""
    links = [d["bw_gbps"] for nic in topo.nics(host) for v, d in topo.graph.adj[nic].items()
             if topo.graph.nodes[v].get("host") != host]
    return statistics.median(links) if links else math.inf


def select_hosts(req: PlanRequest, egress: dict[str, float]) -> list[str]:
    """The hosts to use, leaf by leaf (the list the ring runs are cut from).

    The fewest hosts whose links are as fast as possible (a host on a
    degraded cable is taken only when the GPUs need it), then from the
    leaves that hold the most of them, so rings span few switches.
    """
    topo = req.topo
    ranked = sorted(req.hosts, key=lambda h: -egress[h])
    total, threshold = 0, math.inf
    for h in ranked:
        total += req.gpu_count(h)
        threshold = egress[h]
        if total >= req.gpus:
            break
    by_leaf: dict[object, list[str]] = {}
    for h in req.hosts:
        if egress[h] >= threshold:
            by_leaf.setdefault(topo.leaf_of(h), []).append(h)
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
    groups = tuple(leaf_ids.setdefault(topo.leaf_of(h), len(leaf_ids)) for h in hosts)
    return [hosts[i] for i in _cycle_indices(tuple(map(tuple, bw)), groups)]


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
