"""``ringleader clusters``: render autoscaling cluster configs from a recipe, or check one.

    ringleader clusters render clusters/recipes/llama3-8b-4194k.yaml --provider aws -o clusters/aws-g6e.yaml
    ringleader clusters render clusters/recipes/llama3-8b-4194k.yaml --provider kuberay --namespace ml
    ringleader clusters validate clusters/aws-g6e.yaml
"""

from __future__ import annotations

import argparse
import sys

from launcher.cluster_configs.render import RENDERERS, ClusterOptions, render, sizing, to_yaml, validate
from launcher.recipe import Recipe
from topology.errors import ConfigError
from topology.model import load_data, write_atomic


def add_arguments(parser: argparse.ArgumentParser) -> None:
    actions = parser.add_subparsers(dest="action", required=True, metavar="ACTION")
    r = actions.add_parser("render", help="write a cluster config sized for a recipe")
    r.add_argument("recipe", help="recipe YAML (its stages' GPU counts size the cluster)")
    r.add_argument("--provider", required=True, choices=sorted(RENDERERS), help="aws: Ray cluster launcher on EC2; kuberay: RayCluster; local: fake hosts on this machine")
    r.add_argument("-o", "--output", help="file to write (default: print)")
    defaults = ClusterOptions()
    r.add_argument("--region", default=defaults.region)
    r.add_argument("--zone", default=defaults.availability_zone, help="availability zone (a cluster placement group lives in one)")
    r.add_argument("--subnet", default=defaults.subnet_id, help="subnet id for the EFA interfaces")
    r.add_argument("--security-group", default=defaults.security_group_id)
    r.add_argument("--namespace", default=defaults.namespace, help="Kubernetes namespace (kuberay)")
    r.add_argument("--image", default=defaults.container_image, help="container image (kuberay)")
    r.add_argument("--hosts-per-leaf", type=int, default=defaults.hosts_per_leaf, help="hosts under one switch (kuberay: one worker group each)")
    v = actions.add_parser("validate", help="check a cluster-launcher YAML or RayCluster manifest with Ray's own validation")
    v.add_argument("config", help="cluster config YAML")


def run(args: argparse.Namespace) -> int:
    if args.action == "validate":
        validate(_mapping(load_data(args.config), args.config), source=args.config)
        print(f"{args.config}: valid")
        return 0
    recipe = Recipe.load(args.recipe, check_paths=False)  # data lives on the cluster, not here
    opts = ClusterOptions(region=args.region, availability_zone=args.zone, subnet_id=args.subnet,
                          security_group_id=args.security_group, namespace=args.namespace,
                          container_image=args.image, hosts_per_leaf=args.hosts_per_leaf)
    text = to_yaml(render(recipe, args.provider, opts), args.recipe, args.provider)
    if not args.output:
        sys.stdout.write(text)
        return 0
    write_atomic(args.output, text)
    hosts = sizing(recipe, args.provider).stage_hosts
    print(f"wrote {args.output} ({args.provider}; hosts per stage: {', '.join(f'{k}={v}' for k, v in hosts.items())})")
    return 0


def _mapping(data: object, source: str) -> dict:
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: expected a mapping at the top level")
    return data
