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
* Exact search, for small problems (at most ``EXACT_HOSTS`` hosts or
  ``EXACT_GPUS`` GPUs, or few distinct orders): branch and bound over every
  sequence of GPUs from the pool, up to the cluster's symmetries (alike
  hosts, automorphisms of a host's parts: ``topology.planning.search.symmetry``), cut by a
  lower bound of each partial order (``topology.planning.search.exact``). Finished, it
  proves the result optimal; stopped at ``EXACT_NODES``, local search
  takes the rest of its moves from the best order met (a quarter set the
  search's first incumbent), and a quarter from the second-best
  construction (one of another kind often ends in a better valley; one
  that ties the best is passed over for the next); where
  they find a better order, the exact search runs once more from it, and a
  plan still unproven states its gap to the lower bound.
* Group turns, for plans of at most ``TURN_GPUS`` GPUs with Ulysses groups:
  each construction is also scored with its groups turned (``turn_groups``:
  members of every group at one index modulo a period rotated or reversed
  alike, while the step time drops). A construction that repeats from host
  to host often needs the same turn in every host before its gradient ring
  stops crossing a slow link twice in one direction, and only then does its
  step time drop: no single move of local search gets there.
* Local search, otherwise: first-improvement moves, a fixed number (so a
  plan is reproducible), cut short by a time budget only on a machine too
  slow for it, from the best construction and, short of the bound, from the
  second best too (as above: adding a construction that scores a little
  better must not cost the valley the old best led to). A move swaps two
  ranks, moves a rank onto an unused GPU, or reverses a run of a ring; half
  the moves touch the slowest hop's ends.
  On plans of at most ``TURN_GPUS`` GPUs, a move may also turn a Ulysses
  group or swap two whole groups, and a move that keeps the step time but
  leaves fewer flows at their kind's slowest rate (``DeltaOrder.crowd``) is
  taken: the step time is set by the slowest flows, so it stays flat until
  the last of them moves, and this walks that plateau toward it.
  Each move is first priced incrementally (``topology.planning.search.delta``: only the
  flows touching the moved ranks are re-routed, and the result is a lower
  bound of its step time); a move that could improve is then priced by the
  full step time, and only strict improvements are kept. Up to ``SIDEWAYS``
  moves that keep the step time exactly are taken too (a plateau walk);
  where the screen is only a bound (the all-to-all's slowest transfer), on
  plans of at most ``TURN_GPUS`` GPUs such a move is priced in full first.
  Without that walk, plans whose gradient ring had to split a host into two
  runs of the order (each move alone changing nothing) stayed several
  percent above orders that meet the bound.
* Ring borders, last, for a plan of up to ``RUN_GPUS`` ranks still
  ``RUN_GAP`` above the bound: the host runs of the best order, and of the
  gradient cycles the planner built, reordered within each leaf so that
  ring borders fall where the cards allow (``topology.planning.constructions.cycle_rings``:
  a 16-GPU host on one card split 6 + 6 + 4 rather than 2 + 6 + 6 + 2 sends
  one ring out, not two); then local search from the best, half its moves
  taking one host's run of ranks to the border of two other runs. The
  gradient ring changes at three places; every rank between shifts, so the
  rings cut the hosts elsewhere.
* Switch groups, then annealing, last, for a problem searched exactly but
  left unproven and still ``RUN_GAP`` above the bound. The search over the
  whole pool tries children lowest bound first, and where they tie it
  spends its nodes under the first switch: every other switch group that
  holds the world is searched alone, with ``GROUP_SHARE`` of the budget.
  Then ``ANNEAL_MOVES`` moves of simulated
  annealing from the best order (``topology.planning.search.anneal``), which
  takes worse moves too and so crosses ridges local search stops at (a
  Ulysses group split over two hosts: its first move slows the
  all-to-all; the ring's relief comes only once the group is split).
* Certificate: a plan whose step time meets the lower bound
  (``topology.cost.step_bound``) is optimal too. For problems searched
  exactly with Ulysses groups, the bound's all-to-all term is the joint
  floor of all groups over the pool they must fill (``topology.planning.bounds.a2a_floor``),
  computed once and used by the exact search too; on pools of at most
  ``RING_FLOOR_GPUS``, the ring and all-to-all terms are bounded together
  as well (``topology.planning.bounds.ring_floor``), with what the groups force on the
  gradient ring.
* Floor groups: the partition into Ulysses groups that priced lowest in
  that joint floor is a construction too (``partition_order``), local
  search starts from it as well, and it guides the exact search's child
  order, so the order that meets the floor is met early.
"""

from __future__ import annotations

import math
import random
import time
from dataclasses import dataclass

from topology.planning.bounds.rates import ring_bandwidth_bound, unit_levels
from topology.planning.constructions.cycle_rings import tiled_orders
from topology.cost import StepModel, step_bound
from topology.planning.search.anneal import anneal
from topology.planning.search.delta import REL_TOL, DeltaOrder
from topology.planning.bounds.a2a_floor import FLOOR_GPUS, joint_all_to_all_floor
from topology.planning.search.exact import branch_and_bound
from topology.planning.search.symmetry import RingRotation, twin_key

EXACT_ORDERS = 20_000
"""Up to this many distinct rank orders (up to twins), exact search runs to the end, with no local search first."""
EXACT_HOSTS, EXACT_GPUS = 8, 32
"""Pools of at most this many hosts, or plans of at most this many GPUs, are searched exactly
(``topology.planning.search.exact``)."""
EXACT_NODES = 100_000
"""Exact search of a larger problem stops after visiting this many partial orders (about 6 s on one core)
when its pool has at most ``EXACT_GPUS`` GPUs; a larger pool, whose nodes cost more, gets ``(EXACT_GPUS / pool)^2``
of it, and an order with more than ``EXACT_FLOWS`` flows to price gets proportionally fewer. Unproven, the
best order stands and the plan states its gap to the bound."""
EXACT_FLOWS = 3 * EXACT_GPUS
"""Flows of a 32-GPU plan with Ulysses pairs (ring hops, all-to-all pairs, gradient ring): pricing a partial order
costs about in proportion to its flows, so plans with more (Ulysses 4 or 8) get proportionally fewer nodes and every
exact search stays near ``EXACT_NODES``' time."""
FLOOR_FREE = 0.25
"""The joint all-to-all floor runs where at most this share of the pool is left free: five hosts of 8 GPUs under
leaves of their own, 32 GPUs in Ulysses groups of 8, are proven at once by it (the groups cannot all keep off the
sockets' link), and not in 24,000 nodes of exact search without."""
RING_FLOOR_GPUS = 16
"""Pools of at most this many GPUs (filled by the plan) get the ring priced with the all-to-all
(``topology.planning.bounds.ring_floor``): its partition search costs far more per node than the all-to-all's alone."""
RING_FLOOR_NODES = 2_000
"""Partial partitions that search visits at most (about 1.5 s on one core for 16 GPUs; its floor only rises
above the open branches' bounds when it finishes, as it does for two g6e hosts with Ulysses 4 and cp 8)."""
SEARCH_BUDGET_S = 30.0
"""Most wall-clock seconds one local search takes by default: a safety net, above what its move count needs. Its
moves take up to 8 s on one core in ``benchmarks/plan_quality.py`` (32 GPUs with Ulysses groups, each move priced in
full): a clock any nearer cuts them short on a busy machine, and the plan then depends on the load."""
SIDEWAYS = 200
"""Local search takes at most this many moves that leave the step time exactly as it is (a plateau walk)."""
STALE_MOVES = 1000
"""Local search stops after this many moves in a row without improvement."""
RUN_EVALS = 1000
"""Moves of the last local search, ``RUN_SHARE`` of them moving a host's run of ranks elsewhere (``_run_move``)."""
RUN_SHARE = 0.5
RUN_GPUS = 256
"""Only plans of at most this many ranks, and ``RUN_GAP`` or more above the bound, get the run moves: each
reprices every rank it shifts."""
RUN_GAP = 0.01
TURN_PASSES = 3
"""Passes of ``turn_groups`` over its periodic group turns (each pass prices about ``2 u`` turns per set of groups)."""
TURN_GPUS = 64
"""Constructions of plans up to this many GPUs get their Ulysses groups turned (``turn_groups``) before scoring."""
GROUP_SHARE = 0.25
"""Share of the exact search's node budget each other switch group's own search gets (``_other_groups``)."""
ANNEAL_MOVES = 10_000
"""Moves of the annealing that ends an unproven exact search still ``RUN_GAP`` above the bound (``topology.planning.search.anneal``:
each priced in full, about a second for 16 GPUs with Ulysses groups); an order with more than ``EXACT_FLOWS`` flows gets
proportionally fewer."""
MAX_EVALS = 3000
"""Local search tries at most this many moves, besides the ``SIDEWAYS`` it may take across a plateau; each is priced by
the flows it touches (``topology.planning.search.delta``)."""


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
    gap: float = 0.0
    """How far the step time may be above the optimum: step time over the lower bound, minus one (0 when optimal)."""
    nodes: int = 0
    """Partial orders the exact search visited (0: it did not run)."""
    a2a_floor_s: float = 0.0
    """Joint lower bound of the all-to-all term over every order (``topology.planning.bounds.a2a_floor``; 0: not computed)."""
    attention_floor_s: float = 0.0
    """Joint lower bound of the ring and all-to-all terms together, plus the gradient term's excess over its own
    bound, over every order (``topology.planning.bounds.ring_floor``; 0: not computed)."""

    def info(self) -> dict:
        return {"construction": self.construction, "moves": self.moves, "optimal": self.optimal, "proof": self.proof,
                "gap": float(f"{self.gap:.6g}"), "nodes": self.nodes, "a2a_floor_s": self.a2a_floor_s,
                "attention_floor_s": self.attention_floor_s,
                "candidates": {k: float(f"{v:.6g}") for k, v in self.candidates.items()}}


def optimise(sm: StepModel, candidates: dict[str, list[str]], pool: list[str], budget_s: float, seed: int = 0,
             cycles: list[list[str]] = ()) -> SearchResult:
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
    cycles
        Gradient cycles (GPU sequences) whose host runs are cut into rings anew at the end
        (``topology.planning.constructions.cycle_rings``), as the best order found is.

    Returns
    -------
    SearchResult
    """
    bound = step_bound(sm)["step"]
    candidates = with_turned_groups(sm, candidates)
    scores: dict[str, float] = {}
    for name in sorted(candidates, key=lambda k: k == "naive"):  # Ray's order is scored last
        scores[name] = sm.step(candidates[name])
        if scores[name] <= bound * (1 + REL_TOL):
            break  # nothing beats the bound, Ray's order included
    hosts = {sm.topo.host_of(g) for g in pool}
    joint = 0.0
    crowded = len(pool) - sm.world <= len(pool) * FLOOR_FREE
    if sm.ulysses > 1 and crowded and len(pool) <= FLOOR_GPUS and (len(hosts) <= EXACT_HOSTS or sm.world <= EXACT_GPUS):
        # All groups' all-to-all priced together over the GPUs they must share, once per problem; only where
        # the groups fill most of the pool (with many GPUs left free it rarely beats the per-group floor and
        # costs about a second more).
        known = min(sm.figures(candidates[k])["a2a"] for k in scores)
        joint = joint_all_to_all_floor(sm, pool, twin_classes(sm, pool), known).seconds
        bound = step_bound(sm, joint)["step"]
    attention = 0.0
    seeds: list[list[str]] = []
    guide: list[list[str]] | None = None
    if joint and sm.ring > 1 and len(pool) <= RING_FLOOR_GPUS and min(scores.values()) > bound * (1 + REL_TOL):
        # The ring priced with the all-to-all: the groups that minimise one may cost the other.
        known = min(_attention(sm, candidates[k]) for k in scores)
        floor = joint_all_to_all_floor(sm, pool, twin_classes(sm, pool), known, RING_FLOOR_NODES, ring=True)
        attention = floor.seconds
        bound = step_bound(sm, joint, attention)["step"]
        if floor.groups:
            # The groups that priced lowest beat every construction's: local search starts from them too.
            seeds.append(partition_order(sm, floor.groups))
            guide = floor.groups
    # Ties go to the constructions (in the order given), Ray's order last: they keep rings under few switches,
    # which costs nothing in the model and guards against what it leaves out.
    rank = {k: i for i, k in enumerate(candidates)}
    name = min(scores, key=lambda k: (scores[k], k == "naive", rank[k]))
    best, best_step = list(candidates[name]), scores[name]
    result = SearchResult(best, best_step, name, scores, 0, False, None, a2a_floor_s=joint, attention_floor_s=attention)
    if best_step <= bound * (1 + REL_TOL):
        result.optimal, result.proof = True, "meets bound"
        return result
    classes = twin_classes(sm, pool)
    few = count_orders(classes, sm.world, EXACT_ORDERS) <= EXACT_ORDERS
    flows = len(sm.hops) + len(sm.a2a_pairs) + sm.world  # ring hops, all-to-all pairs, the gradient ring
    cap = math.inf if few else int(EXACT_NODES * min(1.0, EXACT_GPUS / len(pool)) ** 2 * min(1.0, EXACT_FLOWS / flows))
    exact = few or ((len(hosts) <= EXACT_HOSTS or sm.world <= EXACT_GPUS) and cap > 0)

    def from_second_best(evals: int) -> bool:
        """Local search from the second best construction: one of another kind may end in a better valley. One
        that ties the best is most often the same plan by another road: the first that scores worse is taken."""
        others = [k for k in scores if k != name]
        worse = [k for k in others if scores[k] > scores[name] * (1 + REL_TOL)]
        second = min(worse or others, key=lambda k: (scores[k], k == "naive", rank[k]), default=None)
        if second is None:
            return False
        order, step, moves = _local_search(sm, candidates[second], scores[second], pool, budget_s, seed, evals)
        if step < result.step_s * (1 - REL_TOL):
            result.order, result.step_s, result.moves, result.construction = order, step, moves, second
            return True
        return False

    if not few:
        # Before an exact search, local search only sets its first incumbent: a quarter of the moves does.
        evals = MAX_EVALS // 4 if exact else MAX_EVALS
        order, step, moves = _local_search(sm, best, best_step, pool, budget_s, seed, evals)
        if step < result.step_s * (1 - REL_TOL):  # a tie keeps the construction, as among the constructions
            result.order, result.step_s, result.moves = order, step, moves
        for start in seeds:
            order, step, moves = _local_search(sm, start, sm.step(start), pool, budget_s, seed, evals)
            if step < result.step_s * (1 - REL_TOL):
                result.order, result.step_s, result.moves, result.construction = order, step, moves, "floor groups"
        if not exact and result.step_s > bound * (1 + REL_TOL):
            from_second_best(evals)
        if result.step_s <= bound * (1 + REL_TOL):
            result.optimal, result.proof = True, "meets bound"
            return result

    def exhaust() -> None:
        """Branch and bound from the best order so far; a finished search proves its result optimal."""
        order, step, proven, nodes = branch_and_bound(sm, pool, result.order, result.step_s, cap, joint, attention,
                                                      guide)
        result.nodes += nodes
        if step < result.step_s * (1 - REL_TOL):
            result.order, result.step_s, result.construction = order, step, "exhaustive"
        result.optimal, result.proof = proven, "exhaustive" if proven else None

    if exact:
        exhaust()
        if not result.optimal and not few:
            # Unproven, the search spends the rest of its moves from the best order met, on a seed of its own:
            # the quarter before the exact search may have missed a single swap that pays.
            order, step, moves = _local_search(sm, result.order, result.step_s, pool, budget_s, seed + 1,
                                               MAX_EVALS - evals)
            improved = step < result.step_s * (1 - REL_TOL)
            if improved:
                result.order, result.step_s, result.moves = order, step, result.moves + moves
            improved = from_second_best(evals) or improved
            if improved:
                if result.step_s <= bound * (1 + REL_TOL):
                    result.optimal, result.proof = True, "meets bound"
                else:
                    exhaust()  # a better incumbent cuts more branches: the exact search runs once more, from it
    if not result.optimal and not few and sm.world <= RUN_GPUS and result.step_s > bound * (1 + RUN_GAP):
        # Last, the host runs of the best order and of the gradient cycles given, each leaf's reordered so that ring
        # borders fall where the cards allow; then moves of whole host runs: each shifts the ring borders of every
        # rank between its two places while the gradient ring changes at three. Taken earlier, either costs some
        # plans the valley the search led to; from the best order found, they only add.
        for cycle in [result.order, *cycles]:
            for order in tiled_orders(sm.topo, cycle, sm.cp):
                step = sm.step(order)
                if step < result.step_s * (1 - REL_TOL):
                    result.order, result.step_s, result.construction = order, step, "host runs cut at ring borders"
        order, step, moves = _local_search(sm, result.order, result.step_s, pool, budget_s, seed + 2, RUN_EVALS,
                                           run_share=RUN_SHARE)
        if step < result.step_s * (1 - REL_TOL):
            result.order, result.step_s, result.moves = order, step, result.moves + moves
        if result.step_s <= bound * (1 + REL_TOL):
            result.optimal, result.proof = True, "meets bound"
    if exact and not result.optimal and not few and result.step_s > bound * (1 + RUN_GAP):
        # Small and still short of the bound: each other switch group that holds the world searched alone, where the
        # search over the whole pool spent its nodes under the first; then annealing, which crosses the ridges local
        # search stops at.
        for group in _other_groups(sm, pool, result.order):
            order, step, _, nodes = branch_and_bound(sm, group, result.order, result.step_s, cap * GROUP_SHARE, joint,
                                                     attention, guide)
            result.nodes += nodes
            if step < result.step_s * (1 - REL_TOL):
                result.order, result.step_s, result.construction = order, step, "exhaustive in one switch group"
        if result.step_s > bound * (1 + REL_TOL):
            moves = int(ANNEAL_MOVES * min(1.0, EXACT_FLOWS / flows))
            order, step = anneal(sm, result.order, result.step_s, pool, seed + 3, moves, budget_s)
            if step < result.step_s * (1 - REL_TOL):
                result.order, result.step_s, result.construction = order, step, "annealed"
        if result.step_s <= bound * (1 + REL_TOL):
            result.optimal, result.proof = True, "meets bound"
    if not result.optimal:
        result.gap = result.step_s / bound - 1
    return result


def _other_groups(sm: StepModel, pool: list[str], order: list[str]) -> list[list[str]]:
    """The pool's GPUs under each switch (any level) that hold the world, but neither the whole pool nor every host
    ``order`` uses: where else a small plan may lie."""
    used = {sm.topo.host_of(g) for g in order}
    in_pool = set(pool)
    groups: list[list[str]] = []
    for units in unit_levels(sm.topo)[1:]:
        for hosts, _, _ in units:
            gpus = [g for h in hosts for g in sm.topo.gpus(h) if g in in_pool]
            if sm.world <= len(gpus) < len(pool) and not used <= set(hosts) and gpus not in groups:
                groups.append(gpus)
    return groups


def _attention(sm: StepModel, order: list[str]) -> float:
    """Attention time (ring and all-to-all, ``StepModel.attention``) of an order, plus its gradient term's excess
    over that term's own bound: what ``topology.planning.bounds.ring_floor`` bounds."""
    f = sm.figures(order)
    excess = sm.gradients(f["bus_gbps"]) - sm.gradients(ring_bandwidth_bound(sm.topo, 1, sm.world))
    return sm.attention(f["hop_gbps"], f["hop_lat"], f["a2a"]) + max(0.0, excess)


# ------------------------------------------------------------------ exhaustive
def twin_classes(sm: StepModel, pool: list[str]) -> list[list[str]]:
    """GPUs of the pool grouped into twins (``topology.planning.search.symmetry.twin_key``): any two may swap."""
    classes: dict[tuple, list[str]] = {}
    for gpu in pool:
        classes.setdefault(twin_key(sm.topo, gpu), []).append(gpu)
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


def partition_order(sm: StepModel, groups: list[list[str]]) -> list[str]:
    """A rank order whose Ulysses groups are ``groups``: cp groups chained and members aligned greedily.

    Each cp group starts at the first group left and takes, ``ring - 1`` times, the group left whose members
    (each matched in turn to the quickest route from the previous group's member at its position, as
    ``RingRotation.key`` times a ring step alone) make the slowest such hop quickest.
    """
    key = RingRotation(sm).key
    left = [list(g) for g in groups]
    order: list[str] = []
    while left:
        chain = [left.pop(0)]
        for _ in range(sm.ring - 1):
            options = []
            for k, group in enumerate(left):
                free, aligned = list(group), []
                for a in chain[-1]:
                    b = min(free, key=lambda x: key(a, x))
                    free.remove(b)
                    aligned.append(b)
                options.append((max(key(a, b) for a, b in zip(chain[-1], aligned)), k, aligned))
            _, k, aligned = min(options, key=lambda o: o[:2])
            left.pop(k)
            chain.append(aligned)
        order.extend(g for group in chain for g in group)
    return order


# ------------------------------------------------------------------ group turns
def with_turned_groups(sm: StepModel, candidates: dict[str, list[str]]) -> dict[str, list[str]]:
    """The candidates, and after each one with Ulysses groups that ``turn_groups`` improves, the turned order.

    Plans of more than ``TURN_GPUS`` GPUs are left as they are: the turns' count grows with the group count and
    each prices a whole order.
    """
    if sm.ulysses < 2 or sm.world > TURN_GPUS:
        return candidates
    out: dict[str, list[str]] = {}
    for name, order in candidates.items():
        out[name] = order
        turned = turn_groups(sm, order)
        if turned != order:
            out[f"{name}, groups turned"] = turned
    return out


def turn_groups(sm: StepModel, order: list[str], max_passes: int = TURN_PASSES) -> list[str]:
    """``order`` with its Ulysses groups turned in place, periodically, while that lowers the step time.

    A turn rotates or reverses the members of every Ulysses group whose index
    is ``g`` modulo a period ``m`` (a divisor of the group count; ``m`` equal
    to it turns one group). Turning a group re-pairs all its ring hops at once
    and re-routes the gradient ring through it, and leaves its all-to-all as
    it is. Constructions repeat from host to host, so the turn that lets the
    gradient ring through one host without crossing a slow link twice in one
    direction is needed in every host alike: the step time (the slowest flow)
    improves only when all turn together, and no single move gets there.
    Greedy, first improvement, at most ``max_passes`` passes.
    """
    u = sm.ulysses
    count = len(order) // u
    if u < 2 or count < 2:
        return list(order)
    best, step = list(order), sm.step(order)
    sets = [range(g, count, m) for m in range(1, count + 1) if count % m == 0 for g in range(m)]
    for _ in range(max_passes):
        improved = False
        for groups in sets:
            for turn in _turns(u):
                trial = list(best)
                for k in groups:
                    trial[k * u:(k + 1) * u] = [best[k * u + j] for j in turn]
                t = sm.step(trial)
                if t < step * (1 - REL_TOL):
                    best, step, improved = trial, t, True
        if not improved:
            break
    return best


def _turns(u: int) -> list[tuple[int, ...]]:
    """Every rotation and reflection of ``u`` positions but the identity (the dihedral group's other elements)."""
    rotations = [tuple((j + k) % u for j in range(u)) for k in range(u)]
    return [t for t in dict.fromkeys(rotations + [r[::-1] for r in rotations]) if t != rotations[0]]


# ------------------------------------------------------------------ local search
def _local_search(sm: StepModel, order: list[str], step: float, pool: list[str], budget_s: float, seed: int,
                  max_evals: int = MAX_EVALS, run_share: float = 0.0) -> tuple[list[str], float, int]:
    """First-improvement moves from ``order`` (see the module docstring); ``run_share`` of them move a host's run."""
    rng = random.Random(seed)
    deadline = time.perf_counter() + budget_s
    n = len(order)
    if n < 2 or budget_s <= 0:
        return list(order), step, 0
    state = DeltaOrder(sm, order)
    small = n <= TURN_GPUS  # where pricing a whole order is cheap enough for plateau moves and group moves
    unused, free = _unused(sm, pool, order)
    hot = sm.figures(order)["hop"]
    best = list(order)
    best_crowd = state.crowd()
    moves = stale = sideways = 0
    tried = 0
    while tried - sideways < max_evals:  # a count, not a clock: the same input gives the same plan
        tried += 1  # moves taken across a plateau come on top: they price no improvement
        if stale >= STALE_MOVES or time.perf_counter() > deadline:
            break
        stale += 1
        trial = list(state.order)
        i = rng.choice(hot) if hot and rng.random() < 0.5 else rng.randrange(n)
        kind = rng.random()
        if unused and kind < 0.2:
            trial[i] = rng.choice(unused)
            ranks = [i]
        elif len(unused) > 1 and kind < 0.35:
            # A run of ranks onto free GPUs at once (half the time all from one host): leaving a slow
            # host or link can take several ranks, and each alone would not pay.
            host = rng.choice(sorted(free)) if free and rng.random() < 0.5 else None
            spares = free[host] if host else rng.sample(unused, min(len(unused), max(2, sm.cp)))
            k = min(len(spares), rng.randint(2, max(2, sm.cp)), n)
            start = min(i, n - k)
            ranks = list(range(start, start + k))
            for r, g in zip(ranks, spares):
                trial[r] = g
        elif kind < 0.5 and n > 2:
            # Reverse a run of one ring (or, with rings of two or fewer, of the gradient ring over all ranks).
            group, size = (i // sm.cp * sm.cp, sm.cp) if sm.ring > 2 else (0, n)
            a, b = sorted(rng.sample(range(group, group + size), 2))
            trial[a:b + 1] = trial[a:b + 1][::-1]
            ranks = list(range(a, b + 1))
        elif small and sm.ulysses > 1 and kind < 0.65:
            trial, ranks = _group_move(sm, trial, i, rng)
        elif run_share and kind > 1 - run_share:
            trial, ranks = _run_move(sm, trial, i, rng)
        else:
            j = rng.randrange(n)
            trial[i], trial[j] = trial[j], trial[i]
            ranks = [i, j]
        bound = state.bound(ranks, trial)
        tie = abs(bound - step) <= step * REL_TOL
        priced = None  # the trial's full figures, once computed
        if small and tie and (crowd := state.crowd()) < best_crowd:
            # As fast, with fewer flows at the slowest rates: the slowest rate is nearer to rising.
            priced = sm.figures(trial)
            if priced["step"] <= step:
                state.keep()
                step, hot, best_crowd, stale = priced["step"], priced["hop"], crowd, 0
                best = list(trial)
                if unused:
                    unused, free = _unused(sm, pool, trial)
                continue
        if tie and sideways < SIDEWAYS and (state.exact or (
                small and (priced or sm.figures(trial))["step"] <= step * (1 + REL_TOL))):
            state.keep()  # as good, exactly: walk on across the plateau (an improvement may lie past it)
            sideways += 1
            best_crowd = state.crowd() if small else best_crowd
            if unused:
                unused, free = _unused(sm, pool, trial)
            continue
        if bound >= step * (1 - REL_TOL):
            state.undo()  # cannot beat the current order: no full pricing needed
            continue
        f = sm.figures(trial)
        if f["step"] < step * (1 - REL_TOL):
            state.keep()
            step, hot, moves, stale = f["step"], f["hop"], moves + 1, 0
            best_crowd = state.crowd() if small else best_crowd
            best = list(trial)
            if unused:
                unused, free = _unused(sm, pool, trial)
        else:
            state.undo()
    return best, step, moves


def _run_move(sm: StepModel, order: list[str], i: int, rng: random.Random) -> tuple[list[str], list[int]]:
    """Move the run of one host's GPUs holding rank ``i`` to the border of two other runs: the gradient ring changes
    at three places only, while every rank between shifts, so rings take other cuts of the hosts."""
    host_of = sm.topo.host_of
    n = len(order)
    a = b = i
    while a > 0 and host_of(order[a - 1]) == host_of(order[i]):
        a -= 1
    while b < n - 1 and host_of(order[b + 1]) == host_of(order[i]):
        b += 1
    rest = order[:a] + order[b + 1:]
    borders = [k for k in range(len(rest) + 1) if k in (0, len(rest)) or host_of(rest[k - 1]) != host_of(rest[k])]
    k = rng.choice(borders)
    trial = rest[:k] + order[a:b + 1] + rest[k:]
    return trial, list(range(min(a, k), max(b, k + b - a) + 1))


def _group_move(sm: StepModel, order: list[str], i: int, rng: random.Random) -> tuple[list[str], list[int]]:
    """Rank ``i``'s Ulysses group turned (its members rotated or reversed in place) or swapped whole with another.

    A ring hop pairs the members at one position of consecutive groups, and a
    better pairing often needs every member re-paired at once (the hops move
    together off a shared link), which no single swap does.
    """
    u, n = sm.ulysses, len(order)
    start = i // u * u
    ranks = list(range(start, start + u))
    group = order[start:start + u]
    pick = rng.random()
    if pick < 0.5:
        k = rng.randrange(1, u)
        order[start:start + u] = group[k:] + group[:k]
    elif pick < 0.7:
        order[start:start + u] = group[::-1]
    else:
        other = rng.randrange(n // u) * u
        if other == start:
            return order, []
        order[start:start + u], order[other:other + u] = order[other:other + u], group
        ranks += range(other, other + u)
    return order, ranks


def _unused(sm: StepModel, pool: list[str], order: list[str]) -> tuple[list[str], dict[str, list[str]]]:
    """GPUs of the pool ``order`` leaves free, and the hosts with two or more of them free."""
    taken = set(order)
    unused = [g for g in pool if g not in taken]
    by_host: dict[str, list[str]] = {}
    for g in unused:
        by_host.setdefault(sm.topo.host_of(g), []).append(g)
    return unused, {h: gs for h, gs in by_host.items() if len(gs) > 1}
