"""Multi-node NVLink domains (GB200 NVL72 style): routes chosen per destination, rings kept inside a domain."""

import pytest

from topology.cost import FlowModel, StepModel
from topology.network.model import Topology
from topology.planning.planner import make_plan
from topology.network.presets import PRESETS, nvl_domains
from topology.network.routing import nvlink_domain

TOL = 1e-7


def _domain_of(topo, plan, rank):
    p = plan.placements[rank]
    return nvlink_domain(topo, topo.gpu_id(p.host, p.gpu))


def test_a_flow_takes_nvlink_inside_its_domain_and_its_own_nic_to_the_other():
    topo = PRESETS["nvl-2x16"]()
    route = dict(topo.routes.route("r0t00/gpu0", "r0t01/gpu1"))  # two trays of rack 0
    assert route == {("r0t00/gpu0", "nvl0/switch0"): 0.5, ("r0t00/gpu0", "nvl0/switch1"): 0.5,
                     ("nvl0/switch0", "r0t01/gpu1"): 0.5, ("nvl0/switch1", "r0t01/gpu1"): 0.5}
    inside = [e for e, _ in topo.routes.route("r0t00/gpu0", "r0t00/gpu3")]  # one tray: NVLink, not the sockets
    assert all("nvl0/" in u or "nvl0/" in v for u, v in inside)
    across = [e for e, _ in topo.routes.route("r0t00/gpu2", "r1t00/gpu1")]  # rack 0 to rack 1: the network
    assert across[0] == ("r0t00/gpu2", "r0t00/pcie2") and ("r0t00/pcie2", "r0t00/nic2") in across
    assert across[-1] == ("r1t00/pcie1", "r1t00/gpu1") and not any("nvl" in u + v for u, v in across)
    assert topo.routes.nic_of("r0t00/gpu2") == "r0t00/nic2"  # the NIC the tray layout gives that GPU
    assert topo.bandwidth("r0t00/gpu0", "r0t01/gpu1") == 900.0 and topo.bandwidth("r0t00/gpu2", "r1t00/gpu1") == 50.0


def test_two_domains_rings_stay_inside_and_only_gradients_cross():
    """The case Ray's order lost by 1.4x: 32 GPUs in two racks whose trays share leaf switches."""
    topo = PRESETS["nvl-2x16"]()
    seq = 16 * 4096
    flows = FlowModel(topo)
    aware = make_plan(topo, 32, 16, seq_len=seq, flows=flows)
    naive = make_plan(topo, 32, 16, seq_len=seq, strategy="naive", flows=flows)
    # A placement that exists: each rack's 16 GPUs as one ring.
    sm = StepModel(topo, 2, 16, 1, seq, flows=flows)
    by_rack = sorted(topo.gpus(), key=lambda g: (nvlink_domain(topo, g), g))
    assert aware.cost["step_time_s"] <= sm.step(by_rack) * 1.01
    assert aware.cost["step_time_s"] <= aware.cost["bound_step_s"] * (1 + TOL) and aware.cost["search"]["optimal"]
    assert naive.cost["step_time_s"] > 1.3 * aware.cost["step_time_s"]
    for ring in aware.groups.ring_groups:
        assert len({_domain_of(topo, aware, r) for r in ring}) == 1
    assert aware.cost["slowest_hop_gbps"] == 900.0 and aware.cost["cross_switch_hops"] == 0  # every ring hop on NVLink
    # Data-parallel traffic (NCCL's ring over all ranks) is what crosses between the racks, over the NICs.
    crossing = [r for r in range(32) if _domain_of(topo, aware, r) != _domain_of(topo, aware, (r + 1) % 32)]
    assert len(crossing) == 2
    a, b = (topo.gpu_id(aware.placements[r].host, aware.placements[r].gpu) for r in (crossing[0], crossing[0] + 1))
    assert any(topo.kind(u) == "nic" for (u, _), _ in topo.routes.route(a, b))


@pytest.mark.parametrize("gpus,cp", [(288, 72), (256, 64)])
def test_rack_scale_domains_get_a_ring_each_even_when_a_ring_leaves_trays_over(gpus, cp):
    """Four NVL72-style racks: rings of a whole rack, or of 16 of its 18 trays (a partial cluster)."""
    topo = nvl_domains(domains=4, trays=18, hosts_per_leaf=8, oversubscription=2.0)
    flows = FlowModel(topo)
    aware = make_plan(topo, gpus, cp, seq_len=cp * 4096, flows=flows)
    naive = make_plan(topo, gpus, cp, seq_len=cp * 4096, strategy="naive", flows=flows)
    assert aware.cost["step_time_s"] <= aware.cost["bound_step_s"] * 1.01
    assert naive.cost["step_time_s"] > 2 * aware.cost["step_time_s"]
    assert all(len({_domain_of(topo, aware, r) for r in ring}) == 1 for ring in aware.groups.ring_groups)


def test_nvlink_switches_load_from_a_topology_file():
    """A topology file names NVLink switches as nodes of kind nvswitch, outside every host."""
    data = PRESETS["nvl-2x16"]().to_dict()
    topo = Topology.from_dict(data)
    assert sorted(topo.nodes_of_kind("nvswitch")) == ["nvl0/switch0", "nvl0/switch1", "nvl1/switch0", "nvl1/switch1"]
    assert nvlink_domain(topo, "r1t02/gpu3") == nvlink_domain(topo, "r1t00/gpu0") != nvlink_domain(topo, "r0t00/gpu0")
    assert nvlink_domain(topo, "r0t00/pcie0") is None


@pytest.mark.parametrize("cp,ulysses,tokens", [(4, 1, 4096), (2, 1, 256), (4, 2, 4096), (4, 4, 256)])
def test_small_nvlink_cluster_plan_is_the_brute_force_optimum(cp, ulysses, tokens):
    """Two racks of two 2-GPU trays: the plan says optimal, equals brute force, and the bound holds."""
    import itertools

    topo = nvl_domains(domains=2, trays=2, gpus_per_tray=2, hosts_per_leaf=2)
    seq = 2 * cp * tokens
    sm = StepModel(topo, 4 // cp, cp // ulysses, ulysses, seq)
    best = min(sm.step(list(order)) for order in itertools.permutations(topo.gpus(), 4))
    plan = make_plan(topo, 4, cp, ulysses, seq_len=seq)
    assert plan.cost["search"]["optimal"]
    assert plan.cost["step_time_s"] == pytest.approx(best, rel=TOL)
    assert plan.cost["bound_step_s"] <= best * (1 + TOL)
