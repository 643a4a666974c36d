"""Rings as cp groups of their own, Ulysses groups across them: rings that fit a fast domain a cp group does not."""

from __future__ import annotations

from dataclasses import replace

from topology.planning.constructions.hierarchical import hierarchical_order
from topology.planning.constructions.packing import grouped_ring_orders
from topology.planning.request import PlanRequest


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
