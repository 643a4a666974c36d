"""Simulated annealing over rank orders: the search's last resort on small problems it could not prove.

Local search only takes moves that do not raise the step time, so it stays
in the valley it starts in. Some better orders lie past a ridge: where
each Ulysses group sits whole behind one NIC, a ring hop between hosts
sends ``u`` flows through that NIC; an order that splits one group over
two hosts (three members here, one there) sends fewer, and wins once its
ring is re-paired around it, but the first move of the way there slows the
all-to-all and no single move pays. Annealing takes such moves with
probability ``exp(-rise / T)``, ``T`` cooling geometrically from
``START`` of the step time to ``COOL`` of that, and keeps the best order
it met. Every move is priced in full (``StepModel.step``), so it runs only
on small problems, where that is cheap: a fixed number of moves on a fixed
seed, so the same input gives the same plan.
"""

from __future__ import annotations

import math
import random
import time

from topology.cost import StepModel
from topology.planning.search.delta import REL_TOL

START = 0.05
"""Starting temperature, as a share of the starting step time: a move 5% slower is taken about a third of the time."""
COOL = 1e-3
"""The last move's temperature over the first's: at the end only moves that keep the step time are taken."""
MOVE_SHARE = 0.3
"""Share of the moves that put a rank on an unused GPU of the pool (the rest swap two ranks)."""


def anneal(sm: StepModel, order: list[str], step: float, pool: list[str], seed: int, moves: int,
           budget_s: float) -> tuple[list[str], float]:
    """The best order met on ``moves`` annealing moves from ``order`` (step time ``step``), within ``budget_s``.

    Returns ``(order, step)``: ``order`` itself when nothing better was met.
    """
    rng = random.Random(seed)
    deadline = time.perf_counter() + budget_s
    n = len(order)
    if n < 2 or moves <= 0:
        return list(order), step
    current, now = list(order), step
    best, best_step = list(order), step
    taken = set(order)
    unused = [g for g in pool if g not in taken]
    temperature = START * step
    cooling = COOL ** (1 / moves)
    for _ in range(moves):
        if time.perf_counter() > deadline:
            break
        trial = list(current)
        i = rng.randrange(n)
        k = None
        if unused and rng.random() < MOVE_SHARE:
            k = rng.randrange(len(unused))
            trial[i] = unused[k]
        else:
            j = rng.randrange(n - 1)
            j += j >= i
            trial[i], trial[j] = trial[j], trial[i]
        priced = sm.step(trial)
        if priced < now or rng.random() < math.exp((now - priced) / temperature):
            if k is not None:
                unused[k] = current[i]
            current, now = trial, priced
            if now < best_step * (1 - REL_TOL):
                best, best_step = list(current), now
        temperature *= cooling
    return best, best_step
