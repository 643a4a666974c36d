"""Run directories on object storage, and run directories that are not shared.

An S3-compatible server (moto's standalone server) runs on localhost; the
demo recipe runs on a two-host Ray cluster with its run directory at
``s3://BUCKET/runs/demo``. A rank's worker is SIGKILLed after the first
stage's first checkpoint: the stage must resume from the checkpoint in the
bucket. Afterwards the bucket holds the whole run (plans, metrics, manifests,
each stage's model behind its ``hf`` pointer) and ``ringleader niah`` reads
the last stage's model straight from it.

The stages read their data from a token store the controller prepares in
the bucket beside the run (Ray Data writing shards straight to S3, the
commit object last); no rank tokenises, and the store holds exactly the
tokens and samples of in-process tokenisation.

Then a driver whose run directory lies on a mount only it can see (a tmpfs
in its own mount namespace: a disk local to one host) is refused before any
rank trains.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from launcher.recipe import Recipe
from launcher.runtime.rundir import finished, read_metrics
from tests.ray_utils import REPO, local_cluster, when_step_reached
from topology.errors import ConfigError
from trainer import storage
from trainer.checkpoint import MANIFEST, latest_step
from trainer.config import DataConfig
from trainer.data import build_dataset, read_documents
from trainer.data.packing import PackedDataset
from trainer.data.prepare import PrepareSpec, prepare
from trainer.data.ranged import BlockCache, RangedArray
from trainer.data.store import TokenStore
from trainer.data.tokenize import tokenize_documents
from trainer.reporting.ranklog import LOGS_DIR
from trainer.tokenizer import byte_tokenizer

BUCKET = "ringleader-test"
RUN = f"s3://{BUCKET}/runs/demo"
TOKENS = f"s3://{BUCKET}/runs/tokens"
"""The token store root beside the run directory, where the stages prepare their data."""
KILL_AT_STEP = 4
"""A rank dies here: after the first stage's checkpoint of step 3."""


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    """A real S3 endpoint on localhost; AWS_* variables point pyarrow (and the Ray nodes started later) at it."""
    moto_server = pytest.importorskip("moto.server")
    import boto3

    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # one log line per request otherwise
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    env = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
           "AWS_REGION": "us-east-1", "AWS_ENDPOINT_URL": f"http://{host}:{port}", "AWS_EC2_METADATA_DISABLED": "true",
           "RINGLEADER_CACHE": str(tmp_path_factory.mktemp("host-cache"))}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL"]).create_bucket(Bucket=BUCKET)
    try:
        yield env
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        server.stop()


@pytest.mark.parametrize("kind_", ["posix", "s3"])
def test_storage_publishes_whole_files_and_follows_the_model_pointer(s3, tmp_path, kind_):
    """The same calls on a directory and on the bucket: atomic writes, listing, pointer switch, download."""
    root = str(tmp_path / "run") if kind_ == "posix" else f"s3://{BUCKET}/unit/{tmp_path.name}"
    stage = storage.join(root, "stage0-a")
    assert storage.read_bytes(storage.join(stage, "done.json")) is None and storage.children(stage) == []
    storage.write_bytes(storage.join(stage, "done.json"), "{}")
    storage.append_line(storage.join(stage, "metrics.jsonl"), '{"step": 1}')
    storage.append_line(storage.join(stage, "metrics.jsonl"), '{"step": 2}')
    assert storage.read_bytes(storage.join(stage, "metrics.jsonl")) == b'{"step": 1}\n{"step": 2}\n'

    model = tmp_path / "model"
    (model / "sub").mkdir(parents=True)
    (model / "config.json").write_text('{"a": 1}')
    (model / "sub" / "w.bin").write_bytes(b"x" * 1000)
    for version in ("hf-step1-aaaaaa", "hf-step2-bbbbbb"):
        storage.put_dir(model, storage.join(stage, version)) if kind_ == "s3" else shutil.copytree(model, tmp_path / "run" / "stage0-a" / version)
        storage.switch_pointer(stage, version)
    assert storage.file_sizes(storage.join(stage, "hf-step2-bbbbbb")) == {"config.json": 8, "sub/w.bin": 1000}
    assert storage.kind(storage.join(stage, "hf")) == ("link" if kind_ == "posix" else "file")
    local = Path(storage.local_model(storage.join(stage, "hf")))
    assert (local / "sub" / "w.bin").read_bytes() == b"x" * 1000
    assert local.resolve().name == "hf-step2-bbbbbb"
    assert sorted(storage.children(stage)) == ["done.json", "hf", "hf-step1-aaaaaa", "hf-step2-bbbbbb", "metrics.jsonl"]
    storage.remove(storage.join(stage, "hf-step1-aaaaaa"))
    assert storage.kind(storage.join(stage, "hf-step1-aaaaaa")) == "missing"


def test_a_store_in_the_bucket_appears_at_its_commit_and_reads_chat_masks_by_range(s3):
    """Two builds of one key race to commit on the bucket; the store is readable only from the first commit on."""
    from trainer.data.store import commit, is_complete, new_build_dir, store_path, write_shard

    chat = DataConfig(path=str(REPO / "clusters" / "data" / "corpus" / "chat"), kind="chat")
    docs = tokenize_documents(byte_tokenizer(), read_documents(chat.path, "chat"), "chat")
    final = store_path(f"s3://{BUCKET}/unit-tokens", "chat", "0123456789abcdef")
    builds = []
    for _ in range(2):  # e.g. two drivers preparing the same corpus at once
        tmp = new_build_dir(final)
        name, starts = write_shard(tmp, docs)
        write_shard(tmp, docs[:1])  # a retried task's orphan: dropped at commit
        builds.append((tmp, name, np.array([(0, s, len(d)) for s, (d, _) in zip(starts, docs)])))
    assert not is_complete(final)
    with pytest.raises(ConfigError, match="is not a prepared token store"):
        TokenStore.open(final)
    for tmp, name, index in builds:
        commit(tmp, final, [name], index, {"kind": "chat"})
    (tmp, name, _), (loser, _, _) = builds
    build = storage.name(tmp)
    assert storage.kind(loser) == "missing"  # it found the first commit and removed itself
    assert set(storage.file_sizes(final)) == {"meta.json", f"{build}/index.npy", f"{build}/tokens-{name}.npy", f"{build}/learn-{name}.npy"}

    store = TokenStore.open(final, "chat")
    assert store.meta["build"] == build
    for i, (ids, learn) in enumerate(docs):
        tokens, mask = store.read(i)
        assert np.array_equal(tokens, ids) and np.array_equal(mask.astype(bool), learn)
    a, b = PackedDataset(store, 512, chat, seed=2), build_dataset(chat, byte_tokenizer(), 512, seed=2)
    for i in range(len(a) + 2):
        assert all(a[i][k].equal(b[i][k]) for k in ("input_ids", "labels", "doc_ids"))
    assert 0 < store._cache.requests <= 4 and store._cache.size <= store._cache.capacity

    # The block cache holds at most its capacity, whatever is read through it.
    cache = BlockCache(capacity=4096)
    tokens = RangedArray(storage.join(final, build, f"tokens-{name}.npy"), cache, block=1024)
    assert np.array_equal(tokens[:], np.concatenate([d for d, _ in docs])) and cache.size <= 4096 < len(tokens) * 4


def demo_recipe(tmp: Path) -> Recipe:
    """clusters/recipes/demo.yaml with the run directory in the bucket and a first stage long enough to be cut."""
    data = yaml.safe_load((REPO / "clusters" / "recipes" / "demo.yaml").read_text())
    data["data"]["path"] = str(REPO / "clusters" / "data" / "corpus")
    data["run_dir"] = f"s3://{BUCKET}/runs"
    data["stages"][0]["steps"] = 9
    path = tmp / "demo.yaml"
    path.write_text(yaml.safe_dump(data))
    return Recipe.load(path)


def rank_worker_pids(lc) -> list[int]:
    """Processes of this cluster's rank actors: children of its raylets that Ray titled ``ray::RankWorker...``."""
    import psutil
    from ray._private import ray_constants

    raylets = [p.process.pid for node in lc.nodes for p in node.all_processes[ray_constants.PROCESS_TYPE_RAYLET]]
    return [c.pid for r in raylets for c in psutil.Process(r).children(recursive=True)
            if any("RankWorker" in part for part in c.cmdline())]


def kill_a_rank(lc, stage_dir: str, step: int) -> dict:
    """SIGKILL a rank's worker; by step KILL_AT_STEP the checkpoint of step 3 is committed."""
    victim, committed = max(rank_worker_pids(lc)), latest_step(stage_dir)
    os.kill(victim, signal.SIGKILL)
    return {"pid": victim, "at_step": step, "committed": committed}


@pytest.fixture(scope="module")
def cluster_run(s3, tmp_path_factory):
    """The demo recipe on two hosts of two fake GPUs, run directory in the bucket, a rank killed mid-stage."""
    from launcher.runtime.controller import Controller, ControllerOptions

    tmp = tmp_path_factory.mktemp("s3run")
    recipe = demo_recipe(tmp)
    options = ControllerOptions(run_dir=RUN, profile_cache=tmp / "profiles", resource_timeout_s=60,
                                profile_transfer_mb=1, profile_repeats=2, progress_bar=False)
    stage0 = storage.join(RUN, 'stage0-256')
    with local_cluster(hosts=2, gpus_per_host=2, cpus_per_host=2) as lc:
        # Rank 0's working copy of metrics.jsonl on this machine: the bucket's copy lags behind it.
        with when_step_reached(storage.work_dir(stage0), KILL_AT_STEP, lambda step: kill_a_rank(lc, stage0, step)) as killed:
            results = Controller(recipe, options).run_all()
        yield {"results": results, "killed": killed, "recipe": recipe, "tmp": tmp, "address": lc.address, "ips": lc.ips}


@pytest.mark.timeout(900)
def test_demo_runs_on_object_storage_and_resumes_from_the_bucket(cluster_run):
    killed, results = cluster_run["killed"], cluster_run["results"]
    assert killed and killed["committed"] >= 3, killed
    assert [r["steps"] for r in results] == [9, 6]
    assert not any(storage.local_path(r["hf_dir"]) for r in results) and results[1]["hf_dir"] == f"{RUN}/stage1-1k/hf"

    # The bucket's metrics.jsonl: steps up to the committed checkpoint, the retry, then the steps after it.
    metrics = read_metrics(storage.join(RUN, "stage0-256"))
    [at] = [i for i, m in enumerate(metrics) if m.get("event") == "retry"]
    resume = metrics[at]["resume_step"]
    assert resume >= 3 and results[0]["resumed_from"] == resume
    assert [m["step"] for m in metrics[:at]] == list(range(1, resume + 1))
    assert [m["step"] for m in metrics[at + 1:] if "step" in m] == list(range(resume + 1, 10))

    for i, name in enumerate(("stage0-256", "stage1-1k")):
        stage = storage.join(RUN, name)
        assert finished(stage) is not None
        for f in ("plan.json", "stage.json", "topology.json", "metrics.jsonl"):
            assert storage.kind(storage.join(stage, f)) == "file", f
        version = storage.read_bytes(storage.join(stage, "hf")).decode().strip()
        assert version.startswith("hf-step") and storage.kind(storage.join(stage, version, "config.json")) == "file"
        tag = f"step{latest_step(stage)}"
        manifest = json.loads(storage.read_bytes(storage.join(stage, "checkpoints", tag, MANIFEST)))
        sizes = storage.file_sizes(storage.join(stage, "checkpoints", tag))
        assert {rel: meta["size"] for rel, meta in manifest["files"].items()} == {k: v for k, v in sizes.items() if k != MANIFEST}
    stage1 = json.loads(storage.read_bytes(storage.join(RUN, "stage1-1k", "stage.json")))
    assert stage1["init_from"] == f"{RUN}/stage0-256/hf"


@pytest.mark.timeout(120)
def test_the_stages_read_the_token_store_in_the_bucket_and_no_rank_tokenised(cluster_run):
    stages = ("stage0-256", "stage1-1k")
    [store] = {json.loads(storage.read_bytes(storage.join(RUN, s, "stage.json")))["data"]["store"] for s in stages}
    assert store.startswith(f"{TOKENS}/pretrain-")
    # Every rank of every attempt (the killed one too) opened the store and tokenised nothing.
    logs = {p: p.read_text() for s in stages for p in (storage.work_dir(storage.join(RUN, s)) / LOGS_DIR).glob("rank-*.log")}
    assert len(logs) == 2 + 4, sorted(logs)  # the stages run on 2 and 4 ranks
    for path, text in logs.items():
        assert f"data: token store {store}, 8 documents" in text and "data: tokenising" not in text, path


@pytest.mark.timeout(120)
def test_token_store_in_the_bucket_equals_in_process_tokenisation_token_for_token(cluster_run):
    """The store the stage prepared in the bucket holds the tokens, and packs the samples, a rank would have made itself."""
    recipe = cluster_run["recipe"]
    again = prepare(PrepareSpec.of(recipe.data, recipe.model), TOKENS, progress=False)
    assert not again.created and again.path.startswith(f"{TOKENS}/pretrain-")  # the stage prepared it
    store = TokenStore.open(again.path, "pretrain")
    docs = tokenize_documents(byte_tokenizer(), read_documents(recipe.data.path), "pretrain")
    assert len(store) == len(docs) == 8 and all(np.array_equal(store.document(i), d) for i, (d, _) in enumerate(docs))
    a, b = PackedDataset(store, 256, recipe.data, seed=3), build_dataset(recipe.data, byte_tokenizer(), 256, seed=3)
    for i in range(len(a)):
        assert all(a[i][k].equal(b[i][k]) for k in ("input_ids", "labels", "doc_ids"))

    # One committed build in the bucket: meta.json (written last) names it, and nothing else lies there.
    meta, build = store.meta, storage.join(again.path, store.meta["build"])
    shards = {f"{meta['build']}/tokens-{s}.npy" for s in meta["shards"]}
    assert set(storage.file_sizes(again.path)) == {"meta.json", f"{meta['build']}/index.npy", *shards}

    # A rank reads only the byte ranges of its samples: a piece of a document costs a block or two, not the shard.
    doc = len(store) // 2
    shard, start, length = (int(v) for v in store.index[doc])
    cache = BlockCache()
    tokens = RangedArray(storage.join(build, f"tokens-{meta['shards'][shard]}.npy"), cache, block=4096)
    assert length > 2048 and np.array_equal(tokens[start + 1024:start + 2048], docs[doc][0][1024:2048])
    assert cache.requests == 1 and cache.size <= 2 * 4096 < len(tokens) * tokens.dtype.itemsize


@pytest.mark.timeout(120)
def test_a_failed_prepare_leaves_nothing_in_the_bucket(cluster_run, tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "a.jsonl").write_text(json.dumps({"text": "good one"}) + "\n" + json.dumps({"body": "x"}) + "\n")
    root = f"s3://{BUCKET}/failed/tokens"
    with pytest.raises(ConfigError, match="a.jsonl:2: record has no 'text' field"):
        prepare(PrepareSpec(str(corpus)), root, workers=1, progress=False)
    assert storage.file_sizes(root) == {}


@pytest.mark.timeout(120)
def test_niah_reads_a_model_from_the_bucket(cluster_run, tmp_path):
    from launcher.cli import main

    out = tmp_path / "niah"
    grid = ["--max-len", "512", "--min-len", "256", "--len-interval", "256", "--depth-interval", "0.5",
            "--haystack", str(REPO / "tests" / "data" / "haystack")]
    assert main(["niah", f"{RUN}/stage1-1k/hf", *grid, "-o", str(out)]) == 0
    assert json.loads((out / "niah.json").read_text())["cells"]


DRIVER = """
import sys, ray
from launcher.recipe import Recipe
from launcher.runtime.controller import Controller, ControllerOptions
from topology.errors import ConfigError
ray.init(address=sys.argv[1], _node_ip_address=sys.argv[2], logging_level="warning")
options = ControllerOptions(run_dir=sys.argv[4], profile_cache=sys.argv[5], profile_transfer_mb=1, profile_repeats=2, progress_bar=False)
try:
    Controller(Recipe.load(sys.argv[3]), options).run_all()
except ConfigError as exc:
    print(f"ringleader: error: {exc}", file=sys.stderr)
    sys.exit(2)
"""


@pytest.mark.timeout(330)
def test_a_run_directory_only_the_driver_sees_is_refused(cluster_run, tmp_path):
    if os.geteuid() != 0 or shutil.which("unshare") is None:
        pytest.skip("needs root and unshare(1) to give the driver a mount of its own")
    private = tmp_path / "host-local-disk"
    private.mkdir()
    recipe = cluster_run["tmp"] / "demo.yaml"
    script = (f"mount -t tmpfs none {private} && exec {sys.executable} -c \"$DRIVER\" {cluster_run['address']} "
              f"{cluster_run['ips'][0]} {recipe} {private / 'run'} {tmp_path / 'profiles'}")
    env = dict(os.environ, DRIVER=DRIVER, PYTHONPATH=str(REPO))
    proc = subprocess.run(["unshare", "-m", "--propagation", "private", "sh", "-c", script], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-3000:]
    [line] = [ln for ln in proc.stderr.splitlines() if ln.startswith("ringleader: error:")]
    assert f"run directory {private / 'run'} is not visible from host(s)" in line
    assert "mount one shared filesystem" in line and "s3://" in line
    assert not any(private.iterdir())  # the mount went away with the driver; nothing leaked onto the real disk
