"""Tokenise a corpus once, on a Ray cluster, into a token store.

::

    ringleader data prepare clusters/recipes/demo.yaml
    ringleader data prepare --input /shared/ultrachat --tokenizer meta-llama/Meta-Llama-3-8B-Instruct --kind chat

Pipeline (Ray Data, streaming)::

    read_binary_files(corpus files)            one row per file: (path, bytes)
      -> map_batches(TokenizeFiles, actors)    records checked, tokenised, written as a shard
      -> iter_batches on the driver            only (file, record, shard, start, length) per document

Each actor loads the tokenizer once and writes its shards straight into the
store's build directory, so tokens never pass through the driver; the
driver orders the documents by (file, record), which makes the store the
same whatever the number of workers, writes the index and publishes the
store (a rename on a path, a commit object written last on an object store;
see ``trainer.data.store``). Whole files are the unit of work: every record keeps
its file and line (or row) number for error messages, and large corpora come
as many files (SlimPajama: thousands of chunks). Ray Data shows its progress
bars on the driver while it runs.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from topology.errors import ConfigError
from trainer import storage
from trainer.config import DataConfig, ModelConfig
from trainer.data import store as token_store
from trainer.data.read import BadRecord, bad_record_error, file_records, list_files
from trainer.data.tokenize import tokenize_documents, tokenizer_fingerprint
from trainer.tokenizer import tokenizer_by_name

log = logging.getLogger("ringleader")

BYTES_PER_WORKER = 16e6
"""Input per tokenizer actor, at least (default sizing). An actor's start (Ray worker, torch, transformers,
the tokenizer) costs about 5-10 s of CPU, and a fast tokenizer reads about 1.5 MB/s per CPU: an actor is
only worth starting for more text than it takes that long to tokenise."""
STORE_DIR = "tokens"
"""Name of the store root beside a recipe's run directories (``RUN_BASE/tokens``)."""


@dataclass(frozen=True)
class PrepareSpec:
    """What decides a store's contents."""

    path: str
    kind: str = "pretrain"
    tokenizer: str | None = None
    """Local directory or hub name; None: the byte-level tokenizer of tiny models."""
    on_bad_record: str = "error"

    @classmethod
    def of(cls, data: DataConfig, model: ModelConfig) -> "PrepareSpec":
        """A stage's data with the tokenizer its model uses (``model.tokenizer``, else ``model.path``)."""
        return cls(data.path, data.kind, model.tokenizer or model.path, data.on_bad_record)


@dataclass
class Prepared:
    """Where a store is and whether this call built it."""

    path: str
    """A path or a URI, as the store root."""
    created: bool
    meta: dict[str, Any] = field(default_factory=dict)

    def summary(self) -> str:
        m = self.meta
        what = f"{m['documents']:,} documents, {m['tokens']:,} tokens from {m['files']} file(s)"
        skipped = f"; {m['skipped']} bad record(s) skipped" if m.get("skipped") else ""
        if not self.created:
            return f"token store {self.path} is already prepared ({what}); nothing to do"
        rate = m["tokens"] / max(m["seconds"], 1e-9)
        return f"prepared {self.path}: {what} in {m['seconds']:.1f} s ({rate:,.0f} tokens/s){skipped}"


def locate(spec: PrepareSpec, root: str | Path) -> tuple[str, list[Path], Any]:
    """The store location ``spec`` maps to under ``root`` (a path or URI), the input files and the tokenizer (nothing is written)."""
    files = list_files(spec.path, spec.kind)
    tokenizer = tokenizer_by_name(spec.tokenizer)
    key = token_store.store_key(files, tokenizer_fingerprint(tokenizer), spec.kind, spec.on_bad_record)
    return token_store.store_path(root, spec.kind, key), files, tokenizer


def prepare(spec: PrepareSpec, root: str | Path, workers: int | None = None, progress: bool = True) -> Prepared:
    """Build the store of ``spec`` under ``root`` (a shared path or an object store URI) unless it exists; needs ``ray.init`` done.

    Every Ray node writes its shards to ``root`` itself, so each must reach it
    (the same mount, or the object store's credentials and endpoint).

    Parameters
    ----------
    workers
        Tokenizer actors, one CPU each (default: one per ``BYTES_PER_WORKER`` of input, at most one per CPU of
        the cluster; never more than one per file).
    progress
        Show Ray Data's progress bars.

    Raises
    ------
    ConfigError
        A bad record (``on_bad_record='error'``), no documents, or a tokenizer that cannot be loaded;
        no store is left behind.
    """
    import ray

    final, files, _ = locate(spec, root)
    if token_store.is_complete(final):
        return Prepared(final, False, token_store.TokenStore.open(final).meta)
    size = sum(f.stat().st_size for f in files)
    workers = tokenizer_workers(size, len(files), int(ray.cluster_resources().get("CPU", 1)), workers)
    log.info("tokenising %d file(s) of %s (%s, %.3g MB) on %d Ray worker(s) into %s", len(files), spec.path, spec.kind,
             size / 1e6, workers, final)
    tmp = token_store.new_build_dir(final)
    start = time.perf_counter()
    try:
        rows = _run_pipeline(spec, files, tmp, workers, progress)
        meta = _commit(spec, files, tmp, final, rows)
    except BaseException as exc:
        token_store.discard(tmp)
        raise _config_error(exc) or exc
    meta["seconds"] = time.perf_counter() - start
    return Prepared(final, True, meta)


def tokenizer_workers(size: int, files: int, cpus: int, asked: int | None = None) -> int:
    """Tokenizer actors for ``files`` files of ``size`` bytes in all: ``asked``, else one per
    ``BYTES_PER_WORKER`` up to one per CPU; never more than one per file, and at least one."""
    if not asked:
        asked = min(cpus, math.ceil(size / BYTES_PER_WORKER))
    return max(1, min(asked, files))


def ensure_prepared(data: DataConfig, model: ModelConfig, root: str | Path, workers: int | None = None) -> DataConfig:
    """``data`` with ``store`` set, preparing the store first when it is missing (the launcher's hook).

    A generated corpus (``data.synthetic``) has no store: each rank generates and tokenises it.
    """
    if data.store or data.synthetic is not None:
        return data
    result = prepare(PrepareSpec.of(data, model), root, workers=workers)
    log.info("data: %s", result.summary())
    return replace(data, store=result.path)


class TokenizeFiles:
    """Ray Data callable class: one tokenizer per actor; each batch of files becomes one shard."""

    def __init__(self, tokenizer: str | None, kind: str, out_dir: str, files: list[str]) -> None:
        self.tokenizer = tokenizer_by_name(tokenizer)
        self.kind, self.out_dir = kind, out_dir
        self.files = {Path(f).name: (i, f) for i, f in enumerate(files)}

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        docs, keys, bad = [], [], []
        for path, data in zip(batch["path"], batch["bytes"]):
            number, name = self.files[Path(str(path)).name]
            for record, doc in file_records(name, bytes(data), self.kind):
                if isinstance(doc, BadRecord):
                    bad.append((number, record, str(doc)))
                else:
                    keys.append((number, record))
                    docs.append(doc)
        tokens = tokenize_documents(self.tokenizer, docs, self.kind)
        shard, starts = token_store.write_shard(self.out_dir, tokens) if tokens else ("", [])
        n = len(keys) + len(bad)
        return {
            "file": np.array([k[0] for k in keys] + [b[0] for b in bad], dtype=np.int64).reshape(n),
            "record": np.array([k[1] for k in keys] + [b[1] for b in bad], dtype=np.int64).reshape(n),
            "shard": np.array([shard] * len(keys) + [""] * len(bad), dtype=object),
            "start": np.array(starts + [0] * len(bad), dtype=np.int64).reshape(n),
            "length": np.array([len(t) for t, _ in tokens] + [0] * len(bad), dtype=np.int64).reshape(n),
            "bad": np.array([""] * len(keys) + [b[2] for b in bad], dtype=object),
        }


def _run_pipeline(spec: PrepareSpec, files: list[Path], tmp: str, workers: int, progress: bool) -> dict[str, np.ndarray]:
    import ray.data

    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = progress
    # Reading a file is I/O: the CPUs go to the tokenizer actors and reads never wait behind them;
    # as many reads at once as there are actors to take their files.
    ds = ray.data.read_binary_files([str(f) for f in files], include_paths=True, override_num_blocks=len(files), num_cpus=0,
                                    concurrency=workers)
    ds = ds.map_batches(TokenizeFiles, batch_size=1, compute=ray.data.ActorPoolStrategy(size=workers), batch_format="numpy",
                        fn_constructor_kwargs={"tokenizer": spec.tokenizer, "kind": spec.kind, "out_dir": tmp,
                                               "files": [str(f) for f in files]})
    parts: dict[str, list[np.ndarray]] = {}
    for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
        for k, v in batch.items():
            parts.setdefault(k, []).append(v)
    if not parts:
        return {}
    return {k: np.concatenate(v) for k, v in parts.items()}


def _commit(spec: PrepareSpec, files: list[Path], tmp: str, final: str, rows: dict[str, np.ndarray]) -> dict[str, Any]:
    """Order documents by (file, record), apply the bad-record policy, write the index and publish the store."""
    order = np.lexsort((rows["record"], rows["file"])) if rows else np.zeros(0, dtype=np.int64)
    rows = {k: v[order] for k, v in rows.items()}
    bad = rows["bad"][rows["bad"] != ""].tolist() if rows else []
    if bad and spec.on_bad_record == "error":
        raise bad_record_error(bad[0], len(bad))
    ok = rows["bad"] == "" if rows else np.zeros(0, dtype=bool)
    if not ok.any():
        raise ConfigError(f"data.path {spec.path!r} holds no {spec.kind} documents that can be read")
    shards = sorted(set(rows["shard"][ok].tolist()))
    index = np.stack([np.searchsorted(shards, rows["shard"][ok].astype(str)), rows["start"][ok], rows["length"][ok]], axis=1)
    meta = {"kind": spec.kind, "input": str(spec.path), "tokenizer": spec.tokenizer, "files": len(files),
            "documents": int(ok.sum()), "tokens": int(rows["length"][ok].sum()), "skipped": len(bad),
            "skipped_examples": bad[:5], "key": storage.name(final).split("-", 1)[1]}
    token_store.commit(tmp, final, shards, index, meta)
    return meta


def _config_error(exc: BaseException) -> ConfigError | None:
    """The ConfigError a Ray task raised, however Ray wrapped it (as one line for the CLI)."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, ConfigError):
            return ConfigError(str(exc))
        exc = getattr(exc, "cause", None) or exc.__cause__
    return None
