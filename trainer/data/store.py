"""The token store: a corpus tokenised once, read by every rank a sample at a time.

Layout of one store (a directory named ``KIND-KEY`` under the store root, on
a shared path or an object store URI, as the run directory accepts)::

    tokens-<shard>.npy    uint32 token ids of many documents back to back
    learn-<shard>.npy     chat only: uint8, 1 where the token is learned
    index.npy             int64 [documents, 3]: (shard number, start, length) in corpus order
    meta.json             kind, key, counts, shard names; written last

``KEY`` hashes everything that decides the tokens (the input files' names,
sizes and mtimes, the tokenizer, the kind and the bad-record policy), so a
store is reused exactly when it would be rebuilt the same. Packing options
(sequence length, upsampling, seeds) are not in the key; one store serves
every stage that reads the same corpus.

A store appears only once complete. On a path it is built under a temporary
name and renamed into place. An object store has no rename, so there the
shards and the index go under ``KIND-KEY/build-<id>/`` and ``meta.json``,
which names that build, is the commit object written last: a reader that
finds no ``meta.json`` sees no store, and two builds of one key each commit
a whole store of their own (the last ``meta.json`` wins).

``TokenStore`` reads the index into memory (a few bytes per document) and
opens a shard only when a sample touches it: a memory map on a path, ranged
reads on an object store (``trainer.data.ranged``). A rank's memory holds
the index and the bytes of its own samples, never the corpus. The same
class also wraps documents tokenised in process (``TokenStore.from_documents``),
so both paths pack identically.

All access to the store goes through ``trainer.storage``, which takes paths
and URIs alike.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from topology.errors import ConfigError
from trainer import storage
from trainer.data.ranged import BlockCache, RangedArray

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


def store_root(root: str | os.PathLike) -> str:
    """A store root as a location: an absolute path or a URI."""
    return storage.normalize(root)


def store_path(root: str | os.PathLike, kind: str, key: str) -> str:
    return storage.join(store_root(root), f"{kind}-{key}")


def is_complete(loc: str | os.PathLike) -> bool:
    """A store exists only once its meta.json is in place (renamed in whole, or the commit object)."""
    return storage.kind(storage.join(str(loc), META)) == "file"


def new_build_dir(final: str) -> str:
    """Where a build of ``final`` writes: a hidden sibling on a path, a ``build-<id>`` prefix inside it on a URI."""
    build = uuid.uuid4().hex[:8]
    path = storage.local_path(final)
    if path is None:
        return storage.join(final, f"build-{build}")
    tmp = path.parent / f".{path.name}.tmp-{build}"
    tmp.mkdir(parents=True)
    return str(tmp)


def write_shard(directory: str, docs: Sequence[tuple[np.ndarray, np.ndarray | None]]) -> tuple[str, list[int]]:
    """Write documents back to back as one shard; returns its name and each document's start.

    Each call makes a new uniquely named shard, so a retried task never
    overwrites a shard another task's index rows point at.
    """
    name = uuid.uuid4().hex[:12]
    lengths = [len(ids) for ids, _ in docs]
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64).tolist() if docs else []
    tokens = np.concatenate([ids for ids, _ in docs]).astype(TOKEN_DTYPE) if docs else np.zeros(0, TOKEN_DTYPE)
    _save(storage.join(directory, f"tokens-{name}.npy"), tokens)
    if docs and docs[0][1] is not None:
        _save(storage.join(directory, f"learn-{name}.npy"), np.concatenate([m for _, m in docs]).astype(np.uint8))
    return name, starts


def commit(tmp: str, final: str, shards: list[str], index: np.ndarray, meta: dict[str, Any]) -> str:
    """Write the index into ``tmp``, drop shards nothing points at, and publish the store at ``final``.

    On a path ``tmp`` is renamed to ``final``; on an object store ``final/meta.json``
    naming the build is written last. If another build of the same key
    finished first, its store is kept and ``tmp`` removed.
    """
    keep = {f"{p}-{s}.npy" for s in shards for p in ("tokens", "learn")}
    for name in storage.children(tmp):
        if name not in keep:
            storage.remove(storage.join(tmp, name))  # shards of retried tasks
    _save(storage.join(tmp, INDEX), np.asarray(index, dtype=np.int64).reshape(-1, 3))
    meta = dict(meta, version=FORMAT_VERSION, shards=shards)
    path = storage.local_path(final)
    if path is None:
        if is_complete(final):
            discard(tmp)
            return final
        storage.write_bytes(storage.join(final, META), json.dumps(dict(meta, build=storage.name(tmp)), indent=1) + "\n")
        return final
    storage.write_bytes(storage.join(tmp, META), json.dumps(meta, indent=1) + "\n")
    try:
        os.replace(tmp, path)
    except OSError:
        if not is_complete(final):
            raise
        discard(tmp)
    return final


def discard(tmp: str) -> None:
    storage.remove(tmp)


@dataclass
class TokenStore:
    """Documents' tokens, by document number in corpus order.

    Parameters
    ----------
    index
        int64 ``[documents, 3]``: shard number, start in the shard, length.
    shards
        Per shard: its token array, or its location (a path memory-mapped, or a URI read by range, on first use).
    learn
        Chat only: per shard, the learned mask (array or location), else None.
    meta
        The store's meta.json (empty for in-process documents).
    """

    index: np.ndarray
    shards: list[Any]
    learn: list[Any] | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    _cache: BlockCache = field(default_factory=BlockCache, repr=False)
    """Blocks of ranged reads (object store shards), shared by all shards."""

    @classmethod
    def open(cls, loc: str | os.PathLike, kind: str | None = None) -> "TokenStore":
        """A prepared store at a path or URI; only the index is read now, shards when a sample needs them."""
        loc = storage.normalize(loc)
        raw = storage.read_bytes(storage.join(loc, META))
        if raw is None:
            raise ConfigError(f"data.store {loc!r} is not a prepared token store (no {META}); "
                              "run `ringleader data prepare` or leave data.store unset")
        meta = json.loads(raw)
        if meta.get("version") != FORMAT_VERSION:
            raise ConfigError(f"token store {loc} has format {meta.get('version')}, this code reads {FORMAT_VERSION}; prepare it again")
        if kind is not None and meta["kind"] != kind:
            raise ConfigError(f"token store {loc} holds {meta['kind']} data but data.kind is {kind!r}")
        files = storage.join(loc, meta["build"]) if meta.get("build") else loc
        shards = [storage.join(files, f"tokens-{s}.npy") for s in meta["shards"]]
        learn = [storage.join(files, f"learn-{s}.npy") for s in meta["shards"]] if meta["kind"] == "chat" else None
        index = storage.read_bytes(storage.join(files, INDEX))
        if index is None:
            raise ConfigError(f"token store {loc} has lost its {INDEX}; prepare it again")
        return cls(np.load(io.BytesIO(index)), shards, learn, meta)

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

    def _shard(self, shards: list[Any], i: int) -> Any:
        """Shard ``i`` as an array to slice: memory-mapped from a path, read by range from a URI."""
        if isinstance(shards[i], str):
            if storage.is_uri(shards[i]):
                shards[i] = RangedArray(shards[i], self._cache)
            else:
                shards[i] = np.load(shards[i], mmap_mode="r")
        return shards[i]


def _save(loc: str, array: np.ndarray) -> None:
    """One ``.npy`` file, published whole."""
    out = io.BytesIO()
    np.save(out, array)
    storage.write_bytes(loc, out.getbuffer())
