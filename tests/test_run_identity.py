"""One run directory, one recipe, one run at a time: fingerprints and the run lock, before Ray starts.

The run directory is prepared here as a finished run leaves it (each stage's
identity.json, recipe.yaml, done.json, written by the same functions the
controller calls); the lock holders are real processes.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import ray
import yaml

from launcher.cli import main
from launcher.recipe import Recipe
from launcher.runtime import identity, rundir
from launcher.runtime.lock import LOCK_FILE, Holder, RunLock, read_holder
from topology.errors import ConfigError
from tests.ray_utils import REPO

DEMO = REPO / "clusters" / "recipes" / "demo.yaml"


def write_recipe(path: Path, **stage0) -> Path:
    data = yaml.safe_load(DEMO.read_text())
    data["data"]["path"] = str(REPO / "clusters" / "data" / "corpus")
    data["stages"][0].update(stage0)
    path.write_text(yaml.safe_dump(data))
    return path


def finished_run(tmp_path: Path) -> tuple[Path, Path]:
    """A run directory as the demo recipe's finished run leaves it; returns (recipe, run_dir)."""
    recipe_path = write_recipe(tmp_path / "recipe.yaml")
    run_dir = tmp_path / "run"
    configs = Recipe.load(recipe_path).stage_configs(run_dir)
    rundir.RunDir.create(run_dir, recipe_path)
    for cfg, ident in zip(configs, identity.identities(configs)):
        identity.record(cfg.output_dir, ident)
        rundir.mark_done(cfg.output_dir, {"final_loss": 1.0})
    return recipe_path, run_dir


def test_fingerprint_covers_results_not_layout(tmp_path):
    recipe = Recipe.load(write_recipe(tmp_path / "r.yaml"))
    base = identity.identities(recipe.stage_configs(tmp_path))
    for change, same in [({"seq_len": 512}, False), ({"steps": 9}, False), ({"lr": 1e-4}, False),
                         ({"checkpoint_every": 1}, True), ({"gpus": 4, "min_gpus": 2}, True)]:
        changed = identity.identities(Recipe.load(write_recipe(tmp_path / "r.yaml", **change)).stage_configs(tmp_path))
        assert (changed[0] == base[0]) is same, change
        assert (changed[1].fingerprint == base[1].fingerprint) is same, change  # chained: stage 1 starts from stage 0
    recipe.seed, recipe.max_retries = 1, 7
    seeded = identity.identities(recipe.stage_configs(tmp_path))
    assert seeded[0].fingerprint != base[0].fingerprint and "seed 0 -> 1" in identity.changes(base[0].settings, seeded[0].settings)
    recipe.seed = 0
    assert identity.identities(recipe.stage_configs(tmp_path)) == base  # retries are not part of it


def test_changed_recipe_is_refused_naming_the_fields(tmp_path, capsys):
    recipe_path, run_dir = finished_run(tmp_path)
    before = (run_dir / "recipe.yaml").read_text()
    write_recipe(recipe_path, seq_len=512, steps=8)
    code = main(["run", str(recipe_path), "--run-dir", str(run_dir)])
    lines = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(lines) == 1, lines
    assert "stage '256' differs" in lines[0] and "seq_len 256 -> 512" in lines[0] and "steps 6 -> 8" in lines[0]
    assert "--restart-from 256" in lines[0]
    assert (run_dir / "recipe.yaml").read_text() == before  # never overwritten while the stages say otherwise
    assert not ray.is_initialized() and not (run_dir / LOCK_FILE).exists()


def test_restart_from_names_what_to_redo(tmp_path):
    recipe_path, run_dir = finished_run(tmp_path)
    configs = Recipe.load(recipe_path).stage_configs(run_dir)
    assert identity.stages_to_redo(configs) == []  # unchanged: nothing to redo, finished stages are skipped
    assert identity.stages_to_redo(configs, "1k") == [1]
    changed = Recipe.load(write_recipe(recipe_path, steps=8)).stage_configs(run_dir)
    assert identity.stages_to_redo(changed, "256") == [0, 1]
    with pytest.raises(ConfigError, match=r"stage '256' differs .*steps 6 -> 8"):
        identity.stages_to_redo(changed, "1k")  # the changed stage comes before the restart point
    with pytest.raises(ConfigError, match="--restart-from 'nope' names no stage; stages are 256, 1k"):
        identity.stages_to_redo(changed, "nope")
    aside = identity.move_aside(run_dir, [changed[i].output_dir for i in identity.stages_to_redo(changed, "256")])
    assert sorted(p.name for p in aside.iterdir()) == ["recipe.yaml", "stage0-256", "stage1-1k"]
    assert identity.stages_to_redo(changed) == []  # a fresh start for both


HOLD = """
import sys
from launcher.runtime.lock import RunLock
with RunLock.acquire(sys.argv[1], job_id=sys.argv[2]):
    print("held", flush=True)
    sys.stdin.read()
"""


def hold_lock(run_dir: Path, job_id: str = "02000000", **env: str) -> subprocess.Popen:
    """A real process holding the run lock until its stdin closes; returns once it holds it."""
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(run_dir), job_id], cwd=REPO, stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True, env=dict(os.environ, PYTHONPATH=str(REPO), **env))
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_second_concurrent_run_is_refused(tmp_path, capsys):
    recipe_path, run_dir = finished_run(tmp_path)
    # As under `ray job submit`: the supervisor passes the job's submission id in the driver's job config.
    job_config = json.dumps({"metadata": {"job_submission_id": "raysubmit_test"}})
    holder = hold_lock(run_dir, RAY_JOB_CONFIG_JSON_ENV_VAR=job_config)
    try:
        code = main(["run", str(recipe_path), "--run-dir", str(run_dir)])
        line = capsys.readouterr().err.strip()
        assert code == 2 and "\n" not in line
        assert f"is in use by pid {holder.pid} on {socket.gethostname()}, Ray job 02000000 (submission raysubmit_test)" in line
        assert "(ray job stop raysubmit_test)" in line and not ray.is_initialized()
        with pytest.raises(ConfigError, match=f"in use by pid {holder.pid}"):
            RunLock.acquire(run_dir)
    finally:
        holder.stdin.close()
        holder.wait(timeout=60)
    assert not (run_dir / LOCK_FILE).exists()  # released on the holder's way out
    RunLock.acquire(run_dir).release()


def test_stale_lock_is_taken_over(tmp_path, caplog):
    run_dir = tmp_path / "run"
    holder = hold_lock(run_dir)
    holder.send_signal(signal.SIGKILL)  # dies holding it: no release
    holder.wait(timeout=60)
    assert read_holder(run_dir / LOCK_FILE).pid == holder.pid
    logger = logging.getLogger("ringleader")  # may not propagate once the CLI has set it up
    logger.addHandler(caplog.handler)
    try:
        lock = RunLock.acquire(run_dir)
    finally:
        logger.removeHandler(caplog.handler)
    assert read_holder(run_dir / LOCK_FILE).pid == os.getpid() and "took over the stale lock" in caplog.text
    lock.release()
    me = Holder.me()
    for stale in (Holder(me.host, os.getpid(), pid_start="1", boot_id=me.boot_id),  # our pid, but another process's start
                  Holder(me.host, os.getpid(), pid_start=me.pid_start, boot_id="another-boot")):  # before a reboot
        (run_dir / LOCK_FILE).write_text(json.dumps(stale.__dict__))
        RunLock.acquire(run_dir).release()
    (run_dir / LOCK_FILE).write_text(json.dumps(Holder("another-host", 1, job_id="03000000").__dict__))
    with pytest.raises(ConfigError, match="in use by pid 1 on another-host, Ray job 03000000"):
        RunLock.acquire(run_dir)  # cannot be checked from here: counts as alive
