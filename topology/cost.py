"""Cost model: how long a plan's ring attention, all-to-all and gradient traffic take.

One ring step, per layer, forward: every rank sends its K and V block to the
next rank of its ring (``2 * c * n_kv * d_h * bytes``, GQA-aware: KV heads,
not query heads) while it computes attention of its queries against the
block it holds (``4 * a * c^2 * n_q * d_h`` FLOPs, ``a = 0.5`` for zigzag
halves). All rings step at once, so a hop gets, on each link it crosses,
the link's bandwidth over the flows (ECMP shares) crossing it in the same
direction (``topology.network.routing``). Communication hides behind compute when
the slowest hop finishes first. Backward moves about 3x the bytes (dK, dV
travel in fp32) for about 2.5x the FLOPs. The Ulysses all-to-all and the
ZeRO gradient traffic (over NCCL's ring in rank order) add to the step.

``StepModel`` computes the step time of any rank order (the planner's
objective); ``estimate`` reports a plan's figures with lower bounds over all
placements (``step_bound``, ``topology.planning.bounds.rates``), so a plan's distance from
the best possible shows. The rates live in ``HardwareRates``.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from typing import TYPE_CHECKING

import numpy as np

from topology.planning.bounds.rates import all_to_all_rate_bound, min_route_latency, ring_bandwidth_bound
from topology.planning.bounds.gradient_gate import gradient_gate
from topology.planning.bounds.hop_latency import hop_latency
from topology.planning.bounds.split_groups import split_step
from topology.network.model import Topology
from topology.planning.plan import GroupLayout, Plan
from topology.network.routing import FlowModel, same_nvlink_domain

if TYPE_CHECKING:
    from topology.calibration import Calibration

ZIGZAG_A = 0.5
"""Fraction of a full c x c block one zigzag ring step computes."""
BWD_BYTES = 3.0
BWD_FLOPS = 2.5


@dataclass(frozen=True)
class ModelShape:
    """The parts of a transformer that set its compute and traffic."""

    name: str
    layers: int
    hidden: int
    n_q_heads: int
    n_kv_heads: int
    """Key/value heads (GQA): what a ring hop carries."""
    head_dim: int
    vocab: int
    params: int
    """All parameters, embeddings included: the size of the gradient to reduce."""


LLAMA3_8B = ModelShape("Llama-3-8B", layers=32, hidden=4096, n_q_heads=32, n_kv_heads=8, head_dim=128,
                       vocab=128256, params=8_030_261_248)


@dataclass
class CostReport:
    """Predicted figures for one plan; ``to_dict`` is what goes into ``Plan.cost``.

    Times are seconds. "Ring step" is one of the ring's steps for one layer:
    one K/V block in flight, one block of attention computed.
    """

    model: str
    tokens_per_rank: int
    """Tokens each rank holds (sequence length / cp)."""
    ring_bytes_fwd: int
    """Bytes each rank sends per forward ring step and layer."""
    ring_comm_fwd_s: float
    ring_compute_fwd_s: float
    ring_step_fwd_s: float
    """max(comm, compute): the forward ring step with communication overlapped."""
    ring_comm_bwd_s: float
    ring_compute_bwd_s: float
    ring_step_bwd_s: float
    slowest_hop_gbps: float | None
    """Bandwidth of the slowest ring hop with every ring running (None: rings of one)."""
    slowest_hop: list[int] | None
    """[sender rank, receiver rank] of that hop."""
    hidden: bool
    """Whether ring communication hides behind compute, forward and backward."""
    inter_host_hops: int
    cross_switch_hops: int
    """Ring hops between hosts under different leaf switches (a hop inside an NVLink domain takes no network switch)."""
    ulysses_a2a_s: float
    """All-to-all time per layer, forward plus backward."""
    attention_s: float
    """Ring attention (+ all-to-all) of all layers, forward plus backward."""
    dense_compute_s: float
    """Everything but attention scores: 6 x params x tokens per rank."""
    dp_allreduce_s: float
    """Gradient (and ZeRO-3 parameter) traffic of one step across all ranks: cp ranks hold
    different tokens of the same replica, so they reduce with the dp peers."""
    step_time_s: float
    """One forward/backward of one sequence per ring plus the gradient traffic."""
    tokens_per_s: float
    mfu: float
    """Model FLOPs per second over the GPUs' dense BF16 peak."""
    bound_hop_gbps: float | None
    """Fastest slowest-hop any placement of this shape could reach on this topology."""
    bound_ring_step_s: float
    """Lower bound on ``ring_step_fwd_s`` over all placements."""
    bound_step_s: float
    """Lower bound on ``step_time_s`` over all placements (ring, all-to-all and gradient terms each bounded)."""
    efficiency: float
    """Assumed fraction of the dense peak that attention kernels and GEMMs sustain (when no achieved figure is given)."""
    rates_source: str = ""
    """Where the hardware rates come from: ``defaults for <GPU>``, ``calibrated on ...``, or the bare peak model."""

    def to_dict(self) -> dict:
        return {k: (float(f"{v:.9g}") if isinstance(v, float) else v) for k, v in asdict(self).items()}


def gpu_nodes(plan: Plan, topo: Topology) -> list[str]:
    """The GPU node of every rank, in rank order."""
    return [topo.gpu_id(p.host, p.gpu) for p in plan.placements]


def ring_hops(plan: Plan) -> list[tuple[int, int]]:
    """(sender, receiver) rank pairs of one ring step: each rank to the next of its ring."""
    if plan.ring < 2:
        return []
    return [(g[i], g[(i + 1) % len(g)]) for g in plan.groups.ring_groups for i in range(len(g))]


def slowest_hop(plan: Plan, topo: Topology, flows: FlowModel | None = None) -> tuple[float, tuple[int, int] | None, float]:
    """(GB/s, hop, latency µs) of the ring hop that finishes last; (inf, None, 0) for rings of one."""
    hops = ring_hops(plan)
    if not hops:
        return math.inf, None, 0.0
    nodes = gpu_nodes(plan, topo)
    rates = (flows or FlowModel(topo)).bandwidths([(nodes[a], nodes[b]) for a, b in hops])
    i = min(range(len(hops)), key=lambda j: (rates[j][0], -rates[j][1]))
    return rates[i][0], hops[i], rates[i][1]


# ------------------------------------------------------------------ step time
class StepModel:
    """The cost model's step time for any rank order of one shape: the planner's objective.

    Everything that does not depend on where ranks run (bytes per hop,
    FLOPs, dense compute, gradient volume) is computed once; ``step`` then
    costs one pass over the ring, all-to-all and gradient flows of an order.

    Parameters
    ----------
    topo, dp, ring, ulysses, seq_len, model
        The cluster and the plan's shape.
    flows
        Shared routes and link sharing.
    rates
        Hardware rates (``HardwareRates``).
    zero_stage
        3: parameters all-gathered and gradients reduce-scattered (3 x params
        moved); otherwise an all-reduce (2 x).
    recompute
        Activation checkpointing: every layer's forward runs again in backward.
    """

    def __init__(self, topo: Topology, dp: int, ring: int, ulysses: int, seq_len: int, model: ModelShape = LLAMA3_8B,
                 flows: FlowModel | None = None, rates: "HardwareRates | None" = None, zero_stage: int = 3,
                 recompute: bool = False):
        self.topo, self.model, self.recompute = topo, model, recompute
        self.flows = flows or FlowModel(topo)
        self.rates = rates = rates or HardwareRates()
        self.dp, self.ring, self.ulysses, self.seq_len = dp, ring, ulysses, seq_len
        self.cp = ring * ulysses
        self.world = dp * self.cp
        flops_rate = (rates.gemm_tflops or topo.gpu.tflops_bf16 * rates.efficiency) * 1e12
        attn_fwd = (rates.attn_fwd_tflops or topo.gpu.tflops_bf16 * rates.efficiency) * 1e12
        attn_bwd = (rates.attn_bwd_tflops or topo.gpu.tflops_bf16 * rates.efficiency) * 1e12
        diag_fwd = rates.attn_causal_fwd_tflops * 1e12 if rates.attn_causal_fwd_tflops else attn_fwd
        diag_bwd = rates.attn_causal_bwd_tflops * 1e12 if rates.attn_causal_bwd_tflops else attn_bwd
        c = seq_len // ring  # after the all-to-all each rank holds seq/ring tokens of n/U heads
        n_q = model.n_q_heads / ulysses
        n_kv = math.ceil(model.n_kv_heads / ulysses)  # KV heads are replicated when U exceeds them
        self.bytes_fwd = 2 * c * n_kv * model.head_dim * rates.dtype_bytes
        flops_fwd = 4 * rates.zigzag_a * c * c * n_q * model.head_dim
        self.comp_fwd, self.comp_bwd = flops_fwd / attn_fwd, rates.bwd_flops * flops_fwd / attn_bwd
        # Step 0 computes the local block under the causal mask: as many FLOPs as a zigzag half, at the causal kernel's rate.
        self.diag_fwd, self.diag_bwd = flops_fwd / diag_fwd, rates.bwd_flops * flops_fwd / diag_bwd
        self.dense = (8 if recompute else 6) * model.params * (seq_len / self.cp) / flops_rate
        self.volume = (3 if zero_stage == 3 else 2) * model.params * rates.dtype_bytes * (self.world - 1) / self.world
        tokens = seq_len // self.cp
        heads = 2 * model.n_q_heads + 2 * max(model.n_kv_heads, ulysses)
        self.a2a_per_peer = tokens * heads / ulysses * model.head_dim * rates.dtype_bytes
        layout = GroupLayout.from_grid(dp, ring, ulysses)
        self.hops = [(g[i], g[(i + 1) % len(g)]) for g in layout.ring_groups for i in range(len(g))] if ring > 1 else []
        self.a2a_pairs = [(a, b) for g in layout.ulysses_groups for a in g for b in g if a != b] if ulysses > 1 else []

    # -------------------------------------------------------------- parts
    def ring_layer(self, hop_gbps: float, hop_lat: float) -> tuple[float, float, float, float]:
        """(forward comm, backward comm, forward step, backward step) of one ring step at this hop rate."""
        comm_fwd = transfer(self.bytes_fwd, hop_gbps, hop_lat)
        comm_bwd = transfer(self.rates.bwd_bytes * self.bytes_fwd, hop_gbps, hop_lat)
        hide = self.rates.overlap
        step_fwd = max(comm_fwd, self.comp_fwd) + (1 - hide) * min(comm_fwd, self.comp_fwd)
        step_bwd = max(comm_bwd, self.comp_bwd) + (1 - hide) * min(comm_bwd, self.comp_bwd)
        return comm_fwd, comm_bwd, step_fwd, step_bwd

    def collectives(self) -> dict[str, tuple[int, int]]:
        """Collectives of one layer, ``{kind: (forward, backward)}``: what each pays a latency for.

        The forward ring waits on ``R - 1`` K/V exchanges; the backward ring
        on ``R - 1`` K/V exchanges and ``R`` exchanges of their gradient
        accumulators (the last brings a rank's own block home). Ulysses
        exchanges q, k, v and the output (4 all-to-alls) forward and their
        gradients backward. Activation checkpointing repeats the forward ones.
        """
        r = self.ring
        p2p = (r - 1, 2 * r - 1) if r > 1 else (0, 0)
        a2a = (4, 4) if self.ulysses > 1 else (0, 0)
        return {"p2p": p2p, "a2a": a2a}

    def latency(self) -> float:
        """Fixed seconds of one layer's collectives, forward and backward (recompute included): count x measured latency."""
        rates, again = self.rates, 2 if self.recompute else 1
        lat = {"p2p": rates.p2p_latency_s, "a2a": rates.a2a_latency_s}
        return sum(lat[k] * (again * fwd + bwd) for k, (fwd, bwd) in self.collectives().items())

    def attention(self, hop_gbps: float, hop_lat: float, a2a: float) -> float:
        """Ring attention (+ all-to-all) of all layers, forward and backward."""
        _, _, fwd, bwd = self.ring_layer(hop_gbps, hop_lat)
        # The first step computes the local (causal) block while the first transfer runs.
        overhead = self.ring * self.rates.layer_overhead_s
        # Activation checkpointing runs each layer's forward (its ring and all-to-all included) again in backward.
        again = (self.diag_fwd + (self.ring - 1) * fwd + a2a / 2 + overhead / 2) if self.recompute else 0.0
        return self.model.layers * (self.diag_fwd + self.diag_bwd + (self.ring - 1) * (fwd + bwd) + a2a + overhead + again
                                    + self.latency())

    def gradients(self, bus_gbps: float) -> float:
        """ZeRO / data-parallel traffic of a step at the bus bandwidth of the slowest link, capped by the measured one."""
        rate = bus_gbps * self.rates.bus_efficiency
        if self.rates.bus_gbps:
            rate = min(rate, self.rates.bus_gbps)
        return transfer(self.volume, rate, 0.0) if self.world > 1 else 0.0

    def hop_rates(self, pairs: list[tuple[str, str]]) -> list[tuple[float, float]]:
        """(GB/s, latency µs) of transfers that run at once: the flow model's share, scaled and capped by the rates."""
        r = self.rates
        capped = r.intra_host_gbps or r.inter_host_gbps
        out = []
        for (a, b), (gbps, lat) in zip(pairs, self.flows.bandwidths(pairs)):
            gbps *= r.network_efficiency
            cap = capped and (r.intra_host_gbps if self.topo.host_of(a) == self.topo.host_of(b) else r.inter_host_gbps)
            out.append((min(gbps, cap) if cap else gbps, lat))
        return out

    def figures(self, nodes: list[str]) -> dict:
        """Every rank-dependent figure of an order: slowest hop (rate, index, latency), all-to-all, bus, step."""
        flows = self.flows
        hop_gbps, hop_i, hop_lat = math.inf, None, 0.0
        if self.hops:
            rates = self.hop_rates([(nodes[a], nodes[b]) for a, b in self.hops])
            hop_i = min(range(len(rates)), key=lambda j: (rates[j][0], -rates[j][1]))
            hop_gbps, hop_lat = rates[hop_i]
        a2a = 0.0
        if self.a2a_pairs:
            rates = self.hop_rates([(nodes[a], nodes[b]) for a, b in self.a2a_pairs])
            a2a = 2 * max(transfer(self.a2a_per_peer, r, lat) for r, lat in rates)
        bus = math.inf
        if self.world > 1:
            bus = min(r for r, _ in flows.bandwidths([(nodes[i], nodes[(i + 1) % len(nodes)]) for i in range(len(nodes))]))
        step = self.rates.with_step_overhead(self.dense + self.attention(hop_gbps, hop_lat, a2a) + self.gradients(bus))
        return {"hop_gbps": hop_gbps, "hop": None if hop_i is None else self.hops[hop_i], "hop_lat": hop_lat,
                "a2a": a2a, "bus_gbps": bus, "step": step}

    def step(self, nodes: list[str]) -> float:
        """Step time of the rank order ``nodes`` (GPU node of every rank), seconds."""
        return self.figures(nodes)["step"]


@dataclass(frozen=True)
class HardwareRates:
    """The cost model's rates in one place, so a calibration file can replace them.

    GPU peak TFLOPS come from the topology's ``GpuSpec``; link bandwidths and
    latencies from its links. These are the rest.
    """

    efficiency: float = 0.6
    """Fraction of the GPU's dense BF16 peak that kernels sustain: what flash-attention 2 and
    large bf16 GEMMs reach on recent GPUs."""
    zigzag_a: float = ZIGZAG_A
    bwd_bytes: float = BWD_BYTES
    """Backward ring bytes over forward (dK, dV travel in fp32)."""
    bwd_flops: float = BWD_FLOPS
    dtype_bytes: int = 2
    """Bytes per activation and parameter element on the wire (bf16)."""
    gemm_tflops: float | None = None
    """Achieved dense GEMM TFLOPS per device (None: ``efficiency`` x the GPU's peak)."""
    attn_fwd_tflops: float | None = None
    """Achieved attention block kernel TFLOPS, forward (None: ``efficiency`` x peak)."""
    attn_bwd_tflops: float | None = None
    """Achieved attention block kernel TFLOPS, backward (None: ``efficiency`` x peak)."""
    network_efficiency: float = 1.0
    """Fraction of the flow model's link share a ring hop or all-to-all transfer achieves."""
    bus_efficiency: float = 1.0
    """Fraction of the slowest link's bandwidth a gradient collective reaches (bus bandwidth)."""
    inter_host_gbps: float | None = None
    """Measured cap on one host-to-host hop with every hop busy (None: no cap)."""
    intra_host_gbps: float | None = None
    """Measured cap on one in-host hop with every hop busy (None: no cap)."""
    overlap: float = 1.0
    """Fraction of a ring step's shorter part (transfer or compute) that hides behind the longer:
    1 where communication runs on its own engine (NCCL on GPUs), near 0 where it shares the cores."""
    step_overhead_s: float = 0.0
    """Fixed seconds per step on the host (optimizer, ZeRO's hooks, kernel launches), measured where the device is idle."""
    host_overlap: float = 1.0
    """Fraction of ``step_overhead_s`` that runs while the device computes. A GPU executes kernels
    asynchronously, so the host's work of a step hides behind the device's: 1 (on an H200 the
    model's device time alone came within 4-15% of measured steps at 16K-32K tokens, the fixed cost
    added to it 56% above).
    CPU ranks do both on the same cores: 0."""
    layer_overhead_s: float = 0.0
    """Fixed seconds per layer and ring step, forward plus backward."""
    attn_causal_fwd_tflops: float | None = None
    """Achieved TFLOPS of the causal (diagonal) block kernel, forward (None: ``attn_fwd_tflops``)."""
    attn_causal_bwd_tflops: float | None = None
    """Achieved TFLOPS of the causal block kernel, backward (None: ``attn_bwd_tflops``)."""
    bus_gbps: float | None = None
    """Measured bus bandwidth of the ranks' all-reduce / reduce-scatter, GB/s: caps the gradient traffic's rate."""
    p2p_latency_s: float = 0.0
    """Fixed seconds of one ring exchange (``StepModel.collectives`` counts them)."""
    a2a_latency_s: float = 0.0
    """Fixed seconds of one Ulysses all-to-all."""
    source: str = "peak x efficiency"
    """Where the rates come from: a calibration's source, or the bare model."""

    def with_step_overhead(self, device_s: float) -> float:
        """A step's seconds from its device time: the fixed host cost added, less what hides behind the device.

        Non-decreasing in ``device_s``, so a bound on the device time bounds the step.
        """
        return device_s + self.step_overhead_s - self.host_overlap * min(device_s, self.step_overhead_s)

    def step_overhead_from(self, step_s: float, device_s: float) -> float:
        """The fixed host cost that makes ``with_step_overhead(device_s)`` equal a measured ``step_s`` (0 if none does)."""
        hidden = 1.0 - self.host_overlap
        above = step_s - hidden * device_s  # the overhead if it is the longer part
        if above >= device_s:
            return above
        return max(0.0, (step_s - device_s) / hidden) if hidden > 0 else 0.0

    @classmethod
    def from_calibration(cls, cal: "Calibration", which: str = "value") -> "HardwareRates":
        """Rates from a calibration's expected figures (``which="value"``) or one end of its range (``low``/``high``)."""
        if which != "value":
            cal = cal.bound(which)

        def v(name: str) -> float | None:
            f = getattr(cal, name)
            return None if f is None else f.value

        return cls(gemm_tflops=v("gemm_tflops"), attn_fwd_tflops=v("attn_fwd_tflops"), attn_bwd_tflops=v("attn_bwd_tflops"),
                   network_efficiency=v("network_efficiency"), bus_efficiency=v("bus_efficiency"),
                   inter_host_gbps=v("inter_host_gbps"), intra_host_gbps=v("intra_host_gbps"),
                   step_overhead_s=v("step_overhead_s"), layer_overhead_s=v("layer_overhead_s") or 0.0,
                   attn_causal_fwd_tflops=v("attn_causal_fwd_tflops"), attn_causal_bwd_tflops=v("attn_causal_bwd_tflops"),
                   bus_gbps=v("bus_gbps"), p2p_latency_s=v("p2p_latency_s") or 0.0, a2a_latency_s=v("a2a_latency_s") or 0.0,
                   overlap=1.0 if cal.overlap is None else min(1.0, max(0.0, cal.overlap.value)),
                   host_overlap=0.0 if cal.device == "cpu" else 1.0, source=cal.source)


# ------------------------------------------------------------------ estimate
def estimate(
    plan: Plan,
    topo: Topology,
    model: ModelShape = LLAMA3_8B,
    dtype_bytes: int = 2,
    *,
    efficiency: float = 0.6,
    zero_stage: int = 3,
    flows: FlowModel | None = None,
    rates: HardwareRates | None = None,
    recompute: bool = False,
    a2a_floor: float = 0.0,
    attention_floor: float = 0.0,
) -> CostReport:
    """Predict a plan's ring step, step time, tokens/s and MFU, and the bound.

    Parameters
    ----------
    plan, topo
        The placement and the cluster it is for.
    model
        Shape of the model (Llama-3-8B by default).
    dtype_bytes, efficiency
        Shorthands for the same fields of ``rates`` (when ``rates`` is not given).
    zero_stage
        3: parameters are all-gathered for forward and backward and gradients
        reduce-scattered (3 x params moved); otherwise an all-reduce (2 x).
    flows
        A ``FlowModel`` to reuse (its route cache) across plans of one topology.
    rates
        ``HardwareRates``; default: 0.6 of peak, bf16.
    a2a_floor
        A known lower bound of the all-to-all term over every placement (``topology.planning.bounds.a2a_floor``),
        for the bound.
    attention_floor
        A known lower bound of the attention time (ring and all-to-all together) plus the gradient term's excess
        over its own bound, over every placement (``topology.planning.bounds.ring_floor``), for the bound.

    Returns
    -------
    CostReport
    """
    rates = rates or HardwareRates(efficiency=efficiency, dtype_bytes=dtype_bytes)
    sm = StepModel(topo, plan.dp, plan.ring, plan.ulysses, plan.seq_len, model, flows, rates, zero_stage, recompute)
    nodes = gpu_nodes(plan, topo)
    f = sm.figures(nodes)
    comm_fwd, comm_bwd, step_fwd, step_bwd = sm.ring_layer(f["hop_gbps"], f["hop_lat"])
    attention = sm.attention(f["hop_gbps"], f["hop_lat"], f["a2a"])
    dp = sm.gradients(f["bus_gbps"])
    step = f["step"]
    b = step_bound(sm, a2a_floor, attention_floor)
    seq = plan.seq_len
    model_flops = plan.dp * sequence_flops(model, seq, rates.bwd_flops)
    hosts = [p.host for p in plan.placements]
    hops = sm.hops
    leaf = {h: topo.leaf_of(h) for h in set(hosts)}
    return CostReport(
        model=model.name,
        tokens_per_rank=seq // plan.cp,
        ring_bytes_fwd=int(sm.bytes_fwd),
        ring_comm_fwd_s=comm_fwd, ring_compute_fwd_s=sm.comp_fwd, ring_step_fwd_s=step_fwd,
        ring_comm_bwd_s=comm_bwd, ring_compute_bwd_s=sm.comp_bwd, ring_step_bwd_s=step_bwd,
        slowest_hop_gbps=None if math.isinf(f["hop_gbps"]) else f["hop_gbps"],
        slowest_hop=list(f["hop"]) if f["hop"] else None,
        hidden=comm_fwd <= sm.comp_fwd and comm_bwd <= sm.comp_bwd,
        inter_host_hops=sum(hosts[a] != hosts[b] for a, b in hops),
        cross_switch_hops=sum(leaf[hosts[a]] != leaf[hosts[b]] for a, b in hops
                              if hosts[a] != hosts[b] and not same_nvlink_domain(topo, nodes[a], nodes[b])),
        ulysses_a2a_s=f["a2a"],
        attention_s=attention,
        dense_compute_s=sm.dense,
        dp_allreduce_s=dp,
        step_time_s=step,
        tokens_per_s=plan.dp * seq / step,
        mfu=model_flops / (step * plan.world_size * topo.gpu.tflops_bf16 * 1e12),
        bound_hop_gbps=None if math.isinf(b["hop_gbps"]) else b["hop_gbps"],
        bound_ring_step_s=b["ring_step_fwd"],
        bound_step_s=b["step"],
        efficiency=rates.efficiency,
        rates_source=rates.source,
    )


def sequence_flops(model: ModelShape, seq: int, bwd_flops: float = BWD_FLOPS) -> float:
    """Model FLOPs of one sequence's forward and backward (the MFU numerator): 6 x params per token, plus causal
    attention, half of its seq x seq scores, forward and ``bwd_flops`` times that backward. Recompute not counted."""
    causal = 0.5
    return 6 * model.params * seq + (1 + bwd_flops) * 4 * causal * seq * seq * model.n_q_heads * model.head_dim * model.layers


def step_bound(sm: StepModel, a2a_floor: float = 0.0, attention_floor: float = 0.0) -> dict:
    """Lower bounds, over every placement of ``sm``'s shape, on the ring step and the step time.

    Each term of the step is bounded on its own (ring hops, all-to-all,
    gradient bus), so their sum bounds the step; see ``topology.planning.bounds.rates``.
    Every all-to-all transfer also waits at least the shortest latency of
    any route between two GPUs, and the slowest ring hop that of the
    shortest route that can run as slow (``topology.planning.bounds.hop_latency``). ``a2a_floor`` is a known lower
    bound of the all-to-all term (``topology.planning.bounds.a2a_floor``): the larger one counts.
    ``attention_floor`` bounds the ring and all-to-all terms together (``topology.planning.bounds.ring_floor``,
    ``StepModel.attention``) plus what the gradient term takes beyond its own bound (the bus bound here):
    where it is above the ring and all-to-all's own bounds, it counts instead.
    The bound also splits on the gradient bus (``_gated_step``,
    ``topology.planning.bounds.gradient_gate``): the larger of the two bounds counts.
    Ring, all-to-all and gradients are priced together where Ulysses groups must
    either send ring hops out of a unit or split across it (``topology.planning.bounds.split_groups``).
    """
    topo = sm.topo
    hop = ring_bandwidth_bound(topo, sm.dp * sm.ulysses, sm.ring) * sm.rates.network_efficiency
    lat = min_route_latency(topo)
    _, _, fwd, _ = sm.ring_layer(hop, hop_latency(sm).at(hop) if sm.ring > 1 else 0.0)
    a2a = max(all_to_all_bound(sm, lat), a2a_floor)
    bus = ring_bandwidth_bound(topo, 1, sm.world)
    step = sm.rates.with_step_overhead(sm.dense + max(split_step(sm, hop, a2a, bus), attention_floor + sm.gradients(bus)))
    gated = _gated_step(sm, hop, a2a, attention_floor)
    if gated > step:
        step = gated
    return {"hop_gbps": hop, "ring_step_fwd": fwd, "a2a": a2a, "bus_gbps": bus, "step": step}


def all_to_all_bound(sm: StepModel, lat_us: float) -> float:
    """Seconds no placement's all-to-all (forward and backward) beats, its transfers waiting at least ``lat_us``.

    Each GPU's ``u - 1`` transfers share its links, and each runs no faster than the GPU's ``(u - 1)``-th
    fastest route to a partner does alone: some GPU of the placement is no better placed than that
    (``all_to_all_rate_bound``).
    """
    if sm.ulysses < 2:
        return 0.0
    rate = all_to_all_rate_bound(sm.topo, sm.world, sm.ulysses - 1)
    return 2 * transfer(sm.a2a_per_peer, rate * sm.rates.network_efficiency, lat_us)


def _gated_step(sm: StepModel, hop: float, a2a: float, attention_floor: float) -> float:
    """The step bound split on the gradient bus (``topology.planning.bounds.gradient_gate``); 0 where the gate says nothing.

    An order at the best bus ``B*`` keeps out of units too slow for it and sends ring hops out of crowded
    units, whose exits cap its slowest hop; one whose bus is slower falls in one of the gate's ranges of slower
    buses, each with its own hop ceiling. Every order is in one case, so the smallest of their bounds holds.
    ``attention_floor`` already counts the gradient term's excess over ``gradients(B*)``.
    """
    gate = gradient_gate(sm)
    if gate is None:
        return 0.0
    best_bus = sm.gradients(gate.bus)

    def traffic(cap: float, bus: float) -> float:  # ring, all-to-all and gradients: slowest hop at most ``cap``
        return math.inf if cap <= 0 else split_step(sm, min(hop, cap * sm.rates.network_efficiency), a2a, bus)

    bounds = [max(traffic(gate.hop_cap, gate.bus), attention_floor + best_bus)]
    for top, _, cap in gate.slower:  # each range of slower buses, its hop ceiling with it
        bounds.append(max(traffic(cap, top), attention_floor + best_bus))
    return sm.rates.with_step_overhead(sm.dense + min(bounds))


def transfer(nbytes: float, gbps: float, lat_us: float) -> float:
    """Seconds to move ``nbytes`` at ``gbps`` GB/s after ``lat_us`` microseconds."""
    if nbytes == 0 or math.isinf(gbps):
        return 0.0
    return math.inf if gbps <= 0 else nbytes / (gbps * 1e9) + lat_us * 1e-6


def transfers(nbytes: float, gbps: np.ndarray, lat_us: np.ndarray) -> np.ndarray:
    """``transfer`` over arrays of rates and latencies, element by element."""
    if nbytes == 0:
        return np.zeros(np.shape(gbps))
    with np.errstate(divide="ignore"):
        out = nbytes / (np.asarray(gbps) * 1e9) + np.asarray(lat_us) * 1e-6
    out[np.isinf(gbps)] = 0.0
    out[np.asarray(gbps) <= 0] = math.inf
    return out
