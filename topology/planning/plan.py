"""The Plan: which GPU holds which rank, and the process groups that follow.

The plan is the one value the launcher, the trainer and the visualiser share,
so it is plain data (JSON) with a version.

Parallel axes, outermost first: ``dp`` (data parallel: independent
sequences), ``ring`` (ring-attention steps, point-to-point), ``ulysses``
(all-to-all head exchange, innermost so it stays on a host's fast links).
The context-parallel size ``cp = ring * ulysses`` is the number of GPUs that
share one sequence ("ring size" in the recipe). Every group is a slice of one
rank grid::

    grid = arange(world).reshape(dp, ring, ulysses)
    cp group      grid[d].ravel()      (loss of one sequence)
    ring group    grid[d, :, u]        (in ring order: rank i sends to i+1)
    ulysses group grid[d, r, :]
    dp group      grid[:, r, u]        (gradient reduction peers)

A placement is only the permutation ``placements``: rank -> (host, gpu). So
the trainer needs nothing but this file to build its process groups.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from typing import Any

from topology.errors import ConfigError
from topology.files import dump_text, load_data, write_atomic

PLAN_VERSION = 1


@dataclass(frozen=True)
class RankPlacement:
    """Where one rank runs. ``gpu`` is the CUDA ordinal on ``host``."""

    rank: int
    host: str
    gpu: int
    node_id: str | None = None
    """Ray node id of the host, when the topology came from a Ray cluster."""
    ip: str | None = None


@dataclass(frozen=True)
class GroupLayout:
    """The process groups a rank grid of shape (dp, ring, ulysses) gives."""

    cp_groups: list[list[int]]
    ring_groups: list[list[int]]
    ulysses_groups: list[list[int]]
    dp_groups: list[list[int]]

    @classmethod
    def from_grid(cls, dp: int, ring: int, ulysses: int) -> "GroupLayout":
        cp = ring * ulysses

        def rank(d: int, r: int, u: int) -> int:
            return d * cp + r * ulysses + u

        return cls(
            cp_groups=[[d * cp + i for i in range(cp)] for d in range(dp)],
            ring_groups=[[rank(d, r, u) for r in range(ring)] for d in range(dp) for u in range(ulysses)],
            ulysses_groups=[[rank(d, r, u) for u in range(ulysses)] for d in range(dp) for r in range(ring)],
            dp_groups=[[rank(d, r, u) for d in range(dp)] for r in range(ring) for u in range(ulysses)],
        )


@dataclass
class Plan:
    """A placement of ``world_size`` ranks plus the figures that justify it."""

    strategy: str
    """How it was made: ``aware`` (topology-aware), ``naive`` or ``random``."""
    dp: int
    cp: int
    """GPUs per sequence (ring size in the recipe) = ring degree x ulysses."""
    ulysses: int
    seq_len: int
    placements: list[RankPlacement]
    topology: str = "cluster"
    cost: dict[str, Any] = field(default_factory=dict)
    """Cost model figures (seconds, GB/s, bytes); free-form, for people and the visualiser."""
    version: int = PLAN_VERSION

    def __post_init__(self) -> None:
        self.placements = [p if isinstance(p, RankPlacement) else RankPlacement(**p) for p in self.placements]
        if self.ulysses < 1 or self.cp % self.ulysses:
            raise ConfigError(f"ulysses ({self.ulysses}) must divide the ring size cp ({self.cp})")
        if self.dp * self.cp != len(self.placements):
            raise ConfigError(f"dp({self.dp}) * cp({self.cp}) != world_size({len(self.placements)})")
        if [p.rank for p in self.placements] != list(range(len(self.placements))):
            raise ConfigError("plan placements must list ranks 0..world_size-1 in order")
        seen = {(p.host, p.gpu) for p in self.placements}
        if len(seen) != len(self.placements):
            raise ConfigError("plan places two ranks on the same GPU; every rank needs its own (host, gpu)")

    # -------------------------------------------------------------- shape
    @property
    def world_size(self) -> int:
        return len(self.placements)

    @property
    def ring(self) -> int:
        """Ring degree: ranks that pass K/V blocks point to point."""
        return self.cp // self.ulysses

    @property
    def groups(self) -> GroupLayout:
        return GroupLayout.from_grid(self.dp, self.ring, self.ulysses)

    @property
    def hosts(self) -> list[str]:
        """Hosts in order of their first rank."""
        return list(dict.fromkeys(p.host for p in self.placements))

    def local_rank(self, rank: int) -> int:
        """Position of ``rank`` among the ranks on its host (torchrun's LOCAL_RANK)."""
        host = self.placements[rank].host
        return sum(1 for p in self.placements[:rank] if p.host == host)

    def ranks_on(self, host: str) -> list[int]:
        return [p.rank for p in self.placements if p.host == host]

    # ------------------------------------------------------------- (de)serialise
    def to_dict(self) -> dict[str, Any]:
        g = self.groups
        return {
            "version": self.version,
            "strategy": self.strategy,
            "topology": self.topology,
            "world_size": self.world_size,
            "dp": self.dp,
            "cp": self.cp,
            "ring": self.ring,
            "ulysses": self.ulysses,
            "seq_len": self.seq_len,
            "placements": [asdict(p) for p in self.placements],
            "ring_groups": g.ring_groups,
            "dp_groups": g.dp_groups,
            "ulysses_groups": g.ulysses_groups,
            "cp_groups": g.cp_groups,
            "cost": self.cost,
        }

    @classmethod
    def from_dict(cls, data: Any, source: str = "plan") -> "Plan":
        if not isinstance(data, dict):
            raise ConfigError(f"{source}: expected a mapping, got {type(data).__name__}")
        if data.get("version") != PLAN_VERSION:
            raise ConfigError(f"{source}: plan version {data.get('version')!r} is not supported; re-run `ringleader plan` (version {PLAN_VERSION})")
        missing = [k for k in ("strategy", "dp", "cp", "ulysses", "seq_len", "placements") if k not in data]
        if missing:
            raise ConfigError(f"{source}: missing field(s) {', '.join(missing)}")
        for key in ("dp", "cp", "ulysses", "seq_len"):
            if type(data[key]) is not int or data[key] < 1:
                raise ConfigError(f"{source}: {key} is {data[key]!r}; a plan's {key} is a whole number >= 1 (re-run `ringleader plan`)")
        if not isinstance(data.get("cost") or {}, dict):
            raise ConfigError(f"{source}: cost is {data['cost']!r}; expected a mapping (re-run `ringleader plan`)")
        if not isinstance(data["placements"], list):
            raise ConfigError(f"{source}: placements is {data['placements']!r}; expected a list (re-run `ringleader plan`)")
        try:
            plan = cls(
                strategy=data["strategy"], dp=data["dp"], cp=data["cp"], ulysses=data["ulysses"],
                seq_len=data["seq_len"], placements=list(data["placements"]),
                topology=data.get("topology", "cluster"), cost=data.get("cost") or {},
            )
        except TypeError as exc:
            raise ConfigError(f"{source}: bad placement entry ({exc})") from None
        g = plan.groups
        for key in ("ring_groups", "dp_groups", "ulysses_groups", "cp_groups"):
            if key in data and data[key] != getattr(g, key):
                raise ConfigError(f"{source}: {key} do not match the rank grid (dp={plan.dp}, ring={plan.ring}, ulysses={plan.ulysses})")
        return plan

    def save(self, path: str | os.PathLike) -> None:
        write_atomic(path, dump_text(self.to_dict(), path))

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Plan":
        return cls.from_dict(load_data(path), source=str(path))
