"""A 1-D ``.npy`` array on an object store, read by byte range as slices are asked for.

An object store has no memory map, and downloading a shard would put the
corpus on every host. A rank therefore reads only the bytes of the slices it
packs: ``RangedArray(loc)[a:b]`` reads the ``.npy`` header once, then the
blocks that cover elements ``[a, b)`` with one ranged GET per run of
missing blocks (``pyarrow.NativeFile.read_at``).

Blocks are kept in a small LRU cache shared by every shard of a store
(``BlockCache``), for two reasons: a sample cut from many short documents
reads each block once instead of once per document, and the document that
straddles two consecutive samples is fetched once. The cache holds a fixed
number of bytes, so a rank's memory stays flat whatever the corpus size.
"""

from __future__ import annotations

import io
from collections import OrderedDict
from typing import Any

import numpy as np

from trainer import storage

BLOCK_BYTES = 1 << 20
"""One ranged read covers whole blocks of this size (fewer requests for short documents)."""
HEADER_BYTES = 4096
"""Read at once when a shard is opened: numpy writes a 1-D array's header in far fewer."""
CACHE_BYTES = 32 << 20
"""Blocks a store keeps in memory, all shards together."""


class BlockCache:
    """Least recently used blocks, ``(shard location, block number) -> bytes``, up to ``capacity`` bytes."""

    def __init__(self, capacity: int = CACHE_BYTES) -> None:
        self.capacity, self.size = capacity, 0
        self.blocks: OrderedDict[tuple[str, int], bytes] = OrderedDict()
        self.requests = 0
        """Ranged reads sent so far (for tests and benchmarks)."""

    def get(self, key: tuple[str, int]) -> bytes | None:
        data = self.blocks.get(key)
        if data is not None:
            self.blocks.move_to_end(key)
        return data

    def put(self, key: tuple[str, int], data: bytes) -> None:
        self.blocks[key] = data
        self.size += len(data)
        while self.size > self.capacity and len(self.blocks) > 1:
            self.size -= len(self.blocks.popitem(last=False)[1])


class RangedArray:
    """The 1-D array in the ``.npy`` object at ``loc``; slicing reads only the bytes it needs.

    Parameters
    ----------
    loc
        URI of a ``.npy`` file holding a C-ordered 1-D array.
    cache
        Shared block cache (one per store).
    block
        Bytes per block; a read covers whole blocks.
    """

    def __init__(self, loc: str, cache: BlockCache, block: int = BLOCK_BYTES) -> None:
        self.loc, self.cache, self.block = loc, cache, block
        self.file = storage.open_ranges(loc)
        head = io.BytesIO(self.file.read_at(min(HEADER_BYTES, self.file.size()), 0))  # the header in one request
        version = np.lib.format.read_magic(head)
        read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, fortran, self.dtype = read_header(head)
        if len(shape) != 1 or fortran or self.dtype.hasobject:
            raise ValueError(f"{loc} does not hold a flat numeric array (shape {shape})")
        self.length, self.offset = shape[0], head.tell()
        self.end = self.offset + self.length * self.dtype.itemsize

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, key: Any) -> np.ndarray:
        if not isinstance(key, slice):
            raise TypeError("a RangedArray is read by slices of contiguous elements")
        start, stop, step = key.indices(self.length)
        if step != 1:
            raise TypeError("a RangedArray is read by slices of contiguous elements")
        size = self.dtype.itemsize
        data = self._bytes(self.offset + start * size, self.offset + max(start, stop) * size)
        return np.frombuffer(data, dtype=self.dtype)

    def _bytes(self, lo: int, hi: int) -> bytes:
        """File bytes ``[lo, hi)`` through the block cache."""
        if hi <= lo:
            return b""
        first, last = lo // self.block, (hi - 1) // self.block
        blocks = {b: self.cache.get((self.loc, b)) for b in range(first, last + 1)}
        run: list[int] = []
        for b in [*blocks, None]:  # fetch each run of missing blocks with one ranged read
            if b is not None and blocks[b] is None:
                run.append(b)
                continue
            if run:
                start = run[0] * self.block
                data = self.file.read_at(min((run[-1] + 1) * self.block, self.end) - start, start)
                self.cache.requests += 1
                for i, r in enumerate(run):
                    blocks[r] = data[i * self.block:(i + 1) * self.block]
                    self.cache.put((self.loc, r), blocks[r])
                run = []
        joined = b"".join(blocks[b] for b in range(first, last + 1))
        return joined[lo - first * self.block:hi - first * self.block]
