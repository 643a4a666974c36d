"""Constructions that start from the gradient ring: all hosts as one cycle, rings cut from it where they cost least.

NCCL's all-reduce ring follows the rank order, so when gradient traffic
decides, the order of the hosts as one cycle matters more than each ring's
own; these build that cycle first (as a bottleneck cycle of hosts, GPU by
GPU at the bus bound, or host run by host run behind the right NICs) and
then choose where the rings are cut.
"""

from __future__ import annotations

import itertools

from topology.cost import StepModel
from topology.planning.bounds.run_tiling import RunTiling
from topology.planning.constructions.block_cycle import host_run_cycle
from topology.planning.constructions.hosts import choose_hosts, gpu_sequence, host_cycle, host_egress
from topology.planning.constructions.ring_order import through_order
from topology.planning.request import PlanRequest


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
    hosts = host_cycle(req.topo, choose_hosts(req, per_host, 1))
    seq = gpu_sequence(req, hosts)
    if req.ring < 2:
        return seq[: req.gpus]
    starts = list(dict.fromkeys(itertools.accumulate([0] + [per_host[h] for h in hosts[:-1]])))
    if len(seq) == req.gpus:
        starts = list(dict.fromkeys(i % req.cp for i in starts))  # the same cuts come back every ring
    return min(((seq[i:] + seq[:i])[: req.gpus] for i in starts), key=sm.step)


def widest_cycle_order(sm: StepModel, cycle: list[str]) -> list[str]:
    """The gradient ring built GPU by GPU at the bus bound (``topology.planning.constructions.gradient_cycle``) cut into rings where
    the step time is least: rings start at one of its host borders."""
    host_of = sm.topo.host_of
    starts = dict.fromkeys(i % sm.cp for i in range(len(cycle)) if host_of(cycle[i - 1]) != host_of(cycle[i]))
    return min((cycle[i:] + cycle[:i] for i in starts or [0]), key=sm.step)


def host_run_orders(req: PlanRequest, sm: StepModel) -> dict[str, list[str]]:
    """Hosts each one run of the rank order, on a cycle built run by run with each run's ends behind the NICs that
    keep the flows between hosts fastest (``topology.planning.constructions.block_cycle``): rails joined rail to rail, degraded
    cables and uplinks kept off. Runs of whole cp groups where hosts hold them, else of whole hosts; the cycle's
    flows alone at the bus bound, or its ring hops too.
    """
    out = {}
    sizes = {h: req.gpu_count(h) for h in req.hosts}
    groups = {h: min(n // req.cp, req.gpus // req.cp) for h, n in sizes.items()}
    for name, per_host, s in ((", cp groups whole", groups, req.cp), ("", sizes, 1)):
        if sum(per_host.values()) * s < req.gpus:
            continue
        chosen = choose_hosts(req, per_host, s)
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
    hosts = host_cycle(topo, choose_hosts(req, per_host, 1))
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
