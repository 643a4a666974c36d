"""One planning problem, checked: what ``topology.planning.planner`` hands every construction."""

from __future__ import annotations

from dataclasses import dataclass, field

from topology.cost import LLAMA3_8B, FlowModel, HardwareRates, ModelShape
from topology.network.model import Topology


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
    seq_len: int = 0
    model: ModelShape = LLAMA3_8B
    rates: HardwareRates | None = None
    """The cost model's rates (calibrated or defaults): the search ranks orders by the same step time the plan reports."""
    budget_s: float = 0.5
    """Wall-clock budget of the local search."""
    recompute: bool = False
    """Activation checkpointing: the step the search ranks by runs every layer's forward again."""
    info: dict = field(default_factory=dict)
    """What the strategy found out: the construction it kept, moves, optimality."""

    @property
    def ring(self) -> int:
        return self.cp // self.ulysses

    def gpu_count(self, host: str) -> int:
        return len(self.topo.gpus(host))
