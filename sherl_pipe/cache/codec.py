"""Chunks read and written directly as files, with the array's own codec chain, checksums included.

Every array's chain ends in zarr's `crc32c` codec: each stored chunk carries the CRC-32C of its
encoded bytes in its last 4 bytes, checked on every read (by zarr for the arrays it reads, here for
the tier chunks), so a flipped byte or a truncated file is an error that names the chunk, never
wrong values. A chunk that should exist and does not is an error too (see store.py).

The tier arrays are encoded and decoded here, chunk by chunk, exactly as zarr would: zarr's generic
write path copies each chunk several times (as much as a quarter of the forward pass in
extraction), and its read path allocates a decoded copy per chunk, whose page faults cost more than
the decompression on a training epoch. zarr reads everything back as usual.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np

from sherl_pipe.errors import SherlError

CRC_BYTES = 4


class ChunkError(SherlError):
    """A stored chunk that is damaged or missing, named by split, array and chunk coordinates."""

    def __init__(self, cache_path, split: str, name: str, coords: tuple, problem: str):
        self.split, self.name, self.coords, self.problem = split, name, tuple(coords), problem
        super().__init__(f"cache {cache_path}: split '{split}', array '{name}', chunk {self.coords}: {problem}; "
                         f"run `sherl-pipe verify {cache_path} --mark-bad`, then `sherl-pipe extract` to redo "
                         f"the damaged blocks")


def make_compressors(codec: str, clevel: int, dtype: str) -> list:
    """The bytes-to-bytes codecs of every array: the compressor (if any), then the checksum."""
    from zarr.codecs import BloscCodec, Crc32cCodec, ZstdCodec

    if codec == "none":
        return [Crc32cCodec()]
    if codec == "zstd":
        return [ZstdCodec(level=clevel), Crc32cCodec()]
    cname = codec.split("-", 1)[1]
    return [BloscCodec(cname=cname, clevel=clevel, shuffle="shuffle", typesize=np.dtype(dtype).itemsize),
            Crc32cCodec()]


def set_codec_threads(n: int) -> None:
    import numcodecs
    import zarr

    numcodecs.blosc.set_nthreads(n)
    zarr.config.set({"threading.max_workers": n})


def crc32c(data) -> bytes:
    import google_crc32c

    return np.uint32(google_crc32c.value(np.frombuffer(data, dtype=np.uint8))).tobytes()


def checksum_ok(data) -> bool:
    """Whether stored chunk bytes end in the CRC-32C of what precedes it."""
    view = memoryview(data)
    return len(view) >= CRC_BYTES and crc32c(view[:-CRC_BYTES]) == bytes(view[-CRC_BYTES:])


class _Raw:
    """The bytes codec alone: the stored payload is the array's little-endian bytes."""

    @staticmethod
    def encode(raw: np.ndarray):
        return raw

    @staticmethod
    def decode(data, out: np.ndarray) -> None:
        if len(data) != out.nbytes:
            raise ValueError(f"{len(data)} bytes where {out.nbytes} were expected")
        out.reshape(-1).view(np.uint8)[:] = np.frombuffer(data, dtype=np.uint8)


class ChunkCodec:
    """encode(array) -> stored bytes and decode(stored bytes, out=array), equal to the array's
    Zarr v3 chain: bytes, then at most one blosc or zstd, then crc32c."""

    def __init__(self, compressor):
        self.compressor = compressor

    def encode(self, raw: np.ndarray) -> bytes:
        payload = bytes(self.compressor.encode(raw))
        return payload + crc32c(payload)

    def decode(self, data, out: np.ndarray) -> str | None:
        """Decode into OUT; returns what is wrong with the chunk, or None."""
        if not checksum_ok(data):
            return "checksum mismatch (the chunk file is damaged or truncated)"
        try:
            self.compressor.decode(memoryview(data)[:-CRC_BYTES], out=out)
        except (ValueError, RuntimeError) as exc:
            return f"cannot be decoded ({exc})"
        return None


def chunk_codec(arr) -> ChunkCodec | None:
    """The codec of an array whose chain sherl-pipe creates, or None (zarr's generic path then)."""
    import numcodecs
    from zarr.codecs import BloscCodec, BytesCodec, Crc32cCodec, ZstdCodec

    codecs = list(arr.metadata.codecs)
    if (len(codecs) not in (2, 3) or not isinstance(codecs[0], BytesCodec)
            or not isinstance(codecs[-1], Crc32cCodec)):
        return None
    if codecs[0].endian is not None and codecs[0].endian.value != sys.byteorder:
        return None
    if len(codecs) == 2:
        return ChunkCodec(_Raw)
    c = codecs[1]
    if isinstance(c, BloscCodec):
        shuffle = {"noshuffle": 0, "shuffle": 1, "bitshuffle": 2}[c.shuffle.value]
        return ChunkCodec(numcodecs.Blosc(cname=c.cname.value, clevel=c.clevel, shuffle=shuffle,
                                          blocksize=c.blocksize, typesize=c.typesize))
    if isinstance(c, ZstdCodec):
        return ChunkCodec(numcodecs.Zstd(level=c.level, checksum=c.checksum))
    return None


def whole_time_chunks(longest: int, time_chunk: int, time_len: int) -> int:
    """Time positions a block of samples fills: its longest sample, rounded up to whole time chunks
    (so no chunk is ever partly written or partly decoded), at most the array's T."""
    return min(time_len, -(-longest // time_chunk) * time_chunk)


def chunk_path(root: Path, arr, coords: tuple) -> Path:
    key = arr.metadata.chunk_key_encoding.encode_chunk_key(tuple(coords) + (0,) * (arr.ndim - len(coords)))
    return root / key


def read_file_into(path: Path, buffer: bytearray) -> tuple[bytearray, memoryview]:
    """A whole file's bytes, read into BUFFER (grown if needed); (buffer, view of the bytes)."""
    with open(path, "rb", buffering=0) as f:
        size = os.fstat(f.fileno()).st_size
        if len(buffer) < size:
            buffer = bytearray(size)
        view = memoryview(buffer)[:size]
        got = 0
        while got < size:
            n = f.readinto(view[got:])
            if not n:
                break
            got += n
    return buffer, view[:got]


class BlockReader:
    """Reads one tier array's chunks straight from their files.

    A block (one chunk of samples) is handed out as its time chunks: one array of the zarr chunk
    shape per time chunk, decoded in place into arrays the caller owns and reuses. Compressed bytes
    are read into one reused buffer. Only chunks that were written are ever asked for."""

    def __init__(self, cache_path: Path, split: str, name: str, arr):
        self.cache_path, self.split, self.name = cache_path, split, name
        self.arr, self.root = arr, cache_path / split / name
        self.codec = chunk_codec(arr)
        if self.codec is None:
            raise SherlError(f"cache {cache_path}: array {split}/{name} has codecs sherl-pipe does not write; "
                             f"re-extract the cache with this version of sherl-pipe")
        self.chunk_shape, self.dtype = tuple(arr.chunks), arr.dtype
        self._raw = bytearray()

    def read_time_chunk(self, block: int, j: int, out: np.ndarray) -> None:
        """Decode chunk (block, j) into OUT (the chunk shape)."""
        try:
            self._raw, data = read_file_into(chunk_path(self.root, self.arr, (block, j)), self._raw)
        except FileNotFoundError:
            raise ChunkError(self.cache_path, self.split, self.name, (block, j), "missing") from None
        problem = self.codec.decode(data, out)
        if problem:
            raise ChunkError(self.cache_path, self.split, self.name, (block, j), problem)
