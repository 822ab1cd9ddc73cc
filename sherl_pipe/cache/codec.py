"""Chunks encoded and decoded directly, with the array's own codec chain, checksums included.

Every array's chain ends in zarr's `crc32c` codec: each stored chunk carries the CRC-32C of its
encoded bytes in its last 4 bytes, checked on every read (by zarr for the arrays it reads, here for
the tier chunks), so a flipped byte or a truncated chunk is an error that names the chunk, never
wrong values. A chunk that should exist and does not is an error too (see store.py).

A block's chunks are encoded here, chunk by chunk, exactly as zarr would, and written as one value
each through the store (zarr 3.1 has no public call for writing an encoded chunk; the key is the
array's own chunk key encoding): zarr's generic write path copies each chunk several times (as
much as a quarter of the forward pass in extraction), and its read path allocates a decoded copy
per chunk, whose page faults cost more than the decompression on a training epoch. zarr reads
everything back as usual.
"""

from __future__ import annotations

import sys

import numpy as np

from sherl_pipe.errors import SherlError
from sherl_pipe.cache import access
from sherl_pipe.cache.location import as_location

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
            return "checksum mismatch (the stored chunk is damaged or truncated)"
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


def chunk_key(arr, coords: tuple) -> str:
    """The store key of chunk COORDS of an array opened from its group (coordinates past those
    given are 0: a tier's width axis is one chunk), by the array's own chunk key encoding."""
    full = tuple(int(c) for c in coords) + (0,) * (arr.ndim - len(coords))
    return f"{arr.path}/{arr.metadata.chunk_key_encoding.encode_chunk_key(full)}"


class BlockReader:
    """Decodes one tier array's chunks, fetched through the cache's store.

    A block (one chunk of samples) is handed out as its time chunks: one array of the zarr chunk
    shape per time chunk, decoded in place into arrays the caller owns and reuses. The trainer's
    reader fetches many chunks' bytes at once (training/prefetch.py) and decodes them here; only
    chunks that were written are ever asked for."""

    def __init__(self, where, split: str, name: str, arr):
        self.location, self.split, self.name = as_location(where), split, name
        self.cache_path, self.arr = str(self.location), arr
        self.codec = chunk_codec(arr)
        if self.codec is None:
            raise SherlError(f"cache {self.cache_path}: array {split}/{name} has codecs sherl-pipe does not write; "
                             f"re-extract the cache with this version of sherl-pipe")
        self.chunk_shape, self.dtype = tuple(arr.chunks), arr.dtype

    def key(self, block: int, j: int) -> str:
        return chunk_key(self.arr, (block, j))

    def read_time_chunk(self, block: int, j: int, out: np.ndarray) -> None:
        """Fetch and decode chunk (block, j) into OUT (the chunk shape)."""

        self.decode(block, j, access.get(self.location, self.key(block, j)), out)

    def decode(self, block: int, j: int, data, out: np.ndarray) -> None:
        """Decode chunk (block, j)'s stored bytes (a zarr Buffer, or None: not stored) into OUT."""
        if data is None:
            raise ChunkError(self.cache_path, self.split, self.name, (block, j), "missing")
        problem = self.codec.decode(data.as_buffer_like(), out)
        if problem:
            raise ChunkError(self.cache_path, self.split, self.name, (block, j), problem)
