"""Calibration: the achieved rates the cost model predicts with, and where they came from.

The cost model (``topology.cost``) turns FLOPs and bytes into seconds. How
many seconds depends on what kernels and links really sustain, not on data
sheet peaks: a dense GEMM, the attention block kernel forward and backward,
point-to-point transfers with every ring hop busy at once, collectives, and
the fixed work of every step. A ``Calibration`` holds those figures, each
with a range (``low`` .. ``high``) and its source, and is saved as JSON::

    {"format": "ringleader-calibration", "version": 1,
     "source": "calibrated on ray-cluster at 2026-12-01T16:00:00+00:00",
     "device": "cpu",
     "figures": {"gemm_tflops": {"value": 0.05, "low": 0.04, "high": 0.06, "source": "measured: ..."}, ...}}

``ringleader calibrate`` measures one on a live cluster (or fits one from a
finished run); without a file the defaults below are used: published
achieved figures for the GPU, never its peak. ``HardwareRates.from_calibration``
(``topology.cost``) is the one place the cost model reads them.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from topology.errors import ConfigError
from topology.files import write_atomic
from topology.network.model import GpuSpec

FORMAT = "ringleader-calibration"
VERSION = 1


@dataclass(frozen=True)
class Figure:
    """One achieved rate: expected value, the range it is expected in, and where it comes from."""

    value: float
    low: float
    high: float
    source: str = ""

    @classmethod
    def around(cls, value: float, spread: float, source: str) -> "Figure":
        """``value`` with a symmetric relative range (``spread`` = 0.2: +-20%)."""
        return cls(value, value * (1 - spread), value * (1 + spread), source)


@dataclass(frozen=True)
class Calibration:
    """Achieved figures for one kind of device and network; see the module docstring.

    Rates are per device (one GPU, or one rank's CPU slot). ``network_efficiency``
    and ``bus_efficiency`` scale the topology's link bandwidths (for measured
    topologies they are about 1); ``inter_host_gbps`` and ``intra_host_gbps``,
    when measured, cap what one ring hop reaches with every hop busy.
    """

    source: str
    """``defaults for <GPU> (published achieved figures)`` or ``calibrated on <cluster> at <time>``."""
    device: str
    gemm_tflops: Figure
    """Dense matrix multiply at the model's shapes (bf16 on GPUs)."""
    attn_fwd_tflops: Figure
    """The attention block kernel, forward (causal FLOPs counted as computed)."""
    attn_bwd_tflops: Figure
    """The attention block kernel, backward (2.5 x the forward FLOPs)."""
    network_efficiency: Figure
    """Fraction of a link's bandwidth a ring hop's transfer achieves."""
    bus_efficiency: Figure
    """Fraction of the slowest link's bandwidth an all-reduce / reduce-scatter reaches as bus bandwidth."""
    step_overhead_s: Figure
    """Fixed seconds per optimizer step: optimizer, ZeRO bookkeeping, data, logging."""
    layer_overhead_s: Figure = field(default_factory=lambda: Figure(0.0, 0.0, 0.0, "none"))
    """Fixed seconds per layer and ring step, forward plus backward: launches, Python, message latency."""
    inter_host_gbps: Figure | None = None
    """Measured GB/s of one host-to-host ring hop with every hop busy (None: from the topology)."""
    intra_host_gbps: Figure | None = None
    """Measured GB/s of one in-host ring hop with every hop busy (None: from the topology)."""
    overlap: Figure | None = None
    """Fraction of a ring step's shorter part (transfer or compute) that hides behind the longer (None: 1)."""
    attn_causal_fwd_tflops: Figure | None = None
    """The causal (diagonal) block kernel, forward, FLOPs counted for the half it must compute (None: as ``attn_fwd``)."""
    attn_causal_bwd_tflops: Figure | None = None
    """The causal (diagonal) block kernel, backward (None: as ``attn_bwd``)."""
    bus_gbps: Figure | None = None
    """Measured all-reduce / reduce-scatter bus bandwidth of the ranks, GB/s (None: from the topology x ``bus_efficiency``)."""
    p2p_latency_s: Figure | None = None
    """Seconds of one ring exchange of a tiny message, every rank at once (None: the links' latency)."""
    a2a_latency_s: Figure | None = None
    """Seconds of one all-to-all of a tiny message (None: the links' latency)."""
    meta: dict[str, Any] = field(default_factory=dict)
    """How it was measured: shapes, sizes, repeats, the cluster; kept for the record."""

    FIGURES = ("gemm_tflops", "attn_fwd_tflops", "attn_bwd_tflops", "network_efficiency", "bus_efficiency",
               "step_overhead_s", "layer_overhead_s", "inter_host_gbps", "intra_host_gbps", "overlap",
               "attn_causal_fwd_tflops", "attn_causal_bwd_tflops", "bus_gbps", "p2p_latency_s", "a2a_latency_s")
    OPTIONAL = ("layer_overhead_s", "inter_host_gbps", "intra_host_gbps", "overlap", "attn_causal_fwd_tflops",
                "attn_causal_bwd_tflops", "bus_gbps", "p2p_latency_s", "a2a_latency_s")

    @property
    def calibrated(self) -> bool:
        """Measured or fitted on a cluster, rather than defaults."""
        return self.source.startswith("calibrated") or self.source.startswith("fitted")

    def bound(self, which: str) -> "Calibration":
        """The calibration with every figure at ``which`` (``low``/``high``): the slow or the fast end.

        The slow end takes low rates and high overheads; the fast end the opposite.
        """
        if which not in ("low", "high"):
            raise ValueError(which)
        changes = {}
        for name in self.FIGURES:
            f = getattr(self, name)
            if f is None:
                continue
            slow = f.high if is_seconds(name) else f.low
            fast = f.low if is_seconds(name) else f.high
            v = slow if which == "low" else fast
            changes[name] = Figure(v, v, v, f.source)
        return replace(self, **changes)

    # -------------------------------------------------------------- file
    def to_dict(self) -> dict[str, Any]:
        figures = {name: asdict(getattr(self, name)) for name in self.FIGURES if getattr(self, name) is not None}
        return {"format": FORMAT, "version": VERSION, "source": self.source, "device": self.device,
                "figures": figures, "meta": self.meta}

    def save(self, path: str | os.PathLike) -> None:
        """Write JSON atomically (temporary name, then rename)."""
        path = Path(path)
        if path.is_dir():
            raise ConfigError(f"-o {path} is a directory; give a file name such as {path / 'calibration.json'}")
        write_atomic(path, json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def from_dict(cls, data: Any, where: str = "calibration") -> "Calibration":
        """Validate and build; raises ConfigError with one line naming what is wrong."""
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise ConfigError(f"{where}: not a calibration file (no \"format\": \"{FORMAT}\"); "
                              "write one with `ringleader calibrate -o calibration.json`")
        if data.get("version") != VERSION:
            raise ConfigError(f"{where}: version {data.get('version')!r} is not {VERSION}; calibrate again with this ringleader")
        source, device, figs = data.get("source"), data.get("device"), data.get("figures")
        if not isinstance(source, str) or not source or not isinstance(device, str) or not device:
            raise ConfigError(f"{where}: \"source\" and \"device\" must be non-empty text")
        if not isinstance(figs, dict):
            raise ConfigError(f"{where}: \"figures\" must be an object of named figures")
        unknown = sorted(set(figs) - set(cls.FIGURES))
        if unknown:
            raise ConfigError(f"{where}: unknown figure(s) {', '.join(unknown)}; known: {', '.join(cls.FIGURES)}")
        kw: dict[str, Any] = {}
        for name in cls.FIGURES:
            if name not in figs:
                if name in cls.OPTIONAL:
                    continue
                raise ConfigError(f"{where}: figure {name!r} is missing; calibrate again or add it")
            kw[name] = _figure(figs[name], f"{where}: {name}", zero_ok=is_seconds(name) or name == "overlap")
        meta = data.get("meta", {})
        if not isinstance(meta, dict):
            raise ConfigError(f"{where}: \"meta\" must be an object")
        return cls(source=source, device=device, meta=meta, **kw)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Calibration":
        path = Path(path)
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            raise ConfigError(f"calibration file {path} does not exist; write one with `ringleader calibrate -o {path}`") from None
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"calibration file {path} cannot be read ({exc})") from None
        except json.JSONDecodeError as exc:
            raise ConfigError(f"calibration file {path} is not JSON (line {exc.lineno}: {exc.msg})") from None
        return cls.from_dict(data, str(path))


def is_seconds(name: str) -> bool:
    """Figures in seconds (overheads, latencies): their slow end is the high one."""
    return name.endswith("_s")


def _figure(raw: Any, where: str, zero_ok: bool) -> Figure:
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: must be an object with value, low, high")
    names = {f.name for f in fields(Figure)}
    extra = sorted(set(raw) - names)
    if extra:
        raise ConfigError(f"{where}: unknown key(s) {', '.join(extra)}; a figure has value, low, high, source")
    vals = []
    for key in ("value", "low", "high"):
        v = raw.get(key)
        ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and (v >= 0 if zero_ok else v > 0)
        if not ok:
            need = "a finite number >= 0" if zero_ok else "a finite number > 0"
            raise ConfigError(f"{where}: {key} is {v!r}; it must be {need}")
        vals.append(float(v))
    value, low, high = vals
    if not low <= value <= high:
        raise ConfigError(f"{where}: low <= value <= high does not hold ({low:g}, {value:g}, {high:g}); fix the range")
    source = raw.get("source", "")
    if not isinstance(source, str):
        raise ConfigError(f"{where}: source must be text")
    return Figure(value, low, high, source)


# ------------------------------------------------------------------ defaults
L40S = Calibration(
    source="defaults for L40S (published achieved figures)",
    device="L40S",
    gemm_tflops=Figure(
        200.0, 150.0, 250.0,
        "estimate from published sweeps: the largest bf16 GEMMs reach 80-86% of peak on A100/H100 (Bekman, "
        "'Machine Learning Engineering', Maximum Achievable Matmul FLOPS), but the L40S (362 TFLOPS dense bf16 "
        "on its data sheet, 733 with sparsity) is held to 350 W and throttles under sustained tensor load; "
        "an L40S validation guide takes > 150 TFLOPS on an 8192^3 torch.mm as passing (ai-hpc.github.io, "
        "ai-hardware-engineer-roadmap, L40S-x12 '05-Benchmarks'): the low end; no measured sweep was found"),
    attn_fwd_tflops=Figure(
        160.0, 120.0, 200.0,
        "estimate: FlashAttention-2 forward reaches 50-73% of peak at head dim 128 on A100 (Dao 2023, "
        "'FlashAttention-2', figs. 4-6); Ada has less shared memory per SM, so ~0.45 x 362 is taken; "
        "no published L40S figure was found"),
    attn_bwd_tflops=Figure(
        125.0, 90.0, 160.0,
        "estimate: FlashAttention-2 backward reaches 40-63% of peak on A100 (Dao 2023); ~0.35 x 362 on Ada; "
        "no published L40S figure was found"),
    network_efficiency=Figure(
        0.8, 0.65, 0.9,
        "estimate: point-to-point transfers reach 80-90% of line rate on 100-400 Gb/s Ethernet/EFA "
        "(NCCL tests PERFORMANCE.md defines algbw/busbw; sendrecv_perf over EFA on p4d/p5 is reported at "
        "~80-90% of line rate); g6e has no NVLink, in-host hops cross PCIe Gen4 (about 25 GB/s each way)"),
    bus_efficiency=Figure(
        0.75, 0.55, 0.9,
        "estimate: NCCL all_reduce_perf bus bandwidth over EFA/RoCE at large messages is 70-90% of the "
        "slowest link (NCCL tests PERFORMANCE.md: busbw = algbw x 2(n-1)/n); ZeRO-3 all-gathers of "
        "single layers are smaller messages, hence the low end"),
    step_overhead_s=Figure(
        0.3, 0.1, 1.0,
        "estimate: DeepSpeed ZeRO-3 optimizer step over 8B / world parameters, gradient clipping, "
        "data loading and logging per step; measure with `ringleader calibrate`"),
    layer_overhead_s=Figure(
        2e-5, 1e-5, 1e-4,
        "estimate: kernel launches and NCCL send/recv latency per layer and ring step (tens of microseconds)"),
)


def defaults_for(gpu: GpuSpec) -> Calibration:
    """Published achieved figures for ``gpu``: the L40S table, else fractions of its peak (labelled estimates)."""
    if gpu.name.upper().replace(" ", "") in ("L40S", "NVIDIAL40S"):
        return L40S
    peak = gpu.tflops_bf16
    base = L40S

    def frac(f: float, lo: float, hi: float, what: str) -> Figure:
        return Figure(f * peak, lo * peak, hi * peak,
                      f"estimate: {f:.0%} of {gpu.name}'s {peak:g} TFLOPS dense peak, as {what} reaches on A100/H100 "
                      "(largest-GEMM sweeps reach 80-86%: Bekman, 'Machine Learning Engineering', "
                      "Maximum Achievable Matmul FLOPS; FlashAttention-2 paper for attention)")

    return replace(
        base, source=f"defaults for {gpu.name} (fractions of its peak)", device=gpu.name,
        gemm_tflops=frac(0.75, 0.6, 0.85, "a large bf16 GEMM"),
        attn_fwd_tflops=frac(0.6, 0.45, 0.73, "FlashAttention-2 forward"),
        attn_bwd_tflops=frac(0.45, 0.35, 0.6, "FlashAttention-2 backward"),
    )


def load_calibration(path: str | os.PathLike | None, gpu: GpuSpec) -> Calibration:
    """The calibration file at ``path``, or the defaults for ``gpu`` when there is none."""
    return Calibration.load(path) if path else defaults_for(gpu)
