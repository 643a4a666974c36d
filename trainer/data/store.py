"""The token store: a corpus tokenised once, read by every rank through memory maps.

Layout of one store (a directory named ``KIND-KEY`` under the store root)::

    tokens-<shard>.npy    uint32 token ids of many documents back to back
    learn-<shard>.npy     chat only: uint8, 1 where the token is learned
    index.npy             int64 [documents, 3]: (shard number, start, length) in corpus order
    meta.json             kind, key, counts, shard names; written last

``KEY`` hashes everything that decides the tokens (the input files' names,
sizes and mtimes, the tokenizer, the kind and the bad-record policy), so a
store is reused exactly when it would be rebuilt the same. A store is built
under a temporary name and renamed into place once complete: a reader
never sees half of one. Packing options (sequence length, upsampling,
seeds) are not in the key; one store serves every stage that reads the
same corpus.

``TokenStore`` reads the index into memory (a few bytes per document) and
memory-maps a shard only when a sample touches it, so a rank's memory holds
the index and the pages of its own samples, never the corpus. The same
class also wraps documents tokenised in process (``TokenStore.from_documents``),
so both paths pack identically.

All file-system access of the store lives in this module (plain paths).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from topology.errors import ConfigError

FORMAT_VERSION = 1
INDEX, META = "index.npy", "meta.json"
TOKEN_DTYPE = np.uint32


def input_fingerprint(files: Sequence[Path]) -> list[list[Any]]:
    """Name, size and modification time of each input file: cheap to take on any corpus size."""
    out = []
    for f in files:
        st = f.stat()
        out.append([f.name, st.st_size, st.st_mtime_ns])
    return out


def store_key(files: Sequence[Path], tokenizer_fp: str, kind: str, on_bad_record: str) -> str:
    """16 hex digits naming a store; equal keys mean equal contents."""
    spec = {"version": FORMAT_VERSION, "inputs": input_fingerprint(files), "tokenizer": tokenizer_fp,
            "kind": kind, "on_bad_record": on_bad_record}
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]


def store_path(root: str | Path, kind: str, key: str) -> Path:
    return Path(root) / f"{kind}-{key}"


def is_complete(path: str | Path) -> bool:
    """A store exists only once its meta.json is in place (it is renamed in whole)."""
    return (Path(path) / META).is_file()


def new_build_dir(final: str | Path) -> Path:
    """A fresh hidden directory beside ``final`` for a build in progress."""
    final = Path(final)
    tmp = final.parent / f".{final.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir(parents=True)
    return tmp


def write_shard(directory: str | Path, docs: Sequence[tuple[np.ndarray, np.ndarray | None]]) -> tuple[str, list[int]]:
    """Write documents back to back as one shard; returns its name and each document's start.

    Each call makes a new uniquely named shard, so a retried task never
    overwrites a shard another task's index rows point at.
    """
    name = uuid.uuid4().hex[:12]
    lengths = [len(ids) for ids, _ in docs]
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64).tolist() if docs else []
    tokens = np.concatenate([ids for ids, _ in docs]).astype(TOKEN_DTYPE) if docs else np.zeros(0, TOKEN_DTYPE)
    _save(Path(directory) / f"tokens-{name}.npy", tokens)
    if docs and docs[0][1] is not None:
        _save(Path(directory) / f"learn-{name}.npy", np.concatenate([m for _, m in docs]).astype(np.uint8))
    return name, starts


def commit(tmp: str | Path, final: str | Path, shards: list[str], index: np.ndarray, meta: dict[str, Any]) -> Path:
    """Write the index and meta.json into ``tmp``, drop shards nothing points at, and rename it to ``final``.

    If another build of the same key finished first, its store is kept and ``tmp`` removed.
    """
    tmp, final = Path(tmp), Path(final)
    keep = {f"{p}-{s}.npy" for s in shards for p in ("tokens", "learn")}
    for f in tmp.iterdir():
        if f.name not in keep:
            f.unlink()  # shards of retried tasks
    _save(tmp / INDEX, np.asarray(index, dtype=np.int64).reshape(-1, 3))
    meta = dict(meta, version=FORMAT_VERSION, shards=shards)
    _write_text(tmp / META, json.dumps(meta, indent=1) + "\n")
    try:
        os.replace(tmp, final)
    except OSError:
        if not is_complete(final):
            raise
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def discard(tmp: str | Path) -> None:
    shutil.rmtree(tmp, ignore_errors=True)


@dataclass
class TokenStore:
    """Documents' tokens, by document number in corpus order.

    Parameters
    ----------
    index
        int64 ``[documents, 3]``: shard number, start in the shard, length.
    shards
        Per shard: its token array, or a path memory-mapped on first use.
    learn
        Chat only: per shard, the learned mask (array or path), else None.
    meta
        The store's meta.json (empty for in-process documents).
    """

    index: np.ndarray
    shards: list[Any]
    learn: list[Any] | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def open(cls, path: str | Path, kind: str | None = None) -> "TokenStore":
        """A prepared store; only the index is read now, shards when a sample needs them."""
        path = Path(path)
        if not is_complete(path):
            raise ConfigError(f"data.store {str(path)!r} is not a prepared token store (no {META}); "
                              "run `ringleader data prepare` or leave data.store unset")
        meta = json.loads((path / META).read_text())
        if meta.get("version") != FORMAT_VERSION:
            raise ConfigError(f"token store {path} has format {meta.get('version')}, this code reads {FORMAT_VERSION}; prepare it again")
        if kind is not None and meta["kind"] != kind:
            raise ConfigError(f"token store {path} holds {meta['kind']} data but data.kind is {kind!r}")
        shards = [path / f"tokens-{s}.npy" for s in meta["shards"]]
        learn = [path / f"learn-{s}.npy" for s in meta["shards"]] if meta["kind"] == "chat" else None
        return cls(np.load(path / INDEX), shards, learn, meta)

    @classmethod
    def from_documents(cls, docs: Sequence[tuple[np.ndarray, np.ndarray | None]]) -> "TokenStore":
        """Documents tokenised in this process, held as one in-memory shard."""
        lengths = np.array([len(ids) for ids, _ in docs], dtype=np.int64)
        starts = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)
        index = np.stack([np.zeros_like(lengths), starts, lengths], axis=1)
        tokens = np.concatenate([ids for ids, _ in docs]).astype(TOKEN_DTYPE)
        learn = [np.concatenate([m for _, m in docs]).astype(np.uint8)] if docs and docs[0][1] is not None else None
        return cls(index, [tokens], learn)

    @property
    def lengths(self) -> np.ndarray:
        return self.index[:, 2]

    @property
    def has_learn(self) -> bool:
        return self.learn is not None

    def __len__(self) -> int:
        return len(self.index)

    def read(self, doc: int, start: int = 0, stop: int | None = None) -> tuple[np.ndarray, np.ndarray | None]:
        """Tokens ``[start, stop)`` of document ``doc`` (and their learned mask for chat)."""
        shard, base, length = (int(v) for v in self.index[doc])
        stop = length if stop is None else stop
        tokens = self._shard(self.shards, shard)[base + start:base + stop]
        learn = None if self.learn is None else self._shard(self.learn, shard)[base + start:base + stop]
        return tokens, learn

    def document(self, doc: int) -> np.ndarray:
        return np.asarray(self.read(doc)[0])

    @staticmethod
    def _shard(shards: list[Any], i: int) -> np.ndarray:
        if not isinstance(shards[i], np.ndarray):
            shards[i] = np.load(shards[i], mmap_mode="r")
        return shards[i]


def _save(path: Path, array: np.ndarray) -> None:
    with open(path, "wb") as f:
        np.save(f, array)


def _write_text(path: Path, text: str) -> None:
    path.write_text(text)
