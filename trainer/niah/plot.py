"""The needle-in-a-haystack heatmap, in the layout people know from NIAH reports.

Context length runs along x, needle depth down y (0% = the start of the
context), and each cell is coloured from red (number not reproduced) to
green (reproduced exactly), with the average in the title. The colours are
``topology.viz.colour_scale.SCORE``: the same red-amber-green that marks
oversubscribed and idle links in the topology pictures.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only: no display on cluster nodes or CI

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.ticker import FixedLocator, FuncFormatter  # noqa: E402

from topology.viz.colour_scale import SCORE  # noqa: E402
from topology.files import write_atomic  # noqa: E402


def short_count(n: int) -> str:
    """Token counts for axis labels: 1024, 260.1K, 4.19M.

    >>> [short_count(n) for n in (100, 1024, 260100, 4194200)]
    ['100', '1024', '260.1K', '4.19M']
    """
    if n >= 1_000_000:
        return f"{n / 1e6:.3g}M"
    if n >= 10_000:
        return f"{n / 1e3:.4g}K"
    return str(n)


def score_grid(cells: list[Any]) -> tuple[list[int], list[float], np.ndarray]:
    """Lengths, depths and a depth x length matrix of scores (NaN where no cell was run)."""
    lengths = sorted({c.length for c in cells})
    depths = sorted({c.depth for c in cells})
    grid = np.full((len(depths), len(lengths)), np.nan)
    for c in cells:
        grid[depths.index(c.depth), lengths.index(c.length)] = float(c.correct)
    return lengths, depths, grid


def plot_heatmap(result: Any, path: str | Path) -> Path:
    """Draw ``result`` (a NiahResult) as a PNG at ``path``, written atomically."""
    lengths, depths, grid = score_grid(result.cells)
    width = min(24.0, max(7.0, 3.0 + 0.55 * len(lengths)))
    fig, ax = plt.subplots(figsize=(width, 1.8 + 0.45 * len(depths)))
    image = ax.imshow(grid, cmap=SCORE.cmap, norm=SCORE.norm(), aspect="auto", interpolation="nearest")
    ax.set_xticks(range(len(lengths)), [short_count(n) for n in lengths], rotation=45, ha="right")
    ax.set_yticks(range(len(depths)), [f"{d:.0%}" for d in depths])
    ax.set_xticks(np.arange(-0.5, len(lengths)), minor=True)
    ax.set_yticks(np.arange(-0.5, len(depths)), minor=True)
    ax.grid(which="minor", color="white", linewidth=1.5)
    ax.tick_params(which="minor", length=0)
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel("needle depth")
    found = sum(bool(c.correct) for c in result.cells)
    title = f"needle in a haystack: average {result.average:.1%} ({found}/{len(result.cells)} cells)"
    ax.set_title(f"{result.model}\n{title}" if result.model else title, fontsize=10)
    bar = fig.colorbar(image, ax=ax, fraction=0.03, pad=0.02, label="number reproduced")
    bar.ax.yaxis.set_major_locator(FixedLocator(list(SCORE.ticks)))
    bar.ax.yaxis.set_major_formatter(FuncFormatter(lambda x, _: SCORE.tick_label(x)))
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120)
    plt.close(fig)
    write_atomic(path, buf.getvalue())
    return Path(path)
