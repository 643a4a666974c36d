"""One rank's view of the data, measured in a fresh process (tests and benchmarks).

    python tests/data_probe.py --store DIR --seq-len 4096 --samples 0 1 2
    python tests/data_probe.py --store s3://BUCKET/tokens/pretrain-KEY --seq-len 4096 --samples 0 1 2
    python tests/data_probe.py --corpus DIR --seq-len 4096 --samples 0 1 2

Builds the stage's dataset as a rank does (from a prepared store, or by
reading and tokenising the corpus in process), reads the given samples and
prints one JSON line: start-up seconds, seconds to read the samples,
resident memory, and a digest of the samples (equal digests: equal samples).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import time

import psutil


def main() -> None:
    p = argparse.ArgumentParser()
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--store")
    source.add_argument("--corpus")
    p.add_argument("--seq-len", type=int, required=True)
    p.add_argument("--samples", type=int, nargs="+", required=True)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    from trainer.config import DataConfig
    from trainer.data import build_dataset
    from trainer.tokenizer import byte_tokenizer

    tok = byte_tokenizer()
    cfg = DataConfig(path=args.corpus or "", store=args.store)
    before = psutil.Process().memory_info().rss
    start = time.perf_counter()
    ds = build_dataset(cfg, tok, args.seq_len, args.seed)
    startup = time.perf_counter() - start
    digest = hashlib.sha256()
    start = time.perf_counter()
    for i in args.samples:
        for key, value in sorted(ds[i].items()):
            digest.update(key.encode() + value.numpy().tobytes())
    read = time.perf_counter() - start
    rss = psutil.Process().memory_info().rss
    print(json.dumps({"startup_s": startup, "read_s": read, "rss_mb": rss / 2**20, "rss_growth_mb": (rss - before) / 2**20,
                      "digest": digest.hexdigest(), "samples": len(ds), "pid": os.getpid()}))


if __name__ == "__main__":
    main()
