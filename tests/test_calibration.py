"""Calibration files: round trip, bad input in one line, and --calibration moving the plan and dry-run figures."""

import json
import re
from dataclasses import replace
from pathlib import Path

import pytest

from launcher.cli import main
from topology.calibration import L40S, Calibration, Figure, defaults_for
from topology.cost import HardwareRates
from topology.network.model import GpuSpec
from topology.planning.planner import make_plan
from topology.network.presets import load_topology

RECIPE = Path(__file__).resolve().parents[1] / "clusters" / "recipes" / "llama3-8b-4194k.yaml"


def slow_calibration() -> Calibration:
    """The L40S defaults at half the compute and network rates, as if measured."""
    half = lambda f: Figure(f.value / 2, f.low / 2, f.high / 2, "test")  # noqa: E731
    return replace(L40S, source="calibrated on test-cluster at 2026-01-01T00:00:00+00:00",
                   gemm_tflops=half(L40S.gemm_tflops), attn_fwd_tflops=half(L40S.attn_fwd_tflops),
                   attn_bwd_tflops=half(L40S.attn_bwd_tflops), network_efficiency=half(L40S.network_efficiency),
                   inter_host_gbps=Figure(3.0, 2.0, 4.0, "test"))


def test_round_trip_keeps_every_figure(tmp_path):
    cal = slow_calibration()
    path = tmp_path / "cal.json"
    cal.save(path)
    back = Calibration.load(path)
    assert back == cal and back.calibrated and not L40S.calibrated
    assert json.loads(path.read_text())["figures"]["inter_host_gbps"] == {"value": 3.0, "low": 2.0, "high": 4.0, "source": "test"}
    assert [p.name for p in tmp_path.iterdir()] == ["cal.json"]  # written through a temporary name


def test_defaults_are_achieved_figures_below_peak_with_sources():
    gpu = GpuSpec()
    for cal in (defaults_for(gpu), defaults_for(GpuSpec(name="H100", tflops_bf16=989.0))):
        for name in ("gemm_tflops", "attn_fwd_tflops", "attn_bwd_tflops"):
            f = getattr(cal, name)
            assert 0 < f.low <= f.value <= f.high < cal_peak(cal, gpu) and f.source, name
    assert "Bekman" in L40S.gemm_tflops.source and "FlashAttention-2" in L40S.attn_fwd_tflops.source


def cal_peak(cal: Calibration, gpu: GpuSpec) -> float:
    return 989.0 if cal.device == "H100" else gpu.tflops_bf16


@pytest.mark.parametrize("edit,message", [
    (lambda d: d.update(format="something-else"), "not a calibration file"),
    (lambda d: d["figures"].pop("gemm_tflops"), "figure 'gemm_tflops' is missing"),
    (lambda d: d["figures"]["gemm_tflops"].update(value=-1), "gemm_tflops: value is -1"),
    (lambda d: d["figures"]["gemm_tflops"].update(low=500), "low <= value <= high does not hold"),
    (lambda d: d["figures"].update(warp_speed={"value": 1, "low": 1, "high": 1}), "unknown figure(s) warp_speed"),
])
def test_bad_file_is_one_line_and_exit_2(tmp_path, capsys, edit, message):
    data = L40S.to_dict()
    edit(data)
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(data))
    assert main(["plan", "--topology", "g6e-1x", "--gpus", "8", "--ring", "8", "--calibration", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("ringleader: error:") and "\n" not in err and message in err, err


def test_not_json_and_missing_file_are_one_line(tmp_path, capsys):
    bad = tmp_path / "x.json"
    bad.write_text("{not json")
    for path in (bad, tmp_path / "missing.json"):
        assert main(["plan", "--topology", "g6e-1x", "--gpus", "8", "--ring", "8", "--calibration", str(path)]) == 2
        err = capsys.readouterr().err.strip()
        assert "\n" not in err and str(path) in err


def test_calibration_moves_plan_figures(tmp_path, capsys):
    topo = load_topology("g6e-4x")
    default = make_plan(topo, 32, 32, rates=HardwareRates.from_calibration(L40S)).cost
    slow = make_plan(topo, 32, 32, rates=HardwareRates.from_calibration(slow_calibration())).cost
    assert slow["ring_compute_fwd_s"] == pytest.approx(2 * default["ring_compute_fwd_s"])
    assert slow["slowest_hop_gbps"] <= 3.0 < default["slowest_hop_gbps"]  # the measured inter-host cap
    assert slow["step_time_s"] > 1.9 * default["step_time_s"]
    path = tmp_path / "cal.json"
    slow_calibration().save(path)
    args = ["plan", "--topology", "g6e-4x", "--gpus", "32", "--ring", "32"]
    assert main(args) == 0
    plain = capsys.readouterr().out
    assert main(args + ["--calibration", str(path)]) == 0
    calibrated = capsys.readouterr().out
    step = lambda out: float(re.search(r"^step: ([\d.]+) s", out, re.M).group(1))  # noqa: E731
    assert step(calibrated) == pytest.approx(slow["step_time_s"], abs=0.01)
    assert step(plain) == pytest.approx(default["step_time_s"], abs=0.01)
    assert "rates: defaults for L40S" in plain and "rates: calibrated on test-cluster" in calibrated


def test_dry_run_prints_ranges_and_their_source(tmp_path, capsys):
    assert main(["run", str(RECIPE), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "times from defaults, not measured here" in out and "defaults for L40S" in out
    mfu = [float(v.rstrip("%")) for v in re.search(r"^MFU\s+(.*)$", out, re.M).group(1).split()]
    assert all(20 < m < 40 for m in mfu), mfu  # achieved figures, not 40-60% of peak
    path = tmp_path / "cal.json"
    slow_calibration().save(path)
    assert main(["run", str(RECIPE), "--dry-run", "--calibration", str(path)]) == 0
    slow = capsys.readouterr().out
    assert "times from calibration: calibrated on test-cluster" in slow

    def hours(text: str) -> tuple[float, float, float]:
        m = re.search(r"whole recipe: ([\d,]+) GPU-hours \(([\d,]+) to ([\d,]+)\)", text)
        return tuple(float(g.replace(",", "")) for g in m.groups())

    (h, lo, hi), (sh, slo, shi) = hours(out), hours(slow)
    assert lo < h < hi and slo < sh < shi and sh > 1.5 * h


def test_a_ring_of_one_is_refused_before_gloo_sees_a_send_to_itself():
    """gloo has no pair from a rank to itself: a ring of one used to fail inside it with "Pair is not connected"."""
    import torch.distributed as dist

    from ray_utils import free_port
    from topology.profiling import bandwidth

    store = dist.TCPStore("127.0.0.1", free_port(), 1, True)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        with pytest.raises(ValueError, match="at least two distinct ranks"):
            bandwidth.ring_step_seconds([0], 4096, 1, bandwidth.device_for("gloo"))
    finally:
        dist.destroy_process_group()


def test_overlap_and_recompute_enter_the_step():
    """Without overlap a ring step is transfer plus compute; activation checkpointing runs the forward ring again."""
    from topology.cost import estimate

    topo = load_topology("g6e-4x")
    plan = make_plan(topo, 32, 32, seq_len=32 * 4096)
    hidden = estimate(plan, topo, rates=HardwareRates(overlap=1.0))
    serial = estimate(plan, topo, rates=HardwareRates(overlap=0.0))
    assert hidden.ring_step_fwd_s == pytest.approx(max(hidden.ring_comm_fwd_s, hidden.ring_compute_fwd_s))
    assert serial.ring_step_fwd_s == pytest.approx(serial.ring_comm_fwd_s + serial.ring_compute_fwd_s)
    again = estimate(plan, topo, recompute=True)
    fwd_ring = LAYERS * (hidden.ring_compute_fwd_s + 31 * hidden.ring_step_fwd_s)
    assert again.attention_s == pytest.approx(hidden.attention_s + fwd_ring)
    assert again.dense_compute_s == pytest.approx(hidden.dense_compute_s * 8 / 6)


LAYERS = 32


def test_latencies_bus_and_causal_rates_round_trip_and_take_their_slow_end(tmp_path):
    """Seconds (latencies) are slow at their high end, rates (bus, causal kernel) at their low end."""
    cal = replace(slow_calibration(), p2p_latency_s=Figure(1e-4, 5e-5, 3e-4, "t"), a2a_latency_s=Figure(2e-4, 1e-4, 4e-4, "t"),
                  bus_gbps=Figure(0.5, 0.2, 0.8, "t"), attn_causal_fwd_tflops=Figure(60.0, 50.0, 70.0, "t"),
                  attn_causal_bwd_tflops=Figure(40.0, 30.0, 50.0, "t"))
    path = tmp_path / "cal.json"
    cal.save(path)
    assert Calibration.load(path) == cal
    slow, fast = HardwareRates.from_calibration(cal, "low"), HardwareRates.from_calibration(cal, "high")
    assert (slow.p2p_latency_s, slow.a2a_latency_s, slow.bus_gbps, slow.attn_causal_fwd_tflops) == (3e-4, 4e-4, 0.2, 50.0)
    assert (fast.p2p_latency_s, fast.a2a_latency_s, fast.bus_gbps, fast.attn_causal_bwd_tflops) == (5e-5, 1e-4, 0.8, 50.0)
    assert HardwareRates.from_calibration(L40S).p2p_latency_s == 0.0 and HardwareRates.from_calibration(L40S).bus_gbps is None
