"""Predicted vs measured step time of tiny-Llama stages on CPU ranks, after calibrating on the same ranks.

    python benchmarks/predict_vs_measure.py                 # every configuration below
    python benchmarks/predict_vs_measure.py --quick         # three of them
    python benchmarks/predict_vs_measure.py --runs 3 --neighbour   # three runs beside a CPU-bound process
    sudo python benchmarks/predict_vs_measure.py --lab      # and the network lab's cases (netlab_ring.py)

For each configuration the benchmark starts C gloo ranks once, and on them,
back to back: calibrates (``launcher.commands.calibrate.measure_rank``: the
model's dense work, the full and the causal ring attention block kernels at
the block a ring step computes, ring hops with every hop busy, ring exchange
and all-to-all latency, bus bandwidth), runs the stage's layout at 32 tokens per rank,
then runs the stage itself (``trainer.stage.run_stage``, as tests/stage_helpers
does). So the calibration and the check see the machine's load of the same
minute. The fixed cost of a step is the small stage's measured step less
everything the model prices on its own at that size (compute, collectives'
latency and bytes; ``launcher.estimate.fit.overhead_figure``);
``--deepspeed-overhead`` keeps calibrate's DeepSpeed step instead. The
prediction is ``launcher.estimate.fit.predict_stage``: the cost model of
``topology.cost`` with the calibrated rates. ``--neighbour`` keeps a
CPU-bound process (``while 1: pass``) running through calibration and
stages alike. Prints one table per run: predicted and measured micro-step
(median of the steps after the first two), the error of each, and the worst;
and how long each calibrate + check pair took.

Known gaps, measured on a shared 2-core machine. Beside other CPU-bound
processes the calibration's kernel loops got 0.56-0.61 of a core (process
CPU seconds over wall seconds) and the stage right after them, in the same
process, 0.85-1.0: the rates then read slow and C = 1 at 4096 tokens came out
33-74% high. And beside a ``while 1: pass`` in the same session, the
32-token stage's steps (mostly short collectives and waits) ran 3x slower than
the 256-token stage's run right after it, so the fixed cost taken from it was
too high. Both are the scheduler's treatment of compute loops and of
processes that sleep often, not terms of the model; neither is corrected here.
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


def _spec(world: int, tokens: int, repeats: int, step_overhead: bool, ulysses: int, model: dict = MODEL,
          backend: str = "gloo") -> tuple[dict, dict]:
    """What each rank measures for a calibration (``measure_rank``'s spec), and the calibration's meta."""
    from launcher.estimate.memory import model_shape
    from trainer.config import ModelConfig

    shape, _ = model_shape(ModelConfig(**model))
    spec = {"tokens": tokens, "hidden": shape.hidden, "intermediate": shape.intermediate, "n_q": shape.n_q_heads,
            "n_kv": shape.n_kv_heads, "head_dim": shape.head_dim, "layers": shape.layers, "hosts": ["local"] * world,
            "repeats": repeats, "model": model, "params": shape.params, "step_overhead": step_overhead, "ulysses": ulysses}
    meta = {"ranks": world, "tokens_per_rank": tokens, "model": shape.name, "backend": backend, "repeats": repeats,
            "params": shape.params, "ulysses": ulysses}
    return spec, meta


def _build(results: list[dict], world: int, meta: dict, device: str = "cpu"):
    from launcher.commands.calibrate import build

    when = datetime.now(timezone.utc).isoformat(timespec="seconds")
    return build(results, f"calibrated on this machine ({world} {meta['backend']} ranks) at {when}", device, meta)


def _calibrate_rank(rank: int, world: int, spec: dict) -> dict:
    import torch

    from launcher.commands.calibrate import measure_rank

    return measure_rank(spec, torch.device("cpu"))


def _stage_stamps(cfg: dict, plan: dict) -> list[float]:
    """Wall clock at the end of every optimizer step of one real stage on this process group."""
    from topology.planning.plan import Plan
    from trainer.config import StageConfig
    from trainer.stage import run_stage

    stamps: list[float] = []
    run_stage(StageConfig.from_dict(cfg), Plan.from_dict(plan), on_metrics=lambda m: stamps.append(time.perf_counter()))
    return stamps


def _stage_rank(rank: int, world: int, cfg: dict, plan: dict) -> list[float]:
    return _stage_stamps(cfg, plan)


def _pair_rank(rank: int, world: int, spec: dict, stages: list[tuple[dict, dict]]) -> tuple[dict, list[list[float]]]:
    """Calibrate, then run ``stages`` in order, on the same ranks: no start-up lies between them."""
    import torch

    from launcher.commands.calibrate import measure_rank

    samples = measure_rank(spec, torch.device("cpu"))
    return samples, [_stage_stamps(cfg, plan) for cfg, plan in stages]


def calibrate(world: int, tokens: int, repeats: int, step_overhead: bool = True, ulysses: int = 1):
    """A calibration measured on ``world`` gloo ranks at ``tokens`` tokens per rank and a stage's Ulysses degree
    (``step_overhead``: with calibrate's DeepSpeed step)."""
    from dist_utils import run_distributed

    spec, meta = _spec(world, tokens, repeats, step_overhead, ulysses)
    return _build(run_distributed(_calibrate_rank, world, spec, timeout=600), world, meta)


def _stage(tmp: Path, c: int, seq: int, ulysses: int, steps: int, name: str, model: dict = MODEL) -> tuple:
    from stage_helpers import plan_for, stage_config

    cfg = stage_config(tmp / name, seq_len=seq, gpus=c, batch=1, steps=steps, ulysses=ulysses, model=model, name=name)
    return cfg, plan_for(cfg)


def _steps(stamps: list[float]) -> list[float]:
    from launcher.estimate.fit import steady

    return steady([b - a for a, b in zip(stamps, stamps[1:])])


def measure(c: int, seq: int, ulysses: int, steps: int, keep_all: bool = False) -> tuple:
    """(median micro-step seconds, StageConfig, Plan[, every step after the first]) of one real stage."""
    from dist_utils import run_distributed

    with tempfile.TemporaryDirectory(prefix="pvm-") as tmp:
        cfg, plan = _stage(Path(tmp), c, seq, ulysses, steps, "s")
        stamps = run_distributed(_stage_rank, c, cfg.to_dict(), plan.to_dict(), timeout=900)[0]
    times = _steps(stamps)
    return (statistics.median(times), cfg, plan) + ((times,) if keep_all else ())


def steps_for(tokens_per_rank: int, steps: int) -> int:
    """Optimizer steps of a stage at ``tokens_per_rank``: ``steps``, more for small stages (up to 30), so that
    each stage is timed over about as long a stretch as the larger ones and one burst of load elsewhere on
    the machine weighs no more in it."""
    return min(30, max(steps, -(-steps * 512 // tokens_per_rank)))


def pair(c: int, seq: int, u: int, args: argparse.Namespace) -> tuple:
    """Calibrate for one stage and run it, back to back on the same C gloo ranks; (calibration, StageConfig, Plan, measured).

    The ranks calibrate at the stage's tokens per rank and Ulysses degree, then run
    the stage's layout at 32 tokens per rank (the fixed cost of a step as the trainer
    pays it: data, loss, ZeRO, optimizer, metrics, less what the model prices on its
    own at that size), then the stage itself. One start-up for all three, so the
    calibration and the check see the machine's load of the same minute.
    """
    from dataclasses import replace

    from dist_utils import run_distributed

    from launcher.estimate.fit import overhead_figure

    spec, meta = _spec(c, seq // c, args.repeats, args.deepspeed_overhead, u)
    with tempfile.TemporaryDirectory(prefix="pvm-") as tmp:
        small = _stage(Path(tmp), c, 32 * c, u, steps_for(32, args.steps), "small")
        stage = _stage(Path(tmp), c, seq, u, steps_for(seq // c, args.steps), "stage")
        stages = [stage] if args.deepspeed_overhead else [small, stage]
        out = run_distributed(_pair_rank, c, spec, [(cfg.to_dict(), plan.to_dict()) for cfg, plan in stages], timeout=1200)
    cal = _build([samples for samples, _ in out], c, meta)
    stamps = out[0][1]
    if not args.deepspeed_overhead:
        cal = replace(cal, step_overhead_s=overhead_figure(_steps(stamps[0]), *small, cal,
                                                           f"stage at {32 * c} tokens on {c} rank(s), ulysses {u}"))
    return cal, stage[0], stage[1], statistics.median(_steps(stamps[-1]))


def one_run(configs: list[tuple[int, int, int]], args: argparse.Namespace) -> list[tuple]:
    """Calibrate then check each configuration back to back; rows of (C, seq, U, predicted, measured), and each pair's seconds."""
    from launcher.commands.calibrate import summary
    from launcher.estimate.fit import predict_stage
    from topology.cost import HardwareRates

    rows, pairs = [], {}
    for c, seq, u in sorted(configs):
        t0 = time.perf_counter()
        cal, cfg, plan, measured = pair(c, seq, u, args)
        print(summary(cal), flush=True)
        if args.save_dir:
            Path(args.save_dir).mkdir(parents=True, exist_ok=True)
            cal.save(Path(args.save_dir) / f"calibration-c{c}-s{seq}-u{u}.json")
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


LAB_STEPS = 7
RATIO_TARGET = 0.20
"""The network lab's predicted naive/aware ratio must be within this of the measured one (issue: 20%)."""


def lab_rows() -> list[tuple[str, str, float, float]]:
    """Each network-lab case of ``benchmarks/netlab_ring.py`` at its defaults: (case, order, predicted, measured)
    ring step for the aware and the naive order. Needs root. The lab profiles under the load it measures in
    (with ``--neighbour``, this benchmark's own neighbour process)."""
    from benchmarks import netlab_ring

    rows = []
    for case in sorted(netlab_ring.CASES):
        res = netlab_ring.lab_run(netlab_ring.parser().parse_args(["--case", case, "--steps", str(LAB_STEPS)]))
        print(netlab_ring.report(res), flush=True)
        rows += [(case, order, res[order]["predicted_s"], res[order]["step_s"]) for order in ("aware", "naive")]
    return rows


def lab_table(rows: list[tuple[str, str, float, float]]) -> float:
    """Print the network lab's predicted-vs-measured ring steps and naive/aware ratios; returns the worst step error."""
    print(f"{'lab case':<12} {'order':<12} {'predicted':>10} {'measured':>10} {'error':>7}")
    errors, ratio_errors = [], []
    for case, order, p, m in rows:
        errors.append(abs(p - m) / m)
        print(f"{case:<12} {order:<12} {p * 1e3:>8.0f}ms {m * 1e3:>8.0f}ms {(p - m) / m:>+7.0%}")
    for (case, _, pa, ma), (_, _, pn, mn) in zip(rows[::2], rows[1::2]):
        predicted, measured = pn / pa, mn / ma
        ratio_errors.append(abs(predicted - measured) / measured)
        print(f"{case:<12} {'naive/aware':<12} {predicted:>9.2f}x {measured:>9.2f}x {(predicted - measured) / measured:>+7.0%}")
    print(f"lab worst: {max(errors):.0%}; within 25%: {sum(e <= 0.25 for e in errors)} of {len(errors)}; "
          f"ratios within {RATIO_TARGET:.0%}: {sum(e <= RATIO_TARGET for e in ratio_errors)} of {len(ratio_errors)}")
    return max(errors)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="three configurations instead of all")
    parser.add_argument("--steps", type=int, default=8,
                        help="optimizer steps per stage, more below 512 tokens per rank (the first two are not timed)")
    parser.add_argument("--repeats", type=int, default=5, help="repeats of each calibration measurement")
    parser.add_argument("--runs", type=int, default=1, help="consecutive runs, each calibrating afresh")
    parser.add_argument("--neighbour", action="store_true", help="run beside a CPU-bound process (`while 1: pass`)")
    parser.add_argument("--save-dir", help="keep each ring size's calibration file here")
    parser.add_argument("--deepspeed-overhead", action="store_true",
                        help="take the step overhead from `ringleader calibrate`'s DeepSpeed step, not a stage at 32 tokens per rank")
    parser.add_argument("--lab", action="store_true", help="also the network lab's cases (benchmarks/netlab_ring.py; needs root): "
                        "aware and naive ring steps and their ratio, predicted from the lab's profile")
    args = parser.parse_args(argv)

    configs = QUICK if args.quick else CONFIGS
    neighbour = subprocess.Popen([sys.executable, "-c", "while 1: pass"]) if args.neighbour else None
    try:
        worst = []
        for run in range(args.runs):
            rows, pairs = one_run(configs, args)
            title = f"run {run + 1} of {args.runs}" + (" (beside a CPU-bound process)" if neighbour else "")
            worst.append(table(rows, pairs, title))
            if args.lab:
                worst[-1] = max(worst[-1], lab_table(lab_rows()))
    finally:
        if neighbour is not None:
            neighbour.kill()
            neighbour.wait()
    if args.runs > 1:
        print("\nworst per run: " + ", ".join(f"{w:.0%}" for w in worst))
    return 0


if __name__ == "__main__":
    sys.exit(main())
