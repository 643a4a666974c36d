"""Predict a trainer stage's step time from a calibration, and fit a calibration to a finished run.

``predict_stage`` is the cost model (``topology.cost.estimate``) applied to
what a stage really runs: its plan, its model shape, its ZeRO stage, fp32
on CPU ranks and bf16 on GPUs. ``fit_run`` reads a run directory's stages
(``plan.json``, ``stage.json``, ``metrics.jsonl``) and fits the calibration
so the model predicts their measured step times:

    t_i = s * x_i + c

``x_i`` is stage i's predicted micro-step without fixed overhead under the
starting calibration, ``t_i`` its measured micro-step (median over steps,
the warm-up ones left out: ``WARMUP_STEPS``). Least squares gives the slowdown
``s`` (every rate divided by it) and the overhead ``c``; with one stage,
or stages of one shape, only ``c`` can be told apart and ``s`` stays 1
unless ``c`` would be negative. Ranges come from the spread of the steps.
"""

from __future__ import annotations

import json
import statistics
from dataclasses import replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from topology.calibration import Calibration, Figure, defaults_for, load_calibration
from topology.cost import HardwareRates, estimate
from topology.errors import ConfigError
from topology.network.model import GpuSpec, Topology
from topology.planning.plan import Plan

CPU = GpuSpec(name="cpu", tflops_bf16=1.0, memory_gb=1.0, hbm_gbps=10.0)
"""The "accelerator" of ranks on CPU slots; only the calibration's achieved figures matter for them."""
WIRE_GBPS = 1000.0
"""Links of a stage topology: faster than anything measured, so the calibration's hop caps decide."""


def stage_topology(plan: Plan, gpu: GpuSpec = CPU) -> Topology:
    """A topology holding exactly the plan's hosts and devices, every link left to the calibration's caps."""
    topo = Topology(name="stage", gpu=gpu)
    topo.add_node("switch", "leaf")
    for host in dict.fromkeys(p.host for p in plan.placements):
        topo.add_node(host, "host")
        topo.add_node(f"{host}/nic0", "nic", host=host, index=0)
        topo.add_link(f"{host}/nic0", "switch", WIRE_GBPS, 1.0)
        for p in plan.placements:
            if p.host == host:
                g = topo.add_node(f"{host}/gpu{p.gpu}", "gpu", host=host, index=p.gpu)
                topo.add_link(g, f"{host}/nic0", WIRE_GBPS, 1.0)
    return topo


def predict_stage(cfg: Any, plan: Plan, rates: HardwareRates, on_cpu: bool = True) -> float:
    """Predicted micro-step seconds of stage ``cfg`` (a ``StageConfig``) placed by ``plan``."""
    from launcher.estimate.memory import model_shape

    shape, _ = model_shape(cfg.model)
    zero = int(cfg.deepspeed.get("zero_optimization", {}).get("stage", 0))
    rates = replace(rates, dtype_bytes=4 if on_cpu else 2, host_overlap=0.0 if on_cpu else rates.host_overlap)
    return estimate(plan, stage_topology(plan), shape, zero_stage=zero, rates=rates,
                    recompute=cfg.activation_checkpointing).step_time_s


def overhead_figure(steps: list[float], cfg: Any, plan: Plan, cal: Calibration, what: str, on_cpu: bool = True) -> Figure:
    """The fixed cost of a step from a stage's measured micro-steps: each less everything else the model prices.

    Run the stage at a size whose compute is small (tens of tokens per rank);
    what the calibration prices on its own there (compute, each collective's
    latency, ring and ZeRO bytes) is taken off where it runs on the same
    cores (CPU ranks), so nothing is counted twice. On GPUs the host's cost
    runs beside the device's (``HardwareRates.host_overlap``).
    """
    from launcher.estimate.measure import figure

    bare = replace(cal, step_overhead_s=Figure(0.0, 0.0, 0.0, "none"))
    rates = replace(HardwareRates.from_calibration(bare), host_overlap=0.0 if on_cpu else 1.0)
    priced = predict_stage(cfg, plan, rates, on_cpu)
    return figure([rates.step_overhead_from(t, priced) for t in steps],
                  f"{what}: micro-steps less the {priced * 1e3:.3g} ms the model prices on its own")


WARMUP_STEPS = 2
"""Optimizer steps left out of a measured step time. The first builds and connects everything; the
second still ran 2-3x slower than the rest on CPU ranks here (C = 2: 250-470 ms, then 120-160 ms)."""


def steady(seconds: list[float]) -> list[float]:
    """Step durations (the second step's first) without the warm-up ones; all of them when there are too few."""
    return seconds[WARMUP_STEPS - 1:] if len(seconds) > WARMUP_STEPS else seconds


def measured_steps(stage_dir: Path, grad_accum: int = 1) -> list[float]:
    """Micro-step seconds of a stage's metrics.jsonl (steps after the warm-up ones, ``WARMUP_STEPS``)."""
    path = stage_dir / "metrics.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []
    elapsed = [r["elapsed_s"] for r in rows if "step" in r and "elapsed_s" in r]
    return steady([(b - a) / grad_accum for a, b in zip(elapsed, elapsed[1:])])


def stage_dirs(run_dir: Path) -> list[Path]:
    """The run's stage directories that finished steps: the run directory itself or its children."""
    candidates = [run_dir] + sorted(p for p in run_dir.iterdir() if p.is_dir()) if run_dir.is_dir() else []
    return [d for d in candidates if (d / "plan.json").is_file() and (d / "stage.json").is_file() and (d / "metrics.jsonl").is_file()]


def fit_run(run_dir: Path, calibration: str | None = None) -> Calibration:
    """Fit a calibration to the stages of ``run_dir`` (see the module docstring)."""
    from trainer.config import StageConfig

    dirs = stage_dirs(run_dir)
    if not dirs:
        raise ConfigError(f"{run_dir} holds no finished stage (plan.json, stage.json and metrics.jsonl); "
                          "give a run directory of `ringleader run` or one of its stage directories")
    stages = []
    for d in dirs:
        cfg = StageConfig.load(d / "stage.json")
        steps = measured_steps(d, cfg.grad_accum)
        if len(steps) < 2:
            continue
        stages.append((cfg, Plan.load(d / "plan.json"), steps))
    if not stages:
        raise ConfigError(f"{run_dir}: its stages ran fewer than 3 steps; a fit needs timed steps after the first")
    base = load_calibration(calibration, CPU) if calibration else defaults_for(CPU)
    bare = replace(base, step_overhead_s=Figure(0.0, 0.0, 0.0, "fitted"))
    x = np.array([predict_stage(cfg, plan, HardwareRates.from_calibration(bare)) for cfg, plan, _ in stages])
    t = np.array([statistics.median(steps) for _, _, steps in stages])
    s, c = 1.0, float(np.mean(t - x))
    if len(set(np.round(x, 12))) > 1:
        (s, c), *_ = np.linalg.lstsq(np.stack([x, np.ones_like(x)], axis=1), t, rcond=None)
    if c < 0 or s <= 0:
        s, c = float(np.sum(t * x) / np.sum(x * x)), 0.0
    spread = [abs(v - statistics.median(steps)) for _, _, steps in stages for v in steps]
    half = float(np.percentile(spread, 80)) if spread else 0.0
    when = datetime.now(timezone.utc).isoformat(timespec="seconds")
    how = f"fitted to {len(stages)} stage(s) of {run_dir.name}: t = {s:.3g} x model + {c:.3g} s"

    def slower(f: Figure | None) -> Figure | None:
        return None if f is None else Figure(f.value / s, f.low / s, f.high / s, f"{how}; from {f.source}")

    return replace(
        base, source=f"fitted on {run_dir.name} at {when}",
        gemm_tflops=slower(base.gemm_tflops), attn_fwd_tflops=slower(base.attn_fwd_tflops), attn_bwd_tflops=slower(base.attn_bwd_tflops),
        inter_host_gbps=slower(base.inter_host_gbps), intra_host_gbps=slower(base.intra_host_gbps),
        step_overhead_s=Figure(c, max(0.0, c - half), c + half, how),
        meta={**base.meta, "fit": {"stages": [d.name for d in dirs], "measured_s": t.tolist(), "model_s": x.tolist(),
                                   "slowdown": s, "overhead_s": c}},
    )
