"""``ringleader niah``: needle-in-a-haystack evaluation of a saved model.

    ringleader niah runs/llama3-8b-4194k/stage4-4191K/hf --ring 8 -o niah/
    ringleader niah ./tiny-model --max-len 4096 --min-len 256 --len-interval 1024 \\
        --depth-interval 0.25 --haystack tests/data/haystack --ring 2 --shard-above 1024

Defaults are the recipe's evaluation (max 4194200, min 100, interval 260000,
depth 0.2, 8 digits). With ``--ring C`` it spawns C ranks on this machine
(NCCL on C GPUs, gloo on CPU): contexts above ``--shard-above`` tokens are
sharded over all C with ring attention, shorter ones are spread over them.
Writes ``OUT/niah.json`` and ``OUT/niah.png`` and prints the grid.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
from dataclasses import asdict
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from topology.errors import ConfigError
from topology.profiling.listen import store_server
from topology.planning.plan import Plan, RankPlacement
from trainer import storage
from trainer.config import ModelConfig
from trainer.engine import end_rank_process, init_process_group
from trainer.groups import ParallelGroups
from trainer.niah.evaluate import NiahConfig, evaluate_checkpoint
from trainer.niah.plot import short_count
from trainer.niah.prompts import PromptBuilder, load_haystack
from trainer.tokenizer import load_tokenizer

DEFAULTS = NiahConfig()


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", help="HF model directory (a stage's hf), its object store URI (s3://.../hf) or a hub name")
    parser.add_argument("--max-len", type=int, default=DEFAULTS.max_len, help="longest context in tokens (default %(default)s)")
    parser.add_argument("--min-len", type=int, default=DEFAULTS.min_len, help="shortest context (default %(default)s)")
    parser.add_argument("--len-interval", type=int, default=DEFAULTS.len_interval, help="step between lengths (default %(default)s)")
    parser.add_argument("--depth-interval", type=float, default=DEFAULTS.depth_interval, help="step between needle depths, in (0, 1] (default %(default)s)")
    parser.add_argument("--digits", type=int, default=DEFAULTS.digits, help="digits of the needle's number (default %(default)s)")
    parser.add_argument("--haystack", default=DEFAULTS.haystack, help="directory of .txt files (default: the demo corpus)")
    parser.add_argument("--ring", type=int, default=1, help="ranks to spawn on this machine; long contexts are sharded over them")
    parser.add_argument("--shard-above", type=int, default=DEFAULTS.shard_above, help="contexts longer than this are sharded (default %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the needle numbers")
    parser.add_argument("-o", "--output", default="niah", help="output directory for niah.json and niah.png (default %(default)s)")


def run(args: argparse.Namespace) -> int:
    config = NiahConfig.from_dict(dict(max_len=args.max_len, min_len=args.min_len, len_interval=args.len_interval,
                                       depth_interval=args.depth_interval, digits=args.digits, haystack=args.haystack,
                                       shard_above=args.shard_above, seed=args.seed), source="niah")
    if args.ring < 1:
        raise ConfigError(f"--ring is {args.ring}; give the number of ranks to spawn (>= 1)")
    if torch.cuda.is_available() and args.ring > torch.cuda.device_count():
        raise ConfigError(f"--ring {args.ring} needs {args.ring} GPUs; this machine has {torch.cuda.device_count()}")
    # Everything that can be wrong with the input fails here, before a model loads or a rank starts.
    haystack = load_haystack(config.haystack)
    args.model = storage.local_model(args.model)  # a stage's hf on an object store: downloaded once to this machine
    if args.model.startswith((".", "/", "~")) and not Path(args.model).expanduser().exists():
        raise ConfigError(f"model {args.model!r} does not exist; give a model directory (a stage's hf/) or a hub name")
    PromptBuilder(load_tokenizer(ModelConfig(path=args.model)), haystack, config.digits, config.seed).build(config.min_len, 0.0)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.ring == 1:
        summary = evaluate_checkpoint(args.model, config, out_dir=args.output).to_dict()
    else:
        # The ranks meet at a store this process serves on loopback only, at a port no one can take first.
        store = store_server("127.0.0.1", timeout_s=1800)
        mp.start_processes(_rank_main, args=(args.ring, store.port, args.model, asdict(config), args.output),
                           nprocs=args.ring, join=True, start_method="spawn")
        del store
        summary = json.loads((Path(args.output) / "niah.json").read_text())
    print(format_summary(summary))
    print(f"wrote {Path(args.output) / 'niah.json'} and {Path(args.output) / 'niah.png'}")
    return 0


def format_summary(summary: dict) -> str:
    """The grid as text: one row per depth, one column per length, answer tokens right / answer tokens."""
    cells = summary["cells"]
    lengths = sorted({c["length"] for c in cells})
    depths = sorted({c["depth"] for c in cells})
    by_key = {(c["length"], c["depth"]): c for c in cells}
    width = max(8, *(len(short_count(n)) + 2 for n in lengths))
    lines = [f"needle in a haystack: {summary['model']} (ring {summary['ring']}, {len(cells)} cells; "
             "each cell: answer tokens right, * = number found)",
             "depth \\ length".ljust(16) + "".join(short_count(n).rjust(width) for n in lengths)]
    for d in depths:
        row = []
        for n in lengths:
            c = by_key.get((n, d))
            mark = "" if c is None else f"{c['tokens_correct']}/{c['answer_tokens']}" + ("*" if c["correct"] else " ")
            row.append(mark.rjust(width))
        lines.append(f"{d:>6.0%}".ljust(16) + "".join(row))
    found = sum(c["correct"] for c in cells)
    lines.append(f"average: {summary['average']:.1%} ({found}/{len(cells)} numbers found); "
                 f"answer tokens right: {summary['token_accuracy']:.1%}")
    return "\n".join(lines)


def local_plan(ranks: int, seq_len: int) -> Plan:
    """One context-parallel group of ``ranks`` GPUs on this machine, in index order."""
    placements = [RankPlacement(rank=r, host="localhost", gpu=r) for r in range(ranks)]
    return Plan(strategy="naive", dp=1, cp=ranks, ulysses=1, seq_len=seq_len, placements=placements, topology="localhost")


def _rank_main(rank: int, world: int, port: int, model: str, config: dict, out_dir: str) -> None:
    """One spawned rank: the torchrun variables, a process group, the plan's groups, then the evaluation."""
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
                      TORCHELASTIC_USE_AGENT_STORE="True")  # the parent serves the store; every rank is a client
    if not torch.cuda.is_available():
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    logging.basicConfig(level=logging.INFO, format=f"[rank {rank}] %(message)s")
    backend = "nccl" if init_process_group().type == "cuda" else "gloo"
    try:
        cfg = NiahConfig(**config)
        groups = ParallelGroups.from_plan(local_plan(world, cfg.max_len), backend=backend)
        evaluate_checkpoint(model, cfg, groups=groups, out_dir=out_dir)
    finally:
        dist.destroy_process_group()
    end_rank_process(0)  # a failure above is raised to the parent instead, with its traceback

