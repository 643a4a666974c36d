"""Presets: the checked-in YAML is what the generators make, and the hardware numbers hold."""

import pytest

from topology.errors import ConfigError
from topology.files import dump_text
from topology.network.presets import PRESETS, TOPOLOGY_DIR, l40s_host, leaf_spine, load_topology


@pytest.mark.parametrize("name", list(PRESETS))
def test_checked_in_yaml_equals_the_generator(name):
    path = TOPOLOGY_DIR / f"{name}.yaml"
    assert path.read_text() == dump_text(PRESETS[name]().to_dict(), path), (
        f"{path} is stale; regenerate with `python -m topology.network.presets`"
    )


def test_load_topology_takes_names_and_files():
    by_name = load_topology("g6e-4x")
    by_file = load_topology(str(TOPOLOGY_DIR / "g6e-4x.yaml"))
    assert by_name.to_dict() == by_file.to_dict()
    with pytest.raises(ConfigError, match="neither a preset"):
        load_topology("g6e-5x")


def test_recipe_sizes_have_presets():
    sizes = {name: PRESETS[name]().num_gpus for name in PRESETS}
    assert {8, 32, 512} <= set(sizes.values())
    assert sizes["l40s-host"] == sizes["g6e-1x"] == 8 and sizes["g6e-4x"] == 32


@pytest.mark.parametrize("per_switch", [2, 4])
def test_l40s_host_is_pcie_only_with_the_nic_under_a_switch(per_switch):
    topo = l40s_host(per_switch)
    g = topo.graph
    gpus = topo.gpus("h00")
    assert len(gpus) == 8 and len(topo.nodes_of_kind("socket")) == 2
    assert len(topo.nodes_of_kind("pcie")) == 8 // per_switch
    assert not any(g.has_edge(a, b) for a in gpus for b in gpus)  # no NVLink
    (nic,) = topo.nics("h00")
    assert [topo.kind(n) for n in g.adj[nic]] == ["pcie"]
    assert topo.bandwidth(gpus[0], gpus[1]) == 25.0
    assert topo.bandwidth(gpus[0], gpus[7]) < 25.0  # peer-to-peer across the sockets is slower


def test_g6e_hosts_have_400_gbps():
    topo = load_topology("g6e-64x")
    assert len(topo.hosts) == 64
    assert {topo.host_bandwidth(a, b) for a, b in zip(topo.hosts, topo.hosts[1:])} == {12.5}  # one card of four
    for h in topo.hosts[:2]:
        nics = topo.nics(h)
        assert len(nics) == 4 and sum(topo.link(n, "fabric")["bw_gbps"] for n in nics) == 50.0
        # Each GPU pair reaches the network through the card under its own PCIe switch.
        assert [topo.routes.nic_of(g) for g in topo.gpus(h)] == [nics[i // 2] for i in range(8)]


@pytest.mark.parametrize("name,uplink", [("leafspine-64x-1to1", 100.0), ("leafspine-64x-2to1", 50.0),
                                         ("leafspine-64x-4to1", 25.0)])
def test_leaf_uplinks_follow_the_oversubscription(name, uplink):
    topo = load_topology(name)
    leaves = topo.nodes_of_kind("leaf")
    assert len(leaves) == 8 and len(topo.hosts) == 64
    assert {topo.link(leaf, "spine")["bw_gbps"] for leaf in leaves} == {uplink}
    assert all(sum(topo.leaf_of(h) == leaf for h in topo.hosts) == 8 for leaf in leaves)


def test_ray_order_is_not_rack_order():
    """Nodes register in arbitrary order, so consecutive hosts in Ray's list mostly change leaf."""
    topo = load_topology("leafspine-64x-2to1")
    changes = sum(topo.leaf_of(a) != topo.leaf_of(b) for a, b in zip(topo.hosts, topo.hosts[1:]))
    assert changes > 40
    assert topo.hosts == load_topology("leafspine-64x-2to1").hosts  # but fixed


def test_degraded_preset_has_exactly_one_slow_host_link():
    healthy, degraded = load_topology("leafspine-64x-2to1"), load_topology("leafspine-64x-2to1-degraded")
    slow = [h for h in degraded.hosts if degraded.host_bandwidth(h, "h00" if h != "h00" else "h01") < 12.5]
    assert slow == ["h13"]
    assert degraded.to_dict()["links"] != healthy.to_dict()["links"]
    assert leaf_spine(hosts=8, degraded={2: 1.0}).host_bandwidth("h02", "h03") == 1.0
