"""Packing, upsampling, chat masking and the sample order of the stage's data."""

import hashlib
import json
import os
import random
import re
from collections import Counter
from dataclasses import replace
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from stage_helpers import CHAT, CORPUS
from topology.errors import ConfigError
from trainer.config import DataConfig
from trainer.data import build_dataset, read_documents, sample_index, upsample_factor
from trainer.data.packing import IGNORE_INDEX, PackedDataset, place_whole_documents, spread_copies
from trainer.data.store import TokenStore
from trainer.tokenizer import EOT, byte_tokenizer

TOK = byte_tokenizer()


def _stream(ds: PackedDataset) -> list[int]:
    """The packed stream, rebuilt from the documents in the dataset's order (what the old reader held in memory)."""
    return [t for k in ds.order for t in ds.store.document(int(k)).tolist()]


def _docs(tmp_path, texts):
    for i, t in enumerate(texts):
        (tmp_path / f"{i:02d}.txt").write_text(t)
    return DataConfig(path=str(tmp_path))


def test_samples_are_shifted_pieces_of_eos_separated_documents(tmp_path):
    rng = random.Random(0)
    texts = ["".join(rng.choice("abcdefgh ") for _ in range(n)) for n in (180, 250, 120)]
    ds = build_dataset(_docs(tmp_path, texts), TOK, seq_len=64, seed=1)
    stream = _stream(ds)
    assert stream.count(TOK.eos_token_id) == 3 and stream.count(TOK.bos_token_id) == 3
    assert len(ds) == len(stream) // 65
    seen = set()
    for i in range(len(ds)):
        s = ds[i]
        assert s["input_ids"].shape == s["labels"].shape == s["doc_ids"].shape == (64,)
        assert s["labels"][:-1].tolist() == s["input_ids"][1:].tolist()
        start = next(j for j in range(0, len(stream), 65) if stream[j:j + 64] == s["input_ids"].tolist())
        assert stream[start + 64] == int(s["labels"][-1])
        seen.add(start)
    assert len(seen) == len(ds)  # one epoch is a permutation of the pieces


def test_same_seed_same_samples_other_seed_other_order(tmp_path):
    cfg = _docs(tmp_path, [f"document {i} " * (10 + i) for i in range(30)])
    a, b, c = (build_dataset(cfg, TOK, 32, seed=s) for s in (0, 0, 1))
    assert all(a[i]["input_ids"].equal(b[i]["input_ids"]) for i in range(3 * len(a)))
    assert any(not a[i]["input_ids"].equal(c[i]["input_ids"]) for i in range(len(a)))
    # past one epoch indices wrap around in a new order of the same pieces
    first = sorted(a[i]["input_ids"].tolist() for i in range(len(a)))
    second = [a[len(a) + i]["input_ids"].tolist() for i in range(len(a))]
    assert sorted(second) == first and second != [a[i]["input_ids"].tolist() for i in range(len(a))]


def test_long_documents_are_upsampled(tmp_path):
    assert [upsample_factor(n, 100) for n in (50, 100, 101, 250, 10_000)] == [1, 1, 2, 3, 4]
    texts = ["L" * 1000] + ["s" * 50] * 5  # 1002 tokens with BOS/EOS: ceil(1002/300) = 4 copies
    cfg = _docs(tmp_path, texts)
    up = build_dataset(DataConfig(path=cfg.path, long_doc_tokens=300), TOK, 32)
    flat = build_dataset(DataConfig(path=cfg.path, long_doc_tokens=300, upsample_long=False), TOK, 32)
    # copies that found no window of their own at the end of the pass are left out, never doubled up
    assert Counter(_stream(up))[ord("L")] == (4 - up.dropped_copies) * 1000 and up.dropped_copies < 3
    assert Counter(_stream(flat))[ord("L")] == 1000 and flat.dropped_copies == 0
    assert Counter(_stream(up))[ord("s")] == Counter(_stream(flat))[ord("s")] == 250


def test_jsonl_and_parquet_documents(tmp_path):
    (tmp_path / "a.jsonl").write_text("\n".join(json.dumps({"text": t, "meta": 1}) for t in ["one", "two"]) + "\n")
    pq.write_table(pa.table({"text": ["three", "four"]}), tmp_path / "b.parquet")
    (tmp_path / "c.txt").write_text("five")
    (tmp_path / "notes.md").write_text("ignored: not a document type")
    assert read_documents(tmp_path) == ["one", "two", "three", "four", "five"]


def test_chat_labels_cover_exactly_the_assistant_replies():
    ds = build_dataset(DataConfig(path=str(CHAT), kind="chat"), TOK, seq_len=4096)
    convs = read_documents(CHAT, "chat")
    replies = [m["content"] + EOT for c in convs for m in c if m["role"] == "assistant"]
    stream = _stream(ds)
    learn = [bool(f) for k in ds.order for f in ds.store.read(int(k))[1]]
    learned, run = [], []
    for tok, flag in zip(stream, learn):
        if flag:
            run.append(tok)
        elif run:
            learned.append(TOK.decode(run)), run.clear()
    if run:
        learned.append(TOK.decode(run))
    assert sorted(learned) == sorted(replies)
    sample = ds[0]
    masked = sample["labels"] == -100
    assert 0 < int(masked.sum()) < 4096
    assert sample["labels"][~masked].tolist() == sample["input_ids"][1:][~masked[:-1]].tolist() + (
        [] if masked[-1] else [int(sample["labels"][-1])])


def test_sample_index_gives_every_split_of_a_global_batch_the_same_samples():
    def batch(step, dp, accum):
        return sorted(sample_index(step, m, r, dp, accum) for m in range(accum) for r in range(dp))
    for step in range(3):
        assert batch(step, 1, 8) == batch(step, 2, 4) == batch(step, 8, 1) == list(range(8 * step, 8 * step + 8))


def test_demo_corpus_packs_for_the_demo_stages():
    docs = read_documents(CORPUS)
    sizes = [len(d.encode()) + 2 for d in docs]  # bytes + BOS + EOS
    assert sum(sizes) > 40_000 and any(n > 4096 for n in sizes)  # some documents get upsampled
    ds = build_dataset(DataConfig(path=str(CORPUS)), TOK, seq_len=1024)
    assert ds.dropped_copies == 0
    assert ds.stream_tokens == sum(n * upsample_factor(n, 4096) for n in sizes) > sum(sizes)
    assert len(ds) >= 64


@pytest.mark.parametrize("setup,kind,message", [
    (lambda d: None, "pretrain", "holds no pretrain documents"),
    (lambda d: (d / "x.jsonl").write_text('{"body": "no text field"}\n'), "pretrain", r"x.jsonl:1: record has no 'text' field"),
    (lambda d: (d / "x.jsonl").write_text('{"text": \n'), "pretrain", r"x.jsonl:1: not valid JSON"),
    (lambda d: (d / "x.jsonl").write_text('{"messages": "hello"}\n'), "chat", "messages must be a non-empty list"),
    (lambda d: pq.write_table(pa.table({"body": ["x"]}), d / "x.parquet"), "pretrain", "no 'text' column"),
])
def test_bad_data_is_a_one_line_config_error(tmp_path, setup, kind, message):
    setup(tmp_path)
    with pytest.raises(ConfigError, match=message) as err:
        build_dataset(DataConfig(path=str(tmp_path), kind=kind), TOK, 16)
    assert "\n" not in str(err.value)


def test_missing_path_and_too_little_data(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        read_documents(tmp_path / "nope")
    # one pass too short for a sample: passes repeat until one fits
    ds = build_dataset(_docs(tmp_path, ["tiny"]), TOK, seq_len=64)
    assert len(ds) == 1 and ds[0]["input_ids"][:5].tolist() == [TOK.bos_token_id] + list(b"tiny")


def test_doc_ids_number_the_documents_of_each_sample(tmp_path):
    texts = [f"doc{i}-" + "x" * (7 * i + 3) for i in range(12)]
    ds = build_dataset(_docs(tmp_path, texts), TOK, seq_len=40, seed=3)
    for i in range(len(ds)):
        s = ds[i]
        ids, docs = s["input_ids"].tolist(), s["doc_ids"].tolist()
        assert docs[0] == 0 and all(b - a in (0, 1) for a, b in zip(docs, docs[1:]))
        # a new document starts exactly after an EOS (each document is BOS ... EOS)
        starts = [j for j in range(1, 40) if docs[j] != docs[j - 1]]
        assert starts == [j for j in range(1, 40) if ids[j - 1] == TOK.eos_token_id]


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(1, 40), min_size=1, max_size=25), st.integers(2, 60), st.integers(0, 1000), st.data())
def test_no_window_holds_two_copies_of_one_document(lengths, window, seed, data):
    copies = data.draw(st.lists(st.integers(1, 4), min_size=len(lengths), max_size=len(lengths)))
    pool = np.random.default_rng(seed).permutation(np.repeat(np.arange(len(lengths)), copies))
    order, dropped = spread_copies(pool, np.array(lengths), window)
    assert len(order) + dropped == len(pool)
    assert Counter(order.tolist()) <= Counter(pool.tolist())
    pos, seen = 0, {}
    for d in order.tolist():
        windows = set(range(pos // window, (pos + lengths[d] - 1) // window + 1))
        assert not windows & seen.get(d, set()), f"document {d} twice in one window"
        seen[d] = seen.get(d, set()) | windows
        pos += lengths[d]
    if max(copies) == 1:
        assert order.tolist() == pool.tolist()


@settings(max_examples=80, deadline=None)
@given(st.lists(st.integers(1, 40), min_size=1, max_size=30), st.integers(2, 50), st.integers(0, 1000), st.data())
def test_whole_documents_are_cut_only_when_longer_than_a_window(lengths, window, seed, data):
    copies = data.draw(st.lists(st.integers(1, 3), min_size=len(lengths), max_size=len(lengths)))
    pool = np.random.default_rng(seed).permutation(np.repeat(np.arange(len(lengths)), copies))
    lengths = np.array(lengths)
    order, starts = place_whole_documents(pool, lengths, window, np.array(copies) > 1)
    assert sorted(order.tolist()) == sorted(pool.tolist())  # every copy placed
    ends = starts + lengths[order]
    assert (starts[1:] >= ends[:-1]).all()
    for k, d in enumerate(order.tolist()):
        first, last = starts[k] // window, (ends[k] - 1) // window
        if lengths[d] <= window:
            assert first == last, f"document {d} ({lengths[d]} tokens) cut at a window boundary"
        else:
            assert starts[k] % window == 0  # a long document starts a window
        # padding only fills a window's end: a gap before a document means it starts a window
        assert k == 0 or starts[k] == ends[k - 1] or starts[k] % window == 0
    seen = Counter((d, w) for k, d in enumerate(order.tolist()) for w in range(starts[k] // window, (ends[k] - 1) // window + 1))
    assert max(seen.values()) == 1, "a window holds two copies of one document"


def test_whole_documents_samples_hold_every_document_that_fits_uncut_and_learn_no_padding(tmp_path):
    texts = [f"<{i}>" + "x" * (5 * i % 37) + f"</{i}>" for i in range(40)] + ["L" * 150]
    ds = build_dataset(replace(_docs(tmp_path, texts), whole_documents=True), TOK, seq_len=63, seed=2)
    whole = {}
    for i in range(len(ds)):
        s = ds[i]
        ids, labels, docs = s["input_ids"].tolist(), s["labels"].tolist(), s["doc_ids"].tolist()
        text = bytes(t for t in ids if t < 256).decode()
        whole.update({int(m): text for m in re.findall(r"<(\d+)>", text) if f"</{m}>" in text})
        pad = [j for j in range(63) if ids[j] == 0]
        assert pad == list(range(pad[0], 63)) if pad else True  # padding only at the end
        assert all(labels[j - 1] == IGNORE_INDEX for j in pad if j > 0) and all(labels[j] == IGNORE_INDEX for j in pad)
        assert docs == sorted(docs) and (not pad or docs[pad[0]] > docs[pad[0] - 1])
    # every short document of the epoch's windows (the stream's tail is no whole sample) is read uncut
    in_epoch = [int(d) for d, end in zip(ds.order, ds.ends) if end <= len(ds) * 64 and d < 40]
    assert sorted(whole) == sorted(in_epoch) and len(in_epoch) >= 35
    plain = build_dataset(_docs(tmp_path, texts), TOK, seq_len=63, seed=2)
    assert plain.starts.tolist() == (plain.ends - plain.store.lengths[plain.order]).tolist() and 0 not in plain[0]["input_ids"].tolist()


def test_prepared_store_on_disk_gives_the_same_samples(tmp_path):
    from trainer.data.store import commit, new_build_dir, write_shard
    from trainer.data.tokenize import tokenize_documents

    docs = tokenize_documents(TOK, read_documents(CORPUS), "pretrain")
    tmp = new_build_dir(tmp_path / "store")
    index, shards = [], []
    for n, part in enumerate((docs[:3], docs[3:5], docs[5:])):
        name, starts = write_shard(tmp, part)
        index += [(n, s, len(ids)) for s, (ids, _) in zip(starts, part)]
        shards.append(name)
    write_shard(tmp, docs[:1])  # a retried task's orphan: dropped at commit
    store = TokenStore.open(commit(tmp, tmp_path / "store", shards, np.array(index), {"kind": "pretrain"}))
    assert not Path(tmp).exists() and len(list((tmp_path / "store").glob("tokens-*.npy"))) == 3
    cfg = DataConfig(path=str(CORPUS))
    on_disk, in_memory = PackedDataset(store, 256, cfg, seed=5), build_dataset(cfg, TOK, 256, seed=5)
    for i in (0, 1, len(on_disk) - 1, len(on_disk) + 7):
        a, b = on_disk[i], in_memory[i]
        assert all(a[k].equal(b[k]) for k in ("input_ids", "labels", "doc_ids"))
    with pytest.raises(ConfigError, match="holds pretrain data but data.kind is 'chat'"):
        TokenStore.open(tmp_path / "store", "chat")


@pytest.mark.parametrize("content,message", [
    (b"caf\xe9 au lait", r"bad.txt: not UTF-8 \(byte 3\)"),
    (b"  \n", "bad.txt: empty document"),
])
def test_bad_text_files_are_refused_or_skipped_and_counted(tmp_path, content, message):
    (tmp_path / "bad.txt").write_bytes(content)
    (tmp_path / "good.txt").write_text("fine " * 20)
    with pytest.raises(ConfigError, match=message + ".*on_bad_record: skip") as err:
        read_documents(tmp_path)
    assert "\n" not in str(err.value)
    assert read_documents(tmp_path, on_bad_record="skip") == ["fine " * 20]


def _synthetic_store(root, n_tokens: int, seed: int = 0):
    """A prepared store of random documents (mean 2,000 tokens, a few long ones), written with the prepare step's writer."""
    from trainer.data.store import commit, new_build_dir, write_shard

    rng = np.random.default_rng(seed)
    final = root / f"pretrain-{n_tokens}"
    tmp = new_build_dir(final)
    shards, index, left = [], [], n_tokens
    while left > 0:
        lengths = np.minimum(rng.geometric(1 / 2000, size=100) + 2, 60_000)
        docs = [(rng.integers(0, 256, size=int(n), dtype=np.uint32), None) for n in lengths]
        name, starts = write_shard(tmp, docs)
        index += [(len(shards), s, int(n)) for s, n in zip(starts, lengths)]
        shards.append(name)
        left -= int(lengths.sum())
    return commit(tmp, final, shards, np.array(index), {"kind": "pretrain"})


def _probe(store, samples):
    import subprocess
    import sys

    from ray_utils import REPO

    # The script runs by path, so its own folder (tests/) leads sys.path: the repository goes first for its imports.
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    out = subprocess.run([sys.executable, str(REPO / "tests" / "data_probe.py"), "--store", str(store), "--seq-len", "4096",
                          "--samples", *map(str, samples)], capture_output=True, text=True, cwd=REPO, env=env, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_rank_memory_does_not_grow_with_the_corpus_and_a_new_process_reads_the_same_samples(tmp_path):
    small, large = _synthetic_store(tmp_path, 1_500_000), _synthetic_store(tmp_path, 15_000_000, seed=1)
    assert sum(f.stat().st_size for f in large.glob("tokens-*.npy")) > 9 * sum(f.stat().st_size for f in small.glob("tokens-*.npy"))
    samples = [0, 1, 2, 3, 57, 300]
    a, b = _probe(small, samples), _probe(large, samples)
    # the large corpus as int64 tokens in memory would be 114 MiB, several times the whole difference allowed
    assert abs(b["rss_mb"] - a["rss_mb"]) < 0.1 * a["rss_mb"], (a, b)
    # a resumed rank (a fresh process) reads exactly the samples this one does
    ds = PackedDataset(TokenStore.open(small), 4096, DataConfig(path=""), seed=0)
    digest = hashlib.sha256()
    for i in samples:
        for key, value in sorted(ds[i].items()):
            digest.update(key.encode() + value.numpy().tobytes())
    assert a["digest"] == digest.hexdigest() and a["samples"] == len(ds)
