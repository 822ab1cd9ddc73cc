"""Tier chunks read and written directly as files, with the array's own codec settings.

zarr's generic write path copies each chunk several times (as much as a quarter of the forward
pass in extraction), and its read path allocates a decoded copy per chunk, whose page faults cost
more than the decompression on a training epoch. The tier arrays are therefore encoded and decoded
here, chunk by chunk, exactly as zarr would; zarr reads everything back as usual.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np

from sherl_pipe.errors import SherlError


def make_compressors(codec: str, clevel: int, dtype: str):
    from zarr.codecs import BloscCodec, ZstdCodec

    if codec == "none":
        return None
    if codec == "zstd":
        return [ZstdCodec(level=clevel)]
    cname = codec.split("-", 1)[1]
    return [BloscCodec(cname=cname, clevel=clevel, shuffle="shuffle", typesize=np.dtype(dtype).itemsize)]


def set_codec_threads(n: int) -> None:
    import numcodecs
    import zarr

    numcodecs.blosc.set_nthreads(n)
    zarr.config.set({"threading.max_workers": n})


class _Raw:
    """The bytes codec alone: stored chunks are the array's little-endian bytes."""

    @staticmethod
    def encode(raw):
        return raw

    @staticmethod
    def decode(data: bytes, out: np.ndarray) -> None:
        out.reshape(-1).view(np.uint8)[:] = np.frombuffer(data, dtype=np.uint8)


def chunk_codec(arr):
    """A codec with encode(array) and decode(bytes, out=array) equal to the array's own Zarr v3
    codec chain, or None when the chain is not one sherl-pipe creates (bytes, then at most one
    blosc or zstd): those arrays take zarr's generic path."""
    import numcodecs
    from zarr.codecs import BloscCodec, BytesCodec, ZstdCodec

    codecs = list(arr.metadata.codecs)
    if not codecs or not isinstance(codecs[0], BytesCodec) or len(codecs) > 2:
        return None
    if codecs[0].endian is not None and codecs[0].endian.value != sys.byteorder:
        return None
    if len(codecs) == 1:
        return _Raw
    c = codecs[1]
    if isinstance(c, BloscCodec):
        shuffle = {"noshuffle": 0, "shuffle": 1, "bitshuffle": 2}[c.shuffle.value]
        return numcodecs.Blosc(cname=c.cname.value, clevel=c.clevel, shuffle=shuffle, blocksize=c.blocksize,
                               typesize=c.typesize)
    if isinstance(c, ZstdCodec):
        return numcodecs.Zstd(level=c.level, checksum=c.checksum)
    return None


def whole_time_chunks(longest: int, time_chunk: int, time_len: int) -> int:
    """Time positions a block of samples fills: its longest sample, rounded up to whole time chunks
    (so no chunk is ever partly written or partly decoded), at most the array's T."""
    return min(time_len, -(-longest // time_chunk) * time_chunk)


def chunk_path(root: Path, arr, coords: tuple) -> Path:
    key = arr.metadata.chunk_key_encoding.encode_chunk_key(coords + (0,) * (arr.ndim - len(coords)))
    return root / key


class BlockReader:
    """Reads one tier array's chunks straight from their files.

    A block (one chunk of samples) is handed out as its time chunks: one array of the zarr chunk
    shape per time chunk, decoded in place into arrays the caller owns and reuses. Compressed bytes
    are read into one reused buffer. Falls back to zarr for other codec chains."""

    def __init__(self, cache_path: Path, split: str, name: str, arr):
        self.arr, self.root = arr, cache_path / split / name
        self.codec = chunk_codec(arr)
        self.chunk, self.tc = arr.chunks[0], arr.chunks[1]
        self.chunk_shape, self.dtype = tuple(arr.chunks), arr.dtype
        self.fill = arr.metadata.fill_value
        self._raw = bytearray()

    def read_time_chunk(self, block: int, j: int, out: np.ndarray) -> None:
        """Decode chunk (block, j) into OUT (the chunk shape). Rows and time positions past the
        array's edge are left unspecified: readers slice them away."""
        if self.codec is None:
            s, t = block * self.chunk, j * self.tc
            part = self.arr[s:s + self.chunk, t:t + self.tc]
            out[:part.shape[0], :part.shape[1]] = part
            return
        path = chunk_path(self.root, self.arr, (block, j))
        try:
            f = open(path, "rb", buffering=0)
        except FileNotFoundError:  # never written: all fill value
            out[...] = self.fill
            return
        with f:
            size = os.fstat(f.fileno()).st_size
            if len(self._raw) < size:
                self._raw = bytearray(size)
            view = memoryview(self._raw)[:size]
            got = 0
            while got < size:
                n = f.readinto(view[got:])
                if not n:
                    raise SherlError(f"cache {path}: chunk file is shorter than its size; "
                                     f"rerun extraction with --overwrite")
                got += n
        self.codec.decode(view, out=out)
