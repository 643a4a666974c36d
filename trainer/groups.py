"""torch.distributed process groups built from a Plan's rank grid.

No global state: ``ParallelGroups.from_plan`` returns a value the caller
passes to whatever needs it (ring attention, the loss, the data loader).
Every rank must call it, in the same order, since group creation is collective.
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass

import torch.distributed as dist

from topology.errors import ConfigError
from topology.planning.plan import Plan


@dataclass
class ParallelGroups:
    """This rank's view of the parallel layout."""

    rank: int
    world_size: int
    cp_group: dist.ProcessGroup
    """All ranks of one sequence: ring x ulysses (loss of that sequence)."""
    ring_group: dist.ProcessGroup
    ulysses_group: dist.ProcessGroup
    dp_group: dist.ProcessGroup
    cp_ranks: list[int]
    ring_ranks: list[int]
    """Global ranks of this rank's ring, in ring order (send to the next, receive from the previous)."""
    ulysses_ranks: list[int]
    dp_ranks: list[int]

    @property
    def cp_rank(self) -> int:
        return self.cp_ranks.index(self.rank)

    @property
    def ring_rank(self) -> int:
        return self.ring_ranks.index(self.rank)

    @property
    def ulysses_rank(self) -> int:
        return self.ulysses_ranks.index(self.rank)

    @property
    def dp_rank(self) -> int:
        return self.dp_ranks.index(self.rank)

    @property
    def ring_size(self) -> int:
        return len(self.ring_ranks)

    @property
    def ulysses_size(self) -> int:
        return len(self.ulysses_ranks)

    @property
    def next_rank(self) -> int:
        """Global rank this rank sends K/V blocks to."""
        return self.ring_ranks[(self.ring_rank + 1) % self.ring_size]

    @property
    def prev_rank(self) -> int:
        return self.ring_ranks[(self.ring_rank - 1) % self.ring_size]

    @classmethod
    def from_plan(cls, plan: Plan, backend: str | None = None, timeout_s: float | None = None) -> "ParallelGroups":
        """Create every group of the plan's grid; the default group must exist.

        ``timeout_s`` bounds their collectives; torch gives a new group its backend's
        default (10 minutes for NCCL), not the default group's timeout."""
        if not dist.is_initialized():
            raise ConfigError("torch.distributed is not initialised; start ranks with torchrun or the ringleader launcher")
        world, rank = dist.get_world_size(), dist.get_rank()
        if world != plan.world_size:
            raise ConfigError(f"plan world_size ({plan.world_size}) != process group size ({world}); re-plan for {world} GPUs")
        layout = plan.groups

        def mine(groups: list[list[int]]) -> tuple[dist.ProcessGroup, list[int]]:
            timeout = None if timeout_s is None else datetime.timedelta(seconds=timeout_s)
            group, _ = dist.new_subgroups_by_enumeration(groups, timeout=timeout, backend=backend)
            ranks = next(g for g in groups if rank in g)
            return group, ranks

        cp_group, cp_ranks = mine(layout.cp_groups)
        ring_group, ring_ranks = mine(layout.ring_groups)
        ulysses_group, ulysses_ranks = mine(layout.ulysses_groups)
        dp_group, dp_ranks = mine(layout.dp_groups)
        return cls(rank, world, cp_group, ring_group, ulysses_group, dp_group, cp_ranks, ring_ranks, ulysses_ranks, dp_ranks)
