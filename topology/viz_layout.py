"""Where everything goes in a topology drawing, shared by the HTML and the matplotlib renderers.

The picture is a rack diagram: each leaf switch is a bar with its hosts in
rows above it (at most ``HOSTS_PER_ROW`` a row), spines in a column to the
right, and inside each host its GPUs on top with the PCIe switches, sockets
and NICs below them. Coordinates are SVG pixels (y grows downwards).

The figures drawn (bandwidth per link, per ring hop, host to host) are
computed here too, so both renderers show the same numbers.
"""

from __future__ import annotations

import colorsys
import math
import re
from dataclasses import dataclass, field
from functools import lru_cache

from matplotlib import colormaps
from matplotlib.colors import to_hex

from topology.errors import ConfigError
from topology.model import Topology
from topology.plan import Plan

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
    leaf_hosts: dict[str, list[str]] = field(default_factory=dict)
    hosts: dict[str, Box] = field(default_factory=dict)
    points: dict[str, tuple[float, float]] = field(default_factory=dict)
    """Centre of every node inside a host, and of every spine."""
    width: float = 0.0
    height: float = 0.0
    detail: bool = True
    bw_min: float = 1.0
    bw_max: float = 1.0
    bw_cap: float = math.inf
    """Links at or above this are drawn as "never limits" and left out of the scale."""

    def level(self, bw: float) -> float:
        """0 (slowest drawn link) .. 1 (fastest), on a log scale: bandwidths span decades."""
        if self.bw_max <= self.bw_min:
            return 1.0
        x = math.log(max(bw, self.bw_min) / self.bw_min) / math.log(self.bw_max / self.bw_min)
        return min(1.0, x)

    def colour(self, bw: float) -> str:
        """Bandwidth colour: dark = slow, orange = fast."""
        if bw >= self.bw_cap:
            return "#b0b0b0"
        return _hex(round(0.85 * self.level(bw), 3))

    def stroke(self, bw: float) -> float:
        if bw >= self.bw_cap:
            return 0.8
        return round(1.0 + 3.0 * self.level(bw), 2)

    def ticks(self, n: int = 5) -> list[float]:
        if self.bw_max <= self.bw_min:
            return [self.bw_min]
        lo, hi = math.log(self.bw_min), math.log(self.bw_max)
        return [round(math.exp(lo + (hi - lo) * i / (n - 1)), 1) for i in range(n)]


CMAP = colormaps["plasma"]


@lru_cache(maxsize=1024)
def _hex(x: float) -> str:
    return to_hex(CMAP(x))


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
    y = MARGIN
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
    spines = sorted(topo.nodes_of_kind("spine"), key=natural_key)
    for i, s in enumerate(spines):
        out.points[s] = (right + 90, MARGIN + (y - MARGIN) * (i + 1) / (len(spines) + 1))
    out.width = right + (150 if spines else MARGIN)
    out.height = y
    speeds = sorted({d["bw_gbps"] for _, _, d in topo.graph.edges(data=True)})
    if speeds:
        # Real link speeds sit within a few x of each other; a 100x jump marks the stand-ins above it.
        out.bw_cap = next((b for a, b in zip(speeds, speeds[1:]) if b >= UNBOUNDED * a), math.inf)
        shown = [b for b in speeds if b < out.bw_cap]
        out.bw_min, out.bw_max = shown[0], shown[-1]
    return out


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


def uplink_route(lay: Layout, host: str, part: str, switch: str) -> list[tuple[float, float]]:
    """From a NIC down to its leaf bar; from an upper row, down the gap right of the host,
    so no uplink crosses a host below it."""
    x, y = lay.points[part]
    box = lay.hosts[host]
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


def group_colours(n: int) -> list[str]:
    """Distinct colours for n rings: tab10/tab20, then evenly spaced hues."""
    if n <= 10:
        return [to_hex(colormaps["tab10"](i)) for i in range(n)]
    if n <= 20:
        return [to_hex(colormaps["tab20"](i)) for i in range(n)]
    return [to_hex(colorsys.hsv_to_rgb((i * 0.618034) % 1.0, 0.75, 0.85)) for i in range(n)]
