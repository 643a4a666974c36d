"""Hosts (or leaves, pods) that each hold one run of the rank order tile it: which runs can they be?

The gradient ring follows rank order, so a host sends one gradient flow
out per run of its ranks. Where the gradient bus is fast enough that no
host's links out carry two such flows, every host holds one run (or none):
the hosts' ranks tile the rank cycle into at most ``H`` intervals of at
most a host's GPUs each. Which ranks an interval holds is then known
exactly, and with them the ring hops and all-to-all flows it sends out.
Summing each host's figures apart (``topology.planning.bounds.split_groups``)
forgets that the intervals must follow each other: a host may start its
run where a ring leaves few hops out only if the host before it ended
there, and the runs may have to be short to do so.

The layout repeats every cp group, so an interval's figures depend on its
start modulo ``cp`` and its length: a tiling is a closed walk on the
``cp`` residues, one step per run (residue ``r`` to ``r + n``), whose steps
sum to the world. It has at most ``H`` steps, so some cycle of allowed
runs has a mean length of at least ``world / H`` (a closed walk is made of
cycles): Karp's maximum mean cycle says whether one has. Where the units
are few, a search over tilings also uses each kind of unit at most as
often as there are of it. A leaf whose hosts each hold one run too holds
their runs one after another, each within the host's own limits.

The same figures also build orders: ``RunTiling.lengths`` picks how many
ranks each host of a cycle holds so that runs end where rings send fewest
hops out (the planner's "runs tiled to ring borders").
"""

from __future__ import annotations

import math

import numpy as np

from topology.planning.plan import GroupLayout

_TOL = 1e-9
TILE_STATES = 200_000
"""Tilings are searched exactly (each kind of unit used at most as often as there are of it) where start residues
times positions times counts of runs used stay under this; otherwise only the mean-cycle argument counts."""
Parts = tuple[tuple[int, int, "int | None"], ...]
"""(GPUs, how many, most ring hops out) of each kind of unit inside a larger one."""


class RunTiling:
    """What one run per unit leaves possible, for a plan shape: units of a few kinds that partition the GPUs (the
    hosts, or the hosts under each leaf, ...).

    Parameters
    ----------
    dp, ring, ulysses
        The plan's shape (rank order as ``GroupLayout.from_grid``).
    longest
        The most GPUs a unit holds: runs up to this long are read.
    """

    def __init__(self, dp: int, ring: int, ulysses: int, longest: int):
        self.world = world = dp * ring * ulysses
        self.cp = cp = ring * ulysses
        longest = min(longest, world - 1)
        layout = GroupLayout.from_grid(dp, ring, ulysses)
        after, before = list(range(world)), list(range(world))  # each rank's next and previous in its ring
        for g in layout.ring_groups:
            for i, r in enumerate(g):
                after[r], before[r] = g[(i + 1) % len(g)], g[i - 1]
        group = [0] * world
        for k, g in enumerate(layout.ulysses_groups):
            for r in g:
                group[r] = k
        # [start residue, length]: ring hops and all-to-all flows leaving a run of that many ranks from there.
        self.hops = np.zeros((cp, longest + 1), dtype=np.int64)
        self.a2a = np.zeros((cp, longest + 1), dtype=np.int64)
        for start in range(cp):
            held: set[int] = set()
            per_group: dict[int, int] = {}
            hops = a2a = 0
            for n in range(1, longest + 1):
                r = (start + n - 1) % world
                held.add(r)
                # r's own hop leaves unless its next is held; the hop into r from a held rank no longer leaves.
                hops += (after[r] not in held) - (before[r] in held and before[r] != r)
                k = per_group.get(group[r], 0)
                a2a += (k + 1) * (ulysses - k - 1) - k * (ulysses - k)
                per_group[group[r]] = k + 1
                self.hops[start, n], self.a2a[start, n] = hops, a2a
        self._cache: dict[tuple, float | None] = {}

    def least_share(self, kinds: list[tuple[int, float, int]], hop_out: list[int | None],
                    runs_out: list[int | None], parts: list[Parts | None] | None = None) -> float | None:
        """The smallest ``t`` such that units of ``kinds`` (GPUs, GB/s out, how many) can tile the rank order, each
        of kind ``k`` sending at most ``hop_out[k]`` ring hops (None: no limit) and at most ``t x`` its GB/s in
        all-to-all flows out; None where no tiling exists.

        ``runs_out[k]``: the most gradient flows a unit of kind ``k`` sends out (None: no limit). Unless every kind
        sends at most one, units may hold several runs and nothing is claimed (0); so too where one unit can hold
        the world. ``parts[k]``, where given: the units inside a unit of kind ``k`` that each hold one run too, as
        (GPUs, how many, most hops out) of each kind; the unit's run is then theirs one after another.
        """
        if not kinds or any(g is None or g > 1 for g in runs_out) or max(n for n, _, _ in kinds) >= self.world:
            return 0.0
        parts = parts or [None] * len(kinds)
        key = (tuple(kinds), tuple(hop_out), tuple(runs_out), tuple(parts))
        if key not in self._cache:
            usable = [(n, cap, count, e, inner) for (n, cap, count), e, g, inner in zip(kinds, hop_out, runs_out, parts)
                      if g == 1]
            self._cache[key] = self._least(usable)
        return self._cache[key]

    def _split(self, inner: Parts) -> np.ndarray:
        """``[r, n]``: whether a run of ``n`` ranks from residue ``r`` is runs of ``inner``'s units one after
        another, no more of them than there are, each within its hop limit."""
        cp, width = self.hops.shape
        lengths = np.arange(width)
        allowed = np.zeros((cp, width), dtype=bool)  # [r, n]: some part may hold the run
        for n, _, e in inner:
            allowed |= (lengths <= n) & (lengths > 0) & (self.hops <= e if e is not None else True)
        fewest = np.full((cp, width), math.inf)  # [r, n]: fewest parts' runs covering n ranks from r
        fewest[:, 0] = 0
        for n in range(1, width):
            for last in range(1, n + 1):  # the last part's run: ``last`` ranks from r + n - last
                ok = allowed[(np.arange(cp) + n - last) % cp, last]
                fewest[:, n] = np.where(ok, np.minimum(fewest[:, n], fewest[:, n - last] + 1), fewest[:, n])
        return fewest <= sum(count for _, count, _ in inner)

    def _least(self, usable: list[tuple[int, float, int, int | None, Parts | None]]) -> float | None:
        hosts = sum(count for _, _, count, _, _ in usable)
        if not hosts:
            return None
        lengths = np.arange(self.hops.shape[1])
        # Per kind and run, the kind's all-to-all share when it may hold the run (inf: it may not).
        shares = []
        for n, cap, _, e, inner in usable:
            fits = np.broadcast_to((lengths <= n) & (lengths > 0), self.hops.shape).copy()
            if e is not None:
                fits &= self.hops <= e
            if inner:
                fits &= self._split(inner)
            with np.errstate(divide="ignore", invalid="ignore"):
                mine = np.where(self.a2a == 0, 0.0, self.a2a / cap if cap > 0 else math.inf)
            shares.append(np.where(fits, mine, math.inf))
        counts = [count for _, _, count, _, _ in usable]
        candidates = np.unique(np.concatenate([x[np.isfinite(x)] for x in shares]))

        def tiles(t: float) -> bool:
            allowed = [x <= t * (1 + _TOL) for x in shares]
            return self._covers(np.logical_or.reduce(allowed), self.world / hosts) and self._tiles(allowed, counts)

        if not len(candidates) or not tiles(candidates[-1]):
            return None
        lo, hi = -1, len(candidates) - 1
        while hi - lo > 1:
            mid = (lo + hi) // 2
            lo, hi = (lo, mid) if tiles(candidates[mid]) else (mid, hi)
        return float(candidates[hi])

    def _tiles(self, allowed: list[np.ndarray], counts: list[int]) -> bool:
        """Whether runs, at most ``counts[k]`` of them from ``allowed[k]`` (``[residue, length]``), tile the rank
        cycle exactly: a search over positions and runs used, where that is small (``TILE_STATES``); True (no
        claim) where it is not."""
        cp, world = self.cp, self.world
        if cp * world * math.prod(c + 1 for c in counts) > TILE_STATES:
            return True
        width = self.hops.shape[1]
        for first in range(cp):  # the residue the first run starts at
            seen: set[tuple[int, tuple[int, ...]]] = set()
            stack = [(0, (0,) * len(counts))]
            while stack:
                done, used = stack.pop()
                if done == world:
                    return True
                r = (first + done) % cp
                for k, runs in enumerate(allowed):
                    if used[k] < counts[k]:
                        more = used[:k] + (used[k] + 1,) + used[k + 1:]
                        for n in np.flatnonzero(runs[r, 1: min(width, world - done + 1)]) + 1:
                            state = (done + int(n), more)
                            if state not in seen:
                                seen.add(state)
                                stack.append(state)
        return False

    def _covers(self, allowed: np.ndarray, need: float) -> bool:
        """Whether some cycle of allowed runs (residue ``r`` to ``r + n`` mod cp) has a mean length of at least
        ``need``: Karp's maximum mean cycle over the residues."""
        cp = self.cp
        src, length = np.nonzero(allowed)
        if not len(src):
            return False
        dst = (src + length) % cp
        weight = length.astype(float)
        # best[k, v]: the longest walk of exactly k runs ending at v, from anywhere.
        best = np.full((cp + 1, cp), -math.inf)
        best[0] = 0.0
        for k in range(cp):
            np.maximum.at(best[k + 1], dst, best[k, src] + weight)
        last = best[cp]
        finite = np.isfinite(last)
        if not finite.any():
            return False
        ks = np.arange(cp)[:, None]
        with np.errstate(invalid="ignore"):
            means = np.where(np.isfinite(best[:cp]), (last[None, :] - best[:cp]) / (cp - ks), math.inf)
        mean = np.where(finite, means.min(axis=0), -math.inf).max()
        return mean >= need * (1 - _TOL)

    def lengths(self, sizes: list[int], caps: list[float]) -> tuple[int, list[int]] | None:
        """A tiling by hosts in a given cycle: (where the first run starts, the ranks of each host), hosts of
        ``sizes`` GPUs and ``caps`` GB/s out in turn, chosen so that the most ring hops (then all-to-all flows) any
        host sends out per GB/s is least; None where the hosts cannot hold the world. Runs of up to
        ``longest`` ranks (the constructor's) are read; a host may hold none. A construction, not a bound: the first
        run starts within ``longest`` ranks of a cp group's start.
        """
        world, cp, longest = self.world, self.cp, self.hops.shape[1] - 1
        if sum(min(n, longest) for n in sizes) < world:
            return None
        worst = self.hops * 1e6 + self.a2a  # hops first, all-to-all flows break ties
        found = None
        for start in range(min(cp, longest)):  # where in a cp group the first run starts (the first few suffice)
            # best[i][p]: the least worst host cost of hosts before i holding ranks start .. start + p - 1.
            best = [np.full(world + 1, math.inf)]
            best[0][0] = 0.0
            took = []
            for n_max, cap in zip(sizes, caps):
                now, pick = best[-1].copy(), np.zeros(world + 1, dtype=np.int64)  # holding none costs nothing
                for n in range(1, min(n_max, longest) + 1):
                    p = np.arange(world + 1 - n)
                    cost = worst[(start + p) % cp, n] / cap if cap > 0 else np.full(len(p), math.inf)
                    value = np.maximum(best[-1][: world + 1 - n], cost)
                    better = value < now[n:]
                    now[n:][better], pick[n:][better] = value[better], n
                best.append(now)
                took.append(pick)
            if math.isfinite(best[-1][world]) and (found is None or best[-1][world] < found[0]):
                runs, p = [], world
                for pick in reversed(took):
                    runs.append(int(pick[p]))
                    p -= runs[-1]
                found = (best[-1][world], start, runs[::-1])
        return None if found is None else (found[1], found[2])
