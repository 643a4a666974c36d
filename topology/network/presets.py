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
  host over four 100 Gbps network cards, one per PCIe switch, on a
  non-blocking fabric.
* GB200 NVL72-style racks: compute trays of 4 GPUs (two Grace sockets,
  each GPU with a 400 Gbps / 50 GB/s NIC of its own), and every GPU of a
  rack linked to the rack's NVLink switches (900 GB/s per GPU and
  direction, spread over the switch planes). Racks are NVLink domains;
  between racks, traffic takes the NICs and an Ethernet / InfiniBand
  leaf-spine whose leaves hold trays of several racks.
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
from topology.files import load_data
from topology.network.hierarchy import from_ec2
from topology.network.model import GpuSpec, Topology

PCIE_GBPS = 25.0
"""PCIe Gen4 x16, per direction, as measured in practice (not the 32 GB/s line rate)."""
XSOCKET_GBPS = 20.0
"""GPU peer-to-peer traffic between CPU sockets (UPI / xGMI), per direction."""
G6E_NIC_GBPS = 50.0
"""AWS g6e.48xlarge: 400 Gbps per host."""
G6E_NICS = 4
"""AWS g6e.48xlarge: four network cards."""
ONPREM_NIC_GBPS = 12.5
"""One 100 Gbps NIC per on-prem server."""

TOPOLOGY_DIR = Path(__file__).resolve().parents[2] / "clusters" / "topologies"


def add_l40s_host(
    topo: Topology,
    host: str,
    *,
    gpus_per_switch: int = 2,
    nic_gbps: float = G6E_NIC_GBPS,
    leaf: str | list[str] | None = None,
    leaf_link_gbps: float | None = None,
    gpus: int = 8,
    nics: int = 1,
) -> str:
    """Add one L40S PCIe server: 2 sockets, ``gpus / gpus_per_switch`` PCIe switches, ``nics`` NICs.

    Parameters
    ----------
    gpus_per_switch
        2 or 4 GPUs under each PCIe switch.
    nic_gbps
        Bandwidth of each NIC, GB/s per direction.
    leaf, leaf_link_gbps
        The switch the NICs plug into, or one switch per NIC (rails: NIC i of
        every host on rail switch i), and the first NIC's cable bandwidth
        (default ``nic_gbps``; lower for a degraded link).
    gpus
        8 (the 48xlarge shape), 4, 2 or 1 (the single-GPU g6e sizes).
    nics
        NICs, spread evenly over the PCIe switches: GPUs use the one under
        their own switch (or the nearest).

    Returns
    -------
    str
        The first NIC node, the host's endpoint on the network.
    """
    switches_n = -(-gpus // gpus_per_switch) if gpus_per_switch in (2, 4) else 0
    if gpus not in (1, 2, 4, 8) or switches_n < 1:
        raise ConfigError(f"an L40S host has 1, 2, 4 or 8 GPUs with 2 or 4 per PCIe switch, not {gpus} with {gpus_per_switch}")
    if nics < 1 or switches_n % nics:
        raise ConfigError(f"nics is {nics}; it must divide the {switches_n} PCIe switches of the host")
    rails = leaf if isinstance(leaf, list) else [leaf] * nics
    if len(rails) != nics:
        raise ConfigError(f"host {host}: {len(rails)} rail switches for {nics} NICs; give one per NIC")
    topo.add_node(host, "host", leaf=rails[0])
    sockets = [topo.add_node(f"{host}/socket{s}", "socket", host=host, index=s) for s in range(2)]
    topo.add_link(sockets[0], sockets[1], XSOCKET_GBPS, 2.0)
    switches = []
    for i in range(switches_n):
        sw = topo.add_node(f"{host}/pcie{i}", "pcie", host=host, index=i)
        topo.add_link(sw, sockets[i * 2 // switches_n], PCIE_GBPS, 1.0)
        switches.append(sw)
    for g in range(gpus):
        gpu = topo.add_node(f"{host}/gpu{g}", "gpu", host=host, index=g)
        topo.add_link(gpu, switches[g // gpus_per_switch], PCIE_GBPS, 1.0)
    for n in range(nics):
        nic = topo.add_node(f"{host}/nic{n}", "nic", host=host, index=n, rail=n if nics > 1 else None)
        topo.add_link(nic, switches[n * switches_n // nics], PCIE_GBPS, 1.0)
        if rails[n] is not None:
            topo.add_link(nic, rails[n], nic_gbps if leaf_link_gbps is None or n else leaf_link_gbps, 2.0)
    return f"{host}/nic0"


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
    """AWS g6e.48xlarge hosts in one cluster placement group (non-blocking fabric).

    Each host has four network cards of 100 Gbps (400 Gbps in all), one per
    PCIe switch: a GPU pair reaches the network through its own card.
    """
    topo = Topology(name=f"g6e-{hosts}x")
    if hosts > 1:
        topo.add_node("fabric", "leaf")
    for i in ray_order(hosts):
        add_l40s_host(topo, f"h{i:02d}", nic_gbps=G6E_NIC_GBPS / G6E_NICS, nics=G6E_NICS, leaf="fabric" if hosts > 1 else None)
    return topo


def leaf_spine(
    hosts: int = 64,
    hosts_per_leaf: int = 8,
    oversubscription: float = 2.0,
    nic_gbps: float = ONPREM_NIC_GBPS,
    degraded: dict[int, float] | None = None,
    name: str | None = None,
    *,
    spines: int = 1,
    gpus: list[int] | None = None,
    uplinks: dict[int, float] | None = None,
    leaves_per_pod: int | None = None,
    core_oversubscription: float = 1.0,
) -> Topology:
    """Hosts under leaf switches under spines (and, with ``leaves_per_pod``, pods under a core).

    Parameters
    ----------
    hosts, hosts_per_leaf
        Cluster size and hosts per leaf (the last leaf may hold fewer).
    oversubscription
        Host bandwidth under a leaf / its uplinks: the uplinks carry
        ``hosts_per_leaf * nic_gbps / oversubscription`` in all, split over
        ``spines`` equal-cost links.
    degraded
        Host index -> bandwidth of its (faulty) cable to the leaf, GB/s.
    spines
        Spine switches every leaf links to (ECMP spreads flows over them).
    gpus
        GPUs of each host (4 or 8) by host index; default 8 everywhere.
    uplinks
        Leaf index -> bandwidth of each of its (degraded) uplinks, GB/s.
    leaves_per_pod, core_oversubscription
        Three tiers: leaves grouped into pods (the pod switch plays the
        spine, one per pod), pods linked to one core switch with
        ``leaves_per_pod`` uplinks' worth over ``core_oversubscription``.
    """
    if hosts < 1 or hosts_per_leaf < 1 or oversubscription <= 0 or spines < 1:
        raise ConfigError("leaf_spine needs hosts >= 1, hosts_per_leaf >= 1, spines >= 1 and oversubscription > 0")
    degraded, uplinks = degraded or {}, uplinks or {}
    gpus = gpus or [8] * hosts
    topo = Topology(name=name or f"leafspine-{hosts}x-{oversubscription:g}to1")
    leaves = (hosts + hosts_per_leaf - 1) // hosts_per_leaf
    uplink = hosts_per_leaf * nic_gbps / oversubscription
    if leaves_per_pod:
        topo.add_node("core", "core")
        for pod in range((leaves + leaves_per_pod - 1) // leaves_per_pod):
            topo.add_node(f"pod{pod}", "pod")
            topo.add_link(f"pod{pod}", "core", leaves_per_pod * uplink / core_oversubscription, 2.0)
        parents = lambda leaf: [f"pod{leaf // leaves_per_pod}"]  # noqa: E731
    else:
        names = ["spine"] if spines == 1 else [f"spine{s}" for s in range(spines)]
        for sp in names:
            topo.add_node(sp, "spine")
        parents = lambda leaf: names  # noqa: E731
    for leaf in range(leaves):
        topo.add_node(f"leaf{leaf}", "leaf")
        ups = parents(leaf)
        for sp in ups:
            topo.add_link(f"leaf{leaf}", sp, uplinks.get(leaf, uplink / len(ups)), 2.0)
    width = len(str(hosts - 1))
    for i in ray_order(hosts):
        add_l40s_host(
            topo, f"h{i:0{max(2, width)}d}", nic_gbps=nic_gbps, leaf=f"leaf{i // hosts_per_leaf}",
            leaf_link_gbps=degraded.get(i), gpus=gpus[i],
        )
    return topo


def rails(hosts: int = 8, nics: int = 2, hosts_per_leaf: int = 8, nic_gbps: float = ONPREM_NIC_GBPS,
          oversubscription: float = 1.0, name: str | None = None) -> Topology:
    """Rail-optimised fabric: NIC ``r`` of every host plugs into rail switch ``r`` of its group; rails meet at a spine.

    Each 8-GPU host has ``nics`` NICs, one per ``8 / nics`` GPUs; a flow
    between GPUs on different rails crosses the spine.
    """
    topo = Topology(name=name or f"rails-{hosts}x-{nics}nic")
    topo.add_node("spine", "spine")
    groups = (hosts + hosts_per_leaf - 1) // hosts_per_leaf
    for grp in range(groups):
        for r in range(nics):
            topo.add_node(f"rail{grp}.{r}", "leaf")
            topo.add_link(f"rail{grp}.{r}", "spine", hosts_per_leaf * nic_gbps / oversubscription, 2.0)
    for i in ray_order(hosts):
        add_l40s_host(topo, f"h{i:02d}", nic_gbps=nic_gbps, nics=nics,
                      leaf=[f"rail{i // hosts_per_leaf}.{r}" for r in range(nics)])
    return topo


GB200 = GpuSpec(name="GB200", tflops_bf16=2250.0, memory_gb=186.0, hbm_gbps=8000.0)
"""One Blackwell GPU of a GB200 superchip: dense BF16 peak, HBM3e."""
NVLINK5_GBPS = 900.0
"""NVLink 5: 18 links of 50 GB/s per direction per GPU."""
GB200_NIC_GBPS = 50.0
"""ConnectX-7, 400 Gbps, one per GPU."""
C2C_GBPS = 64.0
"""What a GPU's traffic to its NIC crosses on the tray (PCIe Gen5 x16), per direction."""


def nvl_domains(domains: int = 2, trays: int = 4, gpus_per_tray: int = 4, planes: int = 2,
                hosts_per_leaf: int = 4, oversubscription: float = 1.0, name: str | None = None) -> Topology:
    """NVLink domains (racks of ``trays`` compute trays) joined by a leaf-spine network.

    Parameters
    ----------
    domains, trays, gpus_per_tray
        Racks, trays (hosts) per rack, GPUs per tray (each GPU has its own NIC).
    planes
        NVLink switches per rack; each GPU links to every one with an equal
        share of its NVLink bandwidth (the model's ECMP spreads a flow over them).
    hosts_per_leaf, oversubscription
        Trays per leaf switch, dealt round-robin over the racks so a leaf
        holds trays of several racks (the switch tree does not follow the
        NVLink domains); leaf uplinks carry ``hosts_per_leaf * gpus_per_tray
        * 50 GB/s / oversubscription``.
    """
    if min(domains, trays, gpus_per_tray, planes, hosts_per_leaf) < 1 or gpus_per_tray % 2 or oversubscription <= 0:
        raise ConfigError("nvl_domains needs domains, trays, planes, hosts_per_leaf >= 1, an even gpus_per_tray, oversubscription > 0")
    topo = Topology(name=name or f"nvl-{domains}x{trays * gpus_per_tray}", gpu=GB200)
    hosts = domains * trays
    leaves = (hosts + hosts_per_leaf - 1) // hosts_per_leaf
    topo.add_node("spine", "spine")
    for leaf in range(leaves):
        topo.add_node(f"leaf{leaf}", "leaf")
        topo.add_link(f"leaf{leaf}", "spine", hosts_per_leaf * gpus_per_tray * GB200_NIC_GBPS / oversubscription, 2.0)
    for d in range(domains):
        for p in range(planes):
            topo.add_node(f"nvl{d}/switch{p}", "nvswitch")
    for i in ray_order(hosts):
        d, t = divmod(i, trays)
        host = f"r{d}t{t:02d}"
        leaf = f"leaf{(t * domains + d) // hosts_per_leaf}"
        topo.add_node(host, "host", leaf=leaf)
        sockets = [topo.add_node(f"{host}/socket{s}", "socket", host=host, index=s) for s in range(2)]
        topo.add_link(sockets[0], sockets[1], C2C_GBPS * 2, 1.0)
        for g in range(gpus_per_tray):
            gpu = topo.add_node(f"{host}/gpu{g}", "gpu", host=host, index=g)
            sw = topo.add_node(f"{host}/pcie{g}", "pcie", host=host, index=g)
            nic = topo.add_node(f"{host}/nic{g}", "nic", host=host, index=g)
            topo.add_link(gpu, sw, C2C_GBPS, 0.5)
            topo.add_link(nic, sw, C2C_GBPS, 0.5)
            topo.add_link(sw, sockets[g * 2 // gpus_per_tray], C2C_GBPS, 0.5)
            topo.add_link(nic, leaf, GB200_NIC_GBPS, 2.0)
            for p in range(planes):
                topo.add_link(gpu, f"nvl{d}/switch{p}", NVLINK5_GBPS / planes, 0.5)
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
    # Two spines (ECMP), 2:1; leaf 2 lost one of its two uplinks' worth.
    "leafspine-64x-2spine": partial(leaf_spine, oversubscription=2.0, spines=2, uplinks={2: ONPREM_NIC_GBPS * 2},
                                    name="leafspine-64x-2spine"),
    # Leaf / pod / core: 4 leaves per pod, 2:1 at the leaves and 2:1 again at the core.
    "threetier-128x": partial(leaf_spine, hosts=128, oversubscription=2.0, leaves_per_pod=4, core_oversubscription=2.0,
                              name="threetier-128x"),
    # 32 hosts, half with 4 GPUs, half with 8, in Ray's (shuffled) order: 192 GPUs.
    "mixed-32x": partial(leaf_spine, hosts=32, oversubscription=2.0, gpus=[4, 8] * 16, name="mixed-32x"),
    "rails-16x-2nic": partial(rails, hosts=16, nics=2),
    # Two NVLink racks of 4 trays x 4 GPUs; their trays share leaf switches.
    "nvl-2x16": partial(nvl_domains, domains=2, trays=4),
}
"""Preset name -> generator. The recipe's sizes: 8 GPUs (l40s-host, g6e-1x),
32 (g6e-4x), 512 (g6e-64x and the leaf-spines)."""


def _instance(gpus: int, nics: int, nic_gbps: float) -> tuple[Callable[[Topology, str, str], int], float]:
    def build(topo: Topology, host: str, leaf: str) -> int:
        add_l40s_host(topo, host, gpus=gpus, nics=nics, nic_gbps=nic_gbps, leaf=leaf)
        return nics
    return build, nic_gbps


INSTANCE_TYPES: dict[str, tuple[Callable[[Topology, str, str], int], float]] = {
    "g6e.48xlarge": _instance(8, 4, G6E_NIC_GBPS / G6E_NICS),  # 8 L40S, 4 x 100 Gbps
    "g6e.24xlarge": _instance(4, 2, G6E_NIC_GBPS / G6E_NICS),  # 4 L40S, 2 x 100 Gbps
    "g6e.12xlarge": _instance(4, 1, G6E_NIC_GBPS / G6E_NICS),  # 4 L40S, 100 Gbps
    # One L40S each; their network bandwidth is the published "up to" figure (a burst, not a floor).
    "g6e.16xlarge": _instance(1, 1, 35 / 8),
    "g6e.8xlarge": _instance(1, 1, 25 / 8),
    "g6e.4xlarge": _instance(1, 1, 20 / 8),
    "g6e.2xlarge": _instance(1, 1, 20 / 8),
    "g6e.xlarge": _instance(1, 1, 20 / 8),
}
"""EC2 instance type -> (server builder under a leaf, GB/s per NIC), for DescribeInstanceTopology files:
every g6e size, as AWS lists them among the types instance topology describes."""


def load_topology(name_or_path: str) -> Topology:
    """A preset by name, or a YAML/JSON file: node/link form, measured form, or EC2 DescribeInstanceTopology JSON."""
    if name_or_path in PRESETS:
        return PRESETS[name_or_path]()
    if Path(name_or_path).suffix.lower() in (".yaml", ".yml", ".json") or Path(name_or_path).exists():
        data = load_data(name_or_path)
        if isinstance(data, dict) and "Instances" in data:
            return from_ec2(data, source=str(name_or_path))
        if isinstance(data, dict) and "CapacityReservations" in data:
            raise ConfigError(f"{name_or_path}: this is `aws ec2 describe-capacity-reservation-topology` output, which "
                              "gives no instance count per reservation; plan from `aws ec2 describe-instance-topology` "
                              "once the instances run")
        return Topology.from_dict(data, source=str(name_or_path))
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
