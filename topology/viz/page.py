"""Draw a topology and a plan's rings: one offline HTML page, or a PNG/SVG for reports.

    ringleader viz g6e-4x --plan plan.json -o rings.html
    ringleader viz leafspine-64x-2to1 --plan plan.json --dp -o rings.png

The page shows hosts grouped under their leaf switches with their GPUs and
PCIe parts, links coloured and sized by bandwidth, each ring as its own
coloured cycle, data-parallel groups on demand and a host-to-host bandwidth
heatmap. Everything hoverable carries its figures in an SVG ``<title>``.
Above 64 GPUs rings are drawn host to host (a host's GPU-level segments
appear when it is clicked), so 512 GPUs stay readable.

Stable hooks for tests and scripts: ``g.host[data-host]``, ``g.gpu[data-rank]``,
``g.ring[data-ring]``, ``g.dp[data-dp]``, ``rect.cell`` in ``svg#heatmap``.
"""

from __future__ import annotations

import html
import io
import os
from pathlib import Path

from topology.viz.colour_scale import BANDWIDTH, LOAD, Scale
from topology.errors import ConfigError
from topology.network.load import LinkLoad, link_loads, ring_flows
from topology.files import write_atomic
from topology.network.model import Topology
from topology.planning.plan import Plan
from topology.viz.figures import Figure, figures
from topology.viz.layout import (
    DIRECT_LINK_HOSTS, Layout, RankInfo, bend_point, cycle_hops, group_colours, heat_names, host_cycle, layout, load_matrix, rank_table,
    natural_key, switch_point, uplink_route,
)

TEMPLATE = Path(__file__).with_name("template.html")
_PART_LABEL = {"pcie": "sw", "socket": "cpu", "nic": "nic"}


def render_html(topo: Topology, plan: Plan | None = None, show_dp: bool = False, on_gpus: bool = True) -> str:
    """The self-contained page (inline SVG, CSS and JS; no network needed to view it).

    ``on_gpus=False``: the ranks run on CPU slots, so the plan's GPU predictions are left out.
    """
    lay = layout(topo)
    ranks = rank_table(topo, plan) if plan else []
    groups = _groups(topo, lay, plan, ranks)
    loads = _undirected(link_loads(topo, ring_flows(plan, topo))) if plan else {}
    svg = _topology_svg(topo, lay, ranks, groups, loads)
    names, matrix = heat_names(topo, lay)
    heat_svg = _heatmap_svg(topo, names, matrix)
    load_svg, load_note = _load_heatmap_svg(topo, plan, names, loads)
    level = "gpus" if lay.detail else "hosts"
    load_legend = f"<h2>Ring load (% of a link's capacity)</h2>{_scale_legend(LOAD, 'load')}" if plan else ""
    page = TEMPLATE.read_text()
    for key, value in {
        "TITLE": html.escape(title(topo, plan)), "FIGURES": _figures(topo, plan, on_gpus),
        "BW_LEGEND": _scale_legend(BANDWIDTH, "bw"), "LOAD_LEGEND": load_legend, "GROUP_LEGEND": _group_legend(groups),
        "LEVEL": level, "VIZ_CLASS": f"level-{level}" + (" show-dp" if show_dp else ""), "TOPOLOGY_SVG": svg,
        "HEATMAP_SVG": heat_svg, "HEATMAP_NOTE": html.escape(_heat_note(names, topo)),
        "LOAD_SVG": load_svg, "LOAD_NOTE": load_note,
    }.items():
        page = page.replace(f"<!--{key}-->", value)
    return page


def title(topo: Topology, plan: Plan | None) -> str:
    """The picture's one-line title: cluster and plan shape."""
    text = f"{topo.name}: {_count(len(topo.hosts), 'host')}, {_count(topo.num_gpus, 'GPU')}"
    if plan:
        text += (f" · plan {plan.strategy}: {_count(len(plan.groups.ring_groups), 'ring')}, dp {plan.dp} × ring {plan.ring}"
                 f" × ulysses {plan.ulysses}, {plan.seq_len:,} tokens")
    return text


def _count(n: int, noun: str) -> str:
    return f"{n:,} {noun}{'' if n == 1 else 's'}"


def render_image(topo: Topology, plan: Plan | None, path: str | os.PathLike, show_dp: bool = False, on_gpus: bool = True) -> None:
    """A static PNG or SVG (by suffix) of the same drawing, via matplotlib, written atomically."""
    from topology.viz.image import draw

    suffix = Path(path).suffix.lower()
    if suffix not in (".png", ".svg"):
        raise ConfigError(f"{path}: image output must end in .png or .svg")
    buf = io.BytesIO()
    draw(topo, plan, buf, fmt=suffix[1:], show_dp=show_dp, on_gpus=on_gpus)
    write_atomic(path, buf.getvalue())


def save(topo: Topology, plan: Plan | None, path: str | os.PathLike, show_dp: bool = False, on_gpus: bool = True) -> None:
    """Write the drawing to ``path``: ``.html`` page or ``.png``/``.svg`` image, atomically."""
    suffix = Path(path).suffix.lower()
    if suffix == ".html":
        write_atomic(path, render_html(topo, plan, show_dp, on_gpus))
    elif suffix in (".png", ".svg"):
        render_image(topo, plan, path, show_dp, on_gpus)
    else:
        raise ConfigError(f"{path}: output must end in .html, .png or .svg")


# ------------------------------------------------------------------ groups
class Group:
    """A ring or a DP group as drawn: its GPUs in order, their hops and the hosts visited."""

    def __init__(self, kind: str, index: int, ranks: list[int], infos: list[RankInfo], topo: Topology):
        self.kind, self.index, self.ranks, self.colour = kind, index, ranks, "#000000"
        self.gpus = [infos[r].gpu for r in ranks]
        self.hops = cycle_hops(topo, self.gpus)
        self.hosts = host_cycle(topo, self.gpus)
        self.slowest = min(self.hops, key=lambda h: h.bw) if self.hops else None

    def summary(self) -> str:
        name = "ring" if self.kind == "ring" else "DP group"
        text = f"{name} {self.index}: ranks {_span(self.ranks)} on {len(self.hosts)} host(s) ({' '.join(self.hosts[:8])}{' …' if len(self.hosts) > 8 else ''})"
        if self.slowest:
            s = self.slowest
            text += f"\nslowest hop {s.bw:.1f} GB/s, {s.lat:.1f} µs ({s.src} → {s.dst})"
        return text


def _groups(topo: Topology, lay: Layout, plan: Plan | None, ranks: list[RankInfo]) -> dict[str, list[Group]]:
    if plan is None:
        return {"ring": [], "dp": []}
    g = plan.groups
    out = {"ring": [Group("ring", i, r, ranks, topo) for i, r in enumerate(g.ring_groups)],
           "dp": [Group("dp", i, r, ranks, topo) for i, r in enumerate(g.dp_groups)] if plan.dp > 1 else []}
    for members in out.values():
        for grp, colour in zip(members, group_colours(lay, [grp.hosts for grp in members])):
            grp.colour = colour
    return out


# ------------------------------------------------------------------ topology
def _topology_svg(topo: Topology, lay: Layout, ranks: list[RankInfo], groups: dict[str, list[Group]],
                  loads: dict[frozenset, LinkLoad]) -> str:
    by_gpu = {r.gpu: r for r in ranks}
    rings_on: dict[str, set[int]] = {}
    for grp in groups["ring"]:
        for gpu in grp.gpus:
            rings_on.setdefault(topo.host_of(gpu), set()).add(grp.index)
    # Small clusters are drawn larger; every drawing shrinks to the window if it must.
    scale = min(3.0, max(1.0, 1100.0 / lay.width))
    out = [f'<svg id="topology" xmlns="http://www.w3.org/2000/svg" width="100%" style="max-width:{lay.width * scale:.0f}px" '
           f'viewBox="0 0 {lay.width:.0f} {lay.height:.0f}">']
    out += _network_links(topo, lay, loads)
    for leaf, bar in lay.leaves.items():
        if not leaf:
            continue  # hosts under no switch: no bar to draw
        out.append(f'<g class="leaf" data-leaf="{_a(leaf)}"><title>{_t(f"leaf switch {leaf}: {len(lay.leaf_hosts[leaf])} hosts")}</title>'
                   f'<rect class="leaf-bar" x="{bar.x:.1f}" y="{bar.y:.1f}" width="{bar.w:.1f}" height="{bar.h:.1f}" rx="2"/>'
                   f'<text class="leaf-name" x="{bar.x:.1f}" y="{bar.y + bar.h + 13:.1f}">{_t(leaf)}</text></g>')
    for s, b in lay.nvswitches.items():
        linked = sorted({topo.host_of(v) for v in topo.graph.neighbors(s)}, key=natural_key)
        tip = f"NVLink switch {s}: GPUs of {len(linked)} hosts ({', '.join(linked)})"
        out.append(f'<g class="switch nvswitch" data-switch="{_a(s)}"><title>{_t(tip)}</title>'
                   f'<rect class="nvswitch" x="{b.x:.1f}" y="{b.y:.1f}" width="{b.w:.1f}" height="{b.h:.1f}" rx="3"/>'
                   f'<text class="nvswitch-name" x="{b.cx:.1f}" y="{b.cy + 0.5:.1f}">{_t(s)}</text></g>')
    for s in topo.nodes_of_kind("spine"):
        x, y = lay.points[s]
        out.append(f'<g class="switch"><title>{_t(f"spine switch {s}")}</title><rect class="spine" x="{x - 24:.1f}" y="{y - 9:.1f}" width="48" height="18" rx="3"/>'
                   f'<text class="switch-name" x="{x - 24:.1f}" y="{y - 13:.1f}">{_t(s)}</text></g>')
    for h, box in lay.hosts.items():
        out += _host_svg(topo, lay, h, box, by_gpu, rings_on.get(h, set()), loads)
    for kind in ("ring", "dp"):
        out.append(f'<g class="{kind}s">')
        out += [_group_svg(topo, lay, grp) for grp in groups[kind]]
        out.append("</g>")
    out.append("</svg>")
    return "\n".join(out)


def _host_svg(topo: Topology, lay: Layout, h: str, box, by_gpu: dict[str, RankInfo], rings: set[int],
              loads: dict[frozenset, LinkLoad]) -> list[str]:
    data = topo.graph.nodes[h]
    gpus = topo.gpus(h)
    host_ranks = sorted(by_gpu[g].rank for g in gpus if g in by_gpu)
    tip = [f"host {h}", f"leaf {topo.leaf_of(h) or '-'}", f"{len(gpus)} GPUs"]
    tip += [f"{k} {data[k]}" for k in ("ip", "node_id") if data.get(k)]
    if host_ranks:
        tip.append(f"ranks {_span(host_ranks)}; {len(rings)} ring(s): {', '.join(map(str, sorted(rings)))}")
    out = [f'<g class="host" data-host="{_a(h)}" data-rings="{len(rings)}">',
           f'<rect class="host-box" x="{box.x:.1f}" y="{box.y:.1f}" width="{box.w:.1f}" height="{box.h:.1f}" rx="4"><title>{_t(chr(10).join(tip))}</title></rect>',
           f'<text class="host-name" x="{box.x + 5:.1f}" y="{box.y + 11:.1f}">{_t(h)}</text>']
    if rings:
        out.append(f'<text class="badge" x="{box.x + box.w - 5:.1f}" y="{box.y + 11:.1f}" text-anchor="end">{len(rings)} ring{"s" if len(rings) > 1 else ""}</text>')
    for u, v, d in topo.graph.edges(data=True):
        if topo.graph.nodes[u].get("host") == h and topo.graph.nodes[v].get("host") == h:
            out.append(_link(lay, u, v, d, _curve(lay.points[u], lay.points[v], 0.25 if topo.kind(u) == topo.kind(v) == "gpu" else 0.0, 14),
                             load=loads.get(frozenset((u, v)))))
    for n, nd in topo.graph.nodes(data=True):
        if nd.get("host") == h and nd["kind"] != "gpu":
            x, y = lay.points[n]
            out.append(f'<g class="part {nd["kind"]}"><title>{_t(n + " (" + nd["kind"] + ")")}</title>'
                       f'<rect x="{x - 8:.1f}" y="{y - 4:.1f}" width="16" height="8" rx="1.5"/>'
                       f'<text x="{x:.1f}" y="{y + 0.3:.1f}">{_PART_LABEL.get(nd["kind"], nd["kind"])}</text></g>')
    for g in gpus:
        x, y = lay.points[g]
        info = by_gpu.get(g)
        attrs = f' data-rank="{info.rank}" data-ring="{info.ring}" data-dp="{info.dp}"' if info else ""
        tip = f"{g}: host {h}, CUDA index {topo.graph.nodes[g]['index']}, {topo.gpu.name}"
        if info:
            tip += f"\nrank {info.rank}, ring {info.ring} (position {info.ring_pos}), DP group {info.dp}, ulysses group {info.ulysses}"
        out.append(f'<g class="gpu{" placed" if info else ""}" data-gpu="{_a(g)}"{attrs}><title>{_t(tip)}</title>'
                   f'<rect x="{x - 8:.1f}" y="{y - 8:.1f}" width="16" height="16" rx="2"/>'
                   f'<text x="{x:.1f}" y="{y:.1f}">{info.rank if info else ""}</text></g>')
    out.append("</g>")
    return out


def _network_links(topo: Topology, lay: Layout, loads: dict[frozenset, LinkLoad]) -> list[str]:
    """Host-to-switch, switch-to-switch and (measured) host-to-host links."""
    out = ['<g class="links">']
    for u, v, d in topo.graph.edges(data=True):
        hu, hv = topo.graph.nodes[u].get("host"), topo.graph.nodes[v].get("host")
        if hu and hu == hv:
            continue  # drawn inside the host
        if hu and hv:
            if len(topo.hosts) <= DIRECT_LINK_HOSTS:
                out.append(_link(lay, u, v, d, _curve(lay.points[u], lay.points[v], -0.2, 60), load=loads.get(frozenset((u, v)))))
            continue
        part, switch = (u, v) if hu else (v, u)
        if hu or hv:
            out.append(_link(lay, part, switch, d, _polyline(uplink_route(lay, topo.host_of(part), part, switch)), "uplink",
                             loads.get(frozenset((u, v)))))
        else:
            a, b = switch_point(lay, u), switch_point(lay, v)
            if a and b:
                out.append(_link(lay, u, v, d, _polyline([a, b]), load=loads.get(frozenset((u, v)))))
    out.append("</g>")
    return out


def _polyline(points: list[tuple[float, float]]) -> str:
    return "M" + " L".join(f"{x:.1f},{y:.1f}" for x, y in points)


def _link(lay: Layout, u: str, v: str, d: dict, path: str, kind: str = "", load: LinkLoad | None = None) -> str:
    bw = d["bw_gbps"]
    unbounded = bw >= lay.bw_cap
    tip = f"{u} — {v}: " + ("not a bottleneck (stands for a path that never limits)" if unbounded else f"{bw:.1f} GB/s, {d['lat_us']:.1f} µs")
    over = load is not None and load.utilisation > 1
    cls = " ".join(c for c in ("link", kind, "unbounded" if unbounded else "", "over" if over else "") if c)
    extra = ""
    if load is not None:
        tip += f"\nring traffic {load.src} → {load.dst}: {load_text(load)}"
        extra = f' data-util="{load.utilisation:.3g}" style="--load:{LOAD.colour(load.utilisation)}"'
    return (f'<path class="{cls}" data-bw="{bw:g}"{extra} d="{path}" '
            f'stroke="{lay.colour(bw)}" stroke-width="{lay.stroke(bw)}"><title>{_t(tip)}</title></path>')


def load_text(load: LinkLoad) -> str:
    """"8 flows want 100 GB/s of 50 GB/s: 200%, each gets 6.25"."""
    share = load.bw_gbps / load.flows
    return (f"{load.flows} flow{'s want' if load.flows > 1 else ' wants'} {load.demand_gbps:.3g} GB/s of {load.bw_gbps:.3g} GB/s: "
            f"{load.utilisation:.0%}" + (f", each gets {share:.3g} GB/s" if load.utilisation > 1 else ""))


def _undirected(loads: dict[tuple[str, str], LinkLoad]) -> dict[frozenset, LinkLoad]:
    """Per link, the busier of its two directions (what a drawn line shows)."""
    out: dict[frozenset, LinkLoad] = {}
    for (u, v), load in loads.items():
        key = frozenset((u, v))
        if key not in out or load.utilisation > out[key].utilisation:
            out[key] = load
    return out


def _group_svg(topo: Topology, lay: Layout, grp: Group) -> str:
    k = grp.kind
    parts = [f'<g class="{k}" data-{k}="{grp.index}" data-hosts="{len(grp.hosts)}" style="--c:{grp.colour}"><title>{_t(grp.summary())}</title>']
    if len(grp.hosts) > 1:
        pts = [lay.hosts[h].anchor(grp.index) for h in grp.hosts]
        d = f"M{pts[0][0]:.1f},{pts[0][1]:.1f} " + " ".join(_curve(a, b, 0.12, 40, move=False) for a, b in zip(pts, pts[1:] + pts[:1]))
        parts.append(f'<path class="{k}-hosts" d="{d}"/>')
    local: dict[str, list[str]] = {}
    cross = []
    for hop in grp.hops:
        ha, hb = topo.host_of(hop.src), topo.host_of(hop.dst)
        seg = _curve(lay.points[hop.src], lay.points[hop.dst], 0.45, 16 if ha == hb else 50)
        (local.setdefault(ha, []) if ha == hb else cross).append(seg)
    for h, segs in local.items():
        parts.append(f'<path class="{k}-local" data-local-host="{_a(h)}" d="{" ".join(segs)}"/>')
    if cross:
        parts.append(f'<path class="{k}-cross" d="{" ".join(cross)}"/>')
    parts.append("</g>")
    return "".join(parts)


def _curve(a: tuple[float, float], b: tuple[float, float], bend: float, cap: float, move: bool = True) -> str:
    """SVG path data of the curve ``bend_point`` describes."""
    cx, cy = bend_point(a, b, bend, cap)
    head = f"M{a[0]:.1f},{a[1]:.1f} " if move else ""
    return f"{head}Q{cx:.1f},{cy:.1f} {b[0]:.1f},{b[1]:.1f}"


# ------------------------------------------------------------------ heatmaps
def _heat_note(names: list[str], topo: Topology) -> str:
    if not names:
        return "no hosts"
    return ((f"GPU to GPU inside {topo.host_of(names[0])} (one host)" if topo.kind(names[0]) == "gpu" else "host to host, hosts in drawing order")
            + ": the bandwidth one flow gets alone (its slowest link). Hover a cell for GB/s and latency.")


def _matrix_svg(svg_id: str, names: list[str], cell_of) -> str:
    """A square heatmap; ``cell_of(i, j)`` gives (fill, tooltip, extra attributes) of one cell."""
    n = len(names)
    if not n:
        return ""
    cell = max(5.0, min(36.0, 560.0 / n))
    left = 8 + 6 * max(len(s) for s in names)
    size = left + n * cell + 10
    out = [f'<svg id="{svg_id}" class="heat" xmlns="http://www.w3.org/2000/svg" width="{size:.0f}" height="{size:.0f}" viewBox="0 0 {size:.0f} {size:.0f}">']
    for i, name in enumerate(names):
        y = left + i * cell
        out.append(f'<text class="heat-label" x="{left - 3:.1f}" y="{y + cell * 0.7:.1f}" text-anchor="end">{_t(name)}</text>')
        out.append(f'<text class="heat-label" transform="translate({left + i * cell + cell * 0.7:.1f},{left - 3:.1f}) rotate(-90)">{_t(name)}</text>')
        for j in range(n):
            fill, tip, attrs = cell_of(i, j)
            title = f"<title>{_t(tip)}</title>" if tip else ""
            out.append(f'<rect class="cell{attrs.pop("class", "")}" data-a="{_a(names[i])}" data-b="{_a(names[j])}"'
                       + "".join(f' {k}="{_a(v)}"' for k, v in attrs.items())
                       + f' x="{left + j * cell:.1f}" y="{y:.1f}" width="{cell:.1f}" height="{cell:.1f}" fill="{fill}">{title}</rect>')
    out.append("</svg>")
    return "\n".join(out)


def _heatmap_svg(topo: Topology, names: list[str], m: list[list[tuple[float, float]]]) -> str:
    def cell(i: int, j: int):
        if i == j:
            return "#eeeeee", names[i], {}
        bw, lat = m[i][j]
        return BANDWIDTH.colour(bw), f"{names[i]} → {names[j]}: {bw:.1f} GB/s, {lat:.1f} µs", {"data-bw": f"{bw:g}"}

    return _matrix_svg("heatmap", names, cell)


def _load_heatmap_svg(topo: Topology, plan: Plan | None, names: list[str], loads: dict[frozenset, LinkLoad]) -> tuple[str, str]:
    """The ring traffic's load per cell, and a note naming the busiest link."""
    if plan is None or not names:
        return "", "no plan: give --plan to see the load of its ring traffic"
    cells = load_matrix(topo, plan, names)

    def cell(i: int, j: int):
        pair = cells.get((i, j))
        if pair is None:
            return NO_TRAFFIC, "", {}  # no ring traffic: nothing to hover (keeps a 64-host page small)
        w = pair.worst
        tip = (f"{names[i]} → {names[j]}: {pair.flows} ring flow{'s' if pair.flows > 1 else ''}, each {w.alone_gbps:.3g} GB/s alone, "
               f"{w.rate_gbps:.3g} GB/s with all rings running\nbusiest link {w.busiest.src} → {w.busiest.dst}: {load_text(w.busiest)}")
        attrs = {"data-util": f"{w.busiest.utilisation:.3g}", "class": " over" if w.busiest.utilisation > 1 else ""}
        return LOAD.colour(w.busiest.utilisation), tip, attrs

    svg = _matrix_svg("load-heatmap", names, cell)
    if not loads:
        return svg, "rings of one rank: no ring traffic"
    top = max(loads.values(), key=lambda l: l.utilisation)
    over = sum(l.utilisation > 1 for l in loads.values())
    note = (f"every ring stepping at once: each cell is the busiest link its ring flows cross. Busiest: {_t(top.src)} → {_t(top.dst)}, "
            f"{_t(load_text(top))}. ")
    note += (f'<b class="over-count">{over} link{"s" if over > 1 else ""} oversubscribed</b> (outlined): their flows get less than alone.'
             if over else "No link is oversubscribed: every flow gets its single-flow rate.")
    return svg, note


NO_TRAFFIC = "#f3f3f3"


# ------------------------------------------------------------------ side panel
def _scale_legend(scale: Scale, key: str) -> str:
    """A colour bar with plain tick labels, inset so the end labels are not clipped."""
    width, x0 = 236, 16
    stops = "".join(f'<stop offset="{f:.3f}" stop-color="{c}"/>' for f, c in scale.gradient())
    ticks = "".join(f'<text x="{x0 + width * scale.level(t):.1f}" y="32" text-anchor="middle">{scale.tick_label(t)}</text>'
                    f'<line x1="{x0 + width * scale.level(t):.1f}" x2="{x0 + width * scale.level(t):.1f}" y1="18" y2="22" stroke="#444"/>'
                    for t in scale.ticks)
    svg = (f'<svg id="{key}-legend" class="scale-legend" width="{width + 2 * x0}" height="38"><defs><linearGradient id="{key}grad">{stops}'
           f'</linearGradient></defs><rect x="{x0}" y="4" width="{width}" height="14" fill="url(#{key}grad)"/>{ticks}</svg>')
    if scale is BANDWIDTH:
        return svg + '<div class="note">log scale, the same in every picture; dashed grey = never limits</div>'
    return svg + '<div class="note">demand of the ring flows over capacity: above 100% a link holds its flows back</div>'


def _group_legend(groups: dict[str, list[Group]]) -> str:
    out = []
    for kind, heading in (("ring", "Rings"), ("dp", "Data-parallel groups")):
        if not groups[kind]:
            continue
        out.append(f'<h2>{heading} ({len(groups[kind])}) <span class="hint">click to focus</span></h2><ul class="ring-keys">')
        for g in groups[kind]:
            hop = f' · <span title="slowest hop">{g.slowest.bw:.3g} GB/s</span>' if g.slowest else ""
            name = f'{"ring" if kind == "ring" else "DP"} {g.index}'
            out.append(f'<li class="ring-key" data-kind="{kind}" data-index="{g.index}"><span class="swatch" style="background:{g.colour}"></span>'
                       f'<b>{name}</b> · {len(g.ranks)} ranks · {_count(len(g.hosts), "host")}{hop}</li>')
        out.append("</ul>")
    return "\n".join(out)


def _figures(topo: Topology, plan: Plan | None, on_gpus: bool) -> str:
    if plan is None:
        return '<span class="note">no plan: topology only (give --plan to draw rings)</span>'
    head, rest = figures(plan.cost, on_gpus)
    lead = (f'<span class="note">predicted for {_t(topo.gpu.name)}:</span>' if on_gpus else
            '<span class="note">ranks ran on CPU slots: no GPU predictions; network figures only</span>')
    out = lead + "".join(f'<span data-key="{_a(f.key)}">{_figure(f)}</span>' for f in head)
    if rest:
        out += f'<details><summary>all figures</summary>{"".join(f"<span>{_figure(f)}</span>" for f in rest)}</details>'
    return out if head or rest else '<span class="note">plan has no cost figures</span>'


def _figure(f: Figure) -> str:
    return f"{_t(f.label)} <b>{_t(f.text)}</b>" if f.label else f"<b>{_t(f.text)}</b>"


def _span(ranks: list[int]) -> str:
    if ranks and ranks == list(range(ranks[0], ranks[0] + len(ranks))):
        return f"{ranks[0]}–{ranks[-1]}" if len(ranks) > 1 else str(ranks[0])
    return ", ".join(map(str, ranks[:12])) + (" …" if len(ranks) > 12 else "")


def _t(text: str) -> str:
    return html.escape(str(text), quote=False)


def _a(text: str) -> str:
    return html.escape(str(text), quote=True)
