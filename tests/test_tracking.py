"""What a stage tells its trackers, its metrics.jsonl, its rank logs and the console.

Layers: the recipe's ``tracking:`` block and the plan's figures (no process
group); the rank log's redirection in a plain process; then one stage of two
gloo ranks started as torchrun starts them, with TensorBoard, Weights &
Biases (offline) and MLflow (file store) all on, read back through each
tool's own reader.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from launcher.recipe import Recipe
from stage_helpers import CORPUS, MODEL, launch_ranks, plan_for, stage_config
from tests.ray_utils import REPO
from topology.errors import ConfigError
from topology.planning.plan import Plan, RankPlacement
from trainer.config import StageConfig
from trainer.reporting.tracking import MlflowConfig, TrackingConfig, WandbConfig, plan_figures


def recipe(**tracking) -> dict:
    return {"name": "tracked", "model": MODEL, "data": {"path": str(CORPUS)}, "tracking": tracking,
            "stages": [{"name": "256", "seq_len": 256, "rope_theta": 1e4, "batch": 1, "steps": 2, "gpus": 2}]}


def test_tracking_block_defaults_validation_and_round_trip(tmp_path):
    default = Recipe.from_dict(recipe()).tracking
    assert default == TrackingConfig(tensorboard=True, wandb=None, mlflow=None, ray_metrics=True)
    r = Recipe.from_dict(recipe(wandb={"mode": "offline"}, mlflow={"tracking_uri": "file:/x"}, tensorboard=False))
    # The recipe's name names the W&B project and the MLflow experiment unless given.
    assert r.tracking.wandb == WandbConfig(project="tracked", mode="offline")
    assert r.tracking.mlflow == MlflowConfig(tracking_uri="file:/x", experiment="tracked")
    (cfg,) = r.stage_configs(tmp_path)
    cfg.save(tmp_path / "stage.json")
    assert StageConfig.load(tmp_path / "stage.json").tracking == r.tracking  # what the ranks receive
    for bad, message in [({"wandb": {"mode": "sometimes"}}, r"tracking.wandb.mode is 'sometimes'; use online, offline or disabled"),
                         ({"mlflow": {"uri": "x"}}, r"tracking.mlflow: unknown key\(s\) uri; known keys are tracking_uri, experiment"),
                         ({"tensorbord": True}, r"tracking: unknown key\(s\) tensorbord"),
                         ({"tensorboard": "yes"}, r"tracking.tensorboard is 'yes'; use true or false")]:
        with pytest.raises(ConfigError, match=message):
            Recipe.from_dict(recipe(**bad))


def test_plan_figures_keep_gpu_predictions_for_gpu_runs():
    plan = Plan("aware", 1, 2, 1, 256, [RankPlacement(r, "h", r) for r in range(2)],
                cost={"step_time_s": 2.5, "mfu": 0.4, "slowest_hop_gbps": 12.5, "inter_host_hops": 0, "hidden": True})
    shape = {"world_size": 2.0, "dp": 1.0, "ring": 2.0, "ulysses": 1.0, "seq_len": 256.0}
    assert plan_figures(plan, predictions=False) == {**shape, "inter_host_hops": 0.0, "slowest_hop_gbps": 12.5}
    assert plan_figures(plan, predictions=True) == {**shape, "inter_host_hops": 0.0, "slowest_hop_gbps": 12.5,
                                                    "step_time_s": 2.5, "mfu": 0.4}


RANK_LOG_SCRIPT = """
import logging, os, sys, warnings
from trainer.reporting.ranklog import rank_logging
with rank_logging(sys.argv[1], 1, console=True, verbose=sys.argv[2] == "1"):
    os.write(1, b"from C: stdout\\n")
    os.write(2, b"from C: stderr\\n")
    warnings.warn("deprecated thing", FutureWarning)
    logging.getLogger("trainer.stage").info("a trainer line")
    logging.getLogger("trainer.rank").info("a rank's own figures")
    logging.getLogger("deepspeed").warning("a library's warning")
print("after: back on the console")
"""


@pytest.mark.parametrize("verbose", [False, True])
def test_rank_log_takes_third_party_output_off_the_console(tmp_path, verbose):
    done = subprocess.run([sys.executable, "-c", RANK_LOG_SCRIPT, str(tmp_path), str(int(verbose))], cwd=REPO,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    console = done.stdout + done.stderr
    log = (tmp_path / "logs" / "rank-1.log").read_text()
    assert "[rank 1] a trainer line" in console and "after: back on the console" in console
    assert "rank's own figures" not in console
    for line in ("a trainer line", "a rank's own figures", "a library's warning"):
        assert line in log
    for noise in ("from C: stdout", "from C: stderr", "FutureWarning: deprecated thing"):
        assert (noise in console) == verbose and (noise in log) != verbose


def wandb_records(run_file: Path) -> list:
    """The records of a W&B offline run file (a LevelDB-style log of protobuf records)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = run_file.read_bytes()
    assert data[:4] == b":W&B"
    pos, block, records, part = 7, 32768, [], b""
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        length, kind = int.from_bytes(data[pos + 4:pos + 6], "little"), data[pos + 6]
        part += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # a whole record, or the last piece of one
            record = pb.Record()
            record.ParseFromString(part)
            records.append(record)
            part = b""
    return records


@pytest.mark.timeout(300)
def test_two_rank_stage_reports_every_rank_to_every_tracker(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    pytest.importorskip("mlflow")
    pytest.importorskip("tensorboard")
    from mlflow import MlflowClient
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    mlruns = f"file:{tmp_path / 'mlruns'}"
    cfg = stage_config(tmp_path / "run" / "stage0-s", steps=2, name="s",
                       tracking={"wandb": {"mode": "offline", "project": "p"}, "mlflow": {"tracking_uri": mlruns, "experiment": "e"}})
    cfg.save(tmp_path / "s.json")
    plan_for(cfg).save(tmp_path / "plan.json")
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3 keeps file stores behind it; no server here
    ranks = launch_ranks(tmp_path, [tmp_path / "s.json"] * 2, tmp_path / "plan.json", timeout=240, console=True)
    assert [code for code, _ in ranks] == [0, 0], ranks
    stage_dir = Path(cfg.output_dir)

    # metrics.jsonl: rank 0's lines, with wall-clock time and the slowest and fastest rank.
    lines = [json.loads(line) for line in (stage_dir / "metrics.jsonl").read_text().splitlines()]
    assert [(m["step"], m["rank"]) for m in lines] == [(1, 0), (2, 0)]
    for m in lines:
        assert m["step_time_min_s"] <= m["step_time_s"] <= m["step_time_max_s"] and m["slowest_rank"] in (0, 1)
        assert 0 < m["ring_comm_s"] <= m["ring_comm_max_s"] < m["step_time_max_s"]  # a ring of 2 waits on its P2P
        assert 0 < m["peak_memory_gib"] <= m["peak_memory_max_gib"]
        assert "predicted_step_time_s" not in m  # the plan's GPU prediction means nothing on CPU
    assert lines[0]["time"] <= lines[1]["time"] and abs(lines[1]["time"] - (tmp_path / "s.json").stat().st_mtime) < 600

    # Rank logs: each rank's own figures and the third-party noise; the console has one format and no noise.
    console = ranks[0][1] + ranks[1][1]
    for rank in (0, 1):
        log = (stage_dir / "logs" / f"rank-{rank}.log").read_text()
        assert f"[s] rank {rank} step 2: step time " in log and "ring comm wait" in log
        assert "shm_comm_op built" in log and "FutureWarning" in log
    assert "[rank 0] [s] step 2/2 loss " in console and ranks[1][1] == ""
    for noise in ("Setting accelerator", "shm_comm_op", "FutureWarning", "wandb:", "it/s]"):
        assert noise not in console

    # TensorBoard: every step's scalars and the plan's figures.
    events = EventAccumulator(str(stage_dir / "tensorboard"))
    events.Reload()
    loss = [(e.step, e.value) for e in events.Scalars("train/loss")]
    assert loss == [(m["step"], pytest.approx(m["loss"], rel=1e-6)) for m in lines]
    assert [e.value for e in events.Scalars("train/ring_comm_max_s")] == pytest.approx([m["ring_comm_max_s"] for m in lines])
    assert events.Scalars("plan/world_size")[0].value == 2

    # W&B offline run: named after run dir and stage, the same history.
    (run_file,) = (tmp_path / "run" / "wandb").glob("offline-run-*/run-*.wandb")
    records = wandb_records(run_file)
    run = next(r.run for r in records if r.WhichOneof("record_type") == "run")
    assert (run.display_name, run.run_group, run.project) == ("run/s", "run", "p")
    history = [{i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in r.history.item}
               for r in records if r.WhichOneof("record_type") == "history"]
    assert [h["train/loss"] for h in history] == pytest.approx([m["loss"] for m in lines])
    assert [h["train/step_time_max_s"] for h in history] == pytest.approx([m["step_time_max_s"] for m in lines])

    # MLflow file store: a finished run in the experiment, with the steps and the stage's settings.
    client = MlflowClient(tracking_uri=mlruns)
    (found,) = client.search_runs([client.get_experiment_by_name("e").experiment_id])
    assert found.info.run_name == "run/s" and found.info.status == "FINISHED"
    assert found.data.params["seq_len"] == "256" and found.data.params["ring"] == "2"
    assert [(h.step, h.value) for h in client.get_metric_history(found.info.run_id, "loss")] == \
        [(m["step"], pytest.approx(m["loss"])) for m in lines]
    assert client.get_metric_history(found.info.run_id, "plan/ring")[0].value == 2
