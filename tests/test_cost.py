"""The cost model: bytes and FLOPs of a ring step, link sharing, overlap, gradients and the bound."""

import dataclasses
import json
import math

import pytest

from topology.planning.bounds.rates import ring_bandwidth_bound
from topology.cost import LLAMA3_8B, FlowModel, estimate
from topology.network.model import Topology
from topology.planning.planner import make_plan
from topology.network.presets import leaf_spine, load_topology


def test_kv_bytes_per_token_are_gqa_aware():
    """Llama-3-8B in bf16 sends 2 x 8 KV heads x 128 x 2 bytes = 4 KiB per token."""
    topo = load_topology("l40s-host")
    plan = make_plan(topo, 8, 8, seq_len=8 * 16384)
    assert plan.cost["ring_bytes_fwd"] == 16384 * 4096
    mha = dataclasses.replace(LLAMA3_8B, n_kv_heads=32)
    assert estimate(plan, topo, mha).ring_bytes_fwd == 4 * plan.cost["ring_bytes_fwd"]
    uly = make_plan(topo, 8, 8, ulysses=2, seq_len=8 * 16384)  # ring of 4 over 32K tokens, 4 KV heads
    assert uly.cost["ring_bytes_fwd"] == 32768 * 4096 // 2


def test_overlap_threshold_matches_the_closed_form():
    """Comm hides when c >= n_kv * bytes * F / (2 * a * n_q * B)."""
    topo = load_topology("l40s-host")
    probe = make_plan(topo, 8, 8, seq_len=16 * 1024)
    rate = topo.gpu.tflops_bf16 * 1e12 * probe.cost["efficiency"]
    c_star = 8 * 2 * rate / (2 * 0.5 * 32 * probe.cost["slowest_hop_gbps"] * 1e9)
    for c, hidden in [(int(2 * c_star) // 2 * 2, True), (int(c_star / 2) // 2 * 2, False)]:
        cost = make_plan(topo, 8, 8, seq_len=8 * c).cost
        assert cost["hidden"] is hidden
        assert cost["ring_step_fwd_s"] == max(cost["ring_comm_fwd_s"], cost["ring_compute_fwd_s"])


def test_backward_moves_3x_bytes_for_2_5x_flops():
    c = make_plan(load_topology("g6e-4x"), 32, 32).cost
    assert math.isclose(c["ring_compute_bwd_s"], 2.5 * c["ring_compute_fwd_s"], rel_tol=1e-8)
    lat = 3 * c["ring_comm_fwd_s"] - c["ring_comm_bwd_s"]  # both carry the same latency once
    assert 0 < lat < 1e-4 and c["ring_comm_bwd_s"] > 2.9 * c["ring_comm_fwd_s"]


def _two_host_line():
    topo = Topology(name="line")
    for h in ("a", "b"):
        topo.add_node(h, "host")
        for g in range(2):
            topo.add_node(f"{h}/gpu{g}", "gpu", host=h, index=g)
        topo.add_node(f"{h}/nic0", "nic", host=h, index=0)
        for g in range(2):
            topo.add_link(f"{h}/gpu{g}", f"{h}/nic0", 100.0)
    topo.add_link("a/nic0", "b/nic0", 10.0, 5.0)
    return topo


def test_flows_in_the_same_direction_share_a_link():
    flows = FlowModel(_two_host_line())
    assert flows.bandwidths([("a/gpu0", "b/gpu0")]) == [(10.0, 7.0)]
    assert [r for r, _ in flows.bandwidths([("a/gpu0", "b/gpu0"), ("a/gpu1", "b/gpu1")])] == [5.0, 5.0]
    assert [r for r, _ in flows.bandwidths([("a/gpu0", "b/gpu0"), ("b/gpu1", "a/gpu1")])] == [10.0, 10.0]


def test_gradient_traffic_scales_with_zero_stage():
    topo = load_topology("g6e-4x")
    plan = make_plan(topo, 32, 8)
    z3, z2 = estimate(plan, topo, zero_stage=3), estimate(plan, topo, zero_stage=2)
    assert math.isclose(z3.dp_allreduce_s / z2.dp_allreduce_s, 1.5)
    # Hosts in one run each: NCCL's rank-order ring leaves each host through the network card of the
    # GPU at the end of its run, one of the four 100 Gbps cards: 12.5 GB/s, below the 20 GB/s socket link.
    assert math.isclose(z3.dp_allreduce_s, 3 * LLAMA3_8B.params * 2 * 31 / 32 / 12.5e9)
    assert math.isclose(z3.tokens_per_s, plan.dp * plan.seq_len / z3.step_time_s)


def _split_host_behind_one_uplink() -> Topology:
    """A host of two PCIe halves (a NIC each) joined by a 10 GB/s socket link, alone under a leaf whose uplink
    carries one 12.5 GB/s flow; a 4-GPU host on a 25 GB/s card under another leaf. A ring over all 8 GPUs either
    crosses the socket link or enters the first host twice through the one uplink: 10 GB/s at best."""
    topo = Topology(name="split-host-one-uplink")
    topo.add_node("spine", "spine")
    for leaf, up in (("leaf0", 12.5), ("leaf1", 50.0)):
        topo.add_node(leaf, "leaf")
        topo.add_link(leaf, "spine", up)
    topo.add_node("a", "host")
    for half in range(2):
        pcie = topo.add_node(f"a/pcie{half}", "pcie", host="a", index=half)
        nic = topo.add_node(f"a/nic{half}", "nic", host="a", index=half)
        topo.add_link(nic, pcie, 25.0)
        topo.add_link(nic, "leaf0", 12.5)
        for g in (2 * half, 2 * half + 1):
            topo.add_link(topo.add_node(f"a/gpu{g}", "gpu", host="a", index=g), pcie, 25.0)
    topo.add_link("a/pcie0", "a/pcie1", 10.0)
    topo.add_node("b", "host")
    pcie, nic = topo.add_node("b/pcie0", "pcie", host="b", index=0), topo.add_node("b/nic0", "nic", host="b", index=0)
    topo.add_link(nic, pcie, 25.0)
    topo.add_link(nic, "leaf1", 25.0)
    for g in range(4):
        topo.add_link(topo.add_node(f"b/gpu{g}", "gpu", host="b", index=g), pcie, 25.0)
    return topo


@pytest.mark.parametrize("build,rings,size,expect", [
    (lambda: load_topology("l40s-host"), 1, 8, 20.0),           # a ring over both sockets crosses their link
    (lambda: load_topology("l40s-host"), 2, 4, 25.0),           # one ring per socket
    (lambda: load_topology("leafspine-64x-2to1"), 8, 64, 12.5),  # one ring per leaf, one per NIC
    (lambda: load_topology("leafspine-64x-2to1-degraded"), 8, 64, 3.125),  # every host needed, the bad cable too
    (lambda: load_topology("leafspine-64x-2to1-degraded"), 4, 64, 12.5),
    (lambda: leaf_spine(hosts=16, hosts_per_leaf=2, oversubscription=4.0), 4, 32, 6.25),  # leaf uplinks bind
    (lambda: leaf_spine(hosts=16, hosts_per_leaf=2, oversubscription=4.0), 1, 16, 12.5),  # one leaf holds it
    (_split_host_behind_one_uplink, 1, 8, 10.0),  # both halves of host a: its socket link, or the uplink twice
    (_split_host_behind_one_uplink, 1, 6, 12.5),  # one half of host a and host b
])
def test_bound_on_known_cases(build, rings, size, expect):
    topo = build()
    assert ring_bandwidth_bound(topo, rings, size) == pytest.approx(expect, rel=1e-6)
    plan = make_plan(topo, rings * size, size)
    assert plan.cost["slowest_hop_gbps"] == pytest.approx(expect, rel=1e-6)  # and the planner reaches it


def test_no_strategy_beats_the_bound_and_aware_reaches_it():
    topo = leaf_spine(hosts=32, hosts_per_leaf=8, oversubscription=4.0)
    flows = FlowModel(topo)
    for ring in (8, 16, 64, 128):
        plans = [make_plan(topo, 256, ring, strategy=s, seed=3, flows=flows) for s in ("aware", "naive", "random")]
        for p in plans:
            assert p.cost["slowest_hop_gbps"] <= p.cost["bound_hop_gbps"] * (1 + 1e-9)
        assert plans[0].cost["ring_step_fwd_s"] <= 1.05 * plans[0].cost["bound_ring_step_s"]


def test_report_is_plain_json():
    plan = make_plan(load_topology("leafspine-64x-2to1"), 64, 64)
    text = json.dumps(plan.cost, allow_nan=False)
    assert json.loads(text)["model"] == "Llama-3-8B"
    assert make_plan(load_topology("l40s-host"), 8, 1).cost["slowest_hop_gbps"] is None  # rings of one


def _stage_plan(ring: int, ulysses: int, seq: int):
    from launcher.estimate.fit import stage_topology
    from topology.planning.plan import Plan, RankPlacement

    cp = ring * ulysses
    plan = Plan("naive", 1, cp, ulysses, seq, [RankPlacement(r, "local", r) for r in range(cp)])
    return plan, stage_topology(plan)


TINY = dataclasses.replace(LLAMA3_8B, name="tiny", layers=2, hidden=64, n_q_heads=4, n_kv_heads=2, head_dim=16,
                           vocab=264, params=107_584)


@pytest.mark.parametrize("ring,ulysses,recompute,p2p,a2a", [
    (1, 1, False, 0, 0), (2, 1, False, 1 + 3, 0), (4, 1, True, 2 * 3 + 7, 0),
    (1, 2, True, 0, 2 * 4 + 4), (2, 2, False, 1 + 3, 4 + 4),
])
def test_each_collective_pays_its_measured_latency(ring, ulysses, recompute, p2p, a2a):
    """Latency x collectives per layer: K/V exchanges R-1 forward, 2R-1 backward; 4 all-to-alls each way; recompute repeats the forward."""
    from topology.cost import HardwareRates

    plan, topo = _stage_plan(ring, ulysses, 64 * ring * ulysses)
    base = HardwareRates(gemm_tflops=1.0, attn_fwd_tflops=1.0, attn_bwd_tflops=1.0)
    lat = dataclasses.replace(base, p2p_latency_s=1e-3, a2a_latency_s=1e-2)
    plain = estimate(plan, topo, TINY, rates=base, recompute=recompute).step_time_s
    paid = estimate(plan, topo, TINY, rates=lat, recompute=recompute).step_time_s
    assert paid - plain == pytest.approx(TINY.layers * (p2p * 1e-3 + a2a * 1e-2))


def test_measured_bus_bandwidth_prices_the_zero_traffic():
    """ZeRO-3 moves 3 x params (2 all-gathers, 1 reduce-scatter) at the measured bus bandwidth when it is the slower."""
    from topology.cost import HardwareRates

    plan, topo = _stage_plan(4, 1, 256)
    rates = HardwareRates(gemm_tflops=1.0, attn_fwd_tflops=1.0, attn_bwd_tflops=1.0, dtype_bytes=4, bus_gbps=0.5)
    r = estimate(plan, topo, TINY, rates=rates)
    assert r.dp_allreduce_s == pytest.approx(3 * TINY.params * 4 * 3 / 4 / 0.5e9)
    fast = estimate(plan, topo, TINY, rates=dataclasses.replace(rates, bus_gbps=1e6))
    assert fast.dp_allreduce_s == pytest.approx(3 * TINY.params * 4 * 3 / 4 / 1000e9)  # the topology's links bind


def test_the_causal_block_runs_at_its_own_rate():
    """Step 0's causal block is priced at the causal kernel's rate, the other R-1 steps at the full block's."""
    from topology.cost import HardwareRates

    plan, topo = _stage_plan(2, 1, 512)
    full = HardwareRates(gemm_tflops=1.0, attn_fwd_tflops=1.0, attn_bwd_tflops=1.0)
    slow_diag = dataclasses.replace(full, attn_causal_fwd_tflops=0.5, attn_causal_bwd_tflops=0.25)
    a, b = estimate(plan, topo, TINY, rates=full), estimate(plan, topo, TINY, rates=slow_diag)
    fwd, bwd = a.ring_compute_fwd_s, a.ring_compute_bwd_s
    assert b.ring_compute_fwd_s == pytest.approx(fwd)  # the reported ring step is an off-diagonal one
    assert b.attention_s - a.attention_s == pytest.approx(TINY.layers * (fwd * (2 - 1) + bwd * (4 - 1)))


@pytest.mark.parametrize("device,hidden", [("cpu", 0.0), ("NVIDIA H200", 1.0)])
def test_host_overhead_hides_behind_a_gpu_not_a_cpu(device, hidden):
    """A step's fixed host cost is added on CPU ranks and overlaps the device's work on GPUs; measured back exactly."""
    from topology.calibration import defaults_for
    from topology.cost import HardwareRates
    from launcher.estimate.fit import CPU

    cal = dataclasses.replace(defaults_for(CPU), device=device)
    rates = HardwareRates.from_calibration(cal)
    assert rates.host_overlap == hidden
    plan, topo = _stage_plan(2, 1, 512)
    bare = estimate(plan, topo, TINY, rates=dataclasses.replace(rates, step_overhead_s=0.0)).step_time_s
    for overhead in (0.1 * bare, 3 * bare):
        r = dataclasses.replace(rates, step_overhead_s=overhead)
        step = estimate(plan, topo, TINY, rates=r).step_time_s
        assert step == pytest.approx(bare + overhead if device == "cpu" else max(bare, overhead))
        assert step == pytest.approx(r.with_step_overhead(bare))
        if step > bare:  # the overhead a measured step implies (where the device hides it, only when it is the longer)
            assert r.step_overhead_from(step, bare) == pytest.approx(overhead)
        bound = estimate(plan, topo, TINY, rates=r).bound_step_s
        assert bound <= step * (1 + 1e-9)


def test_transfers_price_arrays_as_transfer_prices_each():
    import numpy as np

    from topology.cost import transfer, transfers

    gbps, lat = np.array([12.5, 0.0, math.inf, 3.0]), np.array([4.0, 1.0, 2.0, 0.0])
    for nbytes in (0.0, 1e6):
        assert transfers(nbytes, gbps, lat).tolist() == [transfer(nbytes, g, t) for g, t in zip(gbps, lat)]
