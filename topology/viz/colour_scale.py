"""The colour scales of every picture ringleader draws, one per kind of quantity.

A colour must mean the same number in every picture: 25 GB/s is the same
colour on the HTML page, in the PNG and in the SVG, whatever the cluster.
So each scale has a fixed range, not one stretched over the figures of the
topology at hand, and the renderers ask this module for colours, colour-bar
norms and tick labels instead of choosing their own.

* ``BANDWIDTH``: GB/s per direction, log scale from 0.1 to 1000 (loopback
  and 200 Mbit/s test links to NVLink); dark = slow, orange = fast.
* ``LOAD``: a link's utilisation by the plan's concurrent traffic, 0 to 200 %
  of its capacity; green = room to spare, amber = full, red = oversubscribed
  (2:1 and worse). ``SCORE``: a fraction of a task done (the NIAH heatmap),
  red = none, green = all. Both use the same three colours, so green always
  means "fine" and red "not".
* ``distinct_colours``: hues for groups (rings, data-parallel groups) that
  must be told apart rather than ordered.
"""

from __future__ import annotations

import colorsys
import math
from dataclasses import dataclass
from functools import lru_cache

from matplotlib import colormaps
from matplotlib.colors import Colormap, LinearSegmentedColormap, LogNorm, Normalize, to_hex, to_rgb

GREEN, AMBER, RED = "#0CD79F", "#EBB839", "#F0496E"
"""The traffic-light colours of the usual NIAH heatmaps: fine, borderline, not."""


@dataclass(frozen=True)
class Scale:
    """A fixed mapping from a quantity to colour; values outside [lo, hi] take the end colours."""

    name: str
    lo: float
    hi: float
    colours: tuple[str, ...]
    """Colours spread evenly from ``lo`` to ``hi`` (on a log axis when ``log``)."""
    log: bool
    unit: str
    """Shown after tick labels ("GB/s") or, for "%", fused to them ("150%")."""
    ticks: tuple[float, ...]
    percent: bool = False
    """Values are fractions shown as percentages (1.5 -> "150%")."""

    def level(self, x: float) -> float:
        """Where ``x`` sits on the scale, 0..1 (clipped)."""
        if self.log:
            t = (math.log10(max(x, self.lo)) - math.log10(self.lo)) / (math.log10(self.hi) - math.log10(self.lo))
        else:
            t = (x - self.lo) / (self.hi - self.lo)
        return min(1.0, max(0.0, t))

    def colour(self, x: float) -> str:
        """Hex colour of ``x``."""
        return _hex(self, round(self.level(x), 3))

    @property
    def cmap(self) -> Colormap:
        """The matplotlib colormap over 0..1 (pair it with ``norm``)."""
        return _cmap(self)

    def norm(self) -> Normalize:
        """The matplotlib norm for this range."""
        return LogNorm(self.lo, self.hi, clip=True) if self.log else Normalize(self.lo, self.hi, clip=True)

    def tick_label(self, x: float) -> str:
        """Plain numbers: "0.1", "50", "1000", "150%" (never "5x10^1").

        >>> BANDWIDTH.tick_label(50.0), BANDWIDTH.tick_label(0.1), LOAD.tick_label(1.5)
        ('50', '0.1', '150%')
        """
        if self.percent:
            return f"{x * 100:.0f}%"
        return f"{x:g}"

    def gradient(self, steps: int = 9) -> list[tuple[float, str]]:
        """(offset 0..1, colour) stops for an SVG linearGradient of the whole scale."""
        return [(i / (steps - 1), to_hex(self.cmap(i / (steps - 1)))) for i in range(steps)]


@lru_cache(maxsize=None)
def _cmap(scale: Scale) -> Colormap:
    return LinearSegmentedColormap.from_list(scale.name, list(scale.colours), N=256)


@lru_cache(maxsize=4096)
def _hex(scale: Scale, level: float) -> str:
    return to_hex(_cmap(scale)(level))


_PLASMA = colormaps["plasma"]
BANDWIDTH = Scale("bandwidth", 0.1, 1000.0, tuple(to_hex(_PLASMA(0.88 * i / 15)) for i in range(16)), log=True,
                  unit="GB/s", ticks=(0.1, 1.0, 10.0, 100.0, 1000.0))
"""Link and flow bandwidth, GB/s per direction."""

LOAD = Scale("load", 0.0, 2.0, (GREEN, AMBER, RED), log=False, unit="%", ticks=(0.0, 0.5, 1.0, 1.5, 2.0), percent=True)
"""Utilisation: the single-flow rates of all flows crossing a link over its bandwidth (1.0 = full)."""

SCORE = Scale("score", 0.0, 1.0, (RED, AMBER, GREEN), log=False, unit="%", ticks=(0.0, 0.5, 1.0), percent=True)
"""A fraction of a task done right (NIAH: the needle reproduced)."""

UNBOUNDED_COLOUR = "#b0b0b0"
"""Links that stand for "never limits" (a measured profile's GPU-NIC ties) and cells with nothing to show."""


def bandwidth_stroke(gbps: float) -> float:
    """Line width (px) for a link: faster links draw thicker, on the same fixed scale as the colour."""
    return round(0.8 + 3.2 * BANDWIDTH.level(gbps), 2)


def distinct_colours(classes: list[int]) -> list[str]:
    """A colour per item from its colour class: items of different classes get different hues.

    Up to 10 classes use matplotlib's tab10 (grey left out, it reads as "inactive");
    more use golden-angle hues, so classes next to each other in number still
    differ by about 137 degrees. Items sharing a class alternate darker and lighter
    shades of its hue, so every item stays unique in a legend.

    >>> distinct_colours([0, 1, 0])
    ['#1f77b4', '#ff7f0e', '#165480']
    """
    k = max(classes, default=-1) + 1
    if k <= 9:
        tab = [to_hex(colormaps["tab10"](i)) for i in range(10) if i != 7]
        base = tab[:k]
    else:
        base = [to_hex(colorsys.hls_to_rgb((i * 0.381966) % 1.0, 0.45 if i % 2 else 0.55, 0.75)) for i in range(k)]
    seen = [0] * k
    out = []
    for c in classes:
        out.append(_shade(base[c], seen[c]))
        seen[c] += 1
    return out


def _shade(colour: str, n: int) -> str:
    """The n-th variant of a colour: itself, then darker, lighter, darker still, ..."""
    if n == 0:
        return colour
    h, l, s = colorsys.rgb_to_hls(*to_rgb(colour))
    step = (n + 1) // 2 * 0.12
    l = max(0.18, l - step) if n % 2 else min(0.8, l + step)
    return to_hex(colorsys.hls_to_rgb(h, l, s))

