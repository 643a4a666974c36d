"""``ringleader clusters``: render autoscaling cluster configs from a recipe, check one, or pin installs.

    ringleader clusters render clusters/recipes/llama3-8b-4194k.yaml --provider aws -o clusters/aws-g6e.yaml
    ringleader clusters render clusters/recipes/llama3-8b-4194k.yaml --provider kuberay --namespace ml
    ringleader clusters validate clusters/aws-g6e.yaml
    ringleader clusters lock
"""

from __future__ import annotations

import argparse
import sys

from launcher.cluster_configs import lock
from launcher.cluster_configs.render import RENDERERS, ClusterOptions, documents, render, to_yaml
from launcher.cluster_configs.summary import describe
from launcher.cluster_configs.validate import check_file
from launcher.recipe import Recipe
from topology.errors import ConfigError
from topology.files import write_atomic


def add_arguments(parser: argparse.ArgumentParser) -> None:
    actions = parser.add_subparsers(dest="action", required=True, metavar="ACTION")
    r = actions.add_parser("render", help="write a cluster config sized for a recipe")
    r.add_argument("recipe", help="recipe YAML (its stages' GPU counts size the cluster)")
    r.add_argument("--provider", required=True, choices=sorted(RENDERERS), help="aws: Ray cluster launcher on EC2; kuberay: RayCluster; local: fake hosts on this machine")
    r.add_argument("-o", "--output", help="file to write (default: print)")
    defaults = ClusterOptions()
    r.add_argument("--region", default=defaults.region)
    r.add_argument("--zone", help="availability zone (a cluster placement group lives in one; default: the region's first, "
                   f"{defaults.availability_zone} in {defaults.region})")
    r.add_argument("--subnet", default=defaults.subnet_id, help="subnet id for the EFA interfaces")
    r.add_argument("--security-group", default=defaults.security_group_id, help="a group that admits itself and SSH from --ssh-cidr (the header shows how to make it)")
    r.add_argument("--ssh-cidr", default=defaults.ssh_cidr, help="addresses allowed to SSH to the nodes (aws)")
    r.add_argument("--namespace", default=defaults.namespace, help="Kubernetes namespace (kuberay)")
    r.add_argument("--image", default=defaults.container_image, help="container image (kuberay)")
    r.add_argument("--hosts-per-leaf", type=int, default=defaults.hosts_per_leaf, help="hosts under one switch (kuberay: one worker group each)")
    v = actions.add_parser("validate", help="check a cluster-launcher YAML or RayCluster manifest with Ray's and KubeRay's own validation, and what it exposes")
    v.add_argument("config", help="cluster config YAML")
    v.add_argument("--strict", action="store_true", help="exit 2 on warnings too (unsafe settings, placeholders, unpinned installs)")
    lk = actions.add_parser("lock", help=f"pin the installed versions of the project's dependencies into {lock.LOCK_RELPATH}")
    lk.add_argument("-o", "--output", default=str(lock.LOCK_PATH), help="file to write")


def run(args: argparse.Namespace) -> int:
    if args.action == "validate":
        report = check_file(args.config)
        for line in report.warnings:
            print(line)
        if args.strict and report.warnings:
            raise ConfigError(f"{args.config}: {len(report.warnings)} warning(s); fix them or drop --strict")
        print(f"{args.config}: valid ({describe(report.docs)})" + (f", {len(report.warnings)} warning(s)" if report.warnings else ""))
        return 0
    if args.action == "lock":
        try:
            text = lock.generate()
        except LookupError as exc:
            raise ConfigError(str(exc)) from None
        write_atomic(args.output, text)
        print(f"wrote {args.output} ({len(lock.parse(text))} pins); re-render the cluster configs so they carry it")
        return 0
    recipe = Recipe.load(args.recipe, check_paths=False)  # data lives on the cluster, not here
    opts = ClusterOptions(region=args.region, availability_zone=args.zone or f"{args.region}a", subnet_id=args.subnet,
                          security_group_id=args.security_group, namespace=args.namespace, ssh_cidr=args.ssh_cidr,
                          container_image=args.image, hosts_per_leaf=args.hosts_per_leaf)
    config = render(recipe, args.provider, opts)
    text = to_yaml(config, args.recipe, args.provider, opts)
    if args.provider == "aws":
        for line in opts.warnings():
            print(f"ringleader: warning: {line}", file=sys.stderr)
    if not args.output:
        sys.stdout.write(text)
        return 0
    write_atomic(args.output, text)
    print(f"wrote {args.output} ({args.provider}; {describe(documents(config))})")
    return 0
