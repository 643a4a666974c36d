"""The static drawing (PNG/SVG for reports), with matplotlib, from the same layout as the HTML page.

Left: hosts under their leaf switches, links coloured by bandwidth, rings
as coloured cycles (GPU to GPU up to 64 GPUs, host to host above) with their
legend; right: the single-flow bandwidth heatmap and, with a plan, the load
of its ring traffic, each with its colour bar. Colours come from
``topology.viz.colour_scale``, so a GB/s figure has the same colour here as on
the HTML page. The SVG carries a ``<title>`` (hover text) on every ring and
heatmap, and no timestamp: the same input gives the same bytes.
"""

from __future__ import annotations

from typing import BinaryIO

import html
import io
import re

import matplotlib
import numpy as np
from matplotlib.collections import LineCollection, PatchCollection
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import PathPatch, Rectangle
from matplotlib.path import Path as MplPath
from matplotlib.ticker import FixedLocator, FuncFormatter, NullLocator

from topology.viz.colour_scale import BANDWIDTH, LOAD, Scale
from topology.network.model import Topology
from topology.planning.plan import Plan
from topology.viz.figures import figures
from topology.viz.layout import (
    DIRECT_LINK_HOSTS, bend_point, cycle_hops, group_colours, heat_names, host_cycle, layout, load_matrix, rank_table, switch_point,
    uplink_route,
)

SVG_SALT = "ringleader"
"""Fixed seed for matplotlib's SVG ids, so the same drawing gives the same file."""
PART_LABEL = {"pcie": "sw", "socket": "cpu", "nic": "nic"}
PART_FILL = {"pcie": "#dddddd", "socket": "#e4e4e4", "nic": "#cfe3ff"}
LEGEND_MAX = 32
"""Rings listed in the legend; more are summed up in one line."""


def draw(topo: Topology, plan: Plan | None, out: BinaryIO, fmt: str = "png", show_dp: bool = False, on_gpus: bool = True) -> None:
    """Render to ``out`` in ``fmt`` (png or svg); ``on_gpus=False`` leaves out GPU predictions."""
    from topology.viz.page import title as page_title

    lay = layout(topo)
    ranks = rank_table(topo, plan) if plan else []
    aspect = lay.height / lay.width
    fig = Figure(figsize=(16, max(6.0, 10.5 * aspect)), layout="constrained")
    grid = fig.add_gridspec(2, 2, width_ratios=[2.2, 1])
    ax = fig.add_subplot(grid[:, 0])
    hm = fig.add_subplot(grid[0, 1])
    lm = fig.add_subplot(grid[1, 1]) if plan is not None else None
    ax.set_xlim(0, lay.width)
    ax.set_ylim(lay.height, 0)
    ax.set_aspect("equal")
    ax.axis("off")

    segs, colours, widths = [], [], []
    for u, v, d in topo.graph.edges(data=True):
        hu, hv = topo.graph.nodes[u].get("host"), topo.graph.nodes[v].get("host")
        if hu and hv:
            if hu != hv and len(topo.hosts) > DIRECT_LINK_HOSTS:
                continue  # measured host pairs: the heatmap shows them
            pts = [lay.points[u], lay.points[v]]
        elif hu or hv:
            part, switch = (u, v) if hu else (v, u)
            pts = uplink_route(lay, topo.host_of(part), part, switch)
        else:
            a, b = switch_point(lay, u), switch_point(lay, v)
            if not (a and b):
                continue
            pts = [a, b]
        segs.append(pts)
        colours.append(lay.colour(d["bw_gbps"]))
        widths.append(lay.stroke(d["bw_gbps"]) * 0.6)
    ax.add_collection(LineCollection(segs, colors=colours, linewidths=widths, zorder=1))

    for leaf, bar in lay.leaves.items():
        if leaf:
            ax.add_patch(Rectangle((bar.x, bar.y), bar.w, bar.h, color="#4d4d5c", zorder=2))
            ax.text(bar.x, bar.y + bar.h + 12, leaf, fontsize=7, va="center")
    for s, b in lay.nvswitches.items():
        ax.add_patch(Rectangle((b.x, b.y), b.w, b.h, color="#76b900", zorder=2))
        ax.text(b.cx, b.cy, s, fontsize=6, ha="center", va="center", color="white", zorder=5)
    for s in topo.nodes_of_kind("spine"):
        x, y = lay.points[s]
        ax.add_patch(Rectangle((x - 24, y - 9), 48, 18, color="#4d4d5c", zorder=2))
        ax.text(x, y - 14, s, fontsize=7, ha="center")
    small = lay.detail
    # Points per drawing unit (the HTML page's pixel), so text keeps its size relative to the boxes.
    pt = min(fig.get_figwidth() * 0.62 * 72 / lay.width, fig.get_figheight() * 0.8 * 72 / lay.height)
    for h, box in lay.hosts.items():
        ax.add_patch(Rectangle((box.x, box.y), box.w, box.h, facecolor="#f7f7f9", edgecolor="#8a8a99", linewidth=0.6, zorder=0.5))
        ax.text(box.x + 5, box.y + 11, h, fontsize=max(3.5, min(9.0, 8 * pt)), weight="bold")
    placed = {r.gpu for r in ranks}
    ax.add_collection(PatchCollection([Rectangle((lay.points[g][0] - 8, lay.points[g][1] - 8), 16, 16, rotation_point="center")
                                       for g in topo.gpus()], facecolors=["#fff6d8" if g in placed else "#ffffff" for g in topo.gpus()],
                                      edgecolors="#2b2b2b", linewidths=0.5, zorder=3))
    if small:
        parts = [(n, d["kind"]) for n, d in topo.graph.nodes(data=True) if d.get("host") and d["kind"] != "gpu"]
        ax.add_collection(PatchCollection([Rectangle((lay.points[n][0] - 8, lay.points[n][1] - 4), 16, 8) for n, _ in parts],
                                          facecolors=[PART_FILL.get(k, "#dddddd") for _, k in parts], edgecolors="#666666",
                                          linewidths=0.5, zorder=3))
        for n, kind in parts:
            ax.text(*lay.points[n], PART_LABEL.get(kind, kind), fontsize=4.2 * pt, ha="center", va="center", zorder=5)
        for r in ranks:
            ax.text(*lay.points[r.gpu], str(r.rank), fontsize=5.5 * pt, ha="center", va="center", zorder=5)

    titles: dict[str, str] = {}
    handles = []
    if plan is not None:
        g = plan.groups
        kinds = [("ring", g.ring_groups, "-", 1.6)] + ([("dp", g.dp_groups, "--", 0.9)] if show_dp and plan.dp > 1 else [])
        for kind, members, style, lw in kinds:
            gpu_lists = [[ranks[r].gpu for r in group] for group in members]
            palette = group_colours(lay, [host_cycle(topo, gpus) for gpus in gpu_lists])
            for i, gpus in enumerate(gpu_lists):
                hosts = host_cycle(topo, gpus)
                if small:  # GPU to GPU, each hop bowed as on the page, so a hop back does not hide the row
                    hops = cycle_hops(topo, gpus)
                    pts = [lay.points[gpus[0]]] if hops else []
                    for hop in hops:
                        a, b = lay.points[hop.src], lay.points[hop.dst]
                        pts += [bend_point(a, b, 0.45, 16 if topo.host_of(hop.src) == topo.host_of(hop.dst) else 50), b]
                    codes = [MplPath.MOVETO] + [MplPath.CURVE3] * (len(pts) - 1)
                else:
                    pts = [lay.hosts[h].anchor(i) for h in hosts + hosts[:1]] if len(hosts) > 1 else []
                    codes = [MplPath.MOVETO] + [MplPath.LINETO] * (len(pts) - 1)
                name = f"{kind} {i}" if kind == "ring" else f"DP {i}"
                gid = f"{kind}-{i}"
                label = f"{name}: {len(gpus)} ranks on {len(hosts)} host{'s' if len(hosts) > 1 else ''}"
                titles[gid] = f"{label} ({', '.join(hosts[:8])}{' …' if len(hosts) > 8 else ''})"
                if pts:
                    ax.add_patch(PathPatch(MplPath(pts, codes), fill=False, linestyle=style, edgecolor=palette[i], linewidth=lw,
                                           alpha=0.85, zorder=4, gid=gid))
                if kind == "ring" and i < LEGEND_MAX:
                    handles.append(Line2D([], [], linestyle=style, color=palette[i], linewidth=lw, label=label))
        rings = len(g.ring_groups)
        if rings > LEGEND_MAX:
            handles.append(Line2D([], [], color="none", label=f"… and {rings - LEGEND_MAX} more rings"))
        if handles:
            ax.legend(handles=handles, loc="upper center", bbox_to_anchor=(0.5, 0.0), ncol=min(4, len(handles)), fontsize=7,
                      frameon=False, title=f"{rings} ring{'s' if rings > 1 else ''} (ring attention groups)", title_fontsize=8)

    names, matrix = heat_names(topo, lay)
    by_gpu = len(names) > 0 and topo.kind(names[0]) == "gpu"
    bw = np.array([[np.nan if i == j else matrix[i][j][0] for j in range(len(names))] for i in range(len(names))])
    _heatmap(fig, hm, bw, names, BANDWIDTH, "GB/s (one flow alone)",
             "GPU to GPU bandwidth, one flow alone" if by_gpu else "host to host bandwidth, one flow alone")
    titles["heatmap-bw"] = "single-flow bandwidth: the slowest link between each pair"
    if lm is not None:
        util = np.full((len(names), len(names)), np.nan)
        for (i, j), cell in load_matrix(topo, plan, names).items():
            util[i, j] = cell.worst.busiest.utilisation
        over = int(np.sum(util > 1))
        _heatmap(fig, lm, util, names, LOAD, "% of capacity (ring traffic)",
                 f"load of the ring traffic: {over} cell{'s' if over != 1 else ''} over 100%" if over else "load of the ring traffic: none over 100%")
        for i, j in zip(*np.nonzero(util > 1)):
            lm.add_patch(Rectangle((j - 0.5, i - 0.5), 1, 1, fill=False, edgecolor="#5a0018", linewidth=0.8))
        titles["heatmap-load"] = (f"ring traffic with every ring stepping at once; busiest link on each pair's path, "
                                  f"{over} pair(s) over 100% of capacity")

    text = page_title(topo, plan)
    if plan is not None:
        head, _ = figures(plan.cost, on_gpus)
        shown = " · ".join(str(f) for f in head[:5])
        text += "\n" + (f"predicted for {topo.gpu.name}: {shown}" if on_gpus else f"ranks ran on CPU slots (no GPU predictions) · {shown}")
    fig.suptitle(text, fontsize=10)
    if fmt == "svg":
        buf = io.BytesIO()
        with matplotlib.rc_context({"svg.hashsalt": SVG_SALT}):
            fig.savefig(buf, format="svg", metadata={"Date": None})
        out.write(_svg_titles(buf.getvalue().decode(), titles).encode())
    else:
        fig.savefig(out, format=fmt, dpi=150, metadata={"Software": None} if fmt == "png" else None)


def _heatmap(fig: Figure, ax, values: np.ndarray, names: list[str], scale: Scale, unit: str, heading: str) -> None:
    """One matrix on a fixed colour scale with plain-number ticks on its colour bar."""
    cmap = scale.cmap.with_extremes(bad="#f3f3f3")
    im = ax.imshow(np.ma.masked_invalid(values), cmap=cmap, norm=scale.norm(), interpolation="nearest")
    im.set_gid(f"heatmap-{'bw' if scale is BANDWIDTH else 'load'}")
    step = max(1, len(names) // 16)
    ax.set_xticks(range(0, len(names), step), names[::step], rotation=90, fontsize=6)
    ax.set_yticks(range(0, len(names), step), names[::step], fontsize=6)
    ax.set_title(heading, fontsize=9)
    bar = fig.colorbar(im, ax=ax, shrink=0.8, pad=0.02)
    bar.set_label(unit, fontsize=8)
    bar.ax.yaxis.set_major_locator(FixedLocator(list(scale.ticks)))
    bar.ax.yaxis.set_minor_locator(NullLocator())
    bar.ax.yaxis.set_major_formatter(FuncFormatter(lambda x, _: scale.tick_label(x)))
    bar.ax.tick_params(labelsize=7)


def _svg_titles(svg: str, titles: dict[str, str]) -> str:
    """Give each gid'd artist a ``<title>``, the SVG's hover text: inside the ``<g id=...>``
    matplotlib writes for lines, around the ``<image id=...>`` it writes for heatmaps."""
    if not titles:
        return svg
    ids = "|".join(re.escape(k) for k in titles)

    def tip(key: str) -> str:
        return f"<title>{html.escape(titles[key], quote=False)}</title>"

    svg = re.sub(r'<g id="(' + ids + r')"[^>]*>', lambda m: f"{m.group(0)}\n   {tip(m.group(1))}", svg)
    return re.sub(r'<image [^>]*?id="(' + ids + r')"[^>]*/>', lambda m: f"<g>{tip(m.group(1))}{m.group(0)}</g>", svg)
