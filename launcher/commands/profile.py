"""``ringleader profile``: measure the network of a Ray cluster and write its topology.

    ringleader profile --address 10.0.0.1:6379 -o topology.json
    ringleader profile --address auto --profile-mb 16 --profile-repeats 3 --reprofile --heatmap bandwidth.png
    ringleader profile --label-keys topology.k8s.aws/network-node-layer-1,topology.k8s.aws/network-node-layer-2,topology.k8s.aws/network-node-layer-3
    ringleader profile --ec2-topology instance-topology.json   # `aws ec2 describe-instance-topology` output

Without --address or RAY_ADDRESS it starts an embedded Ray and measures this machine only.

The output is the measured topology (topology/network/model.py's MEASURED_FORMAT):
``ringleader plan --topology topology.json`` places ranks on it.
"""

from __future__ import annotations

import argparse
import io
import os
import sys

from launcher.commands.options import add_cluster_arguments, add_profile_arguments, check_profile_arguments, setup_logging
from launcher.runtime.attach import attach
from launcher.runtime.controller import default_profile_cache
from topology.errors import ConfigError
from topology.network.hierarchy import (INSTANCE_ID_LABEL, ec2_instances, network_nodes_from_ec2,
                                        network_nodes_from_labels)
from topology.files import check_writable, dump_text, load_data, write_atomic
from topology.network.model import Topology
from topology.profiling.profile import ProfileError, profile_cluster


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_cluster_arguments(parser)
    parser.add_argument("-o", "--output", default="topology.json", metavar="FILE", help="measured topology, JSON or YAML by suffix (default topology.json)")
    add_profile_arguments(parser)
    parser.add_argument("--heatmap", metavar="FILE.png", help="also draw the bandwidth matrix (PNG, SVG or PDF)")
    parser.add_argument("--label-keys", metavar="K1,K2,...",
                        help="node-label keys naming the network layers, top-down (e.g. topology.k8s.aws/network-node-layer-1,...-2,...-3)")
    parser.add_argument("--ec2-topology", metavar="FILE.json",
                        help=f"`aws ec2 describe-instance-topology` output; Ray nodes match instances by a label value ({INSTANCE_ID_LABEL})")


def run(args: argparse.Namespace) -> int:
    check_profile_arguments(args)
    for out in (args.output, args.heatmap):
        if out:
            check_writable(out)
    if args.label_keys and args.ec2_topology:
        raise ConfigError("--label-keys and --ec2-topology both name the switch layers; give one")
    ec2 = load_data(args.ec2_topology) if args.ec2_topology else None
    if ec2 is not None:
        ec2_instances(ec2, args.ec2_topology)  # check the file before measuring
    if args.heatmap and os.path.splitext(args.heatmap)[1].lower() not in (".png", ".svg", ".pdf"):
        raise ConfigError(f"--heatmap {args.heatmap}: give a .png, .svg or .pdf file name")
    log = setup_logging()
    import ray

    import topology

    # The probe actors must import this same topology package on every node.
    log.info("%s", attach(args.address, [topology], verbose=args.verbose))
    try:
        data = profile_cluster(args.profile_mb, args.profile_repeats, args.profile_cache or default_profile_cache(),
                               args.reprofile, args.profile_timeout)
    except ProfileError as exc:
        print(f"ringleader: error: {exc}", file=sys.stderr)
        return 1
    finally:
        ray.shutdown()
    hierarchy(data, args, ec2)
    topo = Topology.from_measured(data, source="profile")
    write_atomic(args.output, dump_text(data, args.output))
    print(summary(data))
    print(f"wrote {args.output} ({len(topo.hosts)} hosts, {topo.num_gpus} GPUs)")
    if args.heatmap:
        write_atomic(args.heatmap, heatmap(data, os.path.splitext(args.heatmap)[1][1:].lower()))
        print(f"wrote {args.heatmap}")
    return 0


def hierarchy(data: dict, args: argparse.Namespace, ec2: dict | None) -> None:
    """Name every host's switches, top-down, from label keys or an EC2 topology (they win over inferred leaves)."""
    if args.label_keys:
        network_nodes_from_labels(data["hosts"], [k.strip() for k in args.label_keys.split(",") if k.strip()])
        data["meta"]["leaf_source"] = "label keys"
    elif ec2 is not None:
        network_nodes_from_ec2(data["hosts"], ec2, args.ec2_topology)
        data["meta"]["leaf_source"] = "ec2 topology"


def summary(data: dict) -> str:
    """Hosts with their leaf and GPUs, then the bandwidth matrix in GB/s (row sends to column)."""
    hosts, bw, meta = data["hosts"], data["host_bw_gbps"], data["meta"]
    lines = [f"{len(hosts)} hosts, {len(meta['rounds'])} rounds, {meta['duration_s']:.1f} s, {meta['backend']},"
             f" {meta['transfer_bytes'] / 2**20:g} MiB x {meta['repeats']}; leaves {meta['leaf_source']}"]
    width = max([len(h["name"]) for h in hosts] + [8])
    lines.append(f"{'host':<{width}}  {'leaf':<8} gpus  " + " ".join(f"{i:>7}" for i in range(len(hosts))) + "   GB/s")
    for i, h in enumerate(hosts):
        row = " ".join("      -" if i == j else f"{bw[i][j]:7.3g}" for j in range(len(hosts)))
        lines.append(f"{h['name']:<{width}}  {str(h.get('leaf')):<8} {h['gpus']:>4}  {row}   [{i}]")
    return "\n".join(lines)


def heatmap(data: dict, fmt: str = "png") -> bytes:
    """The bandwidth matrix drawn as a heatmap, hosts labelled with their leaf."""
    from matplotlib.figure import Figure  # no pyplot: no global backend or figure registry to manage

    hosts, bw = data["hosts"], data["host_bw_gbps"]
    n = len(hosts)
    fig = Figure(figsize=(2 + 0.6 * n, 1.5 + 0.6 * n))
    ax = fig.subplots()
    image = ax.imshow(bw, cmap="viridis")
    labels = [f"{h['name']} ({h.get('leaf')})" for h in hosts]
    ax.set_xticks(range(n), labels, rotation=60, ha="right", fontsize=8)
    ax.set_yticks(range(n), labels, fontsize=8)
    if n <= 16:
        top = max(max(row) for row in bw) or 1.0
        for i in range(n):
            for j in range(n):
                if i != j:
                    ax.text(j, i, f"{bw[i][j]:.3g}", ha="center", va="center", fontsize=7,
                            color="black" if bw[i][j] > 0.6 * top else "white")
    ax.set_xlabel("to")
    ax.set_ylabel("from")
    ax.set_title(f"{data.get('name', 'cluster')}: measured bandwidth, GB/s")
    fig.colorbar(image, ax=ax, label="GB/s")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format=fmt, dpi=120)
    return buf.getvalue()
