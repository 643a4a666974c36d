"""The stage's training data: read, tokenise, store, pack.

``read`` (files and records) -> ``tokenize`` (token ids, chat masks) ->
``store`` (token shards + document index, on a path or an object store;
memory-mapped or range-read by ranks) ->
``packing`` (fixed-length samples from the index). ``prepare`` runs the
first three on a Ray cluster with Ray Data; without a prepared store a
rank tokenises the corpus itself (small data, tests) and packs it the same way.
"""

from __future__ import annotations

import logging

from transformers import PreTrainedTokenizerBase

from trainer.config import DataConfig
from trainer.data.packing import PackedDataset, sample_index, upsample_factor
from trainer.data.read import read_documents
from trainer.data.store import TokenStore
from trainer.data.tokenize import conversation_tokens, document_tokens, tokenize_documents

__all__ = ["PackedDataset", "TokenStore", "build_dataset", "conversation_tokens", "document_tokens", "load_store",
           "read_documents", "sample_index", "upsample_factor"]

log = logging.getLogger("trainer.data")


def load_store(data_cfg: DataConfig, tokenizer: PreTrainedTokenizerBase) -> TokenStore:
    """The prepared store at ``data_cfg.store``, else ``data_cfg.path`` (or the generated corpus) tokenised here."""
    if data_cfg.store:
        store = TokenStore.open(data_cfg.store, data_cfg.kind)
        log.info("data: token store %s, %d documents; this rank reads only its samples", data_cfg.store, len(store))
        return store
    if data_cfg.synthetic is not None:
        from trainer.data.synthetic import synthetic_documents

        docs = synthetic_documents(data_cfg.synthetic)
    else:
        docs = read_documents(data_cfg.path, data_cfg.kind, data_cfg.on_bad_record)
    log.info("data: tokenising %d documents in this process (no token store)", len(docs))
    return TokenStore.from_documents(tokenize_documents(tokenizer, docs, data_cfg.kind))


def build_dataset(data_cfg: DataConfig, tokenizer: PreTrainedTokenizerBase, seq_len: int, seed: int = 0) -> PackedDataset:
    """The stage's dataset (see ``trainer.data.packing``)."""
    return PackedDataset(load_store(data_cfg, tokenizer), seq_len, data_cfg, seed)
