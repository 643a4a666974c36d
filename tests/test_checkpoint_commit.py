"""A damaged or half-written newest checkpoint: the stage resumes from the newest complete one.

One world of 2 gloo ranks (ZeRO-3 over both) runs the reference stage to the
end (checkpoints at steps 2, 4 and 6, all kept), then the same stage in
another directory where rank 1 is SIGKILLed while it puts its files of
step 4 (one file in, no manifest). Copies of the reference, cut back to
"died after step 5" (step 6 and the model deleted, ``latest`` = step4), get
their step-4 checkpoint damaged: one shard truncated, one shard deleted, or
``latest`` emptied. All four are then resumed in one second run; each
must pick the right tag and end with the reference's losses and weights.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch.multiprocessing as mp

from dist_utils import run_distributed
from launcher.runtime.rundir import read_metrics
from stage_helpers import hf_weights, max_diff, plan_for, run_stage_ranks, stage_config
from trainer import storage
from trainer.checkpoint import LATEST, MANIFEST, latest_step

SETTINGS = dict(seq_len=128, gpus=2, batch=1, steps=6, checkpoint_every=2, keep_checkpoints=3, lr=1e-3)
SCENARIOS = {
    # name: (damage to the step-4 tag, tag the resume must start from)
    "truncated shard": ("truncate", 2),
    "deleted shard": ("delete", 2),
    "empty latest": ("empty latest", 4),
    "killed while saving": (None, 2),
}


def died_after_step_5(ref: Path, out: Path) -> None:
    """``out`` as the reference was after step 5: tags step2 and step4, no model."""
    shutil.copytree(ref, out, symlinks=True)
    shutil.rmtree(out / "checkpoints" / "step6")
    for p in out.iterdir():
        if p.name.startswith("hf"):
            storage.remove(str(p))
    storage.write_bytes(str(out / "checkpoints" / LATEST), "step4")


def damage(stage: Path, how: str) -> None:
    tag = stage / "checkpoints" / "step4"
    shard = sorted(tag.glob("*rank_1*_optim_states.pt"))[0]  # rank 1's ZeRO shard: also what a world-size change looks like
    if how == "truncate":
        with open(shard, "r+b") as f:
            f.truncate(shard.stat().st_size // 2)
    elif how == "delete":
        shard.unlink()
    elif how == "empty latest":
        (stage / "checkpoints" / LATEST).write_text("")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("commit")
    ref = stage_config(tmp / "ref", **SETTINGS)
    killed = stage_config(tmp / "killed", **SETTINGS)
    plan = plan_for(ref).to_dict()
    with pytest.raises(mp.ProcessExitedException, match="SIGKILL"):
        run_distributed(run_stage_ranks, 2, [ref.to_dict(), killed.to_dict()], [plan] * 2, None, (1, 4, 1), timeout=240)
    assert latest_step(killed.output_dir) == 2
    assert (tmp / "killed" / "checkpoints" / "step4").is_dir() and not (tmp / "killed" / "checkpoints" / "step4" / MANIFEST).exists()

    dirs = {}
    for name, (how, _) in SCENARIOS.items():
        if how is None:
            dirs[name] = tmp / "killed"
            continue
        dirs[name] = tmp / name.replace(" ", "-")
        died_after_step_5(tmp / "ref", dirs[name])
        damage(dirs[name], how)
    cfgs = [stage_config(d, **SETTINGS).to_dict() for d in dirs.values()]
    [per_stage, _] = run_distributed(run_stage_ranks, 2, cfgs, [plan] * len(cfgs), timeout=300)
    return tmp / "ref", dirs, dict(zip(dirs, per_stage))


@pytest.mark.timeout(600)
@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_resume_skips_a_damaged_newest_checkpoint_and_ends_like_the_uninterrupted_run(runs, scenario):
    ref, dirs, results = runs
    result, seen = results[scenario]
    start = SCENARIOS[scenario][1]
    assert result.resumed_from == start
    reference = [m for m in read_metrics(ref) if "step" in m]
    steps = [m for m in seen if "step" in m]
    assert [m["step"] for m in steps] == list(range(start + 1, 7))
    for got in steps:
        want = reference[got["step"] - 1]
        assert got["loss"] == pytest.approx(want["loss"], abs=1e-6)
    assert reference[0]["loss"] - reference[-1]["loss"] > 0.05  # it learns: a restart from step 0 would differ
    assert max_diff(hf_weights(dirs[scenario] / "hf"), hf_weights(ref / "hf")) < 1e-6
    assert latest_step(dirs[scenario]) == 6

    skipped = [m for m in read_metrics(dirs[scenario]) if m.get("event") == "checkpoint_skipped"]
    assert skipped == [m for m in seen if "event" in m]  # in metrics.jsonl and handed to the launcher alike
    if start == 2:  # the step-4 tag was passed over, and said why
        assert [m["tag"] for m in skipped] == ["step4"]
        assert {"truncated shard": "bytes, the manifest says", "deleted shard": "is missing",
                "killed while saving": "manifest.json"}[scenario] in skipped[0]["reason"]
    else:
        assert skipped == []


def test_keep_checkpoints_and_the_model_pointer(runs):
    """Only the newest ``keep_checkpoints`` complete tags stay; ``hf`` is a symlink to the one model version."""
    ref, dirs, _ = runs
    for stage in (ref, *dirs.values()):
        tags = sorted(p.name for p in (stage / "checkpoints").iterdir() if p.name.startswith("step"))
        assert tags == ["step2", "step4", "step6"]
        assert all((stage / "checkpoints" / t / MANIFEST).is_file() for t in tags)
        versions = [p.name for p in stage.iterdir() if p.name.startswith("hf-")]
        assert len(versions) == 1 and (stage / "hf").is_symlink() and (stage / "hf").resolve().name == versions[0]
