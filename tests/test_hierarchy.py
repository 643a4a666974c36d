"""Switch hierarchies from EC2 DescribeInstanceTopology and node-label keys; NIC capacity in measured profiles."""

import json

import pytest

from launcher.cli import main
from topology.cost import FlowModel
from topology.errors import ConfigError
from topology.network.hierarchy import network_nodes_from_ec2, network_nodes_from_labels
from topology.network.model import MEASURED_FORMAT, Topology
from topology.planning.planner import make_plan
from topology.network.presets import load_topology

KEYS = ["topology.k8s.aws/network-node-layer-1", "topology.k8s.aws/network-node-layer-2",
        "topology.k8s.aws/network-node-layer-3"]


def ec2_answer(n=16, per_leaf=4, leaves_per_spine=2, itype="g6e.48xlarge"):
    """What `aws ec2 describe-instance-topology` returns, instances in a shuffled (Ray-like) order."""
    order = [(i * 7) % n for i in range(n)]
    return {"Instances": [
        {"InstanceId": f"i-{i:04x}", "InstanceType": itype, "GroupName": "cpg", "AvailabilityZone": "us-east-1a",
         "NetworkNodes": ["nn-core", f"nn-spine{i // (per_leaf * leaves_per_spine)}", f"nn-leaf{i // per_leaf}"]}
        for i in order]}


def test_ec2_topology_plans_directly_with_its_three_layers(tmp_path, capsys):
    path = tmp_path / "topology.json"
    path.write_text(json.dumps(ec2_answer()))
    topo = load_topology(str(path))
    assert topo.switch_path("i-0005") == ("nn-core", "nn-spine0", "nn-leaf1")
    assert [topo.kind(n) for n in topo.switch_path("i-0005")] == ["core", "spine", "leaf"]
    assert len(topo.nics("i-0005")) == 4 and topo.num_gpus == 128
    # Non-blocking: a leaf's uplink carries its four hosts' 400 Gbps.
    assert topo.link("nn-leaf1", "nn-spine0")["bw_gbps"] == 4 * 50.0
    assert main(["plan", "--topology", str(path), "--gpus", "64", "--ring", "32", "--compare"]) == 0
    out = capsys.readouterr().out
    assert "aware traded:" in out
    plan = make_plan(topo, 64, 32)
    for ring in plan.groups.ring_groups:  # a 32-GPU ring fits under one leaf: it stays there
        assert len({topo.leaf_of(plan.placements[r].host) for r in ring}) == 1


def test_every_g6e_size_plans_from_one_ec2_answer(tmp_path, capsys):
    """An answer mixing every g6e size (1 to 8 L40S, 20 to 400 Gbps) builds each server and plans over all of them."""
    sizes = {"g6e.48xlarge": (8, 4, 50.0), "g6e.24xlarge": (4, 2, 25.0), "g6e.12xlarge": (4, 1, 12.5),
             "g6e.16xlarge": (1, 1, 35 / 8), "g6e.8xlarge": (1, 1, 25 / 8), "g6e.4xlarge": (1, 1, 20 / 8),
             "g6e.2xlarge": (1, 1, 20 / 8), "g6e.xlarge": (1, 1, 20 / 8)}
    data = ec2_answer(n=len(sizes), per_leaf=2, leaves_per_spine=2)
    for inst, itype in zip(data["Instances"], sizes):
        inst["InstanceType"] = itype
    data["NextToken"] = None
    path = tmp_path / "topology.json"
    path.write_text(json.dumps(data))
    topo = load_topology(str(path))
    for inst in data["Instances"]:
        gpus, nics, gbps = sizes[inst["InstanceType"]]
        host = inst["InstanceId"]
        assert (len(topo.gpus(host)), len(topo.nics(host))) == (gpus, nics)
        leaf = inst["NetworkNodes"][-1]
        assert sum(topo.link(nic, leaf)["bw_gbps"] for nic in topo.nics(host)) == pytest.approx(gbps)
    assert main(["plan", "--topology", str(path), "--gpus", "20", "--ring", "4", "--compare"]) == 0
    assert "aware traded:" in capsys.readouterr().out


@pytest.mark.parametrize("edit,match", [
    (lambda d: d["Instances"][0].update(InstanceType="p9.huge"), "instance type 'p9.huge'"),
    (lambda d: d["Instances"][0].update(NetworkNodes="nn-1"), "NetworkNodes must list"),
    (lambda d: d["Instances"][0]["NetworkNodes"].pop(), "network layers"),
    (lambda d: d["Instances"][0].pop("InstanceId"), "has no InstanceId"),
    (lambda d: d.update(Instances=[]), "'Instances' is missing or empty"),
])
def test_bad_ec2_topology_is_one_line_exit_2(tmp_path, capsys, edit, match):
    data = ec2_answer()
    edit(data)
    path = tmp_path / "topology.json"
    path.write_text(json.dumps(data))
    assert main(["plan", "--topology", str(path), "--gpus", "8", "--ring", "8"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and match in err


def test_capacity_reservation_topology_is_refused_in_one_line(tmp_path, capsys):
    """DescribeCapacityReservationTopology lists reservations, not instances: there is nothing to count GPUs by."""
    path = tmp_path / "reservations.json"
    path.write_text(json.dumps({"CapacityReservations": [
        {"CapacityReservationId": "cr-0", "InstanceType": "g6e.48xlarge", "NetworkNodes": ["nn-a", "nn-b", "nn-c"]}]}))
    assert main(["plan", "--topology", str(path), "--gpus", "8", "--ring", "8"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "describe-instance-topology" in err


def measured_hosts(n=8):
    return [{"name": f"10.0.0.{i}", "gpus": 2, "labels": {KEYS[0]: "nn-a", KEYS[1]: f"nn-b{i // 4}",
                                                             KEYS[2]: f"nn-c{i // 2}", "ringleader.io/instance-id": f"i-{i:04x}"}}
            for i in range(n)]


def test_label_keys_and_ec2_name_the_switches_of_a_measured_profile():
    hosts = measured_hosts()
    network_nodes_from_labels(hosts, KEYS)
    assert hosts[5]["network_nodes"] == ["nn-a", "nn-b1", "nn-c2"] and hosts[5]["leaf"] == "nn-c2"
    topo = Topology.from_measured({"format": MEASURED_FORMAT, "hosts": hosts,
                                   "host_bw_gbps": [[0 if i == j else 10.0 for j in range(8)] for i in range(8)]})
    assert topo.switch_path("10.0.0.5") == ("nn-a", "nn-b1", "nn-c2") and topo.leaf_of("10.0.0.5") == "nn-c2"

    by_ec2 = measured_hosts()
    ec2 = {"Instances": [{"InstanceId": f"i-{i:04x}", "InstanceType": "g6e.48xlarge",
                          "NetworkNodes": ["nn-a", f"nn-b{i // 4}", f"nn-c{i // 2}"]} for i in range(8)]}
    network_nodes_from_ec2(by_ec2, ec2, "ec2.json")
    assert [h["network_nodes"] for h in by_ec2] == [h["network_nodes"] for h in hosts]

    hosts[3]["labels"].pop(KEYS[1])
    with pytest.raises(ConfigError, match="has no label 'topology.k8s.aws/network-node-layer-2'"):
        network_nodes_from_labels(hosts, KEYS)
    by_ec2[2]["labels"] = {}
    with pytest.raises(ConfigError, match="matches no instance"):
        network_nodes_from_ec2(by_ec2, ec2, "ec2.json")


def test_measured_nic_capacity_is_shared_by_every_flow_into_a_host():
    """Pairs measured one at a time each reach 10 GB/s; the host's NIC carries 12 GB/s in all."""
    hosts = [{"name": f"h{i}", "gpus": 2, "nic_gbps": 12.0} for i in range(3)]
    topo = Topology.from_measured({"format": MEASURED_FORMAT, "hosts": hosts,
                                   "host_bw_gbps": [[0 if i == j else 10.0 for j in range(3)] for i in range(3)]})
    flows = FlowModel(topo)
    assert [r for r, _ in flows.bandwidths([("h0/gpu0", "h1/gpu0")])] == [10.0]
    assert [r for r, _ in flows.bandwidths([("h0/gpu0", "h2/gpu0"), ("h1/gpu0", "h2/gpu1")])] == [6.0, 6.0]
    # A ring of 6 over 3 hosts enters each host once: no NIC carries two of its flows in one direction.
    plan = make_plan(topo, 6, 6, seq_len=6 * 2 * 1024)
    assert plan.cost["slowest_hop_gbps"] == 10.0
