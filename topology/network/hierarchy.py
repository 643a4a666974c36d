"""Switch hierarchies from what clouds and schedulers publish: node-label keys and EC2 instance topology.

Both describe, per host, the network nodes above it top-down; hosts that
share the bottom node are the closest. Kubernetes topology-aware schedulers
(Kueue) name the layers by a list of node-label keys, top-down::

    ["topology.k8s.aws/network-node-layer-1", "topology.k8s.aws/network-node-layer-2",
     "topology.k8s.aws/network-node-layer-3"]

and AWS EC2 ``DescribeInstanceTopology`` returns the same as JSON::

    {"Instances": [{"InstanceId": "i-0abc...", "InstanceType": "g6e.48xlarge",
                    "NetworkNodes": ["nn-1...", "nn-2...", "nn-3..."], ...}, ...]}

A host's list becomes its ``network_nodes`` (in a measured profile) or, for
an EC2 file planned directly, a switch tree with the instances' own server
layout under it. Neither source gives bandwidths: the tree is taken as
non-blocking (each uplink carries all the NIC bandwidth beneath it), so a
profile measures what it really carries.
"""

from __future__ import annotations

from typing import Any

from topology.errors import ConfigError
from topology.network.model import Topology

INSTANCE_ID_LABEL = "ringleader.io/instance-id"
"""Node label that ties a Ray node to its EC2 instance (any label whose value is the instance id also does)."""


def layer_kinds(depth: int) -> list[str]:
    """Switch kinds for ``depth`` layers, top-down: core, pod..., spine, leaf (as many as there are)."""
    return (["core"] + ["pod"] * (depth - 3) + ["spine", "leaf"]) if depth >= 3 else ["spine", "leaf"][-depth:] if depth else []


def network_nodes_from_labels(hosts: list[dict[str, Any]], keys: list[str]) -> None:
    """Set ``network_nodes`` and ``leaf`` of measured-format hosts from their labels under ``keys`` (top-down).

    Raises
    ------
    ConfigError
        When a host lacks one of the keys.
    """
    if not keys:
        raise ConfigError("--label-keys is empty; give the label keys of the network layers, top-down, comma-separated")
    for h in hosts:
        labels = h.get("labels") or {}
        missing = [k for k in keys if not labels.get(k)]
        if missing:
            raise ConfigError(f"host {h.get('name')!r} has no label {missing[0]!r}; label every node with each layer's key or drop --label-keys")
        h["network_nodes"] = [str(labels[k]) for k in keys]
        h["leaf"] = h["network_nodes"][-1]


def ec2_instances(data: Any, source: str) -> list[dict[str, Any]]:
    """The ``Instances`` of a DescribeInstanceTopology answer, checked."""
    instances = data.get("Instances") if isinstance(data, dict) else None
    if not isinstance(instances, list) or not instances:
        raise ConfigError(f"{source}: 'Instances' is missing or empty; give the JSON of `aws ec2 describe-instance-topology`")
    for i, inst in enumerate(instances):
        if not isinstance(inst, dict) or not inst.get("InstanceId"):
            raise ConfigError(f"{source}: Instances[{i}] has no InstanceId")
        if not isinstance(inst["InstanceId"], str):
            raise ConfigError(f"{source}: Instances[{i}]: InstanceId is {inst['InstanceId']!r}; give the instance id as a string")
        if not isinstance(inst.get("InstanceType", ""), str):
            raise ConfigError(f"{source}: Instances[{i}] ({inst['InstanceId']}): InstanceType is {inst['InstanceType']!r}; give it as a string such as g6e.48xlarge")
        nodes = inst.get("NetworkNodes")
        if not isinstance(nodes, list) or not nodes or not all(isinstance(n, str) and n for n in nodes):
            raise ConfigError(f"{source}: Instances[{i}] ({inst['InstanceId']}): NetworkNodes must list the network node ids, top-down")
    depths = {len(inst["NetworkNodes"]) for inst in instances}
    if len(depths) > 1:
        raise ConfigError(f"{source}: instances list {' and '.join(map(str, sorted(depths)))} network layers (instance families "
                          "differ in depth); describe one family at a time: --filters Name=instance-type,Values=g6e*")
    return instances


def network_nodes_from_ec2(hosts: list[dict[str, Any]], data: Any, source: str) -> None:
    """Set ``network_nodes`` and ``leaf`` of measured-format hosts from an EC2 topology, matched by instance id.

    A host matches an instance when one of its label values is the instance id
    (``INSTANCE_ID_LABEL`` by convention).
    """
    by_id = {inst["InstanceId"]: inst["NetworkNodes"] for inst in ec2_instances(data, source)}
    for h in hosts:
        ids = [v for v in (h.get("labels") or {}).values() if v in by_id]
        if not ids:
            raise ConfigError(f"{source}: host {h.get('name')!r} matches no instance; label its Ray node with {INSTANCE_ID_LABEL}=<instance id>")
        h["network_nodes"] = list(by_id[ids[0]])
        h["leaf"] = h["network_nodes"][-1]


def from_ec2(data: Any, source: str = "EC2 topology") -> Topology:
    """A node/link topology from a DescribeInstanceTopology answer: known instance types under their network nodes."""
    from topology.network.presets import INSTANCE_TYPES  # the server layouts live with the presets

    instances = ec2_instances(data, source)
    kinds = layer_kinds(len(instances[0]["NetworkNodes"]))
    topo = Topology(name=str(data.get("name", "ec2")))
    capacity: dict[str, float] = {}
    parent: dict[str, str] = {}
    for inst in instances:
        itype = inst.get("InstanceType")
        if itype not in INSTANCE_TYPES:
            raise ConfigError(f"{source}: instance type {itype!r} of {inst['InstanceId']} is not known; known: {', '.join(INSTANCE_TYPES)}")
        path = inst["NetworkNodes"]
        for depth, (node, kind) in enumerate(zip(path, kinds)):
            if node not in topo.graph:
                topo.add_node(node, kind)
            elif topo.kind(node) != kind:
                raise ConfigError(f"{source}: network node {node!r} appears at two different layers")
            if depth and parent.setdefault(node, path[depth - 1]) != path[depth - 1]:
                raise ConfigError(f"{source}: network node {node!r} has two parents ({parent[node]}, {path[depth - 1]})")
        build, nic_gbps = INSTANCE_TYPES[itype]
        nics = build(topo, inst["InstanceId"], path[-1])
        topo.graph.nodes[inst["InstanceId"]]["network_nodes"] = list(path)
        for node in path:
            capacity[node] = capacity.get(node, 0.0) + nics * nic_gbps
    for node, up in parent.items():
        topo.add_link(node, up, capacity[node], 2.0)
    return topo
