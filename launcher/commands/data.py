"""``ringleader data prepare``: tokenise a recipe's corpora once into the token store.

From a recipe (every stage's ``data:``, with the model's tokenizer)::

    ringleader data prepare clusters/recipes/demo.yaml
    ray job submit --working-dir . -- python -m launcher data prepare RECIPE --store /shared/runs/tokens

Or one corpus::

    ringleader data prepare --input /shared/ultrachat --tokenizer meta-llama/Meta-Llama-3-8B-Instruct --kind chat

The store root defaults to ``tokens/`` beside the recipe's run directories
(``RUN_DIR_BASE/tokens``), where ``ringleader run`` looks for it; a stage
whose store is missing prepares it before its ranks start, so this command
only moves that work ahead of time. A store that exists is reused and the
command says so.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from launcher.commands.options import add_cluster_arguments
from topology.errors import ConfigError
from trainer import storage


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("action", choices=("prepare",), help="prepare: tokenise into the token store")
    parser.add_argument("recipe", nargs="?", help="recipe YAML: prepare every stage's data")
    parser.add_argument("--input", metavar="PATH", help="a corpus directory or file instead of a recipe")
    parser.add_argument("--tokenizer", metavar="MODEL", help="with --input: local directory or hub name (default: the byte-level tokenizer of tiny models)")
    parser.add_argument("--kind", default="pretrain", choices=("pretrain", "chat"), help="with --input (default: %(default)s)")
    parser.add_argument("--on-bad-record", default="error", choices=("error", "skip"), help="with --input (default: %(default)s)")
    parser.add_argument("--store", metavar="DIR", help="store root on shared storage, a path or a URI such as s3://BUCKET/tokens "
                        "(default: the recipe's run_dir/tokens, or runs/tokens)")
    parser.add_argument("--workers", type=int, metavar="N", help="tokenizer actors (default: one per 16 MB of input, at most one per CPU and one per file)")
    add_cluster_arguments(parser)


def run(args: argparse.Namespace) -> int:
    from trainer.data.prepare import STORE_DIR, PrepareSpec, locate, prepare
    from trainer.data.store import is_complete

    if (args.recipe is None) == (args.input is None):
        raise ConfigError("give a recipe or --input PATH (with --tokenizer and --kind), not both")
    if args.workers is not None and args.workers < 1:
        raise ConfigError(f"--workers is {args.workers}; it must be at least 1")
    if args.recipe:
        from launcher.recipe import Recipe

        recipe = Recipe.load(args.recipe)
        datas = [recipe.data] + [s.data for s in recipe.stages if s.data is not None]
        specs = list(dict.fromkeys(PrepareSpec.of(d, recipe.model) for d in datas))
        root = args.store or storage.join(str(recipe.run_dir), STORE_DIR)
    else:
        specs = [PrepareSpec(args.input, args.kind, args.tokenizer, args.on_bad_record)]
        root = args.store or str(Path("runs") / STORE_DIR)
    import ray

    from launcher.commands.options import setup_logging
    from launcher.commands.run import connect

    setup_logging()
    try:
        for spec in specs:
            if not is_complete(locate(spec, root)[0]) and not ray.is_initialized():
                connect(args.address, None, args.verbose)  # only when there is work to do; no rank slots needed
            print(prepare(spec, root, workers=args.workers).summary(), file=sys.stdout, flush=True)
    finally:
        ray.shutdown()
    return 0
