"""The cluster as a networkx graph: hosts, GPUs, PCIe switches, NICs, switches.

Every source of topology (hand-written YAML, generated presets, measured
profiles) loads into one ``Topology``; the planner, cost model, launcher and
visualiser read only this class.

Nodes carry ``kind`` (one of ``NODE_KINDS``) and, for parts inside a server,
``host`` (the host node's id) and ``index`` (the local ordinal: a GPU's index
is its CUDA device ordinal). Host nodes may carry ``node_id``, ``ip``,
``labels`` (Ray's) and ``leaf`` (the switch they hang from). Links carry
``bw_gbps`` (GB/s per direction) and ``lat_us`` (microseconds).

The saved form (YAML or JSON, same dict) is::

    version: 1
    name: g6e-4x
    gpu: {name: L40S, tflops_bf16: 362, memory_gb: 48, hbm_gbps: 864}
    nodes: [{id: h00, kind: host}, {id: h00/gpu0, kind: gpu, host: h00, index: 0}, ...]
    links: [{a: h00/gpu0, b: h00/pcie0, bw_gbps: 25.0, lat_us: 1.0}, ...]

Host nodes are containers: they have no links; their parts do. Switches
(network tiers, and ``nvswitch``: NVLink switches that GPUs of several
hosts link to directly, one NVLink domain per connected set) belong to no
host.
"""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass, field
from functools import cached_property
from typing import Any, Iterable

import networkx as nx

from topology.errors import ConfigError
from topology.files import dump_text, load_data, write_atomic
from topology.network.routing import NVLINK_KIND, Routes

FORMAT_VERSION = 1
SWITCH_TIER = {"leaf": 0, "spine": 1, "pod": 1, "core": 2}
"""Network switches (nodes outside every host) by tier: leaf (hosts plug in), spine or pod, core."""
SWITCH_KINDS = (*SWITCH_TIER, NVLINK_KIND)
"""Nodes outside every host: network switches, and NVLink switches that join GPUs of several hosts."""
NODE_KINDS = ("host", "gpu", "socket", "pcie", "nic", *SWITCH_KINDS)
NODE_ATTRS = ("kind", "host", "index", "ip", "node_id", "labels", "leaf", "network_nodes", "rail", "nic_gbps")
LINK_FIELDS = ("a", "b", "bw_gbps", "lat_us")
HOST_FIELDS = ("name", "node_id", "ip", "labels", "gpus", "leaf", "network_nodes", "nic_gbps")
"""The fields of a host in the measured format (``MEASURED_FORMAT``)."""
MAX_GPUS_PER_HOST = 4096
"""Rank slots one host may hold: its GPUs, or on a cluster without GPUs its CPUs (``with_slots``; the largest
machines have a few thousand hardware threads). A count above it is a typo: the graph would hold a node for each."""


@dataclass(frozen=True)
class GpuSpec:
    """What the cost model needs to know about one accelerator."""

    name: str = "L40S"
    tflops_bf16: float = 362.0
    """Dense BF16 tensor-core peak, TFLOPS."""
    memory_gb: float = 48.0
    hbm_gbps: float = 864.0

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise ConfigError(f"gpu: name is {self.name!r}; give the accelerator's name as text, e.g. L40S")
        for key in ("tflops_bf16", "memory_gb", "hbm_gbps"):
            _check_positive(f"gpu: {key}", getattr(self, key))


@dataclass
class Topology:
    """A cluster graph plus the GPU type its GPUs are.

    Build one with ``add_host_part``/``add_node``/``add_link`` (the preset
    generators do), or with ``Topology.from_dict``/``load``/``from_measured``.
    """

    name: str = "cluster"
    gpu: GpuSpec = field(default_factory=GpuSpec)
    graph: nx.Graph = field(default_factory=nx.Graph)

    # ----------------------------------------------------------------- build
    def add_node(self, node: str, kind: str, **attrs: Any) -> str:
        if kind not in NODE_KINDS:
            raise ConfigError(f"node {node!r}: kind {kind!r} is not one of {', '.join(NODE_KINDS)}")
        if node in self.graph:
            raise ConfigError(f"node {node!r} is defined twice; give every node a unique id")
        self.graph.add_node(node, kind=kind, **{k: v for k, v in attrs.items() if v is not None})
        self._invalidate()
        return node

    def add_link(self, a: str, b: str, bw_gbps: float, lat_us: float = 1.0) -> None:
        if a == b:
            raise ConfigError(f"link {a!r} - {b!r} joins a node to itself; a link needs two different endpoints")
        for end in (a, b):
            if end not in self.graph:
                raise ConfigError(f"link {a!r} - {b!r}: unknown endpoint {end!r}; define the node first")
        _check_positive(f"link {a!r} - {b!r}: bw_gbps", bw_gbps)
        _check_positive(f"link {a!r} - {b!r}: lat_us", lat_us, allow_zero=True)
        self.graph.add_edge(a, b, bw_gbps=float(bw_gbps), lat_us=float(lat_us))
        self._invalidate()

    def _invalidate(self) -> None:
        for name in ("hosts", "routes", "_gpus_by_host", "_parts_by_host", "_signatures", "_switch_paths", "_bound_cache",
                     "_locality_orders", "_symmetry_cache", "_nics_by_host", "_host_bw", "_host_by_node"):
            self.__dict__.pop(name, None)

    # ----------------------------------------------------------------- query
    def kind(self, node: str) -> str:
        return self.graph.nodes[node]["kind"]

    def nodes_of_kind(self, kind: str) -> list[str]:
        return [n for n, k in self.graph.nodes(data="kind") if k == kind]

    @cached_property
    def hosts(self) -> list[str]:
        """Host ids in the order they were listed (for a Ray cluster: Ray's order)."""
        return self.nodes_of_kind("host")

    @cached_property
    def _gpus_by_host(self) -> dict[str, list[str]]:
        by_host: dict[str, list[str]] = {h: [] for h in self.hosts}
        for n, data in self.graph.nodes(data=True):
            if data["kind"] == "gpu":
                by_host[data["host"]].append(n)
        for gpus in by_host.values():
            gpus.sort(key=lambda g: self.graph.nodes[g]["index"])
        return by_host

    def gpus(self, host: str | None = None) -> list[str]:
        """GPU ids of one host by CUDA index, or of the whole cluster host by host."""
        if host is not None:
            return list(self._gpus_by_host[host])
        return [g for h in self.hosts for g in self._gpus_by_host[h]]

    @property
    def num_gpus(self) -> int:
        return sum(len(g) for g in self._gpus_by_host.values())

    @cached_property
    def _host_by_node(self) -> dict[str, str]:
        """Host of every host and part: searches ask for it per flow, move after move."""
        return {n: n if d["kind"] == "host" else d["host"] for n, d in self.graph.nodes(data=True)
                if d["kind"] == "host" or "host" in d}

    def host_of(self, node: str) -> str:
        return self._host_by_node[node]

    def gpu_id(self, host: str, index: int) -> str:
        """The GPU node of ``host`` with CUDA ordinal ``index``."""
        for g in self._gpus_by_host.get(host, ()):
            if self.graph.nodes[g]["index"] == index:
                return g
        raise ConfigError(f"host {host!r} has no GPU with index {index}")

    def nics(self, host: str) -> list[str]:
        return list(self._nics_by_host.get(host, ()))

    @cached_property
    def _nics_by_host(self) -> dict[str, list[str]]:
        return {h: [n for n in parts if self.graph.nodes[n]["kind"] == "nic"] for h, parts in self._parts_by_host.items()}

    def parts(self, host: str) -> list[str]:
        """Every node inside ``host`` (GPUs, NICs, PCIe switches, sockets), in insertion order."""
        return list(self._parts_by_host.get(host, ()))

    @cached_property
    def _parts_by_host(self) -> dict[str, list[str]]:
        by_host: dict[str, list[str]] = {}
        for n, host in self.graph.nodes(data="host"):
            if host is not None and self.graph.nodes[n]["kind"] != "host":
                by_host.setdefault(host, []).append(n)
        return by_host

    def leaf_of(self, host: str) -> str | None:
        """The switch a host hangs from: its ``leaf`` attribute, else its NIC's leaf neighbour."""
        data = self.graph.nodes[host]
        if data.get("leaf"):
            return data["leaf"]
        for nic in self.nics(host):
            for nb in self.graph.neighbors(nic):
                if self.kind(nb) == "leaf":
                    return nb
        return None

    # ------------------------------------------------------------- bandwidth
    def is_switch(self, node: str) -> bool:
        return self.graph.nodes[node]["kind"] in SWITCH_KINDS

    @cached_property
    def routes(self) -> Routes:
        """ECMP routes of this topology (``topology.network.routing``), cached per node pair."""
        return Routes(self)

    def path(self, a: str, b: str) -> list[tuple[str, str]]:
        """Directed links a flow from ``a`` to ``b`` crosses (every equal-cost path's links)."""
        return [e for e, _ in self.routes.route(a, b)]

    def host_signature(self, host: str) -> tuple:
        """The host's internal links labelled by (kind, index): equal for identically built hosts.

        A host whose parts cannot be told apart by (kind, index) gets its own
        id as signature, so nothing is shared with it.
        """
        cache = self.__dict__.setdefault("_signatures", {})
        if host not in cache:
            g, parts = self.graph, self.parts(host)
            data = {n: g.nodes[n] for n in parts}
            labels = {n: (d["kind"], d.get("index")) for n, d in data.items()}
            if any(i is None for _, i in labels.values()) or len(set(labels.values())) != len(labels):
                cache[host] = (host,)
            else:
                cache[host] = tuple(sorted(
                    (labels[u], labels[v], d["bw_gbps"], d["lat_us"]) for u in parts for v, d in g.adj[u].items() if v in labels))
        return cache[host]

    def host_build_key(self, host: str) -> tuple:
        """Equal for hosts built alike (``host_signature``) whose parts' links out have the same bandwidths: what
        happens inside them, and what leaves them, runs at the same GB/s (wherever their links lead)."""
        sig = self.host_signature(host)
        if sig == (host,):
            return sig
        g, parts = self.graph, set(self.parts(host))
        out = sorted((g.nodes[u]["kind"], g.nodes[u].get("index"), d["bw_gbps"]) for u in parts
                     for v, d in g.adj[u].items() if v not in parts)
        return sig, tuple(out)

    def host_builds(self) -> dict[tuple, list[str]]:
        """Hosts with GPUs grouped by ``host_build_key``, in host order: one of each group stands for all of it."""
        cache = self.__dict__.setdefault("_bound_cache", {})
        if "builds" not in cache:
            builds: dict[tuple, list[str]] = {}
            for host in self.hosts:
                if self._gpus_by_host[host]:
                    builds.setdefault(self.host_build_key(host), []).append(host)
            cache["builds"] = builds
        return cache["builds"]

    def host_class_key(self, host: str, gpus: list[str]) -> tuple:
        """What makes two hosts interchangeable to a plan using ``gpus`` of theirs: layout, those GPUs and links to
        the outside, in part labels."""
        sig = self.host_signature(host)
        if sig == (host,):
            return (host, tuple(sorted(gpus)))
        g = self.graph
        label = lambda n: (g.nodes[n]["kind"], g.nodes[n].get("index"))  # noqa: E731
        parts = set(self.parts(host))
        outside = tuple(sorted((label(u), v, d["bw_gbps"], d["lat_us"]) for u in parts for v, d in g.adj[u].items()
                               if v not in parts))
        return sig, tuple(sorted(label(x) for x in gpus)), outside

    def switch_path(self, host: str) -> tuple[str, ...]:
        """The switches above ``host``, top-down (core ... leaf): hosts sharing a prefix share those switches.

        From the host's ``network_nodes`` when given (labels, EC2 topology),
        else by climbing from its leaf to the first switch of a higher tier.
        """
        cache = self.__dict__.setdefault("_switch_paths", {})
        if host not in cache:
            cache[host] = self._switch_path(host)
        return cache[host]

    def shared_switches(self, a: str, b: str) -> int:
        """How many switches sit above both hosts ``a`` and ``b`` (their switch paths' common start): the more, the
        closer."""
        n = 0
        for x, y in zip(self.switch_path(a), self.switch_path(b)):
            if x != y:
                break
            n += 1
        return n

    def _switch_path(self, host: str) -> tuple[str, ...]:
        data = self.graph.nodes[host]
        if data.get("network_nodes"):
            return tuple(map(str, data["network_nodes"]))
        leaf = self.leaf_of(host)
        if leaf is None:
            return ()
        cache = self.__dict__.setdefault("_switch_paths", {})
        if ("above", leaf) not in cache:  # every host of a leaf shares the climb
            cache["above", leaf] = self._climb(leaf)
        return cache["above", leaf]

    def _climb(self, leaf: str) -> tuple[str, ...]:
        nodes = self.graph.nodes
        chain, seen = [leaf], {leaf}
        while True:
            tier = SWITCH_TIER.get(nodes[chain[-1]]["kind"], 0)
            up = sorted(v for v in self.graph.adj[chain[-1]]
                        if v not in seen and SWITCH_TIER.get(nodes[v]["kind"], -1) > tier)
            if not up:
                return tuple(reversed(chain))
            chain.append(up[0])
            seen.add(up[0])

    def link(self, u: str, v: str) -> dict[str, float]:
        return self.graph.edges[u, v]

    def bandwidth(self, a: str, b: str) -> float:
        """GB/s one flow gets from ``a`` to ``b`` alone on the network (its slowest link, ECMP shares summed)."""
        return min((self.link(u, v)["bw_gbps"] / f for (u, v), f in self.routes.route(a, b)), default=math.inf)

    def latency(self, a: str, b: str) -> float:
        """Microseconds from ``a`` to ``b``: the mean over equal-cost paths."""
        return sum(f * self.link(u, v)["lat_us"] for (u, v), f in self.routes.route(a, b))

    def host_endpoint(self, host: str) -> str:
        """The node that stands for ``host`` on host-to-host paths: its first NIC."""
        nics = self.nics(host)
        if not nics:
            raise ConfigError(f"host {host!r} has no NIC; add a nic node linked to its switch")
        return nics[0]

    def host_bandwidth(self, a: str, b: str) -> float:
        cache = self.__dict__.setdefault("_host_bw", {})  # constructions ask for the same pairs ring after ring
        if (a, b) not in cache:
            cache[a, b] = self.bandwidth(self.host_endpoint(a), self.host_endpoint(b))
        return cache[a, b]

    def host_bandwidth_matrix(self, hosts: Iterable[str] | None = None) -> list[list[float]]:
        """Host-to-host GB/s, 0 on the diagonal; symmetric (links are undirected), so half is computed."""
        hs = list(hosts) if hosts is not None else self.hosts
        m = [[0.0] * len(hs) for _ in hs]
        for i, a in enumerate(hs):
            for j in range(i + 1, len(hs)):
                m[i][j] = m[j][i] = self.host_bandwidth(a, hs[j])
        return m

    # ----------------------------------------------------------- (de)serialise
    def to_dict(self) -> dict[str, Any]:
        nodes = []
        for n, data in self.graph.nodes(data=True):
            entry = {"id": n}
            entry.update({k: data[k] for k in NODE_ATTRS if k in data})
            nodes.append(entry)
        links = [{"a": u, "b": v, "bw_gbps": d["bw_gbps"], "lat_us": d["lat_us"]} for u, v, d in self.graph.edges(data=True)]
        return {"version": FORMAT_VERSION, "name": self.name, "gpu": asdict(self.gpu), "nodes": nodes, "links": links}

    @classmethod
    def from_dict(cls, data: Any, source: str = "topology") -> "Topology":
        if not isinstance(data, dict):
            raise ConfigError(f"{source}: expected a mapping with 'nodes' and 'links', got {type(data).__name__}")
        if data.get("format") == MEASURED_FORMAT:
            return cls.from_measured(data, source)
        _known_fields(data, ("version", "name", "gpu", "nodes", "links"), source)
        _check_version(data, source)
        for key in ("nodes", "links"):
            if not isinstance(data.get(key), list):
                raise ConfigError(f"{source}: '{key}' is missing or not a list; "
                                  "see topology/network/model.py for the format")
        spec = _gpu_spec(data.get("gpu"), source)
        topo = cls(name=str(data.get("name", "cluster")), gpu=spec)
        for i, node in enumerate(data["nodes"]):
            if not isinstance(node, dict) or "id" not in node or "kind" not in node:
                raise ConfigError(f"{source}: nodes[{i}] needs 'id' and 'kind'")
            _known_fields(node, ("id", *NODE_ATTRS), f"{source}: nodes[{i}] ({node['id']})")
            topo.add_node(str(node["id"]), **{k: v for k, v in node.items() if k != "id"})
        for i, link in enumerate(data["links"]):
            if not isinstance(link, dict) or "a" not in link or "b" not in link:
                raise ConfigError(f"{source}: links[{i}] needs endpoints 'a' and 'b'")
            where = f"{source}: links[{i}] ({link['a']} - {link['b']})"
            _known_fields(link, LINK_FIELDS, where)
            if "bw_gbps" not in link:
                raise ConfigError(f"{where}: bw_gbps is missing; give GB/s per direction")
            if topo.graph.has_edge(str(link["a"]), str(link["b"])):
                raise ConfigError(f"{where}: the two nodes are already linked; give each pair one link (GB/s per direction)")
            topo.add_link(str(link["a"]), str(link["b"]), link["bw_gbps"], link.get("lat_us", 1.0))
        topo.check(source)
        return topo

    def check(self, source: str = "topology") -> None:
        """Raise ``ConfigError`` on a part without its host, a bad GPU index or a ``leaf`` naming no switch."""
        g = self.graph
        indices: dict[tuple[str, str, int], str] = {}
        for n, d in g.nodes(data=True):
            kind = d["kind"]
            if d.get("labels") is not None and not isinstance(d["labels"], dict):
                raise ConfigError(f"{source}: node {n!r}: labels is {d['labels']!r}; give Ray's node labels as a mapping")
            if d.get("nic_gbps") is not None:
                _check_positive(f"{source}: node {n!r}: nic_gbps", d["nic_gbps"])
            if kind in SWITCH_KINDS:
                continue
            if kind == "host":
                leaf = d.get("leaf")
                if leaf is not None and (leaf not in g or g.nodes[leaf]["kind"] not in SWITCH_KINDS):
                    raise ConfigError(f"{source}: host {n!r}: leaf {leaf!r} names no switch node; add it as a node of kind leaf or drop the field")
                continue
            host = d.get("host")
            if host not in g or g.nodes[host]["kind"] != "host":
                what = "names no node" if host not in g else f"is a {g.nodes[host]['kind']}"
                raise ConfigError(f"{source}: node {n!r} ({kind}) needs 'host' naming a host node; its host {host!r} {what}")
            index = d.get("index")
            if (kind == "gpu" or index is not None) and (not isinstance(index, int) or isinstance(index, bool) or index < 0):
                what = "give its CUDA ordinal" if kind == "gpu" else f"give the {kind}'s ordinal in its host"
                raise ConfigError(f"{source}: {'GPU' if kind == 'gpu' else kind} {n!r}: index is {index!r}; {what} as an integer >= 0")
            if kind == "gpu" and index >= MAX_GPUS_PER_HOST:
                raise ConfigError(f"{source}: GPU {n!r}: index is {index}; CUDA ordinals of a host run from 0 to at most "
                                  f"{MAX_GPUS_PER_HOST - 1} (a host holds at most {MAX_GPUS_PER_HOST} GPUs)")
            if index is not None and (host, kind, index) in indices:
                if kind == "gpu":
                    raise ConfigError(f"{source}: GPUs {indices[host, kind, index]!r} and {n!r} of host {host!r} both have index {index}; CUDA ordinals are unique per host")
                raise ConfigError(f"{source}: {kind}s {indices[host, kind, index]!r} and {n!r} of host {host!r} both have index {index}; "
                                  f"number each {kind} of a host differently")
            indices[host, kind, index] = n

    def save(self, path: str | os.PathLike) -> None:
        """Write as JSON (``.json``) or YAML (anything else), atomically."""
        write_atomic(path, dump_text(self.to_dict(), path))

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Topology":
        return cls.from_dict(load_data(path), source=str(path))

    # --------------------------------------------------------------- measured
    @classmethod
    def from_measured(cls, data: dict[str, Any], source: str = "measured topology") -> "Topology":
        """Build the graph from a profile (see ``MEASURED_FORMAT``).

        Each host gets one NIC; measured host pairs become direct NIC-NIC links,
        so a flow's bandwidth is what was measured for that pair. GPUs link to
        each other by the measured copy matrix (or, without one, through the
        NIC only), and to the NIC by a link that never limits.

        A profile naming no switch (no host with ``leaf`` or ``network_nodes``)
        gets the leaves its bandwidths infer (``_with_inferred_leaves``).
        Across inferred leaves (hosts without ``network_nodes``, a profile
        with its concurrent flows on record), pairs go through their leaves'
        uplinks instead (``_measured_uplinks``): pairs measured at once
        shared an uplink, so each pair's figure is a share of it, and a
        direct link of that share would count the sharing twice.
        """
        _known_fields(data, ("format", "version", "name", "gpu", "hosts", "host_bw_gbps", "host_lat_us", "gpu_bw_gbps", "meta"), source)
        _check_version(data, source)
        hosts = data.get("hosts")
        if not isinstance(hosts, list) or not hosts:
            raise ConfigError(f"{source}: 'hosts' is missing or empty")
        n = len(hosts)
        bw = _square(data.get("host_bw_gbps"), n, f"{source}: host_bw_gbps")
        lat = _square(data.get("host_lat_us"), n, f"{source}: host_lat_us") if data.get("host_lat_us") else None
        gpu_bw = data.get("gpu_bw_gbps") or {}
        if not isinstance(gpu_bw, dict):
            raise ConfigError(f"{source}: gpu_bw_gbps must map host names to matrices")
        stray = set(gpu_bw) - {str(h.get("name", f"h{i:02d}")) for i, h in enumerate(hosts) if isinstance(h, dict)}
        if stray:
            raise ConfigError(f"{source}: gpu_bw_gbps names no host {', '.join(map(repr, sorted(map(str, stray))))}; key it by the names in 'hosts'")
        spec = _gpu_spec(data.get("gpu"), source)
        topo = cls(name=str(data.get("name", "measured")), gpu=spec)
        hosts = _with_inferred_leaves(hosts, bw, lat)
        names = []
        for i, h in enumerate(hosts):
            if not isinstance(h, dict):
                raise ConfigError(f"{source}: hosts[{i}] must be a mapping with name and gpus")
            _known_fields(h, HOST_FIELDS, f"{source}: hosts[{i}]")
            if h.get("leaf") is not None and not (isinstance(h["leaf"], str) and h["leaf"]):
                raise ConfigError(f"{source}: hosts[{i}]: leaf is {h['leaf']!r}; name the host's switch with a string")
            if h.get("labels") is not None and not isinstance(h["labels"], dict):
                raise ConfigError(f"{source}: hosts[{i}]: labels is {h['labels']!r}; give Ray's node labels as a mapping")
            count = h.get("gpus", 0)
            if not isinstance(count, int) or isinstance(count, bool) or not 0 <= count <= MAX_GPUS_PER_HOST:
                raise ConfigError(f"{source}: hosts[{i}]: gpus is {count!r}; give the host's GPU count as an integer "
                                  f"from 0 to {MAX_GPUS_PER_HOST}")
            name = str(h.get("name", f"h{i:02d}"))
            names.append(name)
            path = h.get("network_nodes")
            if path is not None and (not isinstance(path, list) or not all(isinstance(x, str) and x for x in path)):
                raise ConfigError(f"{source}: hosts[{i}]: network_nodes must list switch names, top-down")
            for depth, node in enumerate(path or []):
                if node not in topo.graph:  # names for the groups; measured pairs link hosts directly
                    topo.add_node(node, "leaf" if depth == len(path) - 1 else "core" if depth == 0 else "spine")
            if h.get("leaf") is not None and h["leaf"] not in topo.graph:
                topo.add_node(str(h["leaf"]), "leaf")
            topo.add_node(name, "host", node_id=h.get("node_id"), ip=h.get("ip"), labels=h.get("labels") or None,
                          leaf=h.get("leaf") or (h.get("network_nodes") or [None])[-1], network_nodes=h.get("network_nodes"))
            nic = topo.add_node(f"{name}/nic0", "nic", host=name, index=0)
            fastest = max([x for x in bw[i] if x] + [1.0])
            gpus = [topo.add_node(f"{name}/gpu{g}", "gpu", host=name, index=g) for g in range(int(h.get("gpus", 0)))]
            matrix = gpu_bw.get(name)
            if matrix is not None:
                m = _square(matrix, len(gpus), f"{source}: gpu_bw_gbps[{name}]")
                fastest = max([fastest] + [x for row in m for x in row if x])
                for a in range(len(gpus)):
                    for b in range(a + 1, len(gpus)):
                        topo.add_link(gpus[a], gpus[b], min(m[a][b], m[b][a]), 1.0)
            port = nic
            cap = h.get("nic_gbps")
            if cap is not None:  # measured with concurrent flows: every flow out of (or into) the host shares it
                _check_positive(f"{source}: hosts[{i}]: nic_gbps", cap)
                port = topo.add_node(f"{name}/pcie0", "pcie", host=name, index=0)
                topo.add_link(port, nic, float(cap), 0.0)
            for g in gpus:
                topo.add_link(g, port, 1e3 * fastest, 0.0)
        uplinks = _measured_uplinks(hosts, bw, (data.get("meta") or {}).get("flows"))
        for i in range(n):
            for j in range(i + 1, n):
                b = min(bw[i][j], bw[j][i])
                if b <= 0:
                    raise ConfigError(f"{source}: host_bw_gbps[{i}][{j}] is {b}; every measured pair needs a positive bandwidth")
                latency = (lat[i][j] + lat[j][i]) / 2 if lat else 1.0
                leaf_i, leaf_j = hosts[i].get("leaf"), hosts[j].get("leaf")
                if uplinks and leaf_i != leaf_j:
                    for k, leaf in ((i, leaf_i), (j, leaf_j)):  # across leaves: through the leaf's shared uplink
                        if not topo.graph.has_edge(f"{names[k]}/nic0", leaf):
                            topo.add_link(f"{names[k]}/nic0", leaf, max(max(bw[k]), max(r[k] for r in bw)), latency / 4)
                else:
                    topo.add_link(f"{names[i]}/nic0", f"{names[j]}/nic0", b, latency)
        if uplinks:
            topo.add_node(MEASURED_SPINE, "spine")
            for leaf, (cap, latency) in uplinks.items():
                topo.add_link(str(leaf), MEASURED_SPINE, cap, latency)
            if not _uplinks_explain(topo, names, data["meta"]["flows"]):
                # The leaves do not explain what was measured (noise, or a wrong grouping): the measured pairs,
                # each as it was, are the safer model.
                return cls.from_measured({**data, "meta": {k: v for k, v in data["meta"].items() if k != "flows"}}, source)
        return topo


def _with_inferred_leaves(hosts: list, bw: list[list[float]], lat: list[list[float]] | None) -> list:
    """The hosts of a profile that names no switch, each given the leaf its measurements infer, as
    ``ringleader profile`` writes them (``topology.network.switches.leaf_names``); otherwise as given.

    A hand-written or third-party profile often lists bandwidths only. Without
    leaves, the planner sees one flat group of hosts and cuts rings from them
    in listing order, which on a shuffled host list pairs hosts across the
    spine; with them, rings keep under one leaf as they do on a profile this
    project wrote. One inferred leaf (a non-blocking fabric) adds nothing.
    """
    if not all(isinstance(h, dict) for h in hosts) or any(h.get("leaf") is not None or h.get("network_nodes") is not None
                                                          for h in hosts):
        return hosts
    n = len(hosts)
    if n < 3 or any(bw[i][j] <= 0 for i in range(n) for j in range(n) if i != j):
        return hosts  # too few to tell a slow link from a far one, or a missing pair the host loop reports
    from topology.network.switches import leaf_names  # scipy's clustering: imported only where a profile needs it

    labels = [h.get("labels") if isinstance(h.get("labels"), dict) else None for h in hosts]
    leaves, _ = leaf_names(bw, labels, lat)
    if len(set(leaves)) < 2:
        return hosts
    return [{**h, "leaf": leaf} for h, leaf in zip(hosts, leaves)]


MEASURED_SPINE = "measured-spine"
"""The switch a measured topology joins its inferred leaves' uplinks at."""


def _measured_uplinks(hosts: list[dict], bw: list[list[float]], flows: Any) -> dict[str, tuple[float, float]]:
    """Leaf -> (uplink GB/s, latency µs) from the flows a profile ran at once; {} when they cannot tell.

    In each round and phase of the profile, the flows leaving one leaf for
    others all crossed its uplink (as did those entering it): their sum is
    what the uplink carried, and the largest such sum over the phases is its
    capacity (a lower bound when no phase filled it). Only for leaves
    inferred from bandwidth or named by one label (no ``network_nodes``
    hierarchy to follow), two or more of them, and a profile that recorded
    its flows.
    """
    leaves = [h.get("leaf") for h in hosts]
    if not isinstance(flows, list) or not flows or any(h.get("network_nodes") for h in hosts) or None in leaves \
            or len(set(leaves)) < 2:
        return {}
    carried: dict[tuple, float] = {}
    try:
        for f in flows:
            a, b = leaves[int(f["src"])], leaves[int(f["dst"])]
            if a != b:
                for leaf, way in ((a, "out"), (b, "in")):
                    key = (f["round"], f["phase"], leaf, way)
                    carried[key] = carried.get(key, 0.0) + float(f["gbps"])
    except (KeyError, IndexError, TypeError, ValueError):
        return {}  # a profile without usable flow records: keep the measured pairs as they are
    out: dict[str, tuple[float, float]] = {}
    for leaf in dict.fromkeys(leaves):
        sums = [v for (r, p, lf, way), v in carried.items() if lf == leaf]
        cross = [min(bw[i][j], bw[j][i]) for i in range(len(hosts)) for j in range(len(hosts))
                 if leaves[i] == leaf and leaves[j] != leaf]
        cap = max(sums or cross or [0.0])
        if cap <= 0:
            return {}
        out[str(leaf)] = (cap, 1.0)
    return out


UPLINK_SLACK = 1.25
"""A shared-uplink model of a profile must not promise any measured flow more than this times what it got."""


def _uplinks_explain(topo: "Topology", names: list[str], flows: list[dict]) -> bool:
    """Whether the shared-uplink model gives every flow of the profile, run with the flows measured beside it,
    at most ``UPLINK_SLACK`` times the rate it measured."""
    from topology.network.routing import FlowModel

    fm = FlowModel(topo)
    phases: dict[tuple, list[dict]] = {}
    for f in flows:
        phases.setdefault((f["round"], f["phase"]), []).append(f)
    for group in phases.values():
        pairs = [(f"{names[int(f['src'])]}/nic0", f"{names[int(f['dst'])]}/nic0") for f in group]
        for f, (rate, _) in zip(group, fm.bandwidths(pairs)):
            if rate > UPLINK_SLACK * float(f["gbps"]):
                return False
    return True


MEASURED_FORMAT = "ringleader/measured-topology"
"""Profiles (written by ``topology.profiling.profile``) look like::

    format: ringleader/measured-topology
    version: 1
    name: ray-cluster
    gpu: {name: L40S, ...}                 # optional
    hosts: [{name, node_id, ip, labels, gpus, leaf,   # leaf: inferred or from labels (inferred here when no host has one)
             network_nodes, nic_gbps}]            # optional: switches top-down; NIC capacity under concurrent flows
    host_bw_gbps: [[0, 48.1, ...], ...]   # n x n, GB/s per direction, median
    host_lat_us: [[0, 12.0, ...], ...]    # optional
    gpu_bw_gbps: {host_name: [[...]]}     # optional, per host
    meta: {...}                            # free-form: transfer size, repeats, rounds
"""


# ------------------------------------------------------------------ file helpers
def _check_positive(what: str, value: Any, allow_zero: bool = False) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or value < 0 or (value == 0 and not allow_zero):
        raise ConfigError(f"{what} is {value!r}; it must be a {'non-negative' if allow_zero else 'positive'} number")


def _check_version(data: dict[str, Any], source: str) -> None:
    """A file's ``version``, when given, must be the integer this ringleader reads (``true`` is not 1)."""
    version = data.get("version", FORMAT_VERSION)
    if not isinstance(version, int) or isinstance(version, bool) or version != FORMAT_VERSION:
        raise ConfigError(f"{source}: version {version!r} is not supported; this ringleader reads version {FORMAT_VERSION}")


def _known_fields(data: dict[str, Any], known: tuple[str, ...], source: str) -> None:
    unknown = set(data) - set(known)
    if unknown:
        raise ConfigError(f"{source}: unknown field(s) {', '.join(sorted(map(str, unknown)))}; known fields are {', '.join(known)}")


def _square(matrix: Any, n: int, what: str) -> list[list[float]]:
    if not isinstance(matrix, list) or len(matrix) != n or any(not isinstance(r, list) or len(r) != n for r in matrix):
        raise ConfigError(f"{what} must be a {n} x {n} matrix")
    for i, row in enumerate(matrix):
        for j, x in enumerate(row):
            if x is not None and (not isinstance(x, (int, float)) or isinstance(x, bool) or not math.isfinite(x) or x < 0):
                raise ConfigError(f"{what}[{i}][{j}] is {x!r}; measured figures are numbers >= 0")
    return [[float(x or 0.0) for x in row] for row in matrix]


def _gpu_spec(gpu: Any, source: str) -> GpuSpec:
    if gpu is None:
        return GpuSpec()
    if not isinstance(gpu, dict):
        raise ConfigError(f"{source}: gpu must be a mapping such as {{name: L40S, tflops_bf16: 362}}")
    _known_fields(gpu, tuple(GpuSpec.__dataclass_fields__), f"{source}: gpu")
    try:
        return GpuSpec(**gpu)
    except ConfigError as exc:
        raise ConfigError(f"{source}: {exc}") from None
