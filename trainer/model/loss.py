"""Causal LM loss of a rank's shard, and the scale that makes data parallelism exact.

Two things live here because both decide what gradient the optimizer sees:

* ``shard_loss_sum``: the summed next-token loss of this rank's tokens. The
  logits of a long shard are the largest tensor of a step (16K tokens x 128256
  vocab x fp32 = 8.4 GB for Llama-3), so they are made and consumed in chunks,
  each recomputed in backward instead of kept.
* ``loss_scale``: the factor each rank multiplies its sum by before
  ``engine.backward`` so DeepSpeed's averaging yields the gradient of the mean
  token loss over the whole global batch.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from trainer.attention.zigzag import IGNORE_INDEX

LOGITS_CHUNK_BYTES = 1 << 30
"""fp32 logits made at once: at most this many bytes (2048 tokens of Llama-3's vocabulary)."""


def loss_scale(world_size: int, grad_accum: int, global_tokens: int) -> float:
    """Factor ``c`` for each rank's summed token loss before ``engine.backward``.

    Let ``N`` be the number of labelled tokens in one optimizer step's global
    batch (every ring, every accumulation micro-step), ``l_t`` the loss of
    token ``t`` and ``S_{r,m}`` the sum of ``l_t`` over the tokens rank ``r``
    holds at micro-step ``m``. The target gradient is ``grad (1/N) sum_t l_t``.

    * Ring attention makes a rank's loss depend on the K/V of every rank of
      its ring, and its backward sends dK/dV back to the rank that made them,
      so the gradients all ranks accumulate add up to the gradient of all
      ranks' backpropagated losses: ``sum_r g_r = c grad sum_{r,m} S_{r,m} =
      c grad sum_t l_t`` (each token lives on exactly one rank).
    * DeepSpeed divides each micro-step's loss by ``A`` (gradient
      accumulation steps) and averages gradients over its data-parallel
      group, which is the whole world of ``W`` ranks (context-parallel ranks
      hold the same parameters too): ``g = c / (W A) grad sum_t l_t``.

    So ``c = W A / N``. Plain data parallelism with equal sequence counts is
    the special case ``N = W A seq_len``, ``c = 1 / seq_len``.

    >>> loss_scale(world_size=4, grad_accum=2, global_tokens=1024)
    0.0078125
    """
    return world_size * grad_accum / max(global_tokens, 1)


def shard_loss_sum(model: torch.nn.Module, input_ids: torch.Tensor, position_ids: torch.Tensor,
                   labels: torch.Tensor, documents: Any = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed next-token loss (fp32) and labelled-token count of one shard.

    Parameters
    ----------
    model
        An HF causal LM (``base_model`` + output embeddings), possibly wrapped
        by DeepSpeed ZeRO: its modules are called, never their weights read.
    input_ids, position_ids, labels
        ``[batch, local_seq]``: this rank's zigzag shard; labels already
        shifted on the whole sequence, ``-100`` where there is no loss.
    documents
        Document boundaries (``trainer.attention.documents.Documents``) handed
        to the attention function of every layer; None: plain causal attention.
    """
    extra = {} if documents is None else {"documents": documents}
    hidden = model.base_model(input_ids=input_ids, position_ids=position_ids, use_cache=False, **extra).last_hidden_state
    head = model.get_output_embeddings()
    chunk = max(1, LOGITS_CHUNK_BYTES // (4 * head.out_features * hidden.shape[0]))
    count = (labels != IGNORE_INDEX).sum()
    if hidden.shape[1] <= chunk:
        return _chunk_loss(head, hidden, labels), count
    total = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, hidden.shape[1], chunk):
        part = slice(start, start + chunk)
        total = total + checkpoint(_chunk_loss, head, hidden[:, part], labels[:, part], use_reentrant=False)
    return total, count


def _chunk_loss(head: torch.nn.Module, hidden: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    logits = head(hidden).float()
    return F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=IGNORE_INDEX, reduction="sum")


class ShardLoss(torch.nn.Module):
    """An HF causal LM whose forward is ``shard_loss_sum``: what DeepSpeed wraps.

    Running the loss inside the wrapped module's forward keeps ZeRO-3's
    parameter fetching (module hooks) and DeepSpeed's step bookkeeping in
    charge of every weight the loss touches, the output head included.
    """

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor, labels: torch.Tensor,
                documents: Any = None) -> tuple[torch.Tensor, torch.Tensor]:
        return shard_loss_sum(self.model, input_ids, position_ids, labels, documents)
