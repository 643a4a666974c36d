"""The topology graph: both ways in give one model, save/load round-trips, paths and bad input."""

import json
import random

import networkx as nx
import pytest

from topology.errors import ConfigError
from topology.cost import FlowModel
from topology.network.model import MEASURED_FORMAT, Topology
from topology.network.presets import leaf_spine, load_topology


def measured(bw, gpus=1, leaves=None):
    n = len(bw)
    return {
        "format": MEASURED_FORMAT, "version": 1, "name": "lab",
        "hosts": [{"name": f"10.0.0.{i}", "gpus": gpus, "ip": f"10.0.0.{i}", "leaf": leaves[i] if leaves else None}
                  for i in range(n)],
        "host_bw_gbps": bw,
        "host_lat_us": [[0 if i == j else 10 + i + j for j in range(n)] for i in range(n)],
    }


@pytest.mark.parametrize("suffix", [".yaml", ".json"])
def test_preset_round_trips_exactly(tmp_path, suffix):
    topo = load_topology("g6e-4x")
    path = tmp_path / f"t{suffix}"
    topo.save(path)
    again = Topology.load(path)
    assert again.to_dict() == topo.to_dict()
    assert again.hosts == topo.hosts  # Ray's order survives
    assert again.host_bandwidth_matrix() == topo.host_bandwidth_matrix()


def test_measured_form_loads_into_the_same_model_and_round_trips(tmp_path):
    bw = [[0, 40, 10], [38, 0, 12], [10, 12, 0]]
    data = measured(bw, gpus=2, leaves=["a", "a", "b"])
    data["gpu_bw_gbps"] = {"10.0.0.0": [[0, 20], [20, 0]]}
    path = tmp_path / "profile.json"
    path.write_text(json.dumps(data))
    topo = load_topology(str(path))
    assert topo.hosts == ["10.0.0.0", "10.0.0.1", "10.0.0.2"]
    assert topo.host_bandwidth("10.0.0.0", "10.0.0.1") == 38  # the slower direction of the pair
    assert topo.bandwidth("10.0.0.0/gpu0", "10.0.0.0/gpu1") == 20
    assert topo.latency("10.0.0.1/nic0", "10.0.0.2/nic0") == 13
    assert topo.leaf_of("10.0.0.2") == "b"
    topo.save(tmp_path / "graph.yaml")
    assert Topology.load(tmp_path / "graph.yaml").to_dict() == topo.to_dict()


def test_routes_split_equally_over_every_shortest_path():
    """ECMP: a route's links are exactly those of networkx's shortest paths, each with its share of them."""
    topo = leaf_spine(hosts=24, hosts_per_leaf=8, spines=3, degraded={3: 1.0})
    nics = sorted(n for n, kind in topo.graph.nodes(data="kind") if kind == "nic")
    switches = {n for n in topo.graph if topo.is_switch(n)}
    fabric = topo.graph.subgraph(switches | set(nics))
    rng = random.Random(1)
    for _ in range(100):
        a, b = rng.sample(nics, 2)
        paths = list(nx.all_shortest_paths(fabric, a, b))
        expect: dict = {}
        for p in paths:
            for e in zip(p, p[1:]):
                expect[e] = expect.get(e, 0) + 1 / len(paths)  # symmetric fabric: per-hop split = per-path split
        got = dict(topo.routes.route(a, b))
        assert got.keys() == expect.keys()
        assert all(abs(got[e] - expect[e]) < 1e-12 for e in got)


def _host_with_nics(topo: Topology, host: str, gpus: int, nic_gbps: list[float]) -> None:
    """``gpus`` GPUs and one NIC per entry of ``nic_gbps`` (its cable to ``leaf``), all under one PCIe switch."""
    topo.add_node(host, "host")
    sw = topo.add_node(f"{host}/pcie0", "pcie", host=host, index=0)
    for k, gbps in enumerate(nic_gbps):
        topo.add_link(topo.add_node(f"{host}/nic{k}", "nic", host=host, index=k), sw, 32.0)
        topo.add_link(f"{host}/nic{k}", "leaf", gbps)
    for g in range(gpus):
        topo.add_link(topo.add_node(f"{host}/gpu{g}", "gpu", host=host, index=g), sw, 32.0)


def test_gpus_take_the_nic_nccl_gives_them():
    """As ncclTopoGetLocalNet: the widest path to the network first (a slow NIC beside a fast one is left alone),
    then GPUs equally close to several NICs share them out by device index, bits mirrored."""
    topo = Topology(name="nics")
    topo.add_node("leaf", "leaf")
    _host_with_nics(topo, "shared", 4, [25.0, 25.0])
    _host_with_nics(topo, "frontend", 2, [3.125, 50.0])
    _host_with_nics(topo, "four", 8, [25.0] * 4)
    nic = lambda host, g: topo.routes.nic_of(f"{host}/gpu{g}").rsplit("nic", 1)[1]  # noqa: E731
    assert [nic("shared", g) for g in range(4)] == ["0", "1", "0", "1"]
    assert [nic("frontend", g) for g in range(2)] == ["1", "1"]
    assert [nic("four", g) for g in range(8)] == ["0", "2", "1", "3"] * 2  # mirrorBits(dev % 8, 4)
    # Two flows out of "shared" through different NICs each get a whole NIC.
    flows = [("shared/gpu0", "four/gpu0"), ("shared/gpu1", "four/gpu1")]
    assert [bw for bw, _ in FlowModel(topo).bandwidths(flows)] == [25.0, 25.0]


def test_bandwidth_is_the_slowest_link_on_the_path():
    topo = load_topology("leafspine-64x-2to1")
    assert topo.bandwidth("h00/gpu0", "h00/gpu1") == 25.0  # same PCIe switch
    assert topo.bandwidth("h00/gpu0", "h00/gpu4") == 20.0  # across the sockets
    assert topo.bandwidth("h00/gpu0", "h63/gpu0") == 12.5  # the NIC
    assert topo.leaf_of("h63") == "leaf7" and topo.path("h00/gpu0", "h00/gpu0") == []


BAD = [
    ({"nodes": [{"id": "a", "kind": "gpu", "host": "h"}, {"id": "h", "kind": "host"}],
      "links": [{"a": "a", "b": "ghost", "bw_gbps": 1}]}, "unknown endpoint 'ghost'"),
    ({"nodes": [{"id": "h", "kind": "host"}, {"id": "x", "kind": "nic", "host": "h"}, {"id": "y", "kind": "leaf"}],
      "links": [{"a": "x", "b": "y", "bw_gbps": -3}]}, "bw_gbps is -3"),
    ({"nodes": [{"id": "h", "kind": "host"}, {"id": "x", "kind": "nic", "host": "h"}, {"id": "y", "kind": "leaf"}],
      "links": [{"a": "x", "b": "y"}]}, "bw_gbps is missing"),
    ({"nodes": [{"id": "h", "kind": "router"}], "links": []}, "kind 'router'"),
    ({"nodes": [{"id": "x", "kind": "gpu"}], "links": []}, "needs 'host'"),
    ({**measured([[0, 1], [1, 0]]), "host_bw_gbps": [[0, 1, 1], [1, 0, 1]]}, "2 x 2 matrix"),
    (measured([[0, 0], [0, 0]]), "positive bandwidth"),
]


@pytest.mark.parametrize("data,match", BAD, ids=[m for _, m in BAD])
def test_bad_topologies_raise_one_line(tmp_path, data, match):
    path = tmp_path / "bad.yaml"
    path.write_text(json.dumps(data))  # JSON is YAML
    with pytest.raises(ConfigError, match=match) as info:
        load_topology(str(path))
    assert "\n" not in str(info.value)


def test_malformed_yaml_and_missing_file(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("nodes: [\n  - {id: a\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_topology(str(path))
    with pytest.raises(ConfigError, match="file not found"):
        load_topology(str(tmp_path / "absent.yaml"))


def test_save_is_atomic_and_readable(tmp_path):
    topo = load_topology("l40s-host")
    path = tmp_path / "t.yaml"
    topo.save(path)
    assert [p.name for p in tmp_path.iterdir()] == ["t.yaml"]  # no temporary left behind
    assert path.stat().st_mode & 0o044  # group/others can read it, like any written file


def test_measured_pairs_across_leaves_share_the_uplink_they_shared_while_measured():
    """Four hosts on two leaves behind 0.025 GB/s uplinks, host links 0.05. The profile's rounds ran two
    cross-leaf pairs at once, so each recorded half the uplink; the model must put them back on one
    uplink (two at once: half each, as measured) rather than give each a private link of that half."""
    from topology.network.routing import FlowModel

    leaf = ["a", "a", "b", "b"]
    share, alone = 0.0125, 0.05
    bw = [[0.0 if i == j else alone if leaf[i] == leaf[j] else share for j in range(4)] for i in range(4)]
    rounds = [[(0, 2), (1, 3)], [(0, 3), (1, 2)], [(0, 1), (2, 3)]]
    flows = [{"round": r, "phase": ph, "src": a if ph == 0 else b, "dst": b if ph == 0 else a, "gbps": bw[a][b]}
             for r, pairs in enumerate(rounds) for ph in (0, 1) for a, b in pairs]
    data = {"format": MEASURED_FORMAT, "version": 1, "hosts": [{"name": f"h{i}", "gpus": 1, "leaf": leaf[i]} for i in range(4)],
            "host_bw_gbps": bw, "meta": {"flows": flows}}
    topo = Topology.from_measured(data)
    fm = FlowModel(topo)
    g = [f"h{i}/gpu0" for i in range(4)]
    assert fm.bandwidths([(g[0], g[2])])[0][0] == pytest.approx(0.025)  # alone: the whole uplink
    assert [r for r, _ in fm.bandwidths([(g[0], g[2]), (g[1], g[3])])] == pytest.approx([share, share])  # as measured
    assert fm.bandwidths([(g[0], g[1])])[0][0] == pytest.approx(alone)  # same leaf: the measured pair, direct
    # Leaves that do not explain the measurements (here: a same-leaf pair put across leaves, so the model would
    # promise flows more than they got) fall back to the measured pairs, each as it was.
    wrong = {**data, "hosts": [{"name": f"h{i}", "gpus": 1, "leaf": ["a", "b", "a", "b"][i]} for i in range(4)]}
    fallback = Topology.from_measured(wrong)
    assert "measured-spine" not in fallback.graph and fallback.host_bandwidth("h0", "h2") == pytest.approx(share)
    # Without the flows on record (an older profile), pairs stay as measured.
    del data["meta"]
    assert Topology.from_measured(data).host_bandwidth("h0", "h2") == pytest.approx(share)
