"""Cost model: how long a plan's ring attention, all-to-all and gradient traffic take.

One ring step, per layer, forward: every rank sends its K and V block to the
next rank of its ring (``2 * c * n_kv * d_h * bytes``, GQA-aware: KV heads,
not query heads) while it computes attention of its queries against the
block it holds (``4 * a * c^2 * n_q * d_h`` FLOPs, ``a = 0.5`` for zigzag
halves). All rings step at once, so a hop's bandwidth is its slowest link's
bandwidth divided by the number of ring flows crossing that link in the same
direction. Communication hides behind compute when the slowest hop finishes
first. Backward moves about 3x the bytes (dK, dV travel in fp32) for about
2.5x the FLOPs.

Each figure comes with its lower bound over all placements
(``topology.bound``), so a plan's distance from the best possible shows.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from topology.bound import ring_bandwidth_bound
from topology.model import Topology
from topology.plan import Plan
from topology.routing import FlowModel

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
    """Ring hops between hosts under different leaf switches."""
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
    """Lower bound on ``step_time_s`` over all placements (all-to-all counted as free)."""
    efficiency: float
    """Assumed fraction of the dense peak that attention kernels and GEMMs sustain."""

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
) -> CostReport:
    """Predict a plan's ring step, step time, tokens/s and MFU, and the bound.

    Parameters
    ----------
    plan, topo
        The placement and the cluster it is for.
    model
        Shape of the model (Llama-3-8B by default).
    dtype_bytes
        Bytes per activation element on the wire (2 for bf16).
    efficiency
        Fraction of the GPU's dense BF16 peak that kernels sustain; 0.6 is
        what flash-attention 2 and large bf16 GEMMs reach on recent GPUs.
    zero_stage
        3: parameters are all-gathered for forward and backward and gradients
        reduce-scattered (3 x params moved); otherwise an all-reduce (2 x).
    flows
        A ``FlowModel`` to reuse (its path cache) across plans of one topology.

    Returns
    -------
    CostReport
    """
    flows = flows or FlowModel(topo)
    ring, uly, seq = plan.ring, plan.ulysses, plan.seq_len
    rate = topo.gpu.tflops_bf16 * 1e12 * efficiency
    c = seq // ring  # after the all-to-all each rank holds seq/ring tokens of n/U heads
    n_q = model.n_q_heads / uly
    n_kv = math.ceil(model.n_kv_heads / uly)  # KV heads are replicated when U exceeds them
    bytes_fwd = 2 * c * n_kv * model.head_dim * dtype_bytes
    flops_fwd = 4 * ZIGZAG_A * c * c * n_q * model.head_dim

    hop_gbps, hop, hop_lat = slowest_hop(plan, topo, flows)
    comm_fwd = _transfer(bytes_fwd, hop_gbps, hop_lat)
    comm_bwd = _transfer(BWD_BYTES * bytes_fwd, hop_gbps, hop_lat)
    comp_fwd, comp_bwd = flops_fwd / rate, BWD_FLOPS * flops_fwd / rate
    step_fwd, step_bwd = max(comm_fwd, comp_fwd), max(comm_bwd, comp_bwd)
    # The first step computes the local block while the first transfer runs.
    ring_layer = comp_fwd + comp_bwd + (ring - 1) * (step_fwd + step_bwd)
    nodes = gpu_nodes(plan, topo)
    a2a = _ulysses_a2a(plan, nodes, model, dtype_bytes, flows)
    attention = model.layers * (ring_layer + a2a)
    dense = 6 * model.params * (seq / plan.cp) / rate
    volume = (3 if zero_stage == 3 else 2) * model.params * dtype_bytes * (plan.world_size - 1) / plan.world_size
    dp = _transfer(volume, _world_ring_gbps(nodes, flows), 0.0) if plan.world_size > 1 else 0.0
    step = dense + attention + dp

    bound_gbps = ring_bandwidth_bound(topo, plan.dp * uly, ring)
    bound_fwd = max(comp_fwd, _transfer(bytes_fwd, bound_gbps, 0.0))
    bound_bwd = max(comp_bwd, _transfer(BWD_BYTES * bytes_fwd, bound_gbps, 0.0))
    bound_ring = comp_fwd + comp_bwd + (ring - 1) * (bound_fwd + bound_bwd)
    bus_bound = ring_bandwidth_bound(topo, 1, plan.world_size)
    bound_dp = _transfer(volume, bus_bound, 0.0) if plan.world_size > 1 else 0.0
    bound_step = dense + model.layers * bound_ring + bound_dp

    causal = 0.5  # a causal sequence computes half of its seq x seq scores
    attn_flops = (1 + BWD_FLOPS) * 4 * causal * seq * seq * model.n_q_heads * model.head_dim * model.layers
    model_flops = plan.dp * (6 * model.params * seq + attn_flops)
    hosts = [p.host for p in plan.placements]
    hops = ring_hops(plan)
    return CostReport(
        model=model.name,
        tokens_per_rank=seq // plan.cp,
        ring_bytes_fwd=int(bytes_fwd),
        ring_comm_fwd_s=comm_fwd, ring_compute_fwd_s=comp_fwd, ring_step_fwd_s=step_fwd,
        ring_comm_bwd_s=comm_bwd, ring_compute_bwd_s=comp_bwd, ring_step_bwd_s=step_bwd,
        slowest_hop_gbps=None if math.isinf(hop_gbps) else hop_gbps,
        slowest_hop=list(hop) if hop else None,
        hidden=comm_fwd <= comp_fwd and comm_bwd <= comp_bwd,
        inter_host_hops=sum(hosts[a] != hosts[b] for a, b in hops),
        cross_switch_hops=sum(topo.leaf_of(hosts[a]) != topo.leaf_of(hosts[b]) for a, b in hops if hosts[a] != hosts[b]),
        ulysses_a2a_s=a2a,
        attention_s=attention,
        dense_compute_s=dense,
        dp_allreduce_s=dp,
        step_time_s=step,
        tokens_per_s=plan.dp * seq / step,
        mfu=model_flops / (step * plan.world_size * topo.gpu.tflops_bf16 * 1e12),
        bound_hop_gbps=None if math.isinf(bound_gbps) else bound_gbps,
        bound_ring_step_s=bound_fwd,
        bound_step_s=bound_step,
        efficiency=efficiency,
    )


def _transfer(nbytes: float, gbps: float, lat_us: float) -> float:
    if nbytes == 0 or math.isinf(gbps):
        return 0.0
    return math.inf if gbps <= 0 else nbytes / (gbps * 1e9) + lat_us * 1e-6


def _ulysses_a2a(plan: Plan, nodes: list[str], model: ModelShape, dtype_bytes: int, flows: FlowModel) -> float:
    """All-to-all of q, k, v and the output (forward), and of their gradients (backward), per layer."""
    uly = plan.ulysses
    if uly < 2:
        return 0.0
    pairs = [(nodes[a], nodes[b]) for g in plan.groups.ulysses_groups for a in g for b in g if a != b]
    rates = flows.bandwidths(pairs)
    tokens = plan.seq_len // plan.cp
    heads = 2 * model.n_q_heads + 2 * max(model.n_kv_heads, uly)
    per_peer = tokens * heads / uly * model.head_dim * dtype_bytes
    return 2 * max(_transfer(per_peer, r, lat) for r, lat in rates)


def _world_ring_gbps(nodes: list[str], flows: FlowModel) -> float:
    """Bus bandwidth of a collective over all ranks: NCCL builds its ring in rank order (``nodes``)."""
    ring = [(nodes[i], nodes[(i + 1) % len(nodes)]) for i in range(len(nodes))]
    return min(r for r, _ in flows.bandwidths(ring))
