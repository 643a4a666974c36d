"""``ringleader run RECIPE``: run a recipe's stages on Ray.

On a laptop (no cluster: an embedded local Ray, ranks on CPU)::

    python -m launcher run clusters/recipes/demo.yaml

On a cluster, as a Ray job (the run directory must be on shared storage)::

    ray job submit --working-dir . -- python -m launcher run clusters/recipes/RECIPE.yaml --run-dir /shared/runs/x

From a machine that reaches the head's GCS port::

    python -m launcher run RECIPE --address 10.0.0.1:6379 --run-dir /shared/runs/x

Sizing only, nothing started: ``--dry-run [--topology PRESET|FILE]``.
Everything the run can check before it starts (the recipe, the model path,
the cluster address, whether the cluster can ever hold each stage) is
checked first; a failure there is one line and exit status 2.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from launcher.commands.options import add_cluster_arguments, add_profile_arguments, check_profile_arguments, setup_logging
from launcher.recipe import Recipe
from launcher.runtime.rundir import default_run_dir
from topology.errors import ConfigError

log = logging.getLogger("ringleader")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("recipe", help="recipe YAML (clusters/recipes/)")
    add_cluster_arguments(parser)
    parser.add_argument("--run-dir", help="run directory (default: RECIPE's run_dir/NAME-TIMESTAMP); "
                        "rerunning with the same one skips finished stages and resumes the current one")
    add_profile_arguments(parser)
    parser.add_argument("--dry-run", action="store_true", help="size the stages and print the plan; start nothing")
    parser.add_argument("--topology", help="with --dry-run: a topology preset name or file instead of the live cluster")
    parser.add_argument("--strategy", default="aware", choices=("aware", "naive", "random"), help="placement strategy (default: aware)")
    parser.add_argument("--resource-timeout", type=float, default=600.0, metavar="S",
                        help="seconds to wait for a stage's GPUs to appear (autoscaler or replacement host)")


def run(args: argparse.Namespace) -> int:
    if args.topology and not args.dry_run:
        raise ConfigError("--topology goes with --dry-run; a real run profiles the cluster it runs on")
    if args.dry_run:
        from launcher.estimate.dryrun import dry_run

        return dry_run(Recipe.load(args.recipe, check_paths=False), args.topology)
    from launcher.runtime.controller import Controller, ControllerOptions, StageFailed  # Ray, torch: not for --dry-run

    setup_logging()
    check_profile_arguments(args)
    recipe = Recipe.load(args.recipe)
    check_model(recipe)
    options = ControllerOptions(
        run_dir=args.run_dir or default_run_dir(recipe.run_dir, recipe.name), reprofile=args.reprofile,
        resource_timeout_s=args.resource_timeout, strategy=args.strategy,
        profile_cache=Path(args.profile_cache) if args.profile_cache else None,
        profile_transfer_mb=args.profile_mb, profile_repeats=args.profile_repeats,
        profile_timeout_s=args.profile_timeout, verbose=args.verbose,
    )
    import ray

    connect(args.address, recipe, args.verbose)
    controller = Controller(recipe, options)
    try:
        controller.run_all()
    except StageFailed as exc:
        print(f"ringleader: error: {exc}", file=sys.stderr)
        return 1
    finally:
        ray.shutdown()
    log.info("run finished: %s", controller.run_dir.root)
    for line in controller.where():
        log.info("%s", line)
    return 0


def check_model(recipe: Recipe) -> None:
    """The first stage's model must exist before any rank starts (later stages start from earlier ones)."""
    from trainer.modeling import resolve_source

    resolve_source(recipe.model, None)


def connect(address: str | None, recipe: Recipe, verbose: bool = False) -> None:
    """Join the named cluster or start an embedded one sized for ``recipe`` (``launcher.runtime.attach``)."""
    import launcher
    import topology
    import trainer
    from launcher.runtime.attach import attach

    # Embedded: one logical CPU per rank at the widest stage (ranks run on CPU when the machine
    # has fewer GPUs than the recipe asks for), plus one for the driver's tasks.
    import torch

    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if 0 < gpus < recipe.peak_gpus and not (address or os.environ.get("RAY_ADDRESS")):
        log.info("this machine has %d GPU(s) and the recipe needs %d: ranks run on CPU", gpus, recipe.peak_gpus)
    cpus = max(os.cpu_count() or 1, recipe.peak_gpus + 1)
    log.info("%s", attach(address, [launcher, topology, trainer], num_cpus=cpus,
                          num_gpus=gpus if gpus >= recipe.peak_gpus else 0, verbose=verbose))
