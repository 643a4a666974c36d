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
import socket
import sys
from pathlib import Path

from launcher.recipe import Recipe
from launcher.runtime.rundir import default_run_dir
from topology.errors import ConfigError

log = logging.getLogger("ringleader")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("recipe", help="recipe YAML (clusters/recipes/)")
    parser.add_argument("--address", help="Ray cluster: the head's GCS host:port or ray://host:10001 "
                        "(default: RAY_ADDRESS, as inside `ray job submit`; else an embedded local Ray)")
    parser.add_argument("--run-dir", help="run directory (default: RECIPE's run_dir/NAME-TIMESTAMP); "
                        "rerunning with the same one skips finished stages and resumes the current one")
    parser.add_argument("--reprofile", action="store_true", help="measure the network again even if a profile of these nodes is cached")
    parser.add_argument("--profile-cache", metavar="DIR", help="where measured profiles are kept, keyed by node ids "
                        "(default: ~/.cache/ringleader/profiles)")
    parser.add_argument("--profile-mb", type=float, default=64.0, metavar="MIB",
                        help="size of each timed message between two hosts (default: %(default)s; smaller on slow links)")
    parser.add_argument("--profile-repeats", type=int, default=5, metavar="N", help="timed messages per host pair; the median counts (default: %(default)s)")
    parser.add_argument("--dry-run", action="store_true", help="size the stages and print the plan; start nothing")
    parser.add_argument("--topology", help="with --dry-run: a topology preset name or file instead of the live cluster")
    parser.add_argument("--calibration", metavar="FILE", help="achieved rates for the cost model (`ringleader calibrate -o FILE`); "
                        "default: published achieved figures for the GPU")
    parser.add_argument("--strategy", default="aware", choices=("aware", "naive", "random"), help="placement strategy (default: aware)")
    parser.add_argument("--resource-timeout", type=float, default=600.0, metavar="S",
                        help="seconds to wait for a stage's GPUs to appear (autoscaler or replacement host)")


def run(args: argparse.Namespace) -> int:
    if args.topology and not args.dry_run:
        raise ConfigError("--topology goes with --dry-run; a real run profiles the cluster it runs on")
    if args.dry_run:
        from launcher.estimate.dryrun import dry_run

        return dry_run(Recipe.load(args.recipe, check_paths=False), args.topology, calibration=args.calibration)
    from launcher.runtime.controller import Controller, ControllerOptions, StageFailed  # Ray, torch: not for --dry-run

    _setup_logging()
    recipe = Recipe.load(args.recipe)
    check_model(recipe)
    if args.calibration:
        from topology.calibration import Calibration

        Calibration.load(args.calibration)  # a bad file fails here, before Ray starts
    options = ControllerOptions(
        run_dir=args.run_dir or default_run_dir(recipe.run_dir, recipe.name), reprofile=args.reprofile,
        resource_timeout_s=args.resource_timeout, strategy=args.strategy,
        profile_cache=Path(args.profile_cache) if args.profile_cache else None,
        profile_transfer_mb=args.profile_mb, profile_repeats=args.profile_repeats,
        calibration=Path(args.calibration) if args.calibration else None,
    )
    if not args.profile_mb > 0 or args.profile_repeats < 1:
        raise ConfigError(f"--profile-mb ({args.profile_mb}) must be positive and --profile-repeats ({args.profile_repeats}) at least 1")
    import ray

    connect(args.address, recipe)
    try:
        Controller(recipe, options).run_all()
    except StageFailed as exc:
        print(f"ringleader: error: {exc}", file=sys.stderr)
        return 1
    finally:
        ray.shutdown()
    log.info("run finished: %s", options.run_dir)
    return 0


def check_model(recipe: Recipe) -> None:
    """The first stage's model must exist before any rank starts (later stages start from earlier ones)."""
    from trainer.modeling import resolve_source

    resolve_source(recipe.model, None)


def connect(address: str | None, recipe: Recipe) -> None:
    """``ray.init`` on the given cluster, the job's cluster, or an embedded local one.

    An address is probed with a plain TCP connect first: ``ray.init`` on an
    unreachable address retries for minutes before it gives up.
    """
    import ray

    target = address or os.environ.get("RAY_ADDRESS")
    if target and target not in ("auto", "local"):
        check_reachable(target)
    kwargs = {"logging_level": logging.WARNING}
    if address:
        import launcher
        import topology
        import trainer

        # Workers on a cluster the driver only connects to must run this same code.
        ray.init(address=address, runtime_env={"py_modules": [launcher, topology, trainer]}, **kwargs)
    elif target:
        ray.init(**kwargs)
    else:
        # One logical CPU per rank at the widest stage (ranks run on CPU when the
        # machine has fewer GPUs than the recipe asks for), plus one for the driver's tasks.
        import torch

        gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if 0 < gpus < recipe.peak_gpus:
            log.info("this machine has %d GPU(s) and the recipe needs %d: ranks run on CPU", gpus, recipe.peak_gpus)
        cpus = max(os.cpu_count() or 1, recipe.peak_gpus + 1)
        ray.init(address="local", num_cpus=cpus, num_gpus=gpus if gpus >= recipe.peak_gpus else 0,
                 include_dashboard=False, **kwargs)


def check_reachable(address: str, timeout_s: float = 5.0) -> None:
    """Raise ConfigError naming ``address`` if nothing accepts TCP connections there."""
    hostport = address.split("://", 1)[-1].rstrip("/")
    host, sep, port = hostport.rpartition(":")
    if not sep or not port.isdigit():
        raise ConfigError(f"Ray address {address!r} is not host:port; give the head's GCS address, e.g. 10.0.0.1:6379")
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s):
            pass
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        raise ConfigError(f"cannot reach a Ray cluster at {address} ({reason}); start one with `ray start --head` "
                          "or fix --address / RAY_ADDRESS") from None


def _setup_logging() -> None:
    if not log.handlers:
        handler = logging.StreamHandler(sys.stdout)
        handler.setFormatter(logging.Formatter("%(asctime)s ringleader: %(message)s", "%H:%M:%S"))
        log.addHandler(handler)
        log.setLevel(logging.INFO)
        log.propagate = False
