"""Data parallelism x ring attention changes nothing but speed: one step of DP=2 x C=2 equals DP=1 x C=1.

Both runs take one optimizer step over the same global batch (two chat
sequences whose labelled-token counts differ, so the loss must be the mean
over all tokens of the batch, not a mean of per-sequence means): 4 ranks
with one sequence per ring of 2, against 1 rank accumulating the two
sequences. Plain SGD without clipping makes the step equal to the gradient
times the learning rate, so any error in loss scaling or gradient
reduction shows in the parameters (AdamW's first step would hide it: it
moves every weight by about lr whatever the gradient's size).
"""

import pytest
import torch

from dist_utils import run_distributed
from stage_helpers import CHAT, MODEL, hf_weights, max_diff, plan_for, run_stage_ranks, stage_config
from trainer.model import loss as loss_mod
from trainer.config import ModelConfig
from trainer.model.loss import loss_scale, shard_loss_sum
from trainer.model.llama import build_model
from trainer.tokenizer import byte_tokenizer

SEQ = 128
LR = 0.5
TOLERANCE = 1e-5
"""Max abs difference of any parameter after the step (fp32; the step itself moves them by ~1e-2)."""
SGD = {"zero_optimization": {"stage": 3}, "optimizer": {"type": "SGD", "params": {}},
       "gradient_clipping": 0.0, "zero_allow_untested_optimizer": True, "steps_per_print": 10**6}


def test_loss_scale_undoes_deepspeed_averaging():
    # W ranks x A micro-steps, N tokens: c * (sum of all token losses) / (W * A) is the token mean.
    assert loss_scale(4, 2, 1024) * 1024 / (4 * 2) == 1.0
    assert loss_scale(1, 1, 0) == 1.0  # a batch with no labelled token contributes nothing, without dividing by 0


def test_chunked_logits_give_the_same_loss_and_gradients(monkeypatch):
    tok = byte_tokenizer()
    model = build_model(ModelConfig(**MODEL), 10_000.0, 64, tokenizer=tok).train()
    ids = torch.randint(0, 256, (1, 64), generator=torch.Generator().manual_seed(0))
    labels = torch.roll(ids, -1, 1)
    labels[0, ::5] = -100
    pos = torch.arange(64)[None]

    def run():
        model.zero_grad()
        total, count = shard_loss_sum(model, ids, pos, labels)
        total.backward()
        return total.detach(), count, {n: p.grad.clone() for n, p in model.named_parameters()}

    whole = run()
    monkeypatch.setattr(loss_mod, "LOGITS_CHUNK_BYTES", 4 * len(tok) * 10)  # 10 tokens per chunk: 7 chunks
    chunked = run()
    assert whole[1] == chunked[1] == 64 - 13
    assert torch.allclose(whole[0], chunked[0], rtol=1e-6)
    assert max_diff(whole[2], chunked[2]) < 1e-6


@pytest.mark.timeout(300)
def test_dp2_x_ring2_step_equals_single_rank_step(tmp_path):
    init = tmp_path / "init"
    tok = byte_tokenizer()
    build_model(ModelConfig(**MODEL), 10_000.0, SEQ, tokenizer=tok).save_pretrained(init)
    tok.save_pretrained(init)
    common = dict(seq_len=SEQ, steps=1, lr=LR, init_from=str(init), deepspeed=SGD,
                  data={"path": str(CHAT), "kind": "chat"}, activation_checkpointing=False)
    wide = stage_config(tmp_path / "dp2_c2", gpus=4, batch=2, grad_accum=1, **common)
    single = stage_config(tmp_path / "dp1_c1", gpus=1, batch=1, grad_accum=2, **common)
    assert wide.tokens_per_step == single.tokens_per_step and wide.cp == 2

    (wide_result, _), = run_distributed(run_stage_ranks, 4, [wide.to_dict()], [plan_for(wide).to_dict()], timeout=240)[0]
    (single_result, _), = run_distributed(run_stage_ranks, 1, [single.to_dict()], [plan_for(single).to_dict()], timeout=240)[0]

    before, after_wide, after_single = hf_weights(init), hf_weights(wide_result.hf_dir), hf_weights(single_result.hf_dir)
    assert max_diff(after_single, before) > 1000 * TOLERANCE  # the step is large against the tolerance
    assert max_diff(after_wide, after_single) < TOLERANCE
    assert abs(wide_result.final_loss - single_result.final_loss) < 1e-5
