"""Ring attention inside HF transformers models, through their AttentionInterface.

transformers 5 looks attention functions up by ``config._attn_implementation``
in ``AttentionInterface``; registering one there is the supported extension
point, so no model code is patched. The function receives each layer's
query ``[b, n_q, s_local, d]`` and key/value ``[b, n_kv, s_local, d]`` (RoPE
applied with the ``position_ids`` given to the model: the global zigzag
positions) and returns ``[b, s_local, n_q, d]``.

An implementation name that transformers' mask builder does not know makes it
skip building a mask (masking_utils), which is right here: the ring is causal
over global positions by construction, and a local ``s x s`` mask would be
both wrong and large.

    groups = ParallelGroups.from_plan(plan)
    model.set_attn_implementation(register_ring_attention(groups))
    ids = shard(input_ids, groups); pos = shard(positions, groups)
    logits = model(input_ids=ids, position_ids=pos).logits

Packed samples under a document mask pass their boundaries through the
model call, which hands extra keyword arguments down to every attention call:

    docs = Documents.from_doc_ids(doc_ids)          # the whole sequence, same on every rank
    ids, pos = shard(input_ids, groups, documents=docs), shard(positions, groups, documents=docs)
    logits = model(input_ids=ids, position_ids=pos, documents=docs).logits
"""

from __future__ import annotations

import torch
from transformers import AttentionInterface

from topology.errors import ConfigError
from trainer.groups import ParallelGroups
from trainer.attention.ring_attention import ring_attention


def register_ring_attention(groups: ParallelGroups) -> str:
    """Register zigzag ring attention over ``groups`` and return its implementation name.

    The name encodes the layout (ring x ulysses and the first rank of the
    sequence's group), so models bound to different groups in one process do
    not share a function; registering the same layout again rebinds it to the
    newest groups.
    """
    name = f"ringleader_ring{groups.ring_size}_ulysses{groups.ulysses_size}_cp{min(groups.cp_ranks)}"

    def attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                  attention_mask: torch.Tensor | None, scaling: float | None = None, dropout: float = 0.0,
                  **kwargs) -> tuple[torch.Tensor, None]:
        if dropout:
            raise ConfigError(f"ring attention has no attention dropout; set attention_dropout=0 (got {dropout})")
        if attention_mask is not None:
            raise ConfigError("ring attention is causal over the whole sequence and takes no attention_mask; "
                             "pack samples to the sequence length instead of padding")
        out = ring_attention(query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2), groups, scale=scaling,
                             documents=kwargs.get("documents"))
        return out, None

    AttentionInterface.register(name, attention)
    return name
