"""``ringleader run RECIPE``: run a recipe's stages on Ray.

On a laptop (no cluster: an embedded local Ray, ranks on CPU)::

    python -m launcher run clusters/recipes/demo.yaml

On a cluster, as a Ray job (the run directory must be on shared storage, or in an object store)::

    ray job submit --working-dir . -- python -m launcher run clusters/recipes/RECIPE.yaml --run-dir /shared/runs/x
    ray job submit --working-dir . -- python -m launcher run clusters/recipes/RECIPE.yaml --run-dir s3://BUCKET/runs/x

From a machine that reaches the head's GCS port::

    python -m launcher run RECIPE --address 10.0.0.1:6379 --run-dir /shared/runs/x

Rerunning with the same ``--run-dir`` skips finished stages; after changing a
stage, ``--restart-from STAGE`` redoes it and the stages after it.

Sizing only, nothing started: ``--dry-run [--topology PRESET|FILE]``.
Everything the run can check before it starts (every recipe field, the model,
the run directory's recipe and lock, the cluster address, whether the cluster
can ever hold each stage) is checked first; each problem is one line, exit status 2.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from launcher.commands.options import add_cluster_arguments, add_profile_arguments, check_profile_arguments, setup_logging
from launcher.recipe import Recipe
from launcher.runtime.rundir import default_run_dir
from topology.errors import ConfigError

if TYPE_CHECKING:  # Ray and torch come with it: imported where a run starts, not for --dry-run
    from launcher.runtime.controller import ControllerOptions

log = logging.getLogger("ringleader")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("recipe", help="recipe YAML (clusters/recipes/)")
    add_cluster_arguments(parser)
    parser.add_argument("--run-dir", help="run directory: a path every host mounts, or an object store URI such as "
                        "s3://BUCKET/runs/x (default: RECIPE's run_dir/NAME-TIMESTAMP); "
                        "rerunning with the same one skips finished stages and resumes the current one")
    add_profile_arguments(parser)
    parser.add_argument("--dry-run", action="store_true", help="size the stages and print the plan; start nothing")
    parser.add_argument("--topology", help="with --dry-run: a topology preset name or file instead of the live cluster")
    parser.add_argument("--calibration", metavar="FILE", help="achieved rates for the cost model (`ringleader calibrate -o FILE`); "
                        "default: published achieved figures for the GPU")
    parser.add_argument("--strategy", default="aware", choices=("aware", "naive", "random"), help="placement strategy (default: aware)")
    parser.add_argument("--resource-timeout", type=float, default=600.0, metavar="S",
                        help="seconds to wait for a stage's GPUs to appear (autoscaler or replacement host)")
    parser.add_argument("--restart-from", metavar="STAGE", help="redo STAGE and every stage after it in an existing "
                        "run directory (needed when the recipe changed them); their old output moves to RUN_DIR/replaced/")
    parser.add_argument("--collective-timeout", type=_seconds, metavar="S", help="seconds a torch.distributed "
                        "collective may wait before the rank fails (default: the recipe's collective_timeout, 1800)")
    parser.add_argument("--watchdog-floor", type=_seconds, metavar="S", help="least time a stage may go "
                        "between two steps (10 x its slowest step if longer) before the attempt is retried; it must cover "
                        "a checkpoint save (default: 600)")


def run(args: argparse.Namespace) -> int:
    if args.topology and not args.dry_run:
        raise ConfigError("--topology goes with --dry-run; a real run profiles the cluster it runs on")
    if args.dry_run:
        from launcher.estimate.dryrun import dry_run

        return dry_run(Recipe.load(args.recipe, check_paths=False), args.topology, calibration=args.calibration)
    from launcher.runtime.controller import Controller, ControllerOptions, StageFailed  # Ray, torch: not for --dry-run
    from launcher.runtime.watchdog import WatchdogPolicy

    setup_logging()
    check_profile_arguments(args)
    recipe = Recipe.load(args.recipe)
    if args.collective_timeout is not None:
        recipe.collective_timeout = args.collective_timeout
    check_model(recipe)
    if args.calibration:
        from topology.calibration import Calibration

        Calibration.load(args.calibration)  # a bad file fails here, before Ray starts
    options = ControllerOptions(
        run_dir=args.run_dir or default_run_dir(recipe.run_dir, recipe.name), reprofile=args.reprofile,
        resource_timeout_s=args.resource_timeout, strategy=args.strategy,
        profile_cache=Path(args.profile_cache) if args.profile_cache else None,
        profile_transfer_mb=args.profile_mb, profile_repeats=args.profile_repeats, restart_from=args.restart_from,
        profile_timeout_s=args.profile_timeout, verbose=args.verbose,
        watchdog=WatchdogPolicy() if args.watchdog_floor is None else WatchdogPolicy(floor_s=args.watchdog_floor),
        calibration=Path(args.calibration) if args.calibration else None,
    )
    check_run_dir(recipe, options)
    import ray

    connect(args.address, recipe, args.verbose)
    controller = Controller(recipe, options)
    previous = signal.signal(signal.SIGTERM, _terminate)  # `ray job stop`: unwind, so placement groups and requests are released
    try:
        controller.run_all()
    except StageFailed as exc:
        print(f"ringleader: error: {exc}", file=sys.stderr)
        return 1
    finally:
        signal.signal(signal.SIGTERM, previous)
        ray.shutdown()
    log.info("run finished: %s", controller.run_dir.root)
    for line in controller.where():
        log.info("%s", line)
    return 0


def check_model(recipe: Recipe) -> None:
    """The first stage's model must be resolvable here before Ray starts (later stages start from earlier ones):
    a local directory with config.json, a valid ``tiny`` config, or a hub name already in the local HF cache;
    and its heads must split into every stage's Ulysses groups."""
    from trainer.model.llama import load_config

    config = load_config(recipe.model, local_only=True)
    recipe.check_heads(config.num_attention_heads, config.num_key_value_heads or config.num_attention_heads)


def check_run_dir(recipe: Recipe, options: ControllerOptions) -> None:
    """Before Ray starts: a run directory that holds other versions of the stages, or that a live run holds, is refused."""
    from launcher.runtime import identity, lock

    from trainer import storage

    root = options.run_dir if storage.is_uri(options.run_dir) else Path(options.run_dir).resolve()
    identity.stages_to_redo(recipe.stage_configs(root), options.restart_from)
    lock.check_free(root)


class Terminated(SystemExit):
    """SIGTERM, raised where the driver is, so that every ``finally`` (workers, placement groups,
    the autoscaler request, the run lock) runs before the process ends."""


def _terminate(signum: int, frame: object) -> None:
    log.warning("terminated (signal %d): releasing the stage's workers, placement group and autoscaler request", signum)
    raise Terminated(128 + signum)


def _seconds(text: str) -> float:
    """argparse type: a finite number of seconds > 0."""
    from pydantic import TypeAdapter, ValidationError

    from trainer.schema import PositiveFloat

    try:
        return TypeAdapter(PositiveFloat).validate_python(text)
    except ValidationError as exc:
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite number of seconds > 0") from exc


def connect(address: str | None, recipe: Recipe | None, verbose: bool = False) -> None:
    """Join the named cluster or start an embedded one sized for ``recipe`` (``launcher.runtime.attach``;
    None: no rank slots, e.g. for ``ringleader data prepare``)."""
    import launcher
    import topology
    import trainer
    from launcher.runtime.attach import attach

    # Embedded: one logical CPU per rank at the widest stage (ranks run on CPU when the machine
    # has fewer GPUs than the recipe asks for), plus one for the driver's tasks.
    import torch

    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    peak = recipe.peak_gpus if recipe else 0
    if 0 < gpus < peak and not (address or os.environ.get("RAY_ADDRESS")):
        log.info("this machine has %d GPU(s) and the recipe needs %d: ranks run on CPU", gpus, peak)
    cpus = max(os.cpu_count() or 1, peak + 1)
    log.info("%s", attach(address, [launcher, topology, trainer], num_cpus=cpus,
                          num_gpus=gpus if gpus >= peak else 0, verbose=verbose))
