"""Where a CPU stage's step goes, measured inside the real stage, beside the cost model's term for each part.

    python benchmarks/stage_breakdown.py 4 1024 1      # C = 4 ranks, 1024 tokens, no Ulysses
    python benchmarks/stage_breakdown.py 2 1024 2 --steps 6

Calibrates on C gloo ranks as ``predict_vs_measure.py`` does, then runs the
stage (``trainer.stage.run_stage``) under ``torch.profiler`` for its steady
steps and sorts the time of each rank's ops into the parts the cost model
prices apart (``topology.cost.StepModel``):

- ``attention kernels``: the block kernels (``aten::_scaled_dot_product_flash_attention_for_cpu``
  and its backward), against the diagonal and off-diagonal block terms;
- ``ring, besides kernels``: the rest of ``ZigzagRingAttention`` forward and backward
  (sends, receives, waits, merges, Python per ring step), against the collectives'
  latency, the unhidden transfer and the per-layer ring overhead;
- ``ZeRO collectives``: all-gathers, reduce-scatters and all-reduces, against the gradient traffic;
- ``optimizer``: the optimizer's step;
- ``rest``: everything else of the step (the dense layers, loss, bookkeeping), against dense compute
  plus the fixed step cost less the optimizer.

Figures are milliseconds per micro-step, the mean over ranks; the step is wall time
(the profiler's own cost included, so the parts are compared among themselves more than with
``predict_vs_measure.py``'s step). Also printed: each rank's CPU seconds per step over its wall
seconds, which says how much of a core a rank had.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
for p in (REPO, REPO / "tests", REPO / "benchmarks"):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

KERNELS = ("aten::_scaled_dot_product_flash_attention_for_cpu", "aten::_scaled_dot_product_flash_attention_for_cpu_backward")
RING = ("ZigzagRingAttention", "ZigzagRingAttentionBackward")
ZERO = ("c10d::_allgather_base_", "c10d::_reduce_scatter_base_", "c10d::allreduce_", "c10d::allgather_",
        "c10d::reduce_scatter_")
OPTIMIZER = "Optimizer.step#AdamW.step"


def _profiled_rank(rank: int, world: int, cfg: dict, plan: dict, skip: int) -> dict:
    from torch.profiler import ProfilerActivity, profile

    from topology.planning.plan import Plan
    from trainer.config import StageConfig
    from trainer.stage import run_stage

    prof = profile(activities=[ProfilerActivity.CPU])
    walls, cpus = [], []

    def on_metrics(m: dict) -> None:
        walls.append(time.perf_counter())
        cpus.append(time.process_time())
        if m["step"] == skip:
            prof.start()

    run_stage(StageConfig.from_dict(cfg), Plan.from_dict(plan), on_metrics=on_metrics)
    prof.stop()
    ops = {e.key: e.cpu_time_total / 1e3 for e in prof.key_averages()}
    return {"walls": walls[skip - 1:], "cpus": cpus[skip - 1:], "ops": ops}


def parts(ops: dict[str, float], steps: int) -> dict[str, float]:
    """Milliseconds per step of each part, from one rank's op totals."""
    get = lambda k: ops.get(k, 0.0) / steps  # noqa: E731
    kernels = sum(get(k) for k in KERNELS)
    ring = max(0.0, sum(get(k) for k in RING) - (kernels if any(k in ops for k in RING) else 0.0))
    return {"attention kernels": kernels, "ring, besides kernels": ring, "ZeRO collectives": sum(get(k) for k in ZERO),
            "optimizer": get(OPTIMIZER)}


def model_parts(cfg, plan, cal) -> dict[str, float]:
    """The cost model's terms (ms) for the same parts."""
    from launcher.estimate.fit import stage_topology
    from launcher.estimate.memory import model_shape
    from topology.cost import HardwareRates, StepModel, gpu_nodes

    shape, _ = model_shape(cfg.model)
    rates = replace(HardwareRates.from_calibration(cal), dtype_bytes=4)
    topo = stage_topology(plan)
    zero = int(cfg.deepspeed.get("zero_optimization", {}).get("stage", 0))
    sm = StepModel(topo, plan.dp, plan.ring, plan.ulysses, plan.seq_len, shape, rates=rates, zero_stage=zero,
                   recompute=cfg.activation_checkpointing)
    f = sm.figures(gpu_nodes(plan, topo))
    again = 2 if sm.recompute else 1
    kernels = shape.layers * (again * (sm.diag_fwd + (sm.ring - 1) * sm.comp_fwd) + sm.diag_bwd + (sm.ring - 1) * sm.comp_bwd)
    attention = sm.attention(f["hop_gbps"], f["hop_lat"], f["a2a"])
    return {"attention kernels": kernels * 1e3, "ring, besides kernels": (attention - kernels) * 1e3,
            "ZeRO collectives": sm.gradients(f["bus_gbps"]) * 1e3, "dense": sm.dense * 1e3,
            "step overhead": rates.step_overhead_s * 1e3, "step": f["step"] * 1e3}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("ranks", type=int)
    parser.add_argument("seq_len", type=int)
    parser.add_argument("ulysses", type=int, nargs="?", default=1)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)

    from dist_utils import run_distributed
    from predict_vs_measure import MODEL, calibrate, measure, steps_for
    from stage_helpers import plan_for, stage_config

    from launcher.commands.calibrate import summary
    from launcher.estimate.fit import overhead_figure

    c, seq, u, skip = args.ranks, args.seq_len, args.ulysses, 2
    cal = calibrate(c, seq // c, args.repeats, step_overhead=False, ulysses=u)
    _, small_cfg, small_plan, small = measure(c, 32 * c, u, steps_for(32, args.steps), keep_all=True)
    cal = replace(cal, step_overhead_s=overhead_figure(small, small_cfg, small_plan, cal, "small stage"))
    with tempfile.TemporaryDirectory(prefix="breakdown-") as tmp:
        cfg = stage_config(Path(tmp), seq_len=seq, gpus=c, batch=1, steps=args.steps, ulysses=u, model=MODEL)
        plan = plan_for(cfg)
        ranks = run_distributed(_profiled_rank, c, cfg.to_dict(), plan.to_dict(), skip, timeout=900)
    n = args.steps - skip
    measured = [parts(r["ops"], n) for r in ranks]
    walls = [statistics.mean(b - a for a, b in zip(r["walls"], r["walls"][1:])) * 1e3 for r in ranks]
    share = [(r["cpus"][-1] - r["cpus"][0]) / (r["walls"][-1] - r["walls"][0]) for r in ranks]
    mean = {k: statistics.mean(m[k] for m in measured) for k in measured[0]}
    step = statistics.mean(walls)
    mean["rest"] = step - sum(mean.values())
    model = model_parts(cfg, plan, cal)
    print(summary(cal))
    print("model: " + ", ".join(f"{k} {v:.1f}" for k, v in model.items()))
    model["rest"] = model.pop("dense") + model.pop("step overhead")
    print(f"\nC={c} seq={seq} ulysses={u}: ms per micro-step, mean of {c} rank(s) over {n} steady steps")
    print(f"{'part':<24} {'measured':>9} {'model':>9}")
    for k in ("attention kernels", "ring, besides kernels", "ZeRO collectives", "optimizer", "rest"):
        print(f"{k:<24} {mean[k]:>9.1f} {model.get(k, float('nan')):>9.1f}")
    print(f"{'step':<24} {step:>9.1f} {model['step']:>9.1f}")
    print("CPU seconds over wall seconds per rank: " + ", ".join(f"{s:.2f}" for s in share))
    return 0


if __name__ == "__main__":
    sys.exit(main())
