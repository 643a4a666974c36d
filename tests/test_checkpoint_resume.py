"""A stage killed (SIGKILL) after a checkpoint resumes from it and ends exactly like an uninterrupted run.

One world of 2 gloo ranks (a ring of 2, ZeRO-3 partitioned over both,
2 accumulation micro-steps) first runs the stage to the end as the
reference, then runs it again in another directory and kills itself after
step 3, one step past the checkpoint of step 2. The stage is then restarted
through its command line, as torchrun would, and must pick up at step 2.
"""

import shutil

import pytest
import torch.multiprocessing as mp

from dist_utils import run_distributed
from launcher.runtime.rundir import read_metrics
from stage_helpers import hf_weights, launch_ranks, max_diff, plan_for, run_stage_ranks, stage_config
from trainer.checkpoint import latest_step, saved_world_size


@pytest.mark.timeout(300)
def test_killed_stage_resumes_and_ends_with_the_uninterrupted_loss(tmp_path):
    ref = stage_config(tmp_path / "ref", seq_len=128, gpus=2, batch=1, grad_accum=2, steps=4, checkpoint_every=2, lr=1e-3)
    cut = stage_config(tmp_path / "cut", seq_len=128, gpus=2, batch=1, grad_accum=2, steps=4, checkpoint_every=2, lr=1e-3)
    plan = plan_for(ref)

    with pytest.raises(mp.ProcessExitedException, match="SIGKILL"):
        run_distributed(run_stage_ranks, 2, [ref.to_dict(), cut.to_dict()], [plan.to_dict()] * 2, (1, 3), timeout=240)

    assert (tmp_path / "ref" / "hf" / "model.safetensors").is_file() and latest_step(ref.output_dir) == 4
    assert latest_step(cut.output_dir) == 2
    assert [m["step"] for m in read_metrics(cut.output_dir)] == [1, 2, 3]
    assert not any(p.name.startswith("hf") for p in (tmp_path / "cut").iterdir())  # no model, not even half of one

    cut.save(tmp_path / "cut.json")
    plan.save(tmp_path / "plan.json")
    (rc0, err0), (rc1, err1) = launch_ranks(tmp_path, [tmp_path / "cut.json"] * 2, tmp_path / "plan.json", timeout=240)
    assert (rc0, rc1) == (0, 0), err0[-3000:] + err1[-3000:]
    assert "resuming at step 2" in err0

    resumed, reference = read_metrics(cut.output_dir), read_metrics(ref.output_dir)
    assert [m["step"] for m in resumed] == [1, 2, 3, 3, 4]
    assert [m["tokens"] for m in resumed[-2:]] == [m["tokens"] for m in reference[-2:]] == [768, 1024]
    for got, want in zip(resumed[-2:], reference[-2:]):
        assert got["loss"] == pytest.approx(want["loss"], abs=1e-6)
    assert reference[0]["loss"] - reference[-1]["loss"] > 0.05  # it learns, so a resume from scratch would differ
    assert max_diff(hf_weights(tmp_path / "cut" / "hf"), hf_weights(tmp_path / "ref" / "hf")) < 1e-6
    assert latest_step(cut.output_dir) == 4


@pytest.mark.timeout(300)
def test_checkpoint_of_two_ranks_resumes_on_one_with_its_optimizer_state(tmp_path):
    """After a lost host the stage may go on with fewer ranks: the ZeRO-3 shards of 2 ranks are re-partitioned for 1.

    The reference runs 4 steps on a ring of 2. Its step-2 checkpoint is then
    resumed by one rank (no ring): steps 3 and 4 must give the reference's
    losses and weights, which needs Adam's moments too, not just the weights.
    """
    ref = stage_config(tmp_path / "ref", seq_len=128, gpus=2, batch=1, steps=4, checkpoint_every=2, lr=1e-3)
    run_distributed(run_stage_ranks, 2, [ref.to_dict()], [plan_for(ref).to_dict()], timeout=240)
    small = tmp_path / "small"
    shutil.copytree(tmp_path / "ref" / "checkpoints" / "step2", small / "checkpoints" / "step2")
    (small / "checkpoints" / "latest").write_text("step2")
    assert saved_world_size(small / "checkpoints" / "step2") == 2
    one = stage_config(small, seq_len=128, gpus=1, batch=1, steps=4, checkpoint_every=2, lr=1e-3)

    [[(result, seen)]] = run_distributed(run_stage_ranks, 1, [one.to_dict()], [plan_for(one).to_dict()], timeout=240)

    assert result.resumed_from == 2 and [m["step"] for m in seen] == [3, 4]
    reference = read_metrics(ref.output_dir)
    assert [m["tokens"] for m in seen] == [m["tokens"] for m in reference[-2:]]
    for got, want in zip(seen, reference[-2:]):
        assert got["loss"] == pytest.approx(want["loss"], abs=1e-5)
    assert max_diff(hf_weights(small / "hf"), hf_weights(tmp_path / "ref" / "hf")) < 1e-5
    assert saved_world_size(small / "checkpoints" / "step4") == 1 and not (small / "checkpoints" / "universal").exists()
