"""Size a stage for a cluster: its ring size (``batch: auto``) and Ulysses degree (``ulysses: auto``).

Two rules, each printed with its reason by the dry run:

* Ring size: the smallest ring whose memory per GPU fits (``launcher.estimate.memory``).
  A smaller ring means more rings side by side (larger data parallelism), so
  fewer K/V blocks cross the network per token. When the stage names
  ``train_batch_size`` (sequences per optimizer step) only rings that keep it
  are tried: rings = gpus / ring must divide it, and gradient accumulation
  makes up the rest.
* Ulysses degree: 1 unless the planned ring is communication-bound (the
  slowest hop's K/V transfer does not hide behind the block's attention, by
  ``topology.cost``); then every degree that divides the KV heads and fits
  in a host is planned, and the fastest predicted step wins.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

from launcher.estimate.memory import GB, MemoryAssumptions, MemoryEstimate, estimate_memory
from launcher.recipe import AUTO, RecipeStage
from topology.cost import LLAMA3_8B, FlowModel, HardwareRates, ModelShape
from topology.errors import ConfigError
from topology.network.model import Topology
from topology.planning.plan import Plan
from topology.planning.planner import make_plan


@dataclass
class StageSize:
    """A stage's layout on one cluster, and why it was chosen."""

    stage: str
    gpus: int
    batch: int
    """Rings side by side (data-parallel size)."""
    grad_accum: int
    cp: int
    """GPUs per sequence: ring degree x ulysses."""
    ulysses: int
    memory: MemoryEstimate
    plan: Plan | None
    """The topology-aware placement; None when the topology cannot hold the stage."""
    reasons: list[str] = field(default_factory=list)
    """Why the sizing chose what it chose (only for ``auto`` settings)."""
    problems: list[str] = field(default_factory=list)
    """What stops the stage from running: memory over the GPU's, a topology too small."""
    warnings: list[str] = field(default_factory=list)
    """What runs but slower than it could: a communication-bound ring."""

    @property
    def ring(self) -> int:
        return self.cp // self.ulysses


def ring_candidates(seq_len: int, gpus: int, train_batch_size: int | None = None) -> list[int]:
    """Ring sizes (cp) a stage could use, smallest first.

    ``cp`` must divide ``gpus``, zigzag needs ``seq_len`` in ``2 * cp`` equal
    chunks, and with ``train_batch_size`` the number of rings must divide it.

    >>> ring_candidates(65536, 8, train_batch_size=32)
    [1, 2, 4, 8]
    >>> ring_candidates(4194304, 512, train_batch_size=4)
    [128, 256, 512]
    """
    out = []
    for cp in range(1, gpus + 1):
        if gpus % cp or seq_len % (2 * cp):
            continue
        if train_batch_size is not None and train_batch_size % (gpus // cp):
            continue
        out.append(cp)
    return out


def size_stage(
    stage: RecipeStage,
    topo: Topology,
    model: ModelShape = LLAMA3_8B,
    deepspeed: dict[str, Any] | None = None,
    assumptions: MemoryAssumptions = MemoryAssumptions(),
    flows: FlowModel | None = None,
    rates: HardwareRates | None = None,
) -> StageSize:
    """Resolve ``auto`` in one stage and plan it on ``topo``.

    Parameters
    ----------
    stage : RecipeStage
        As written; ``batch`` and ``ulysses`` may be ``"auto"``.
    topo : Topology
        The cluster (its GPU type sets the memory).
    model, deepspeed, assumptions
        For the memory estimate and the cost model.
    flows : FlowModel, optional
        Shared path cache for the plans of one topology.
    rates : HardwareRates, optional
        The cost model's rates (from a calibration or the GPU's defaults).

    Returns
    -------
    StageSize
        With ``reasons`` for each ``auto`` choice, ``problems`` for what cannot run, ``warnings`` for what runs slowly.

    Raises
    ------
    ConfigError
        When no ring size is possible at all (e.g. ``train_batch_size`` shares no divisor with ``gpus``).
    """
    def memory(cp: int, ulysses: int = 1) -> MemoryEstimate:
        return estimate_memory(model, stage.seq_len, stage.gpus, cp, ulysses, topo.gpu, deepspeed, assumptions)

    reasons: list[str] = []
    if stage.batch == AUTO:
        cp, why = _choose_ring(stage, memory, stage.train_batch_size)
        reasons.append(why)
    else:
        cp = stage.gpus // stage.batch
        auto_cp, why = _choose_ring(stage, memory, stage.batch * stage.grad_accum)
        if auto_cp != cp:
            reasons.append(f"ring {cp} as written; batch: auto would pick {why}")
    batch = stage.gpus // cp
    accum = stage.train_batch_size // batch if stage.batch == AUTO and stage.train_batch_size else stage.grad_accum
    size = StageSize(stage.name, stage.gpus, batch, accum, cp, 1, memory(cp), None, reasons)
    if topo.num_gpus < stage.gpus:
        size.problems.append(f"stage {stage.name} needs {stage.gpus} GPUs; topology {topo.name} has {topo.num_gpus}")
        return size
    flows = flows or FlowModel(topo)

    def plan(ulysses: int) -> Plan:
        return make_plan(topo, stage.gpus, cp, ulysses=ulysses, seq_len=stage.seq_len, model=model, flows=flows, rates=rates,
                         recompute=assumptions.activation_checkpointing)

    if stage.ulysses == AUTO:
        size.ulysses, size.plan, why = _choose_ulysses(cp, topo, model, plan, memory)
        reasons.append(why)
    else:
        size.ulysses, size.plan = int(stage.ulysses), plan(int(stage.ulysses))
        if not size.plan.cost["hidden"]:
            size.warnings.append(f"stage {stage.name}: ring communication is not hidden behind compute ({_comm(size.plan)}); "
                                 "try ulysses: auto")
    size.memory = memory(cp, size.ulysses)
    if not size.memory.fits:
        size.problems.append(f"stage {stage.name}: {size.memory.total / GB:.1f} GB per GPU exceeds the "
                             f"{size.memory.usable / GB:.1f} GB usable of {topo.gpu.name}'s {topo.gpu.memory_gb:g} GB")
    return size


def resolve_stage(stage: RecipeStage, size: StageSize) -> RecipeStage:
    """The stage with ``auto`` replaced by what ``size`` chose: what the launcher trains with."""
    return replace(stage, batch=size.batch, grad_accum=size.grad_accum, ulysses=size.ulysses)


def _choose_ring(stage: RecipeStage, memory: Any, train_batch_size: int | None) -> tuple[int, str]:
    candidates = ring_candidates(stage.seq_len, stage.gpus, train_batch_size)
    if not candidates:
        raise ConfigError(f"stage {stage.name!r}: no ring size divides gpus ({stage.gpus}) and seq_len ({stage.seq_len}) "
                          f"with rings dividing train_batch_size ({train_batch_size}); change one of them")
    tried = []
    for cp in candidates:
        m = memory(cp)
        if m.fits:
            smaller = f"; ring {tried[-1][0]} would need {tried[-1][1]:.1f} GB" if tried else ""
            limit = "" if cp != candidates[0] or train_batch_size is None else (
                f" (with train_batch_size {train_batch_size} no ring can be smaller)")
            return cp, (f"ring {cp} ({stage.gpus // cp} rings, {stage.seq_len // cp:,} tokens per GPU): the smallest ring "
                        f"that fits, {m.total / GB:.1f} of {m.usable / GB:.1f} GB usable{smaller}{limit}")
        tried.append((cp, m.total / GB))
    cp = candidates[-1]
    return cp, f"ring {cp}: no ring size fits; even the largest needs {tried[-1][1]:.1f} GB per GPU"


def _choose_ulysses(cp: int, topo: Topology, model: ModelShape, plan: Any, memory: Any) -> tuple[int, Plan, str]:
    base = plan(1)
    if base.cost["hidden"]:
        return 1, base, f"ulysses 1: ring communication hides behind compute ({_comm(base)})"
    per_host = min(len(topo.gpus(h)) for h in topo.hosts if topo.gpus(h))
    degrees = [u for u in (2, 4, 8, 16) if cp % u == 0 and model.n_kv_heads % u == 0 and u <= per_host and memory(cp, u).fits]
    options = [(base.cost["step_time_s"], 1, base)] + [(p.cost["step_time_s"], u, p) for u in degrees for p in [plan(u)]]
    step, u, best = min(options, key=lambda o: o[0])
    tried = ", ".join(f"ulysses {d}: {s:.2f} s" for s, d, _ in options)
    if u == 1:
        return 1, base, f"ulysses 1: the ring is communication-bound ({_comm(base)}) but no Ulysses degree is faster ({tried})"
    return u, best, (f"ulysses {u} x ring {cp // u}: the ring of {cp} is communication-bound ({_comm(base)}); "
                     f"all-to-all inside a host is faster ({tried})")


def _comm(plan: Plan) -> str:
    c = plan.cost
    hop = f"slowest hop {c['slowest_hop_gbps']:.1f} GB/s" if c.get("slowest_hop_gbps") else "no ring hops"
    return (f"{hop}: K/V transfer {c['ring_comm_fwd_s'] * 1e3:.3g} ms vs attention {c['ring_compute_fwd_s'] * 1e3:.3g} ms "
            f"per layer step, forward")
