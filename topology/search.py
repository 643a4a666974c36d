"""Search over rank orders for the smallest predicted step time.

The planner hands over a few constructed rank orders (Ray's order among
them) and the pool of GPUs it may use; this module returns the best order
it can find for the cost model's step time (``topology.cost.StepModel``).

Algorithms
----------
* Candidates: constructions are scored in turn, Ray's order last, until one
  meets the lower bound; the best is kept. Ray's order is always a
  candidate (or beaten by one that meets the bound), so the result is never
  worse than it.
* Exhaustive search, for small problems: every sequence of GPUs from the
  pool, up to twins (GPUs of one host with the same links to the same
  parts are interchangeable: swapping them changes no route), while the
  count stays under ``EXACT_ORDERS``. The result is then proven optimal.
* Local search, otherwise: first-improvement moves, a number that shrinks
  as the world grows (so a plan is reproducible), cut short by a time budget
  only on a machine too slow for it.
  A move swaps two ranks, moves a rank onto an unused GPU, or reverses a
  run of a ring; half the moves touch the slowest hop's ends. Each move is
  scored by the step time; only strict improvements are kept.
* Certificate: a plan whose step time meets the lower bound
  (``topology.cost.step_bound``) is optimal too.
"""

from __future__ import annotations

import math
import random
import time
from dataclasses import dataclass
from typing import Iterator

from topology.cost import StepModel, step_bound

EXACT_ORDERS = 3000
"""Largest number of distinct rank orders (up to twins) searched exhaustively."""
SEARCH_BUDGET_S = 2.0
"""Most wall-clock seconds the local search takes by default: a safety net, above what its move count needs."""
REL_TOL = 1e-9
STALE_MOVES = 1000
"""Local search stops after this many moves in a row without improvement."""
MAX_EVALS = 3000
EVAL_WORK = 10000
"""Local search scores at most ``min(MAX_EVALS, EVAL_WORK / world)`` moves (each costs O(world))."""
MIN_MOVES = 20
"""Below this many moves local search is skipped."""


def default_budget(gpus: int) -> float:
    """Local-search seconds for a world of ``gpus``: ``SEARCH_BUDGET_S``, several times what its moves take.

    The move count, not this clock, ends a search on a working machine, so
    the same input gives the same plan even on a busy one.
    """
    return SEARCH_BUDGET_S


@dataclass
class SearchResult:
    order: list[str]
    step_s: float
    construction: str
    """Name of the construction the search started from (or ``exhaustive``)."""
    candidates: dict[str, float]
    """Step time of every construction scored, seconds."""
    moves: int
    optimal: bool
    proof: str | None
    """``exhaustive`` or ``meets bound`` when optimal."""

    def info(self) -> dict:
        return {"construction": self.construction, "moves": self.moves, "optimal": self.optimal, "proof": self.proof,
                "candidates": {k: float(f"{v:.6g}") for k, v in self.candidates.items()}}


def optimise(sm: StepModel, candidates: dict[str, list[str]], pool: list[str], budget_s: float, seed: int = 0) -> SearchResult:
    """The best rank order found for ``sm``'s step time; see the module docstring.

    Parameters
    ----------
    sm
        Objective: the step time of a rank order.
    candidates
        Constructed orders by name; ``naive`` among them.
    pool
        Every GPU the plan may use.
    budget_s
        Wall-clock seconds for local search.
    seed
        Seed of the move sampler (the result is deterministic for a seed).

    Returns
    -------
    SearchResult
    """
    bound = step_bound(sm)["step"]
    scores: dict[str, float] = {}
    for name in sorted(candidates, key=lambda k: k == "naive"):  # Ray's order is scored last
        scores[name] = sm.step(candidates[name])
        if scores[name] <= bound * (1 + REL_TOL):
            break  # nothing beats the bound, Ray's order included
    # Ties go to the constructions (in the order given), Ray's order last: they keep rings under few switches,
    # which costs nothing in the model and guards against what it leaves out.
    rank = {k: i for i, k in enumerate(candidates)}
    name = min(scores, key=lambda k: (scores[k], k == "naive", rank[k]))
    best, best_step = list(candidates[name]), scores[name]
    result = SearchResult(best, best_step, name, scores, 0, False, None)
    if best_step <= bound * (1 + REL_TOL):
        result.optimal, result.proof = True, "meets bound"
        return result
    classes = twin_classes(sm, pool)
    if count_orders(classes, sm.world, EXACT_ORDERS) <= EXACT_ORDERS:
        for order in _orders(classes, sm.world):
            step = sm.step(order)
            if step < best_step * (1 - REL_TOL):
                best, best_step, result.construction = order, step, "exhaustive"
        result.order, result.step_s, result.optimal, result.proof = best, best_step, True, "exhaustive"
        return result
    result.order, result.step_s, result.moves = _local_search(sm, best, best_step, pool, budget_s, seed)
    if result.step_s <= bound * (1 + REL_TOL):
        result.optimal, result.proof = True, "meets bound"
    return result


# ------------------------------------------------------------------ exhaustive
def twin_classes(sm: StepModel, pool: list[str]) -> list[list[str]]:
    """GPUs of the pool grouped into twins: same host, same neighbours over links of the same bandwidth and latency."""
    g = sm.topo.graph
    classes: dict[tuple, list[str]] = {}
    for gpu in pool:
        key = (g.nodes[gpu]["host"], frozenset((v, d["bw_gbps"], d["lat_us"]) for v, d in g.adj[gpu].items()))
        classes.setdefault(key, []).append(gpu)
    return list(classes.values())


def count_orders(classes: list[list[str]], k: int, cap: int) -> int:
    """Distinct sequences of ``k`` GPUs from ``classes`` up to twins; ``cap + 1`` once clearly above ``cap``."""
    if k > 12 or len(classes) > 12:
        return cap + 1
    ways = [1] + [0] * k  # ways[j]: label sequences of length j over the classes so far
    for c in (len(x) for x in classes):
        nxt = [0] * (k + 1)
        for j, w in enumerate(ways):
            if w:
                for t in range(0, min(c, k - j) + 1):
                    nxt[j + t] += w * math.comb(j + t, t)
        ways = nxt
    return ways[k]


def _orders(classes: list[list[str]], k: int) -> Iterator[list[str]]:
    """Every sequence of ``k`` GPUs, one per order of twin labels (a twin class fills in listed order)."""
    left = [len(c) for c in classes]
    seq: list[int] = []

    def rec() -> Iterator[list[str]]:
        if len(seq) == k:
            used = [0] * len(classes)
            out = []
            for c in seq:
                out.append(classes[c][used[c]])
                used[c] += 1
            yield out
            return
        for c in range(len(classes)):
            if left[c]:
                left[c] -= 1
                seq.append(c)
                yield from rec()
                seq.pop()
                left[c] += 1

    yield from rec()


# ------------------------------------------------------------------ local search
def _local_search(sm: StepModel, order: list[str], step: float, pool: list[str], budget_s: float, seed: int) -> tuple[list[str], float, int]:
    rng = random.Random(seed)
    deadline = time.perf_counter() + budget_s
    order = list(order)
    unused = [g for g in pool if g not in set(order)]
    n, moves = len(order), 0
    if n < 2 or budget_s <= 0:
        return order, step, 0
    evals = min(MAX_EVALS, EVAL_WORK // sm.world)  # a count, not a clock: the same input gives the same plan
    if evals < MIN_MOVES:
        return order, step, 0  # too large to search move by move: the constructions stand
    hot = sm.figures(order)["hop"]
    stale = 0
    for _ in range(evals):
        if stale >= STALE_MOVES or time.perf_counter() > deadline:
            break
        stale += 1
        trial = list(order)
        i = rng.choice(hot) if hot and rng.random() < 0.5 else rng.randrange(n)
        kind = rng.random()
        if unused and kind < 0.25:
            j = rng.randrange(len(unused))
            trial[i], spare = unused[j], trial[i]
        elif kind < 0.5 and sm.ring > 2:
            group = i // sm.cp * sm.cp
            a, b = sorted(rng.sample(range(group, group + sm.cp), 2))
            trial[a:b + 1] = trial[a:b + 1][::-1]
            spare = None
        else:
            j = rng.randrange(n)
            trial[i], trial[j] = trial[j], trial[i]
            spare = None
        f = sm.figures(trial)
        if f["step"] < step * (1 - REL_TOL):
            order, step, hot, moves, stale = trial, f["step"], f["hop"], moves + 1, 0
            if spare is not None:
                unused[j] = spare
    return order, step, moves
