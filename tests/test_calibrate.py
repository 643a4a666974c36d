"""``ringleader calibrate``: live on a small local Ray cluster, and fitted from a finished tiny stage."""

import json
import statistics

import pytest

from launcher.cli import main
from launcher.estimate.fit import measured_steps, predict_stage
from stage_helpers import plan_for, stage_config
from topology.calibration import Calibration
from topology.cost import HardwareRates

MODEL = {"tiny": {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
                  "num_key_value_heads": 2, "head_dim": 16, "vocab_size": 264},
         "base_theta": 10_000.0, "base_len": 128, "head_dim": 16}


def test_calibrate_on_two_hosts_writes_sane_positive_figures(tmp_path, capsys):
    from ray_utils import local_cluster

    out = tmp_path / "cal.json"
    with local_cluster(hosts=2, gpus_per_host=0, cpus_per_host=1) as lc:
        address = lc.address
        assert main(["calibrate", "--address", address, "--ranks", "2", "--repeats", "2", "-o", str(out)]) == 0
    cal = Calibration.load(out)
    assert cal.calibrated and cal.source.startswith(f"calibrated on {address} at ") and cal.device == "cpu"
    assert cal.meta["ranks"] == 2 and cal.meta["hosts"] == 2  # one rank per host: the ring's hops cross hosts
    for name in ("gemm_tflops", "attn_fwd_tflops", "attn_bwd_tflops", "inter_host_gbps", "step_overhead_s"):
        f = getattr(cal, name)
        assert 0 < f.low <= f.value <= f.high, name
    assert cal.gemm_tflops.value < 10 and cal.inter_host_gbps.value < 100  # a CPU over loopback, not a GPU
    assert cal.intra_host_gbps is None and cal.bus_gbps.value > 0
    for name in ("attn_causal_fwd_tflops", "attn_causal_bwd_tflops", "p2p_latency_s", "a2a_latency_s"):
        f = getattr(cal, name)
        assert 0 < f.low <= f.value <= f.high, name
    assert cal.p2p_latency_s.value < 0.1 and cal.a2a_latency_s.value < 0.1  # a tiny message over loopback
    assert "wrote" in capsys.readouterr().out


def _stage_rank(rank, world, cfg, plan):
    from topology.planning.plan import Plan
    from trainer.config import StageConfig
    from trainer.stage import run_stage

    run_stage(StageConfig.from_dict(cfg), Plan.from_dict(plan))


def test_from_run_fits_a_finished_stage_within_25_percent(tmp_path, capsys):
    from dist_utils import run_distributed

    cfg = stage_config(tmp_path / "s", seq_len=256, gpus=2, batch=1, steps=4, model=MODEL)
    plan = plan_for(cfg)
    (tmp_path / "s").mkdir()
    cfg.save(tmp_path / "s" / "stage.json")
    plan.save(tmp_path / "s" / "plan.json")
    run_distributed(_stage_rank, 2, cfg.to_dict(), plan.to_dict(), timeout=300)
    out = tmp_path / "fitted.json"
    assert main(["calibrate", "--from-run", str(tmp_path), "-o", str(out)]) == 0
    cal = Calibration.load(out)
    assert cal.source.startswith(f"fitted on {tmp_path.name}") and cal.step_overhead_s.value > 0
    measured = statistics.median(measured_steps(tmp_path / "s"))
    predicted = predict_stage(cfg, plan, HardwareRates.from_calibration(cal))
    assert predicted == pytest.approx(measured, rel=0.25)
    assert json.loads(out.read_text())["meta"]["fit"]["stages"] == ["s"]
    assert main(["calibrate", "--from-run", str(tmp_path / "nothing-here"), "-o", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert "holds no finished stage" in err and "\n" not in err


def test_rates_are_total_work_over_total_time_and_seconds_their_mean():
    from launcher.estimate.measure import figure

    # Three samples at full speed and one stalled for a scheduler slice: the median reads the full speed,
    # four equal pieces of work really took 3 x 1 + 10 time units.
    rate = figure([1.0, 1.0, 1.0, 0.1], "test", "rate")
    assert rate.value == pytest.approx(4 / 13) and rate.low <= rate.value <= rate.high
    seconds = figure([1.0, 1.0, 1.0, 10.0], "test", "seconds")
    assert seconds.value == pytest.approx(13 / 4) and seconds.low <= seconds.value <= seconds.high
    assert figure([1.0, 1.0, 1.0, 10.0], "test").value == 1.0
    assert figure([], "test", "rate") is None


def _hop_rank(rank, world, nbytes):
    import torch

    from launcher.estimate.measure import ring_hops
    from topology.profiling import bandwidth

    whole = bandwidth.ring_step_seconds(list(range(world)), nbytes, 5, torch.device("cpu"))
    return ring_hops(["local"] * world, nbytes, 5, torch.device("cpu")), nbytes / statistics.mean(whole) / 1e9


def test_ring_hop_rate_leaves_out_the_exchange_fixed_cost():
    from dist_utils import run_distributed

    # A K/V-sized hop of 64 KiB timed whole reads mostly the exchange's fixed cost, which the model prices apart
    # (per exchange); the hop's rate is what further bytes cost.
    for hops, whole in run_distributed(_hop_rank, 2, 64 << 10, timeout=120):
        assert set(hops) == {"intra"} and hops["intra"], hops
        assert statistics.mean(hops["intra"]) > whole > 0
