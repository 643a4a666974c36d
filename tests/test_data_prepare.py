"""The Ray Data prepare step on a two-node local Ray cluster, and training on its store.

One cluster serves the module. Each check holds the distributed result
against the in-process reference: the same tokens, the same chat masks, the
same samples, and the demo recipe's first stage trained from the store.
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from launcher.cli import main
from launcher.recipe import Recipe
from ray_utils import REPO, local_cluster
from stage_helpers import CHAT, CORPUS
from topology.errors import ConfigError
from trainer.config import DataConfig
from trainer.data import build_dataset, read_documents
from trainer.data.packing import PackedDataset
from trainer.data.prepare import PrepareSpec, ensure_prepared, prepare, tokenizer_workers
from trainer.data.store import TokenStore
from trainer.data.tokenize import conversation_tokens, document_tokens
from trainer.tokenizer import byte_tokenizer

pytestmark = [pytest.mark.ray, pytest.mark.timeout(600)]
TOK = byte_tokenizer()


@pytest.fixture(scope="module")
def cluster():
    with local_cluster(hosts=2, gpus_per_host=0, cpus_per_host=2) as lc:
        yield lc


def test_a_small_corpus_gets_one_tokenizer_actor_and_a_large_one_every_cpu():
    mb = 1_000_000
    assert tokenizer_workers(43_165, files=8, cpus=5) == 1  # the demo corpus: one actor's start-up is the whole job
    assert tokenizer_workers(40 * mb, files=8, cpus=5) == 3
    assert tokenizer_workers(400 * mb, files=8, cpus=5) == 5
    assert tokenizer_workers(400 * mb, files=2, cpus=5) == 2
    assert tokenizer_workers(10, files=3, cpus=5, asked=4) == 3  # --workers, still one file per actor at most


def test_prepare_on_two_nodes_equals_single_process_tokenisation(cluster, tmp_path):
    first = prepare(PrepareSpec(str(CORPUS)), tmp_path, workers=2, progress=False)
    store = TokenStore.open(first.path, "pretrain")
    expected = document_tokens(TOK, read_documents(CORPUS))
    assert first.created and len(store) == len(expected) == first.meta["documents"] == 8
    assert len(store.meta["shards"]) > 1  # several tasks wrote it
    assert [store.document(i).tolist() for i in range(len(store))] == expected
    again = subprocess.run([sys.executable, "-m", "launcher", "data", "prepare", "--input", str(CORPUS), "--store", str(tmp_path)],
                           capture_output=True, text=True, cwd=REPO, timeout=120)
    assert again.returncode == 0 and f"token store {first.path} is already prepared (8 documents" in again.stdout
    assert sorted(p.name for p in tmp_path.iterdir()) == [Path(first.path).name]  # no build directory left


def test_chat_masks_survive_the_round_trip(cluster, tmp_path):
    result = prepare(PrepareSpec(str(CHAT), kind="chat"), tmp_path, workers=1, progress=False)
    store = TokenStore.open(result.path, "chat")
    convs = read_documents(CHAT, "chat")
    for i, conv in enumerate(convs):
        ids, learn = conversation_tokens(TOK, conv)
        tokens, mask = store.read(i)
        assert tokens.tolist() == ids and mask.astype(bool).tolist() == learn
    cfg = DataConfig(path=str(CHAT), kind="chat")
    stored, in_process = PackedDataset(store, 512, cfg, seed=2), build_dataset(cfg, TOK, 512, seed=2)
    for i in range(len(stored) + 2):
        assert all(stored[i][k].equal(in_process[i][k]) for k in ("input_ids", "labels", "doc_ids"))
    assert (stored[0]["labels"] == -100).any()


def test_bad_records_refuse_the_store_or_are_skipped_and_counted(cluster, tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "a.jsonl").write_text(json.dumps({"text": "good one"}) + "\n" + json.dumps({"body": "x"}) + "\n")
    (corpus / "b.jsonl").write_bytes(b'{"text": "fine"}\n\n{"text": "caf\xe9"}\n')
    with pytest.raises(ConfigError) as err:
        prepare(PrepareSpec(str(corpus)), tmp_path / "store", workers=1, progress=False)
    message = str(err.value)
    assert "\n" not in message and message.startswith(f"{corpus / 'a.jsonl'}:2: record has no 'text' field")
    assert "2 bad records in all" in message and "on_bad_record: skip" in message
    assert list((tmp_path / "store").iterdir()) == []  # nothing half-written
    skipped = prepare(PrepareSpec(str(corpus), on_bad_record="skip"), tmp_path / "store", workers=1, progress=False)
    store = TokenStore.open(skipped.path)
    assert skipped.meta["skipped"] == 2 and skipped.meta["skipped_examples"][1].startswith(f"{corpus / 'b.jsonl'}:3: not UTF-8")
    assert [TOK.decode(store.document(i)[1:-1]) for i in range(len(store))] == ["good one", "fine"]


@pytest.mark.timeout(300)
def test_demo_recipe_store_gives_the_samples_tokenising_in_process_gives(cluster, tmp_path):
    """The samples ranks read from a prepared store are the ones in-process tokenisation makes (every controller run
    in the suite then trains on a store: ``Controller`` prepares one before a stage starts)."""
    recipe = Recipe.load(REPO / "clusters" / "recipes" / "demo.yaml")
    cfg = recipe.stage_configs(tmp_path / "run")[0]
    data = ensure_prepared(cfg.data, cfg.model, tmp_path / "tokens")
    assert data.store and TokenStore.open(data.store).meta["documents"] == 8
    assert ensure_prepared(data, cfg.model, tmp_path / "tokens") is data  # a stage given a store keeps it
    stored = build_dataset(data, TOK, cfg.seq_len, cfg.seed)
    in_process = build_dataset(cfg.data, TOK, cfg.seq_len, cfg.seed)
    assert len(stored) == len(in_process)
    assert all(stored[i]["input_ids"].equal(in_process[i]["input_ids"]) for i in range(len(stored)))


def test_data_prepare_takes_a_recipe_or_an_input(capsys):
    assert main(["data", "prepare"]) == 2
    assert "give a recipe or --input PATH" in capsys.readouterr().err
