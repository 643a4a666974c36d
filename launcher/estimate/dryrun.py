"""``ringleader run RECIPE --dry-run``: what every stage will need and cost, before any GPU-hour.

No Ray, no worker: each stage is sized (``launcher.estimate.sizing``), its memory per
GPU estimated (``launcher.estimate.memory``) and its ranks placed topology-aware on a
topology (``topology.planning.planner``), whose cost model predicts the step time,
tokens/s and MFU. The report is one table, a column per stage, then what
the sizing chose and why, and everything that does not add up::

    ringleader run clusters/recipes/llama3-8b-4194k.yaml --dry-run
    ringleader run clusters/recipes/llama3-8b-4194k.yaml --dry-run --topology leafspine-64x-2to1

Without ``--topology`` each stage runs on the AWS g6e preset of its size
(g6e-1x for 8 GPUs, g6e-4x for 32, g6e-64x for 512); with it, every stage is
placed on that topology (a preset name or a YAML/JSON file).
"""

from __future__ import annotations

import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, TextIO

from launcher.estimate.data_readiness import Readiness, readiness
from launcher.estimate.memory import GB, MemoryAssumptions, MemoryEstimate, model_shape, startup_host_bytes
from launcher.recipe import Recipe, RecipeStage
from launcher.estimate.sizing import StageSize, size_stage
from topology.calibration import Calibration, defaults_for
from topology.cost import FlowModel, HardwareRates, estimate
from topology.errors import ConfigError
from topology.network.model import Topology
from topology.network.presets import PRESETS, load_topology
from trainer.config import DEFAULT_DEEPSPEED
from trainer.niah.evaluate import NiahConfig

LABEL = 27
COLUMN = 15

COST_ROWS: list[tuple[str, Callable[[dict], str]]] = [
    ("slowest ring hop, GB/s", lambda c: f"{c['slowest_hop_gbps']:.1f}" if c["slowest_hop_gbps"] else "-"),
    ("K/V comm / attn, ms", lambda c: f"{c['ring_comm_fwd_s'] * 1e3:.3g} / {c['ring_compute_fwd_s'] * 1e3:.3g}"),
    ("  comm hidden", lambda c: "yes" if c["hidden"] else "NO"),
    ("tokens/s", lambda c: f"{c['tokens_per_s']:,.0f}"),
    ("MFU", lambda c: f"{c['mfu']:.1%}"),
]
"""Rows from the planned placement's cost model (``Plan.cost``): one ring step per layer, forward; a micro-step."""


@dataclass
class StageReport:
    """One stage's figures, as the table shows them."""

    stage: RecipeStage
    topology: Topology
    size: StageSize
    theta: float
    step_range_s: tuple[float, float] | None = None
    """Micro-step time at the fast and the slow end of the calibration's ranges."""

    @property
    def tokens(self) -> int:
        """What the settings train on: seq_len x batch x accumulation x steps."""
        return self.stage.seq_len * self.size.batch * self.size.grad_accum * self.stage.steps

    @property
    def micro_steps(self) -> int:
        return self.size.grad_accum * self.stage.steps

    @property
    def wall_s(self) -> float | None:
        plan = self.size.plan
        return None if plan is None else plan.cost["step_time_s"] * self.micro_steps

    @property
    def wall_range_s(self) -> tuple[float, float] | None:
        return None if self.step_range_s is None else (self.step_range_s[0] * self.micro_steps, self.step_range_s[1] * self.micro_steps)

    @property
    def gpu_hours(self) -> float | None:
        return None if self.wall_s is None else self.wall_s * self.stage.gpus / 3600

    @property
    def gpu_hours_range(self) -> tuple[float, float] | None:
        w = self.wall_range_s
        return None if w is None else (w[0] * self.stage.gpus / 3600, w[1] * self.stage.gpus / 3600)


def default_topology(gpus: int) -> str:
    """The smallest AWS g6e preset with at least ``gpus`` GPUs."""
    sizes = sorted((PRESETS[name]().num_gpus, name) for name in PRESETS if name.startswith("g6e-"))
    for count, name in sizes:
        if count >= gpus:
            return name
    raise ConfigError(f"no preset has {gpus} GPUs (largest: {sizes[-1][1]}); pass --topology FILE describing the cluster")


def plan_recipe(recipe: Recipe, topology_arg: str | None = None, calibration: str | None = None) -> list[StageReport]:
    """Size, estimate and place every stage; raises ConfigError on a recipe, topology or calibration that cannot be read.

    ``calibration`` is a calibration file (``ringleader calibrate``); without
    one each topology's GPU gets its published achieved figures
    (``topology.calibration.defaults_for``). The sizing, the placement and
    the printed times all use the same rates; the range comes from the
    calibration's low and high ends. Activation checkpointing (the trainer's
    default) is priced in: every layer's forward runs again in backward.
    """
    recompute = MemoryAssumptions().activation_checkpointing
    shape, _ = model_shape(recipe.model)
    recipe.check_heads(shape.n_q_heads, shape.n_kv_heads)
    thetas = recipe.resolve_theta()
    cal_file = Calibration.load(calibration) if calibration else None
    topologies: dict[str, tuple[Topology, FlowModel, Calibration]] = {}
    reports = []
    for stage in recipe.stages:
        name = topology_arg or default_topology(stage.gpus)
        if name not in topologies:
            topo = load_topology(name)
            topologies[name] = (topo, FlowModel(topo), cal_file or defaults_for(topo.gpu))
        topo, flows, cal = topologies[name]
        size = size_stage(stage, topo, shape, recipe.deepspeed, flows=flows, rates=HardwareRates.from_calibration(cal))
        report = StageReport(stage, topo, size, thetas[stage.name])
        if size.plan is not None:
            fast, slow = (estimate(size.plan, topo, shape, flows=flows, rates=HardwareRates.from_calibration(cal, end),
                                   recompute=recompute).step_time_s for end in ("high", "low"))
            report.step_range_s = (fast, slow)
        reports.append(report)
    return reports


def dry_run(recipe: Recipe, topology_arg: str | None = None, out: TextIO | None = None, calibration: str | None = None) -> int:
    """Print the dry-run report; 0 when every stage fits and can be placed, 1 otherwise."""
    out = out or sys.stdout
    reports = plan_recipe(recipe, topology_arg, calibration)
    print(format_report(recipe, reports, data_report(recipe, reports)), file=out)
    return 1 if any(r.size.problems for r in reports) else 0


def _startup_host(recipe: Recipe, report: StageReport, params: float) -> str:
    """Host memory while the busiest host's ranks build the model (``startup_host_bytes``)."""
    if not report.size.plan:
        return "?"
    per_host = max(Counter(p.host for p in report.size.plan.placements).values())
    zero = {**DEFAULT_DEEPSPEED["zero_optimization"], **((recipe.deepspeed or {}).get("zero_optimization") or {})}
    zero3 = int(zero.get("stage", 0)) == 3
    return f"{startup_host_bytes(params, per_host, report.stage.gpus, zero3) / GB:.1f}"


# ------------------------------------------------------------------ formatting
def data_report(recipe: Recipe, reports: list[StageReport]) -> list[Readiness]:
    """Data readiness of every stage, from the stores under the recipe's ``run_dir/tokens``."""
    from trainer import storage
    from trainer.data.prepare import STORE_DIR

    return readiness(recipe, {r.stage.name: r.tokens for r in reports}, storage.join(str(recipe.run_dir), STORE_DIR))


def format_report(recipe: Recipe, reports: list[StageReport], data: list[Readiness] | None = None) -> str:
    shape, shape_source = model_shape(recipe.model)
    gpu = reports[0].topology.gpu
    names = list(dict.fromkeys(r.topology.name for r in reports))
    lines = [f"dry run of {recipe.name}: {len(reports)} stages, model {recipe.model.path or 'tiny'} "
             f"({format_count(shape.params)} parameters; shape from {shape_source})",
             f"GPU {gpu.name}: {gpu.memory_gb:g} GB, {gpu.tflops_bf16:g} TFLOPS bf16. Nothing is started."]
    if len(names) == 1:
        lines.append(f"topology {names[0]}: {len(reports[0].topology.hosts)} hosts, {reports[0].topology.num_gpus} GPUs")
    rows: list[tuple[str, list[str]]] = [("stage", [r.stage.name for r in reports])]
    if len(names) > 1:
        rows.append(("topology", [r.topology.name for r in reports]))
    rows += [
        ("GPUs / hosts", [f"{r.stage.gpus} / {len(r.size.plan.hosts) if r.size.plan else '?'}" for r in reports]),
        ("rings x ring size", [f"{r.size.batch} x {r.size.cp}" for r in reports]),
        ("  ulysses x ring degree", [f"{r.size.ulysses} x {r.size.ring}" for r in reports]),
        ("tokens per GPU", [f"{r.stage.seq_len // r.size.cp:,}" for r in reports]),
        ("RoPE theta", [format_theta(r.theta) for r in reports]),
        ("batch x accum x steps", [f"{r.size.batch} x {r.size.grad_accum} x {r.stage.steps}" for r in reports]),
        ("total tokens", [f"{r.tokens:,}" for r in reports]),
        ("  published", [_published(r) for r in reports]),
    ]
    if data:
        rows += [
            ("data tokens per pass", [f"{d.stream_tokens:,}" if d.passes else d.status.split(" (")[0] for d in data]),
            ("  passes trained", [f"{d.passes:.2f}" if d.passes else "-" for d in data]),
            ("  docs > seq_len/4", [f"{d.long_documents:,}" if d.passes else "-" for d in data]),
            ("  sample share of them", [f"{d.long_share:.0%}" if d.passes else "-" for d in data]),
        ]
    rows += [
        ("memory per GPU, GB", ["" for _ in reports]),
    ]
    for term in MemoryEstimate.TERMS:
        rows.append((f"  {MemoryEstimate.LABELS[term]}", [f"{getattr(r.size.memory, term) / GB:.2f}" for r in reports]))
    rows += [
        ("  total (usable)", [f"{r.size.memory.total / GB:.1f} ({r.size.memory.usable / GB:.1f})" for r in reports]),
        ("  fits", ["yes" if r.size.memory.fits else "NO" for r in reports]),
        ("host memory at start-up, GB", [_startup_host(recipe, r, shape.params) for r in reports]),
    ]
    rows += [(label, [fmt(r.size.plan.cost) if r.size.plan else "?" for r in reports]) for label, fmt in COST_ROWS]
    rows += [
        ("micro-step time, s", [f"{r.size.plan.cost['step_time_s']:.2f}" if r.size.plan else "?" for r in reports]),
        ("  range", [format_range(r.step_range_s, lambda v: f"{v:.2f}") for r in reports]),
        ("wall time", [format_duration(r.wall_s) for r in reports]),
        ("  range", [format_range(r.wall_range_s, format_duration) for r in reports]),
        ("GPU-hours", [f"{r.gpu_hours:,.1f}" if r.gpu_hours is not None else "?" for r in reports]),
        ("  range", [format_range(r.gpu_hours_range, lambda v: f"{v:,.0f}") for r in reports]),
    ]
    width = max(COLUMN, *(len(v) + 2 for _, values in rows for v in values))
    lines += [""] + [label.ljust(LABEL) + "".join(v.rjust(width) for v in values) for label, values in rows]
    placed = [r for r in reports if r.gpu_hours is not None]
    total_h = sum(r.gpu_hours for r in placed)
    wall = sum(r.wall_s for r in placed)
    ranged = [r for r in placed if r.step_range_s is not None]
    h_lo, h_hi = sum(r.gpu_hours_range[0] for r in ranged), sum(r.gpu_hours_range[1] for r in ranged)
    w_lo, w_hi = sum(r.wall_range_s[0] for r in ranged), sum(r.wall_range_s[1] for r in ranged)
    lines += ["", f"whole recipe: {total_h:,.0f} GPU-hours ({h_lo:,.0f} to {h_hi:,.0f}), {format_duration(wall)} of wall time "
              f"({format_duration(w_lo)} to {format_duration(w_hi)})"
              + ("" if len(placed) == len(reports) else f" ({len(reports) - len(placed)} stage(s) could not be placed)")]
    sources = list(dict.fromkeys(r.size.plan.cost.get("rates_source", "") for r in placed))
    for source in sources:
        how = "from calibration" if source.startswith(("calibrated", "fitted")) else \
            "from defaults, not measured here: `ringleader calibrate -o FILE`, then --calibration FILE"
        lines.append(f"times {how}: {source}; ranges span the low and high end of every figure")
    lines += _section("sizing", [f"{r.stage.name}: {why}" for r in reports for why in r.size.reasons])
    lines += _section("flags", [msg for r in reports for msg in _flags(r)] + [f for d in data or [] if (f := d.flag())])
    lines += _section("notes", _notes(recipe, reports) + _data_notes(data or []))
    return "\n".join(lines)


def format_range(pair: tuple[float, float] | None, fmt: Callable[[float], str]) -> str:
    """``lo-hi`` of a (fast, slow) pair, each written by ``fmt``."""
    return "?" if pair is None else f"{fmt(pair[0])} to {fmt(pair[1])}"


def format_theta(theta: float) -> str:
    """RoPE theta as the recipe table writes it.

    >>> [format_theta(t) for t in (500_000, 15_296_098, 207_112_190, 1_062_356_863, 2_804_339_921, 45_218_125_209)]
    ['500,000', '15.3M', '207.1M', '1.06B', '2.80B', '45.2B']
    """
    if theta >= 1e10:
        return f"{theta / 1e9:.1f}B"
    if theta >= 1e9:
        return f"{theta / 1e9:.2f}B"
    if theta >= 1e6:
        return f"{theta / 1e6:.1f}M"
    return f"{theta:,.0f}"


def format_count(n: float) -> str:
    """Parameter counts for people.

    >>> [format_count(n) for n in (8_030_261_248, 107_584, 950)]
    ['8.03B', '107.6K', '950']
    """
    for scale, suffix in ((1e9, "B"), (1e6, "M"), (1e3, "K")):
        if n >= scale:
            return f"{n / scale:.3g}{suffix}" if scale == 1e9 else f"{n / scale:.1f}{suffix}"
    return f"{n:.0f}"


def format_duration(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    if seconds < 3600:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


def _published(r: StageReport) -> str:
    published = r.stage.published_tokens
    if published is None:
        return "-"
    return f"{published:,}" + (" ok" if published == r.tokens else " (!)")


def _flags(r: StageReport) -> list[str]:
    out = r.size.problems + r.size.warnings
    published = r.stage.published_tokens
    if published is not None and published != r.tokens:
        s = r.stage
        out.append(f"stage {s.name}: seq_len x batch x accum x steps = {s.seq_len:,} x {r.size.batch} x {r.size.grad_accum} x "
                   f"{s.steps} = {r.tokens:,} tokens, but published_tokens is {published:,} ({published / r.tokens:.2f}x)")
    return out


def _notes(recipe: Recipe, reports: list[StageReport]) -> list[str]:
    notes = []
    paths = dict.fromkeys([recipe.data.path] + [r.stage.data.path for r in reports if r.stage.data])
    for path in paths:
        if path is not None and not Path(path).exists():
            notes.append(f"data {path} is not on this machine; each stage checks its data when it starts")
    for r in reports:
        if r.stage.niah:
            cfg = NiahConfig.from_dict(r.stage.niah, source=f"stage {r.stage.name}: niah")
            notes.append(f"after {r.stage.name}: needle in a haystack, {len(cfg.lengths())} lengths x {len(cfg.depths())} depths, "
                         f"{cfg.min_len:,} to {cfg.max_len:,} tokens, {cfg.digits}-digit needle")
    return notes


def _data_notes(data: list[Readiness]) -> list[str]:
    notes = []
    for path in dict.fromkeys(d.data.path for d in data if d.status == "not prepared"):
        stages = ", ".join(d.stage for d in data if d.data.path == path)
        notes.append(f"data {path} is not prepared (stage {stages}): the stage tokenises it on the cluster before its ranks "
                     "start; `ringleader data prepare RECIPE` does it ahead of time")
    notes += [f"stage {d.stage}: data {d.data.path} is {d.status}" for d in data if d.status.startswith("unreadable")]
    return notes


def _section(title: str, items: list[str]) -> list[str]:
    return ["", f"{title}:"] + [f"  - {item}" for item in items] if items else []
