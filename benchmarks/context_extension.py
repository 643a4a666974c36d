"""Does raising RoPE theta let a model use 4x its trained context? Three arms, measured.

The recipe clusters/recipes/tiny-retrieval.yaml trains a tiny Llama on a
synthetic retrieval corpus (``trainer.data.synthetic``) at a short length, then
extends it to 4x that length with the NTK theta rule. This benchmark runs it
through ``ringleader run`` (embedded Ray, rings of CPU ranks) and a control
arm, then prints needle-in-a-haystack accuracy at both lengths:

* ``stage 1``: the short-length model, before any extension;
* ``same theta``: stage 1 extended for the same steps, theta unchanged;
* ``theta schedule``: stage 1 extended with the recipe's NTK theta.

Both extended arms start from the same stage-1 checkpoint (the control's run
directory is seeded with a copy of stage 1, which ``ringleader run`` skips as
finished), so they differ in theta alone. NIAH runs at the end of each stage
(the recipe's ``niah:`` blocks) on the haystack essays of clusters/data/corpus,
which the training corpus never contains. Run by hand (about 20 minutes on a
2-core machine, most of it the drills and stage 1)::

    python benchmarks/context_extension.py [--out runs/context-extension]
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
RECIPE = REPO / "clusters" / "recipes" / "tiny-retrieval.yaml"


def run(recipe: Path, run_dir: Path, extra: list[str]) -> float:
    """``ringleader run`` of ``recipe`` into ``run_dir``; returns its wall time in seconds."""
    start = time.perf_counter()
    cmd = [sys.executable, "-m", "launcher", "run", str(recipe), "--run-dir", str(run_dir), *extra]
    print("$", " ".join(cmd), flush=True)
    subprocess.run(cmd, cwd=REPO, check=True)
    return time.perf_counter() - start


def stage_dir(run_dir: Path, index: int) -> Path:
    return next(run_dir.glob(f"stage{index}-*"))


def stage_summary(directory: Path) -> dict:
    """Final loss and steps (metrics.jsonl) and NIAH accuracy per length (niah/*.json) of one stage."""
    steps = [json.loads(line) for line in (directory / "metrics.jsonl").read_text().splitlines() if line.strip()]
    losses = [m for m in steps if "loss" in m and "step" in m]
    niah_json = next((directory / "niah").glob("*.json"))
    cells = json.loads(niah_json.read_text())["cells"]
    by_len: dict[int, list[bool]] = {}
    tokens: dict[int, list[tuple[int, int]]] = {}
    for c in cells:
        by_len.setdefault(int(c["length"]), []).append(bool(c["correct"]))
        tokens.setdefault(int(c["length"]), []).append((int(c["tokens_correct"]), int(c["answer_tokens"])))
    return {
        "loss": losses[-1]["loss"] if losses else float("nan"),
        "steps": losses[-1]["step"] if losses else 0,
        "niah": {n: sum(v) / len(v) for n, v in sorted(by_len.items())},
        "tokens": {n: sum(t for t, _ in v) / sum(a for _, a in v) for n, v in sorted(tokens.items())},
        "heatmaps": sorted(str(p) for p in (directory / "niah").glob("*.png")),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=REPO / "runs" / "context-extension", help="where the three arms' run directories go")
    parser.add_argument("--recipe", type=Path, default=RECIPE)
    args = parser.parse_args(argv)
    if args.out.exists():
        shutil.rmtree(args.out)
    args.out.mkdir(parents=True)
    recipe = yaml.safe_load(args.recipe.read_text())
    base_theta = float(recipe["model"]["base_theta"])

    scheduled = args.out / "theta-schedule"
    wall_scheduled = run(args.recipe, scheduled, [])

    # The positive control is the last stage at the base length; the stages after it extend.
    first_index = max(i for i, st in enumerate(recipe["stages"]) if st["seq_len"] == recipe["model"]["base_len"])
    # The control: the same recipe with the extension's theta held at the base model's,
    # its run directory seeded with the scheduled arm's finished stages up to the positive control.
    control_recipe = dict(recipe, name=recipe["name"] + "-same-theta")
    control_recipe["stages"] = [dict(st) for st in recipe["stages"]]
    for st in control_recipe["stages"][first_index + 1:]:
        st["rope_theta"] = base_theta
    control_path = args.out / "same-theta.yaml"
    # Relative paths in a recipe are relative to its file: keep them pointing where the original's do.
    control_recipe["data"] = _absolute(recipe["data"], args.recipe.parent)
    control_path.write_text(yaml.safe_dump(control_recipe, sort_keys=False))
    control = args.out / "same-theta"
    control.mkdir()
    for i in range(first_index + 1):
        shutil.copytree(stage_dir(scheduled, i), control / stage_dir(scheduled, i).name)
    first = stage_dir(scheduled, first_index)
    wall_control = run(control_path, control, [])

    s1, sched, ctrl = stage_summary(first), stage_summary(stage_dir(scheduled, first_index + 1)), stage_summary(stage_dir(control, first_index + 1))
    lengths = sorted(set(s1["niah"]) | set(sched["niah"]))
    short = min(lengths)
    print()
    print(f"NIAH (cells with the 8-digit number exactly right), base theta {base_theta:,.0f}, "
          f"trained at {short:,} tokens, extended to {max(lengths):,}")
    header = (f"{'arm':<16}" + "".join(f"{f'@{n:,}':>10}" for n in lengths) + "".join(f"{f'tok@{n:,}':>11}" for n in lengths)
              + f"{'final loss':>12}{'steps':>7}{'wall':>9}")
    print(header)
    rows = [("stage 1", s1, None), ("same theta", ctrl, wall_control), ("theta schedule", sched, wall_scheduled)]
    for name, summary, wall in rows:
        cells = "".join(f"{summary['niah'][n] * 100:>9.0f}%" if n in summary["niah"] else f"{'-':>10}" for n in lengths)
        cells += "".join(f"{summary['tokens'][n] * 100:>10.0f}%" if n in summary["tokens"] else f"{'-':>11}" for n in lengths)
        wall_s = f"{wall:>8.0f}s" if wall is not None else f"{'-':>9}"
        print(f"{name:<16}{cells}{summary['loss']:>12.3f}{summary['steps']:>7}{wall_s}")
    print("(@N: cells whose whole number is right; tok@N: answer tokens right, teacher-forced; "
          "wall: the whole ringleader run of that arm, the scheduled arm's including every stage before the extension)")
    print("heatmaps:")
    for name, summary, _ in rows:
        for h in summary["heatmaps"]:
            print(f"  {name}: {h}")
    return 0


def _absolute(data: dict, base: Path) -> dict:
    out = dict(data)
    if "path" in out and not Path(out["path"]).is_absolute():
        out["path"] = str((base / out["path"]).resolve())
    return out


if __name__ == "__main__":
    sys.exit(main())
