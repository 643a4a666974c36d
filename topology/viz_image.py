"""The static drawing (PNG/SVG for reports), with matplotlib, from the same layout as the HTML page.

Left: hosts under their leaf switches, links coloured by bandwidth, rings
as coloured cycles (GPU to GPU up to 64 GPUs, host to host above);
right: the host-to-host bandwidth heatmap with its GB/s colour bar.
"""

from __future__ import annotations

from typing import BinaryIO

from matplotlib.collections import LineCollection
from matplotlib.colors import ListedColormap, LogNorm
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

from topology.model import Topology
from topology.plan import Plan
from topology.viz_layout import (
    CMAP, DIRECT_LINK_HOSTS, cycle_hops, group_colours, host_cycle, host_matrix, layout, rank_table, switch_point, uplink_route,
)


def draw(topo: Topology, plan: Plan | None, out: BinaryIO, fmt: str = "png", show_dp: bool = False) -> None:
    """Render to ``out`` in ``fmt`` (png or svg)."""
    lay = layout(topo)
    ranks = rank_table(topo, plan) if plan else []
    aspect = lay.height / lay.width
    fig = Figure(figsize=(15, max(4.5, 10.5 * aspect)), layout="constrained")
    ax, hm = fig.subplots(1, 2, width_ratios=[2.2, 1])
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
    for s in topo.nodes_of_kind("spine"):
        x, y = lay.points[s]
        ax.add_patch(Rectangle((x - 24, y - 9), 48, 18, color="#4d4d5c", zorder=2))
        ax.text(x, y - 14, s, fontsize=7, ha="center")
    small = lay.detail
    for h, box in lay.hosts.items():
        ax.add_patch(Rectangle((box.x, box.y), box.w, box.h, facecolor="#f7f7f9", edgecolor="#8a8a99", linewidth=0.6, zorder=0.5))
        ax.text(box.x + 4, box.y + 9, h, fontsize=6 if small else 3.5, weight="bold")
    gx = [lay.points[g][0] for g in topo.gpus()]
    gy = [lay.points[g][1] for g in topo.gpus()]
    ax.scatter(gx, gy, marker="s", s=40 if small else 6, facecolor="#fff6d8", edgecolor="#2b2b2b", linewidths=0.5, zorder=3)
    if small:
        for r in ranks:
            x, y = lay.points[r.gpu]
            ax.text(x, y, str(r.rank), fontsize=5, ha="center", va="center", zorder=5)

    if plan is not None:
        g = plan.groups
        kinds = [("ring", g.ring_groups, "-", 1.6)] + ([("dp", g.dp_groups, "--", 0.9)] if show_dp and plan.dp > 1 else [])
        for kind, members, style, lw in kinds:
            palette = group_colours(len(members))
            for i, group in enumerate(members):
                gpus = [ranks[r].gpu for r in group]
                if small:
                    pts = [lay.points[hop.src] for hop in cycle_hops(topo, gpus)] + [lay.points[gpus[0]]]
                else:
                    hosts = host_cycle(topo, gpus)
                    if len(hosts) < 2:
                        continue
                    pts = [lay.hosts[h].anchor(i) for h in hosts + hosts[:1]]
                ax.plot(*zip(*pts), linestyle=style, color=palette[i], linewidth=lw, alpha=0.85, zorder=4)

    hosts = [h for leaf in lay.leaf_hosts.values() for h in leaf]
    names = topo.gpus(hosts[0]) if len(hosts) == 1 else hosts
    m = [[bw for bw, _ in row] for row in host_matrix(topo, hosts)]
    masked = [[x if x > 0 else float("nan") for x in row] for row in m]
    # The links' scale, so a colour means the same GB/s on both sides of the figure.
    cmap = ListedColormap([CMAP(0.85 * i / 255) for i in range(256)])
    hi = lay.bw_max if lay.bw_max > lay.bw_min else lay.bw_min * 1.01
    im = hm.imshow(masked, cmap=cmap, norm=LogNorm(vmin=lay.bw_min, vmax=hi, clip=True))
    step = max(1, len(names) // 16)
    hm.set_xticks(range(0, len(names), step), names[::step], rotation=90, fontsize=6)
    hm.set_yticks(range(0, len(names), step), names[::step], fontsize=6)
    hm.set_title("GPU to GPU bandwidth" if len(hosts) == 1 else "host to host bandwidth", fontsize=9)
    fig.colorbar(im, ax=hm, shrink=0.6, label="GB/s (one flow alone)")

    title = f"{topo.name}: {len(topo.hosts)} hosts, {topo.num_gpus} GPUs"
    if plan is not None:
        title += f" | plan {plan.strategy}: dp {plan.dp} x ring {plan.ring} x ulysses {plan.ulysses}, {len(plan.groups.ring_groups)} rings"
        if "step_time_s" in plan.cost:
            title += f" | step {plan.cost['step_time_s']:.3g} s"
    fig.suptitle(title, fontsize=10)
    fig.savefig(out, format=fmt, dpi=150)
