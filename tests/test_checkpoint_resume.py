"""A stage killed (SIGKILL) after a checkpoint resumes from it and ends exactly like an uninterrupted run.

One world of 2 gloo ranks (a ring of 2, ZeRO-3 partitioned over both,
2 accumulation micro-steps) first runs the stage to the end as the
reference, then runs it again in another directory and kills itself after
step 3, one step past the checkpoint of step 2. The stage is then restarted
through its command line, as torchrun would, and must pick up at step 2.
"""

import pytest
import torch.multiprocessing as mp

from dist_utils import run_distributed
from stage_helpers import hf_weights, launch_ranks, max_diff, metrics, plan_for, run_stage_ranks, stage_config
from trainer.checkpoint import latest_step


@pytest.mark.timeout(300)
def test_killed_stage_resumes_and_ends_with_the_uninterrupted_loss(tmp_path):
    ref = stage_config(tmp_path / "ref", seq_len=128, gpus=2, batch=1, grad_accum=2, steps=4, checkpoint_every=2, lr=1e-3)
    cut = stage_config(tmp_path / "cut", seq_len=128, gpus=2, batch=1, grad_accum=2, steps=4, checkpoint_every=2, lr=1e-3)
    plan = plan_for(ref)

    with pytest.raises(mp.ProcessExitedException, match="SIGKILL"):
        run_distributed(run_stage_ranks, 2, [ref.to_dict(), cut.to_dict()], [plan.to_dict()] * 2, (1, 3), timeout=240)

    assert (tmp_path / "ref" / "hf" / "model.safetensors").is_file() and latest_step(ref.output_dir) == 4
    assert latest_step(cut.output_dir) == 2
    assert [m["step"] for m in metrics(cut.output_dir)] == [1, 2, 3]
    assert not any(p.name.startswith("hf") for p in (tmp_path / "cut").iterdir())  # no model, not even half of one

    cut.save(tmp_path / "cut.json")
    plan.save(tmp_path / "plan.json")
    (rc0, err0), (rc1, err1) = launch_ranks(tmp_path, [tmp_path / "cut.json"] * 2, tmp_path / "plan.json", timeout=240)
    assert (rc0, rc1) == (0, 0), err0[-3000:] + err1[-3000:]
    assert "resuming at step 2" in err0

    resumed, reference = metrics(cut.output_dir), metrics(ref.output_dir)
    assert [m["step"] for m in resumed] == [1, 2, 3, 3, 4]
    assert [m["tokens"] for m in resumed[-2:]] == [m["tokens"] for m in reference[-2:]] == [768, 1024]
    for got, want in zip(resumed[-2:], reference[-2:]):
        assert got["loss"] == pytest.approx(want["loss"], abs=1e-6)
    assert reference[0]["loss"] - reference[-1]["loss"] > 0.05  # it learns, so a resume from scratch would differ
    assert max_diff(hf_weights(tmp_path / "cut" / "hf"), hf_weights(tmp_path / "ref" / "hf")) < 1e-6
    assert latest_step(cut.output_dir) == 4
