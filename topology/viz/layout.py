"""Where everything goes in a topology drawing, shared by the HTML and the matplotlib renderers.

The picture is a rack diagram: each leaf switch is a bar with its hosts in
rows above it (at most ``HOSTS_PER_ROW`` a row), spines in a column to the
right, and inside each host its GPUs on top with the PCIe switches, sockets
and NICs below them. NVLink switches (``nvswitch``: GPUs of several hosts
link to them directly, they carry no network traffic) are a layer of their
own, a band of switch boxes above every host, one group per NVLink domain. Coordinates are SVG pixels (y grows downwards).

The figures drawn (bandwidth per link, per ring hop, host to host) are
computed here too, so both renderers show the same numbers.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

import networkx as nx

from topology.viz.colour_scale import BANDWIDTH, UNBOUNDED_COLOUR, bandwidth_stroke, distinct_colours
from topology.errors import ConfigError
from topology.network.load import FlowLoad, flow_loads, ring_flows
from topology.network.model import Topology
from topology.planning.plan import Plan
from topology.network.routing import NVLINK_KIND

GPU = 16.0
"""Side of a GPU square."""
PITCH = 20.0
HOSTS_PER_ROW = 8
PAD = 6.0
HOST_H = 86.0
ROW_GAP = 14.0
LEAF_BAR = 10.0
LEAF_GAP = 34.0
MARGIN = 20.0
NVLINK_BAND = 44.0
"""Height of the band of NVLink switches above the hosts (boxes, then room for GPU links to fan out)."""
NVLINK_BOX = (64.0, 16.0)
PART_ROWS = {"pcie": 1, "socket": 2, "nic": 2}
"""Row inside a host (0 is the GPUs) for each other kind of part."""
DETAIL_MAX_GPUS = 64
"""Above this many GPUs rings are drawn host to host; GPU-level detail appears per host on demand."""
DIRECT_LINK_HOSTS = 16
"""Measured host-to-host links are drawn up to this many hosts; beyond, the heatmap shows them."""
UNBOUNDED = 100.0
"""A link this many times faster than the next slower speed stands for "never limits" (a measured profile's GPU-NIC ties)."""


@dataclass
class Box:
    x: float
    y: float
    w: float
    h: float

    @property
    def cx(self) -> float:
        return self.x + self.w / 2

    @property
    def cy(self) -> float:
        return self.y + self.h / 2

    def anchor(self, index: int) -> tuple[float, float]:
        """Where host-to-host cycle ``index`` passes through this box: below the GPU row, so the
        GPUs stay in reach of the pointer, each cycle a little offset so cycles sharing hosts part."""
        off = ((index % 7) - 3) * 3.0
        return self.cx + off, self.y + self.h * 0.72 + off


@dataclass
class Layout:
    """Positions of every drawn node plus the scales that colour links."""

    leaves: dict[str, Box] = field(default_factory=dict)
    """Leaf name (or "" for hosts under no switch) -> its bar."""
    nvswitches: dict[str, Box] = field(default_factory=dict)
    """NVLink switch -> its box in the band above the hosts (empty without NVLink switches)."""
    leaf_hosts: dict[str, list[str]] = field(default_factory=dict)
    hosts: dict[str, Box] = field(default_factory=dict)
    points: dict[str, tuple[float, float]] = field(default_factory=dict)
    """Centre of every node inside a host, and of every spine."""
    width: float = 0.0
    height: float = 0.0
    detail: bool = True
    bw_cap: float = math.inf
    """Links at or above this are drawn as "never limits" and left out of the scale."""

    def colour(self, bw: float) -> str:
        """Bandwidth colour on the fixed scale every picture shares (grey: never limits)."""
        return UNBOUNDED_COLOUR if bw >= self.bw_cap else BANDWIDTH.colour(bw)

    def stroke(self, bw: float) -> float:
        return 0.8 if bw >= self.bw_cap else bandwidth_stroke(bw)

    def rows(self) -> dict[str, int]:
        """Each host's drawing row, counted from the top over all leaves."""
        tops = sorted({round(b.y) for b in self.hosts.values()})
        return {h: tops.index(round(b.y)) for h, b in self.hosts.items()}


def natural_key(name: str) -> list:
    """h2 before h10."""
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


def layout(topo: Topology) -> Layout:
    """Place leaves, hosts and their parts; choose detail or overview by cluster size."""
    out = Layout(detail=topo.num_gpus <= DETAIL_MAX_GPUS)
    groups: dict[str, list[str]] = {}
    for h in topo.hosts:
        groups.setdefault(topo.leaf_of(h) or "", []).append(h)
    cols = max(4, max((len(topo.gpus(h)) for h in topo.hosts), default=1))
    cols = min(cols, 8)
    host_w = 2 * PAD + cols * PITCH
    nvswitches = _nvlink_domains(topo)
    y = MARGIN + (NVLINK_BAND if nvswitches else 0.0)
    for leaf in sorted(groups, key=natural_key):
        hosts = sorted(groups[leaf], key=natural_key)
        out.leaf_hosts[leaf] = hosts
        for i, h in enumerate(hosts):
            r, c = divmod(i, HOSTS_PER_ROW)
            out.hosts[h] = Box(MARGIN + c * (host_w + ROW_GAP), y + r * (HOST_H + ROW_GAP), host_w, HOST_H)
            _place_parts(topo, h, out.hosts[h], cols, out.points)
        rows = math.ceil(len(hosts) / HOSTS_PER_ROW)
        bar_w = min(len(hosts), HOSTS_PER_ROW) * (host_w + ROW_GAP) - ROW_GAP
        y += rows * (HOST_H + ROW_GAP)
        out.leaves[leaf] = Box(MARGIN, y, bar_w, LEAF_BAR)
        y += LEAF_BAR + LEAF_GAP
    right = max((b.x + b.w for b in out.leaves.values()), default=MARGIN)
    box_w, box_h = NVLINK_BOX
    x = MARGIN
    for domain in nvswitches:
        for sw in domain:
            out.nvswitches[sw] = Box(x, MARGIN, box_w, box_h)
            out.points[sw] = (x + box_w / 2, MARGIN + box_h)
            x += box_w + 6
        x += ROW_GAP
    right = max(right, x - ROW_GAP - 6)
    spines = sorted(topo.nodes_of_kind("spine"), key=natural_key)
    for i, s in enumerate(spines):
        out.points[s] = (right + 90, MARGIN + (y - MARGIN) * (i + 1) / (len(spines) + 1))
    out.width = right + (150 if spines else MARGIN)
    out.height = y
    speeds = sorted({d["bw_gbps"] for _, _, d in topo.graph.edges(data=True)})
    if speeds:
        # Real link speeds sit within a few x of each other; a 100x jump marks the stand-ins above it.
        out.bw_cap = next((b for a, b in zip(speeds, speeds[1:]) if b >= UNBOUNDED * a), math.inf)
    return out


def _nvlink_domains(topo: Topology) -> list[list[str]]:
    """NVLink switches grouped by the hosts they link (one NVLink domain a group), in name order."""
    by_hosts: dict[frozenset, list[str]] = {}
    for s in sorted(topo.nodes_of_kind(NVLINK_KIND), key=natural_key):
        hosts = frozenset(topo.graph.nodes[v].get("host") for v in topo.graph.neighbors(s))
        by_hosts.setdefault(hosts, []).append(s)
    return list(by_hosts.values())


def _place_parts(topo: Topology, host: str, box: Box, cols: int, points: dict[str, tuple[float, float]]) -> None:
    gpus = topo.gpus(host)
    rows_of_gpus = math.ceil(len(gpus) / cols) if gpus else 1
    for i, g in enumerate(gpus):
        r, c = divmod(i, cols)
        points[g] = (box.x + PAD + c * PITCH + PITCH / 2, box.y + 16 + r * PITCH + PITCH / 2)
    base = box.y + 16 + rows_of_gpus * PITCH
    parts: dict[int, list[str]] = {}
    for n, data in topo.graph.nodes(data=True):
        if data.get("host") == host and data["kind"] != "gpu":
            parts.setdefault(PART_ROWS.get(data["kind"], 2), []).append(n)
    room = int((box.w - 2 * PAD - 16) // 22) + 1
    if len(parts.get(2, [])) > room:  # NICs beside the sockets would not fit: a row of their own
        parts[3] = [n for n in parts[2] if topo.kind(n) == "nic"]
        parts[2] = [n for n in parts[2] if topo.kind(n) != "nic"]
    for row in sorted(parts):
        nodes = sorted(parts[row], key=lambda n: (topo.kind(n) == "nic", topo.graph.nodes[n].get("index", 0), n))
        y = base + (row - 0.5) * 16
        # Each part sits under the mean of its already-placed neighbours, then parts are spread apart.
        want = []
        for i, n in enumerate(nodes):
            xs = [points[m][0] for m in topo.graph.neighbors(n) if m in points and points[m][1] < y]
            want.append(sum(xs) / len(xs) if xs else box.x + box.w * (i + 1) / (len(nodes) + 1))
        order = sorted(range(len(nodes)), key=lambda i: want[i])
        lo, hi, gap = box.x + PAD + 8, box.x + box.w - PAD - 8, 22.0
        xs_placed: list[float] = []
        for i in order:
            x = max(want[i], lo, (xs_placed[-1] + gap) if xs_placed else lo)
            xs_placed.append(x)
        shift = max(0.0, xs_placed[-1] - hi) if xs_placed else 0.0
        for i, x in zip(order, xs_placed):
            points[nodes[i]] = (x - shift, y)


def bend_point(a: tuple[float, float], b: tuple[float, float], bend: float, cap: float) -> tuple[float, float]:
    """Control point of a quadratic curve from a to b bowed sideways by ``bend`` x its length
    (at most ``cap``), so a hop and its way back, or hops along one row of GPUs, do not lie
    on top of each other."""
    (x1, y1), (x2, y2) = a, b
    dx, dy = x2 - x1, y2 - y1
    dist = (dx * dx + dy * dy) ** 0.5 or 1.0
    off = max(-cap, min(cap, bend * dist))
    return (x1 + x2) / 2 - dy / dist * off, (y1 + y2) / 2 + dx / dist * off


def uplink_route(lay: Layout, host: str, part: str, switch: str) -> list[tuple[float, float]]:
    """From a NIC down to its leaf bar; from an upper row, down the gap right of the host,
    so no uplink crosses a host below it."""
    x, y = lay.points[part]
    box = lay.hosts[host]
    if switch in lay.nvswitches:  # up to the NVLink band, by the gap left of the host past any host above
        top = lay.nvswitches[switch].y + lay.nvswitches[switch].h
        if box.y - top <= NVLINK_BAND:
            return [(x, y), (x, box.y - 3), lay.points[switch]]
        gx = box.x - ROW_GAP / 2
        return [(x, y), (x, box.y - 3), (gx, box.y - 3), (gx, top + 6), lay.points[switch]]
    bar = lay.leaves.get(switch)
    if bar is None:
        return [(x, y), lay.points.get(switch, (x, box.y + box.h + ROW_GAP))]
    rows_below = round((bar.y - (box.y + box.h)) / (HOST_H + ROW_GAP))
    if rows_below <= 0:
        return [(x, y), (x, bar.y)]
    gx = box.x + box.w + ROW_GAP / 2 + (rows_below - 3.5) * 0.9
    by = box.y + box.h + 3
    return [(x, y), (x, by), (gx, by), (gx, bar.y)]


def switch_point(lay: Layout, node: str) -> tuple[float, float] | None:
    """Where switch-to-switch links attach: a leaf bar's right end, a spine's centre."""
    if node in lay.leaves:
        bar = lay.leaves[node]
        return bar.x + bar.w, bar.cy
    return lay.points.get(node)


# --------------------------------------------------------------- plan figures
DEFAULT_NAME = Plan.__dataclass_fields__["topology"].default
"""A plan that names no topology (built by hand) is checked by its hosts and GPUs only."""


@dataclass(frozen=True)
class RankInfo:
    rank: int
    gpu: str
    ring: int
    ring_pos: int
    dp: int
    ulysses: int


def rank_table(topo: Topology, plan: Plan) -> list[RankInfo]:
    """Each rank's GPU node and groups; ConfigError if the plan does not fit the topology."""
    hosts = set(topo.hosts)
    gpus = []
    for p in plan.placements:
        if p.host not in hosts:
            raise ConfigError(f"plan places rank {p.rank} on host {p.host!r}, which topology {topo.name!r} does not have; plan for this topology")
        if p.gpu not in {topo.graph.nodes[g]["index"] for g in topo.gpus(p.host)}:
            raise ConfigError(f"plan places rank {p.rank} on GPU {p.gpu} of host {p.host!r}, which topology {topo.name!r} does not have; plan for this topology")
        gpus.append(topo.gpu_id(p.host, p.gpu))
    if plan.topology not in (DEFAULT_NAME, topo.name):
        raise ConfigError(f"plan was made for topology {plan.topology!r}, not {topo.name!r}; draw it on its own topology or re-plan for this one")
    g = plan.groups
    ring_of = {r: (i, pos) for i, ring in enumerate(g.ring_groups) for pos, r in enumerate(ring)}
    dp_of = {r: i for i, grp in enumerate(g.dp_groups) for r in grp}
    uly_of = {r: i for i, grp in enumerate(g.ulysses_groups) for r in grp}
    return [RankInfo(r, gpus[r], *ring_of[r], dp_of[r], uly_of[r]) for r in range(plan.world_size)]


@dataclass(frozen=True)
class Hop:
    src: str
    dst: str
    bw: float
    lat: float


def cycle_hops(topo: Topology, gpus: list[str]) -> list[Hop]:
    """Hops of the cycle through ``gpus`` in order (a ring sends rank i -> i+1, the last back to the first)."""
    if len(gpus) < 2:
        return []
    pairs = list(zip(gpus, gpus[1:] + gpus[:1])) if len(gpus) > 2 else [(gpus[0], gpus[1])]
    return [Hop(a, b, topo.bandwidth(a, b), topo.latency(a, b)) for a, b in pairs]


def host_cycle(topo: Topology, gpus: list[str]) -> list[str]:
    """The hosts a cycle visits, in order, each contiguous run once."""
    hosts: list[str] = []
    for g in gpus:
        h = topo.host_of(g)
        if not hosts or hosts[-1] != h:
            hosts.append(h)
    if len(hosts) > 1 and hosts[0] == hosts[-1]:
        hosts.pop()
    return hosts


def host_matrix(topo: Topology, hosts: list[str]) -> list[list[tuple[float, float]]]:
    """(GB/s, microseconds) between every pair of hosts; one host: between its GPUs instead."""
    # A host without a NIC (a hand-written topology) is reached through its first GPU.
    ends = [(topo.nics(h) or topo.gpus(h) or [h])[0] for h in hosts] if len(hosts) > 1 else topo.gpus(hosts[0])
    n = len(ends)
    m = [[(0.0, 0.0)] * n for _ in range(n)]
    for i in range(n):
        for j in range(i + 1, n):
            hops = topo.path(ends[i], ends[j])
            cell = (min(topo.link(u, v)["bw_gbps"] for u, v in hops), sum(topo.link(u, v)["lat_us"] for u, v in hops))
            m[i][j] = m[j][i] = cell
    return m


def group_colours(lay: Layout, host_sets: list[list[str]]) -> list[str]:
    """A colour per group (ring or DP group) such that groups drawn near each other differ in hue.

    Two groups are neighbours when they visit a common drawing row or rows next
    to each other (their cycles cross or run side by side). Groups are coloured
    greedily in order, each taking the palette colour no neighbour has and used
    least so far; the palette grows past tab10 only when a group has nine or more
    neighbours. Far-apart groups may share a hue, in different shades.

    Parameters
    ----------
    lay
        The drawing, for the hosts' rows.
    host_sets
        Each group's hosts.

    Returns
    -------
    list[str]
        Hex colours, one per group, all different.

    Notes
    -----
    O(G^2) for G groups (G <= 512 in practice).
    """
    row = lay.rows()
    spans = [{row[h] for h in hosts if h in row} for hosts in host_sets]
    graph = nx.Graph()
    graph.add_nodes_from(range(len(spans)))
    graph.add_edges_from((i, j) for i in range(len(spans)) for j in range(i + 1, len(spans))
                         if any(abs(a - b) <= 1 for a in spans[i] for b in spans[j]))
    size = max(9, max((d for _, d in graph.degree), default=0) + 1)
    used = [0] * size
    classes: list[int] = []
    for i in range(len(spans)):
        taken = {classes[j] for j in graph[i] if j < i}
        c = min((c for c in range(size) if c not in taken), key=lambda c: (used[c], c))
        used[c] += 1
        classes.append(c)
    return distinct_colours(classes)


@dataclass(frozen=True)
class PairLoad:
    """The ring flows from one heatmap row to one column, as loaded as they get."""

    flows: int
    worst: FlowLoad
    """The flow whose busiest link is the most utilised."""


def load_matrix(topo: Topology, plan: Plan, names: list[str]) -> dict[tuple[int, int], PairLoad]:
    """(row, column) -> load of the ring flows between them, with every ring stepping at once.

    ``names`` are the heatmap's hosts (or, for one host, its GPUs); a flow counts
    for the cell of its sender's and receiver's host (or GPU). The diagonal holds
    the hops that stay inside a host.
    """
    index = {n: i for i, n in enumerate(names)}
    by_gpu = len(names) > 0 and names[0] in topo.graph and topo.kind(names[0]) == "gpu"
    flows = ring_flows(plan, topo)
    cells: dict[tuple[int, int], PairLoad] = {}
    for (a, b), fl in zip(flows, flow_loads(topo, flows)):
        if fl is None:
            continue
        key = (index.get(a if by_gpu else topo.host_of(a)), index.get(b if by_gpu else topo.host_of(b)))
        if None in key:
            continue
        old = cells.get(key)
        worst = fl if old is None or fl.busiest.utilisation > old.worst.busiest.utilisation else old.worst
        cells[key] = PairLoad((old.flows if old else 0) + 1, worst)
    return cells


def heat_names(topo: Topology, lay: Layout) -> tuple[list[str], list[list[tuple[float, float]]]]:
    """The heatmaps' rows and columns (hosts in drawing order; one host: its GPUs) and their
    single-flow (GB/s, µs) matrix."""
    hosts = [h for leaf in lay.leaf_hosts.values() for h in leaf]
    if not hosts:
        return [], []
    return (topo.gpus(hosts[0]) if len(hosts) == 1 else hosts), host_matrix(topo, hosts)
