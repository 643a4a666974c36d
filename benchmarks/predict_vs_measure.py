"""Predicted vs measured step time of tiny-Llama stages on CPU ranks, after calibrating on the same ranks.

    python benchmarks/predict_vs_measure.py                 # every configuration below
    python benchmarks/predict_vs_measure.py --quick         # three of them
    python benchmarks/predict_vs_measure.py --runs 3 --neighbour   # three runs beside a CPU-bound process

For each ring size C (1, 2, 4) the benchmark first calibrates on C gloo
ranks (``launcher.commands.calibrate.measure_rank``: GEMM at the model's
shapes, the full and the causal ring attention block kernels, ring hops with
every hop busy, ring exchange and all-to-all latency, bus bandwidth, a
DeepSpeed step of a tiny model), then runs each stage of that C for real
(``trainer.stage.run_stage`` on spawned gloo ranks, as tests/stage_helpers
does), back to back, so the calibration and the stages see the same load on
the machine. The fixed cost of a step is taken from the same stage code at
32 tokens per rank: its measured step less everything the model prices on
its own (compute, collectives' latency and bytes; ``launcher.estimate.fit.overhead_figure``);
``--deepspeed-overhead`` keeps calibrate's DeepSpeed step instead. The
prediction is ``launcher.estimate.fit.predict_stage``: the cost model of
``topology.cost`` with the calibrated rates. ``--neighbour`` keeps a
CPU-bound process (``while 1: pass``) running through calibration and
stages alike. Prints one table per run: predicted and measured micro-step
(median of the steps after the first two), the error of each, and the worst;
and how long each calibrate + check pair took.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
for p in (REPO, REPO / "tests"):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

CONFIGS = [  # (ring size C, sequence length, ulysses)
    (1, 256, 1), (1, 4096, 1),
    (2, 256, 1), (2, 1024, 1), (2, 4096, 1), (2, 1024, 2),
    (4, 1024, 1), (4, 4096, 1), (4, 4096, 2),
]
QUICK = [(1, 1024, 1), (2, 2048, 1), (4, 4096, 2)]
MODEL = {"tiny": {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
                  "num_key_value_heads": 2, "head_dim": 16, "vocab_size": 264},
         "base_theta": 10_000.0, "base_len": 128, "head_dim": 16}


def _calibrate_rank(rank: int, world: int, spec: dict) -> dict:
    import torch

    from launcher.commands.calibrate import measure_rank

    return measure_rank(spec, torch.device("cpu"))


def _stage_rank(rank: int, world: int, cfg: dict, plan: dict) -> list[float]:
    from topology.plan import Plan
    from trainer.config import StageConfig
    from trainer.stage import run_stage

    stamps: list[float] = []
    run_stage(StageConfig.from_dict(cfg), Plan.from_dict(plan), on_metrics=lambda m: stamps.append(time.perf_counter()))
    return stamps


def calibrate(world: int, tokens: int, repeats: int, step_overhead: bool = True):
    """A calibration measured on ``world`` gloo ranks at ``tokens`` tokens per rank (``step_overhead``: with calibrate's DeepSpeed step)."""
    from dist_utils import run_distributed

    from launcher.commands.calibrate import build
    from launcher.estimate.memory import model_shape
    from trainer.config import ModelConfig

    shape, _ = model_shape(ModelConfig(**MODEL))
    spec = {"tokens": tokens, "hidden": shape.hidden, "intermediate": shape.intermediate, "n_q": shape.n_q_heads,
            "n_kv": shape.n_kv_heads, "head_dim": shape.head_dim, "layers": shape.layers, "hosts": ["local"] * world,
            "repeats": repeats, "model": MODEL, "params": shape.params, "step_overhead": step_overhead}
    results = run_distributed(_calibrate_rank, world, spec, timeout=600)
    when = datetime.now(timezone.utc).isoformat(timespec="seconds")
    return build(results, f"calibrated on this machine ({world} gloo ranks) at {when}", "cpu",
                 {"ranks": world, "tokens_per_rank": tokens, "model": shape.name, "backend": "gloo", "repeats": repeats,
                  "params": shape.params})


def measure(c: int, seq: int, ulysses: int, steps: int, keep_all: bool = False) -> tuple:
    """(median micro-step seconds, StageConfig, Plan[, every step after the first]) of one real stage."""
    from dist_utils import run_distributed
    from stage_helpers import plan_for, stage_config

    from launcher.estimate.fit import steady

    with tempfile.TemporaryDirectory(prefix="pvm-") as tmp:
        cfg = stage_config(Path(tmp), seq_len=seq, gpus=c, batch=1, steps=steps, ulysses=ulysses, model=MODEL)
        plan = plan_for(cfg)
        stamps = run_distributed(_stage_rank, c, cfg.to_dict(), plan.to_dict(), timeout=900)[0]
    times = steady([b - a for a, b in zip(stamps, stamps[1:])])
    return (statistics.median(times), cfg, plan) + ((times,) if keep_all else ())


def one_run(configs: list[tuple[int, int, int]], args: argparse.Namespace) -> list[tuple]:
    """Calibrate then check each configuration back to back; rows of (C, seq, U, predicted, measured), and each pair's seconds."""
    from dataclasses import replace

    from launcher.commands.calibrate import summary
    from launcher.estimate.fit import overhead_figure, predict_stage
    from topology.cost import HardwareRates

    rows, pairs = [], {}
    for c in sorted({c for c, _, _ in configs}):
        for seq, u in [(s, u) for cc, s, u in configs if cc == c]:
            t0 = time.perf_counter()
            # Calibrate for this stage (its tokens per rank set the blocks), then run it: a pair, back to back.
            cal = calibrate(c, seq // c, args.repeats, step_overhead=args.deepspeed_overhead)
            if not args.deepspeed_overhead:
                # The fixed cost of a step as the trainer pays it (data, loss, ZeRO, optimizer, metrics): the
                # real stage at 32 tokens per rank, less what the model prices on its own at that size. Taken
                # for every stage, right before it: on C ranks sharing 2 cores it is most of a step, and
                # it moves with the machine's load.
                _, cfg, plan, steps = measure(c, 32 * c, 1, args.steps, keep_all=True)
                cal = replace(cal, step_overhead_s=overhead_figure(steps, cfg, plan, cal,
                                                                   f"stage at {32 * c} tokens on {c} rank(s)"))
            print(summary(cal), flush=True)
            if args.save_dir:
                Path(args.save_dir).mkdir(parents=True, exist_ok=True)
                cal.save(Path(args.save_dir) / f"calibration-c{c}-s{seq}-u{u}.json")
            measured, cfg, plan = measure(c, seq, u, args.steps)
            predicted = predict_stage(cfg, plan, HardwareRates.from_calibration(cal))
            rows.append((c, seq, u, predicted, measured))
            pairs[(c, seq, u)] = time.perf_counter() - t0
            print(f"C={c} seq={seq} ulysses={u}: predicted {predicted * 1e3:.0f} ms, measured {measured * 1e3:.0f} ms", flush=True)
    return rows, pairs


def table(rows: list[tuple], pairs: dict[int, float], title: str) -> float:
    """Print the predicted-vs-measured table; returns the worst absolute error."""
    print(f"\n{title}")
    print(f"{'C':>2} {'seq':>6} {'U':>2} {'predicted ms':>13} {'measured ms':>12} {'error':>7}")
    errors = []
    for c, seq, u, p, m in rows:
        err = (p - m) / m
        errors.append(abs(err))
        print(f"{c:>2} {seq:>6} {u:>2} {p * 1e3:>13.0f} {m * 1e3:>12.0f} {err:>+7.0%}")
    worst = max(range(len(rows)), key=lambda i: errors[i])
    c, seq, u, _, _ = rows[worst]
    print(f"worst: {errors[worst]:.0%} (C={c}, seq={seq}, ulysses={u}); within 25%: {sum(e <= 0.25 for e in errors)} of {len(rows)}")
    print("calibrate + check, back to back, s: " + ", ".join(f"C={c}/{seq}/U{u} {t:.0f}" for (c, seq, u), t in pairs.items()))
    return errors[worst]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="three configurations instead of all")
    parser.add_argument("--steps", type=int, default=5, help="optimizer steps per stage (the first two are not timed)")
    parser.add_argument("--repeats", type=int, default=5, help="repeats of each calibration measurement")
    parser.add_argument("--runs", type=int, default=1, help="consecutive runs, each calibrating afresh")
    parser.add_argument("--neighbour", action="store_true", help="run beside a CPU-bound process (`while 1: pass`)")
    parser.add_argument("--save-dir", help="keep each ring size's calibration file here")
    parser.add_argument("--deepspeed-overhead", action="store_true",
                        help="take the step overhead from `ringleader calibrate`'s DeepSpeed step, not a stage at 32 tokens per rank")
    args = parser.parse_args(argv)

    configs = QUICK if args.quick else CONFIGS
    neighbour = subprocess.Popen([sys.executable, "-c", "while 1: pass"]) if args.neighbour else None
    try:
        worst = []
        for run in range(args.runs):
            rows, pairs = one_run(configs, args)
            title = f"run {run + 1} of {args.runs}" + (" (beside a CPU-bound process)" if neighbour else "")
            worst.append(table(rows, pairs, title))
    finally:
        if neighbour is not None:
            neighbour.kill()
            neighbour.wait()
    if args.runs > 1:
        print("\nworst per run: " + ", ".join(f"{w:.0%}" for w in worst))
    return 0


if __name__ == "__main__":
    sys.exit(main())
