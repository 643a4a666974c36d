"""Building blocks of the stage tests: a tiny Llama stage on the demo corpus, run for real.

Stages run either in ranks spawned by ``dist_utils.run_distributed`` (calling
``run_stage``) or as ``python -m trainer.stage`` processes given torchrun's
environment variables, exactly as torchrun would start them.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch

from ray_utils import REPO, free_port
from topology.planning.plan import Plan, RankPlacement
from trainer.config import StageConfig

CORPUS = REPO / "clusters" / "data" / "corpus"
CHAT = CORPUS / "chat"
TINY = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2}
MODEL = {"tiny": TINY, "base_theta": 10_000.0, "base_len": 128, "head_dim": 16}


def stage_config(output_dir: Path, *, seq_len: int = 256, gpus: int = 2, batch: int = 1, steps: int = 2, **kw: Any) -> StageConfig:
    kw.setdefault("data", {"path": str(CORPUS)})
    kw.setdefault("model", MODEL)
    return StageConfig(name=kw.pop("name", "s"), seq_len=seq_len, rope_theta=kw.pop("rope_theta", 10_000.0), batch=batch,
                       steps=steps, gpus=gpus, output_dir=str(output_dir), **kw)


def plan_for(cfg: StageConfig, world: int | None = None) -> Plan:
    world = world or cfg.gpus
    return Plan("naive", world // cfg.cp, cfg.cp, cfg.ulysses, cfg.seq_len, [RankPlacement(r, "local", r) for r in range(world)])


def run_stage_ranks(rank: int, world: int, cfgs: list[dict], plans: list[dict], kill_at: tuple[int, int] | None = None,
                    kill_in_save: tuple[int, int, int] | None = None) -> list[Any]:
    """Rank body: run stages in order; ``kill_at=(i, step)`` SIGKILLs the rank after that step of stage ``i``.

    ``kill_in_save=(i, step, r)``: rank ``r`` SIGKILLs itself in stage ``i``'s save of tag ``step<step>``,
    right after it has put its first file there (other ranks' files and the manifest not yet written).
    """
    from trainer import storage
    from trainer.stage import run_stage

    put_file = storage.put_file
    stage_now = [0]

    def put_then_die(src: Path, loc: str) -> None:
        put_file(src, loc)
        i, step, victim = kill_in_save
        if (stage_now[0], rank) == (i, victim) and f"/step{step}/" in loc:
            os.kill(os.getpid(), signal.SIGKILL)

    if kill_in_save is not None:
        storage.put_file = put_then_die
    out = []
    for i, (cfg, plan) in enumerate(zip(cfgs, plans)):
        stage_now[0] = i
        seen: list[dict] = []

        def on_metrics(m: dict) -> None:
            seen.append(m)
            if (i, m.get("step")) == kill_at:
                os.kill(os.getpid(), signal.SIGKILL)

        result = run_stage(StageConfig.from_dict(cfg), Plan.from_dict(plan), on_metrics=on_metrics)
        out.append((result, seen))
    return out


def launch_ranks(tmp: Path, configs: list[Path], plan: Path, timeout: float = 120,
                 console: bool = False) -> list[tuple[int, str]]:
    """Start ``python -m trainer.stage`` once per config (rank order) as torchrun would; (exit code, stderr) per rank.

    With ``console`` the text is the rank's whole console, stdout and stderr together.
    """
    port = free_port()
    procs = []
    for rank, config in enumerate(configs):
        env = dict(os.environ, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(len(configs)),
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1")
        err = open(tmp / f"rank{rank}-{port}.err", "w+")
        procs.append((subprocess.Popen([sys.executable, "-m", "trainer.stage", "--config", str(config), "--plan", str(plan)],
                                       cwd=REPO, env=env, stdout=err if console else subprocess.DEVNULL, stderr=err), err))
    results = []
    try:
        for proc, err in procs:
            proc.wait(timeout=timeout)
            err.seek(0)
            results.append((proc.returncode, err.read()))
    finally:
        for proc, err in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            err.close()
    return results


def hf_weights(hf_dir: str | Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(Path(hf_dir) / "model.safetensors"))


def max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k].detach().float() - b[k].detach().float()).abs().max()) for k in a)
