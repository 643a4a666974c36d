"""Segments: ``u`` GPUs of each host cut into runs that rings string together, layer by layer or host by host."""

from __future__ import annotations

import itertools

from topology.planning.constructions.hosts import choose_hosts
from topology.planning.constructions.ring_order import locality_order, nic_spread_order
from topology.planning.request import PlanRequest


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
            hosts = choose_hosts(req, per_host, s)
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
