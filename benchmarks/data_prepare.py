"""Tokenising a corpus once: Ray Data prepare vs HF ``datasets.map``, and what a rank pays at start-up.

Two measurements, each side by side in one run on one synthetic corpus
(.jsonl files of random words, document lengths geometric around
``--doc-tokens``; the byte-level tokenizer of the tiny models):

1. Prepare throughput, tokens/s: ``trainer.data.prepare`` with 1 and 2
   tokenizer actors on a two-node local Ray cluster (127.0.0.2-3, 2 CPUs
   each), against ``datasets.load_dataset("json").map(batched=True)`` with
   ``num_proc`` 1 and 2, all calling the same ``document_tokens``. Times
   include start-up (Ray actors, ``datasets`` worker processes), as a user sees them.
2. Rank start-up time and resident memory at corpus sizes N and 10 N: the
   in-process path (read and tokenise everything, as before the store) vs a
   prepared store (index only, samples memory-mapped), each in a fresh
   process (``tests/data_probe.py``).
3. The same stores read from an object store: each copied to an S3 bucket
   (moto's server on localhost, so no network in the figures) and opened by
   URI, samples read by byte range, against the memory map of the same store
   on a local path: start-up, time to read the samples, resident memory.

Run by hand (``pip install -e .[bench]`` for ``datasets``)::

    python benchmarks/data_prepare.py --mb 8
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Iterator

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402

from tests.ray_utils import local_cluster  # noqa: E402
from trainer import storage  # noqa: E402
from trainer.data.prepare import PrepareSpec, prepare  # noqa: E402
from trainer.data.tokenize import document_tokens  # noqa: E402
from trainer.tokenizer import byte_tokenizer  # noqa: E402

WORDS = "the of ring token shard context window rope theta packet river clock lighthouse bread night sky".split()


def write_corpus(directory: Path, megabytes: float, files: int = 8, doc_tokens: int = 2000, seed: int = 0) -> Path:
    """``files`` .jsonl files of random-word documents, about ``megabytes`` MB in all."""
    rng = np.random.default_rng(seed)
    directory.mkdir(parents=True, exist_ok=True)
    per_file = megabytes * 1e6 / files
    for i in range(files):
        size = 0
        with open(directory / f"part-{i:03d}.jsonl", "w") as f:
            while size < per_file:
                n = int(rng.geometric(1 / (doc_tokens / 6))) + 1  # ~6 bytes per word
                text = " ".join(rng.choice(WORDS, size=n))
                line = json.dumps({"text": text}) + "\n"
                f.write(line)
                size += len(line)
    return directory


def hf_datasets_map(corpus: Path, num_proc: int, cache: Path) -> tuple[float, int]:
    import datasets

    start = time.perf_counter()
    files = sorted(str(p) for p in corpus.glob("*.jsonl"))
    ds = datasets.load_dataset("json", data_files=files, split="train", cache_dir=str(cache))
    tok = byte_tokenizer()
    out = ds.map(lambda b: {"input_ids": document_tokens(tok, b["text"])}, batched=True, num_proc=num_proc if num_proc > 1 else None,
                 remove_columns=["text"], cache_file_name=str(cache / f"map-{num_proc}.arrow"))
    tokens = sum(len(ids) for ids in out["input_ids"])
    return time.perf_counter() - start, tokens


def ray_prepare(corpus: Path, workers: int, root: Path) -> tuple[float, int]:
    start = time.perf_counter()
    result = prepare(PrepareSpec(str(corpus)), root, workers=workers, progress=False)
    return time.perf_counter() - start, result.meta["tokens"]


def probe(flag: str, path: Path, seq_len: int) -> dict:
    out = subprocess.run([sys.executable, str(REPO / "tests" / "data_probe.py"), flag, str(path), "--seq-len", str(seq_len),
                          "--samples", "0", "1", "2", "3"], capture_output=True, text=True, cwd=REPO, check=True,
                         env=dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1"))
    return json.loads(out.stdout.strip().splitlines()[-1])


@contextlib.contextmanager
def s3_bucket(name: str = "ringleader-bench") -> Iterator[str]:
    """An S3 endpoint on localhost (moto's server) with one bucket; AWS_* point pyarrow and the probes at it."""
    import boto3
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.WARNING)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    os.environ.update(AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench", AWS_REGION="us-east-1",
                      AWS_DEFAULT_REGION="us-east-1", AWS_ENDPOINT_URL=f"http://{host}:{port}", AWS_EC2_METADATA_DISABLED="true")
    boto3.client("s3", endpoint_url=os.environ["AWS_ENDPOINT_URL"]).create_bucket(Bucket=name)
    try:
        yield f"s3://{name}"
    finally:
        server.stop()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--mb", type=float, default=8.0, help="corpus size N in MB for the throughput runs (default: %(default)s)")
    p.add_argument("--rank-mb", type=float, default=2.0, help="corpus size N for the rank start-up runs; 10 N is also run")
    p.add_argument("--seq-len", type=int, default=4096)
    args = p.parse_args()
    with tempfile.TemporaryDirectory(prefix="data-prepare-") as tmp:
        tmp = Path(tmp)
        corpus = write_corpus(tmp / "corpus", args.mb)
        rows, results, stores = [], {}, {}
        with local_cluster(hosts=2, gpus_per_host=0, cpus_per_host=2):
            for workers in (1, 2):
                rows.append((f"Ray Data prepare, {workers} worker(s)", *ray_prepare(corpus, workers, tmp / f"store-{workers}")))
            for scale in (1, 10):
                # Many files: each shard stays below one multipart part (moto's server mishandles larger uploads).
                c = write_corpus(tmp / f"rank-{scale}", args.rank_mb * scale, files=8 * scale, seed=scale)
                store = prepare(PrepareSpec(str(c)), tmp / "rank-stores", progress=False).path
                results[scale] = {"in-process": probe("--corpus", c, args.seq_len), "store": probe("--store", store, args.seq_len)}
                stores[scale] = store
        with s3_bucket() as bucket:
            for scale, store in stores.items():
                uri = storage.join(bucket, "tokens", storage.name(store))
                storage.put_dir(Path(store), uri)
                results[scale]["store on S3"] = probe("--store", uri, args.seq_len)
        for num_proc in (1, 2):
            rows.append((f"HF datasets.map, num_proc={num_proc}", *hf_datasets_map(corpus, num_proc, tmp / f"hf-{num_proc}")))
        base = rows[0][2] / rows[0][1]
        print(f"\nprepare throughput on {args.mb:g} MB ({rows[0][2]:,} tokens), byte-level tokenizer:")
        print(f"  {'':38s}{'seconds':>10s}{'tokens/s':>14s}{'vs Ray 1 worker':>18s}")
        for name, seconds, tokens in rows:
            print(f"  {name:38s}{seconds:10.2f}{tokens / seconds:14,.0f}{tokens / seconds / base:17.2f}x")

        print(f"\nrank start-up at seq_len {args.seq_len}, corpus N = {args.rank_mb:g} MB and 10 N (fresh process each):")
        print(f"  {'':14s}{'start-up s N':>14s}{'10 N':>10s}{'10N/N':>8s}{'RSS MiB N':>12s}{'10 N':>10s}{'10N/N':>8s}")
        for path in ("in-process", "store"):
            a, b = results[1][path], results[10][path]
            print(f"  {path:14s}{a['startup_s']:14.2f}{b['startup_s']:10.2f}{b['startup_s'] / a['startup_s']:8.2f}"
                  f"{a['rss_mb']:12.0f}{b['rss_mb']:10.0f}{b['rss_mb'] / a['rss_mb']:8.2f}")
        for scale in (1, 10):
            old, new = results[scale]["in-process"], results[scale]["store"]
            print(f"  store vs in-process at {scale:>2} N: start-up {new['startup_s'] / old['startup_s']:.3f}x, "
                  f"RSS {new['rss_mb'] / old['rss_mb']:.2f}x; same samples: {new['digest'] == old['digest']}")

        print("\nthe same stores on S3 (moto on localhost; byte-range reads) vs on a local path (memory map):")
        print(f"  {'':8s}{'start-up s path':>16s}{'S3':>8s}{'S3/path':>9s}{'read s path':>13s}{'S3':>8s}{'S3/path':>9s}"
              f"{'RSS MiB path':>14s}{'S3':>8s}{'same samples':>14s}")
        for scale in (1, 10):
            a, b = results[scale]["store"], results[scale]["store on S3"]
            print(f"  {scale:>2} N   {a['startup_s']:16.3f}{b['startup_s']:8.3f}{b['startup_s'] / a['startup_s']:8.1f}x"
                  f"{a['read_s']:13.3f}{b['read_s']:8.3f}{b['read_s'] / a['read_s']:8.1f}x"
                  f"{a['rss_mb']:14.0f}{b['rss_mb']:8.0f}{str(a['digest'] == b['digest']):>14s}")


if __name__ == "__main__":
    main()
