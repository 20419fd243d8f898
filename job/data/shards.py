"""Token shards: fixed-size blocks of token ids in a flat binary file with a small header (as llm.c does).

Layout: a 64-byte header, then n_blocks * block_size token ids (little-endian uint16 or uint32).
The header lets a loader check a shard before trusting it: magic, version, dtype width, block size, count.
"""
from __future__ import annotations

import hashlib
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

MAGIC = b"FTJOBTOK"
VERSION = 1
HEADER_BYTES = 64
_HEADER = struct.Struct("<8sIIIQ")  # magic, version, bytes per token, block_size, n_blocks


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype("<u2") if vocab_size <= 2**16 else np.dtype("<u4")


def write_token_shard(path: Path, blocks: np.ndarray) -> None:
    """Write a (n_blocks, block_size) array; written to a temporary name and renamed, so never half there."""
    n_blocks, block_size = blocks.shape
    tmp = path.with_suffix(path.suffix + ".tmp")
    with TokenShardWriter(tmp, block_size, n_blocks, blocks.dtype) as w:
        w.write(blocks.reshape(-1))
    tmp.replace(path)


class TokenShardWriter:
    """A token shard written as a stream: the header first (the block count is known beforehand), then
    token runs in order; tokens past the last whole block are dropped, as a shard's tail shorter than a
    block is. Hashes what it writes, so the file is never read back for its sha256."""

    def __init__(self, path: Path, block_size: int, n_blocks: int, dtype):
        self.path, self.dtype = Path(path), np.dtype(dtype)
        self.capacity = n_blocks * block_size  # tokens
        self.written = 0
        self.sha256 = hashlib.sha256()
        self.f = open(self.path, "wb")
        self._put(_HEADER.pack(MAGIC, VERSION, self.dtype.itemsize, block_size, n_blocks).ljust(HEADER_BYTES, b"\0"))

    def _put(self, data) -> None:
        self.f.write(data)
        self.sha256.update(data)

    @property
    def bytes(self) -> int:
        return HEADER_BYTES + self.capacity * self.dtype.itemsize

    def write(self, tokens: np.ndarray) -> None:
        room = self.capacity - self.written
        if room > 0:
            tokens = tokens[:room]
            self._put(np.ascontiguousarray(tokens, dtype=self.dtype).data)
            self.written += len(tokens)

    def __enter__(self) -> "TokenShardWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.f.close()
        if exc[0] is None and self.written != self.capacity:
            raise ValueError(f"{self.path}: {self.written} tokens written for {self.capacity}")


@dataclass
class TokenShard:
    path: Path
    block_size: int
    n_blocks: int
    dtype: np.dtype

    @classmethod
    def open(cls, path: Path) -> "TokenShard":
        with open(path, "rb") as f:
            raw = f.read(HEADER_BYTES)
        if len(raw) < HEADER_BYTES:
            raise ValueError(f"{path}: too short for a token shard header")
        magic, version, width, block_size, n_blocks = _HEADER.unpack(raw[:_HEADER.size])
        if magic != MAGIC or version != VERSION or width not in (2, 4):
            raise ValueError(f"{path}: not an ftjob token shard (magic {magic!r}, version {version})")
        expected = HEADER_BYTES + n_blocks * block_size * width
        if path.stat().st_size != expected:
            raise ValueError(f"{path}: size {path.stat().st_size} != {expected} from its header (truncated?)")
        return cls(path, block_size, n_blocks, np.dtype("<u2" if width == 2 else "<u4"))

    def blocks(self) -> np.ndarray:
        """Memory-mapped (n_blocks, block_size) view: no copy, pages come in as the loader touches them."""
        if self.n_blocks == 0:
            return np.zeros((0, self.block_size), self.dtype)
        return np.memmap(self.path, dtype=self.dtype, mode="r", offset=HEADER_BYTES,
                         shape=(self.n_blocks, self.block_size))


class BlockStore:
    """All blocks of one split, across its memory-mapped shards, addressed by one global index."""

    def __init__(self, shards: list[TokenShard]):
        self.views = [s.blocks() for s in shards if s.n_blocks]
        self.block_size = shards[0].block_size if shards else 0
        self.starts = np.cumsum([0] + [len(v) for v in self.views])

    def __len__(self) -> int:
        return int(self.starts[-1])

    def gather(self, indices: np.ndarray) -> np.ndarray:
        """(len(indices), block_size) int64 array; sorted reads per shard keep page-cache access sequential."""
        out = np.empty((len(indices), self.block_size), dtype=np.int64)
        shard_of = np.searchsorted(self.starts, indices, side="right") - 1
        for s in np.unique(shard_of):
            rows = np.nonzero(shard_of == s)[0]
            out[rows] = self.views[s][indices[rows] - self.starts[s]]
        return out
