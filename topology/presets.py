"""Cluster presets, made by generator functions.

Each preset is a ``Topology`` built from a few parameters, so the checked-in
YAML under ``clusters/topologies/`` is a cache of these functions (a test
regenerates it and compares). The numbers:

* An 8x L40S PCIe Gen4 server has no NVLink. Its GPUs sit in pairs (or
  fours) under PCIe switches, two switches per CPU socket; a GPU gets about
  25 GB/s per direction to its switch, and peer-to-peer traffic between the
  sockets crosses the inter-socket link, which carries less (20 GB/s here).
  The NIC sits under the first switch of socket 0, so the two GPUs beside
  it are the ones that should talk to other hosts.
* AWS g6e.48xlarge: the same 8 L40S and 400 Gbps (50 GB/s) of network per
  host, modelled as one logical NIC on a non-blocking fabric.
* The on-prem leaf-spine: 8x L40S servers with one 100 Gbps (12.5 GB/s)
  NIC, 8 hosts per leaf switch, one logical spine. A leaf's uplink carries
  ``8 * host_bw / oversubscription``: at 2:1 each leaf has 400 Gbps up for
  800 Gbps of hosts.

Ray lists nodes in the order they registered, which has nothing to do with
racks. The multi-host presets therefore list their hosts in a fixed shuffled
order (``ray_order``): the ``naive`` strategy, which follows Ray's order as
torchrun and Ray Train do, sees what it would see on a real cluster.
"""

from __future__ import annotations

import random
from functools import partial
from pathlib import Path
from typing import Callable

from topology.errors import ConfigError
from topology.model import Topology

PCIE_GBPS = 25.0
"""PCIe Gen4 x16, per direction, as measured in practice (not the 32 GB/s line rate)."""
XSOCKET_GBPS = 20.0
"""GPU peer-to-peer traffic between CPU sockets (UPI / xGMI), per direction."""
G6E_NIC_GBPS = 50.0
"""AWS g6e.48xlarge: 400 Gbps per host."""
ONPREM_NIC_GBPS = 12.5
"""One 100 Gbps NIC per on-prem server."""

TOPOLOGY_DIR = Path(__file__).resolve().parent.parent / "clusters" / "topologies"


def add_l40s_host(
    topo: Topology,
    host: str,
    *,
    gpus_per_switch: int = 2,
    nic_gbps: float = G6E_NIC_GBPS,
    leaf: str | None = None,
    leaf_link_gbps: float | None = None,
) -> str:
    """Add one 8x L40S PCIe server: 2 sockets, 8 / ``gpus_per_switch`` PCIe switches, one NIC.

    Parameters
    ----------
    gpus_per_switch
        2 (four switches) or 4 (two switches, one per socket).
    nic_gbps
        Network bandwidth of the host, GB/s per direction.
    leaf, leaf_link_gbps
        The switch the NIC plugs into and the cable's bandwidth (default
        ``nic_gbps``; lower for a degraded link).

    Returns
    -------
    str
        The NIC node, the host's endpoint on the network.
    """
    if gpus_per_switch not in (2, 4):
        raise ConfigError(f"gpus_per_switch is {gpus_per_switch}; an 8-GPU PCIe host has 2 or 4 GPUs per switch")
    topo.add_node(host, "host", leaf=leaf)
    sockets = [topo.add_node(f"{host}/socket{s}", "socket", host=host, index=s) for s in range(2)]
    topo.add_link(sockets[0], sockets[1], XSOCKET_GBPS, 2.0)
    switches = []
    for i in range(8 // gpus_per_switch):
        sw = topo.add_node(f"{host}/pcie{i}", "pcie", host=host, index=i)
        topo.add_link(sw, sockets[i * gpus_per_switch // 4], PCIE_GBPS, 1.0)
        switches.append(sw)
    for g in range(8):
        gpu = topo.add_node(f"{host}/gpu{g}", "gpu", host=host, index=g)
        topo.add_link(gpu, switches[g // gpus_per_switch], PCIE_GBPS, 1.0)
    nic = topo.add_node(f"{host}/nic0", "nic", host=host, index=0)
    topo.add_link(nic, switches[0], PCIE_GBPS, 1.0)
    if leaf is not None:
        topo.add_link(nic, leaf, nic_gbps if leaf_link_gbps is None else leaf_link_gbps, 2.0)
    return nic


def l40s_host(gpus_per_switch: int = 2) -> Topology:
    """One on-prem 8x L40S server (the recipe's 8-GPU stage)."""
    topo = Topology(name="l40s-host")
    add_l40s_host(topo, "h00", gpus_per_switch=gpus_per_switch)
    return topo


def ray_order(n: int, seed: int = 0) -> list[int]:
    """A fixed shuffle of ``range(n)``: the order in which ``n`` nodes registered with Ray."""
    order = list(range(n))
    random.Random(seed).shuffle(order)
    return order


def g6e(hosts: int) -> Topology:
    """AWS g6e.48xlarge hosts in one cluster placement group (non-blocking fabric)."""
    topo = Topology(name=f"g6e-{hosts}x")
    if hosts > 1:
        topo.add_node("fabric", "leaf")
    for i in ray_order(hosts):
        add_l40s_host(topo, f"h{i:02d}", nic_gbps=G6E_NIC_GBPS, leaf="fabric" if hosts > 1 else None)
    return topo


def leaf_spine(
    hosts: int = 64,
    hosts_per_leaf: int = 8,
    oversubscription: float = 2.0,
    nic_gbps: float = ONPREM_NIC_GBPS,
    degraded: dict[int, float] | None = None,
    name: str | None = None,
) -> Topology:
    """Hosts under leaf switches under one logical spine.

    Parameters
    ----------
    hosts, hosts_per_leaf
        Cluster size and hosts per leaf (the last leaf may hold fewer).
    oversubscription
        Host bandwidth under a leaf / its uplink: the uplink carries
        ``hosts_per_leaf * nic_gbps / oversubscription``.
    degraded
        Host index -> bandwidth of its (faulty) cable to the leaf, GB/s.
    """
    if hosts < 1 or hosts_per_leaf < 1 or oversubscription <= 0:
        raise ConfigError("leaf_spine needs hosts >= 1, hosts_per_leaf >= 1 and oversubscription > 0")
    degraded = degraded or {}
    topo = Topology(name=name or f"leafspine-{hosts}x-{oversubscription:g}to1")
    topo.add_node("spine", "spine")
    uplink = hosts_per_leaf * nic_gbps / oversubscription
    for leaf in range((hosts + hosts_per_leaf - 1) // hosts_per_leaf):
        topo.add_node(f"leaf{leaf}", "leaf")
        topo.add_link(f"leaf{leaf}", "spine", uplink, 2.0)
    width = len(str(hosts - 1))
    for i in ray_order(hosts):
        add_l40s_host(
            topo, f"h{i:0{max(2, width)}d}", nic_gbps=nic_gbps, leaf=f"leaf{i // hosts_per_leaf}",
            leaf_link_gbps=degraded.get(i),
        )
    return topo


PRESETS: dict[str, Callable[[], Topology]] = {
    "l40s-host": l40s_host,
    "g6e-1x": partial(g6e, 1),
    "g6e-4x": partial(g6e, 4),
    "g6e-64x": partial(g6e, 64),
    "leafspine-64x-1to1": partial(leaf_spine, oversubscription=1.0),
    "leafspine-64x-2to1": partial(leaf_spine, oversubscription=2.0),
    "leafspine-64x-4to1": partial(leaf_spine, oversubscription=4.0),
    # Host 13 (leaf 1) negotiated its 100 Gbps cable down to 25 Gbps.
    "leafspine-64x-2to1-degraded": partial(
        leaf_spine, oversubscription=2.0, degraded={13: ONPREM_NIC_GBPS / 4}, name="leafspine-64x-2to1-degraded",
    ),
}
"""Preset name -> generator. The recipe's sizes: 8 GPUs (l40s-host, g6e-1x),
32 (g6e-4x), 512 (g6e-64x and the leaf-spines)."""


def load_topology(name_or_path: str) -> Topology:
    """A preset by name, or a YAML/JSON file in the node/link or the measured form."""
    if name_or_path in PRESETS:
        return PRESETS[name_or_path]()
    if Path(name_or_path).suffix.lower() in (".yaml", ".yml", ".json") or Path(name_or_path).exists():
        return Topology.load(name_or_path)
    raise ConfigError(
        f"topology {name_or_path!r} is neither a preset ({', '.join(PRESETS)}) nor a .yaml/.json file"
    )


def write_presets(directory: str | Path = TOPOLOGY_DIR) -> list[Path]:
    """Regenerate ``clusters/topologies/<name>.yaml`` from the generators."""
    paths = []
    for name, make in PRESETS.items():
        path = Path(directory) / f"{name}.yaml"
        make().save(path)
        paths.append(path)
    return paths


if __name__ == "__main__":
    for p in write_presets():
        print(p)
