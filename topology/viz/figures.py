"""A plan's cost figures as people read them, for the page header and the image title.

``Plan.cost`` holds raw numbers under field names (``tokens_per_s:
34912.3``, ``mfu: 0.507``); pictures show "34,900 tokens/s" and "MFU 50.7%".
The figures that predict GPU speed (times, throughput, MFU) are left out when
the ranks ran on CPU slots: there they describe hardware the run never had.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Figure:
    key: str
    label: str
    text: str

    def __str__(self) -> str:
        return f"{self.label} {self.text}" if self.label else self.text


HEADLINE = ("tokens_per_s", "step_time_s", "mfu", "slowest_hop_gbps", "hidden", "bound_step_s", "dp_allreduce_s",
            "inter_host_hops", "cross_switch_hops")
"""Shown in the header; the rest folds under "all figures"."""

LABELS = {
    "tokens_per_s": "", "step_time_s": "step", "mfu": "MFU", "slowest_hop_gbps": "slowest ring hop",
    "hidden": "ring communication", "bound_step_s": "best possible step", "dp_allreduce_s": "gradient traffic",
    "inter_host_hops": "ring hops between hosts", "cross_switch_hops": "between leaf switches",
    "efficiency": "assumed kernel efficiency", "tokens_per_rank": "tokens per rank",
    "ring_bytes_fwd": "K/V block per ring step", "slowest_hop": "slowest hop (ranks)",
    "bound_hop_gbps": "best possible slowest hop", "bound_ring_step_s": "best possible ring step",
    "a2a_floor_s": "all-to-all floor", "attention_floor_s": "ring, all-to-all and gradient floor",
}
"""Labels for the cost model's fields; others are shown as their field name in words."""

PREDICTED_EXTRA = ("tokens_per_s", "mfu", "hidden", "efficiency")
"""GPU predictions besides the times (every ``*_s`` field)."""


def is_prediction(key: str) -> bool:
    """Whether ``key`` predicts GPU speed (meaningless when ranks ran on CPU slots)."""
    return key.endswith("_s") or key in PREDICTED_EXTRA


def figures(cost: dict[str, Any], on_gpus: bool = True) -> tuple[list[Figure], list[Figure]]:
    """(headline, rest) of ``cost`` formatted; GPU predictions only when ``on_gpus``."""
    shown = {k: ({i: x for i, x in v.items() if on_gpus or not is_prediction(i)} if isinstance(v, dict) else v)
             for k, v in cost.items() if on_gpus or not is_prediction(k)}
    head = [k for k in HEADLINE if k in shown]
    return [fmt(k, shown[k]) for k in head], [fmt(k, v) for k, v in shown.items() if k not in head]


def fmt(key: str, value: Any) -> Figure:
    """One figure with its unit.

    >>> [str(fmt(k, v)) for k, v in (("tokens_per_s", 34912.3), ("mfu", 0.5071), ("step_time_s", 2.34e-06),
    ...                               ("hidden", True), ("inter_host_hops", 1024), ("ring_bytes_fwd", 4194304))]
    ['34,900 tokens/s', 'MFU 50.7%', 'step 2.34 µs', 'ring communication hidden behind compute', 'ring hops between hosts 1,024', 'K/V block per ring step 4 MiB']
    """
    label = LABELS.get(key, key.replace("_", " "))
    number = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if value is None:
        text = "-"
    elif key == "hidden":
        text = "hidden behind compute" if value else "exposed (slower than compute)"
    elif isinstance(value, bool):
        text = "yes" if value else "no"
    elif not number and not isinstance(value, (dict, list)):  # a figure a hand-edited plan got wrong: shown as it is
        text = str(value)
    elif key == "tokens_per_s" and number:
        text = f"{thousands(value)} tokens/s"
    elif key in ("mfu", "efficiency") and number:
        text = f"{value * 100:.1f}%"
    elif key.endswith("_s") and number:
        text = seconds(value)
    elif key.endswith("_gbps") and number:
        text = f"{value:.3g} GB/s"
    elif "bytes" in key and number:
        text = nbytes(value)
    elif isinstance(value, dict):  # e.g. the planner's search record: each field formatted the same way
        text = "; ".join(str(fmt(k, v)) for k, v in value.items())
    elif key == "slowest_hop" and isinstance(value, list):
        text = " → ".join(map(str, value))
    elif isinstance(value, int):
        text = f"{value:,}"
    elif isinstance(value, float):
        text = thousands(value)
    else:
        text = str(value)
    return Figure(key, label, text)


def thousands(x: float) -> str:
    """Three significant figures with thousands separators: 34912.3 -> "34,900"."""
    return f"{float(f'{x:.3g}'):,.0f}" if abs(x) >= 100 else f"{x:.3g}"


def seconds(s: float) -> str:
    """"2.34 µs", "12.5 ms", "43.8 s", "2 min 05 s", "3 h 07 min"."""
    if s < 1e-3:
        return f"{s * 1e6:.3g} µs"
    if s < 1:
        return f"{s * 1e3:.3g} ms"
    if s < 60:
        return f"{s:.3g} s"
    if s < 3600:
        return f"{int(s // 60)} min {int(s % 60):02d} s"
    return f"{int(s // 3600)} h {int(s % 3600 // 60):02d} min"


def nbytes(n: float) -> str:
    """Bytes in binary units: 4194304 -> "4 MiB"."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.3g} {unit}"
        n /= 1024
    return f"{n:.3g} GiB"
