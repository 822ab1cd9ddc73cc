"""The cache: a Zarr v3 group holding per-split, per-tier activations and a manifest.

Layout (a local folder):

    CACHE/zarr.json                 group attributes: {"sherl_pipe": MANIFEST}
    CACHE/<split>/h<t>              (N, T, D) float16|float32, chunks (chunk_size, time_chunk, D)
    CACHE/<split>/input_ids         (N, T) int32, padded with the tokenizer's pad id
    CACHE/<split>/token_type_ids    (N, T) int8, only for text pairs
    CACHE/<split>/lengths           (N,) int32, real tokens per sample
    CACHE/<split>/labels            (N,) int64 class ids, or float32 targets
    CACHE/<split>/row_ids           (N,) int64, 0-based data rows of the split's source file
    CACHE/<split>/done              (blocks,) uint8, one chunk per block: 1 once the block is written

Samples are stored sorted by length (ties in a fixed pseudo-random order; `row_ids` map them back), and the time
axis T is the split's longest sample, chunked by `time_chunk` positions. Positions past a sample's
length hold zeros, and since a block's samples have similar lengths, the time chunks past its
longest sample are entirely zero: they are never compressed, written or read back. A block is exactly one chunk along samples, so no two
writers ever touch the same chunk, and `done[b]` is written only after all of block b's data: a
block whose flag is not set is redone on the next run. The manifest is written once, when the
cache is created, and never rewritten by writers.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

import numpy as np

from sherl_pipe import __version__
from sherl_pipe.atomic import write_atomically
from sherl_pipe.errors import CacheMismatch, SherlError

FORMAT_VERSION = 1
MANIFEST_KEY = "sherl_pipe"
# Fields that describe how or when a cache was made, not what it holds: never matched. File paths
# are volatile too: what a path held is matched by the module hashes and the rows' fingerprints.
VOLATILE = {"tool_version", "created", "config"}


def is_volatile(path: tuple) -> bool:
    return ((len(path) == 1 and path[0] in VOLATILE) or path == ("backbone", "source")
            or (len(path) == 3 and path[0] == "splits" and path[2] == "source"))
FP16_MAX = 65504.0


def tier_name(t: int) -> str:
    return f"h{t}"


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


def manifest_diff(old: dict, new: dict) -> list[str]:
    """Dotted paths of the non-volatile fields that differ, with both values."""
    out: list[str] = []

    def walk(a, b, path):
        if isinstance(a, dict) and isinstance(b, dict):
            for key in sorted(set(a) | set(b)):
                if not is_volatile(path + (key,)):
                    walk(a.get(key), b.get(key), path + (key,))
        elif a != b:
            show = lambda v: (s if len(s := json.dumps(v)) <= 60 else s[:57] + "...")  # noqa: E731
            out.append(f"{'.'.join(path)}: cache has {show(a)}, request has {show(b)}")

    walk(old, new, ())
    return out


def _jsonable(value):
    return json.loads(json.dumps(value, default=lambda o: o.tolist() if hasattr(o, "tolist") else str(o)))


def remove_partials(root: Path) -> int:
    """Delete the temporary files an interrupted write leaves behind (zarr writes KEY.<uuid>.partial)."""
    count = 0
    for path in root.rglob("*.partial"):
        path.unlink(missing_ok=True)
        count += 1
    return count


class Cache:
    """Read access to a finished or partial cache."""

    def __init__(self, path: str | os.PathLike):
        import zarr

        self.path = Path(path)
        if not (self.path / "zarr.json").is_file():
            raise SherlError(f"cache {self.path}: not found (no zarr.json); run `sherl-pipe extract` first")
        try:
            self.group = zarr.open_group(str(self.path), mode="r")
        except Exception as exc:  # zarr raises several types for a damaged group
            raise SherlError(f"cache {self.path}: cannot open as a Zarr group ({exc})") from None
        manifest = self.group.attrs.get(MANIFEST_KEY)
        if not isinstance(manifest, dict):
            raise SherlError(f"cache {self.path}: no sherl-pipe manifest in its attributes; not a sherl-pipe cache")
        if manifest.get("format_version") != FORMAT_VERSION:
            raise SherlError(f"cache {self.path}: format version {manifest.get('format_version')} is not "
                             f"{FORMAT_VERSION}; re-extract it with this version of sherl-pipe")
        self.manifest = manifest

    @property
    def splits(self) -> list[str]:
        return list(self.manifest["splits"])

    @property
    def tiers(self) -> list[int]:
        return list(self.manifest["tiers"])

    def split_info(self, split: str) -> dict:
        if split not in self.manifest["splits"]:
            raise SherlError(f"cache {self.path}: no split '{split}' (has: {', '.join(self.splits)})")
        return self.manifest["splits"][split]

    def array(self, split: str, name: str):
        self.split_info(split)
        try:
            return self.group[f"{split}/{name}"]
        except KeyError:
            raise SherlError(f"cache {self.path}: split '{split}' has no array '{name}'; the cache is damaged "
                             f"or incomplete: rerun `sherl-pipe extract`") from None

    def dask_array(self, split: str, name: str):
        """A lazy dask array over one cached array (e.g. 'h3'), chunked like the cache, for analysis
        beyond sherl-pipe: `cache.dask_array("train", "h5")[:, 0].mean(0).compute()`."""
        import dask.array as da

        self.require_complete(split)
        return da.from_zarr(self.array(split, name))

    def blocks_done(self, split: str) -> tuple[int, int]:
        info = self.split_info(split)
        try:
            done = self.group[f"{split}/done"][:]
        except KeyError:
            return 0, info["blocks"]
        return int(done.sum()), info["blocks"]

    def is_complete(self, split: str | None = None) -> bool:
        splits = [split] if split else self.splits
        return all(self.blocks_done(s)[0] == self.blocks_done(s)[1] for s in splits)

    def require_complete(self, split: str) -> None:
        done, total = self.blocks_done(split)
        if done != total:
            raise SherlError(f"cache {self.path}: split '{split}' is incomplete ({done}/{total} blocks); "
                             f"rerun `sherl-pipe extract` with the same pipeline to finish it")

    def bytes_on_disk(self, split: str | None = None, name: str | None = None) -> int:
        root = self.path / split if split else self.path
        if name:
            root = root / name
        return sum(f.stat().st_size for f in root.rglob("*") if f.is_file())


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
    blosc or zstd): those arrays take zarr's generic path.

    Used for the large tier arrays: zarr's generic write path copies each chunk several times,
    which cost as much as a quarter of the forward pass in extraction."""
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


class BlockReader:
    """Reads one tier array's chunks straight from their files.

    A block (one chunk of samples) is handed out as its time chunks: one array of the zarr chunk
    shape per time chunk, decoded in place into arrays the caller owns and reuses. zarr's generic
    read path allocates a decoded copy per chunk and then an output array; on a training epoch the
    page faults of that fresh memory cost more than the decompression itself. Compressed bytes are
    read into one reused buffer for the same reason. Falls back to zarr for other codec chains."""

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
        key = self.arr.metadata.chunk_key_encoding.encode_chunk_key((block, j) + (0,) * (self.arr.ndim - 2))
        try:
            f = open(self.root / key, "rb", buffering=0)
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
                    raise SherlError(f"cache {self.root / key}: chunk file is shorter than its size; "
                                     f"rerun extraction with --overwrite")
                got += n
        self.codec.decode(view, out=out)


class CacheWriter:
    """Creates (or reopens and checks) a cache and writes blocks into it."""

    def __init__(self, path: str | os.PathLike, manifest: dict, overwrite: bool = False):
        import zarr

        self.path = Path(path)
        self.manifest = _jsonable({**manifest, "format_version": FORMAT_VERSION, "tool_version": __version__})
        if self.path.exists() and overwrite:
            shutil.rmtree(self.path)
        if self.path.exists() and any(self.path.iterdir()):
            if not (self.path / "zarr.json").is_file():
                raise SherlError(f"cache {self.path}: exists and is not a sherl-pipe cache; choose another "
                                 f"extract.cache path or remove the folder")
            old = Cache(self.path).manifest
            diffs = manifest_diff(old, self.manifest)
            if diffs:
                raise CacheMismatch(f"cache {self.path}: exists with a different manifest ({'; '.join(diffs[:6])}"
                                 f"{'; ...' if len(diffs) > 6 else ''}); use --overwrite to replace it, "
                                 f"or choose another extract.cache path")
            self.resumed = True
            remove_partials(self.path)
            self.group = zarr.open_group(str(self.path), mode="r+")
        else:
            self.resumed = False
            self.group = zarr.open_group(str(self.path), mode="w", attributes={MANIFEST_KEY: self.manifest})
        self._codecs = {}

    def create_split(self, split: str, n: int, t: int, d: int, tiers: list[int], dtype: str, compressors,
                     chunk: int, time_chunk: int, label_dtype: str, pad_id: int, with_types: bool) -> None:
        tc = min(time_chunk, t)
        specs = {tier_name(tier): ((n, t, d), (chunk, tc, d), dtype, 0, compressors) for tier in tiers}
        specs["input_ids"] = ((n, t), (chunk, tc), "int32", pad_id, compressors)
        if with_types:
            specs["token_type_ids"] = ((n, t), (chunk, tc), "int8", 0, compressors)
        specs["lengths"] = ((n,), (chunk,), "int32", 0, None)
        specs["labels"] = ((n,), (chunk,), label_dtype, 0, None)
        specs["row_ids"] = ((n,), (chunk,), "int64", -1, None)
        specs["done"] = ((-(-n // chunk),), (1,), "uint8", 0, None)
        sub = self.group.require_group(split)
        for name, (shape, chunks, dt, fill, comp) in specs.items():
            if name in sub:
                arr = sub[name]
                if arr.shape != shape or arr.chunks != chunks or str(arr.dtype) != dt:
                    raise SherlError(f"cache {self.path}: array {split}/{name} has shape {arr.shape} dtype "
                                     f"{arr.dtype}, expected {shape} {dt}; the cache is damaged: use --overwrite")
                continue
            kwargs = {"compressors": comp} if comp is not None else {"compressors": None}
            sub.create_array(name, shape=shape, chunks=chunks, dtype=dt, fill_value=fill, **kwargs)

    def pending_blocks(self, split: str) -> list[int]:
        return [int(b) for b in np.flatnonzero(self.group[f"{split}/done"][:] == 0)]

    def write_block(self, split: str, block: int, start: int, arrays: dict[str, np.ndarray]) -> None:
        """Write one block's arrays, then mark it done.

        Each array covers samples start..start+len; 2-D and 3-D ones cover the first `width` time
        positions, a multiple of the time chunk (or all of T): the chunks past it stay unwritten,
        which Zarr reads back as zeros (pad ids for input_ids)."""
        sub = self.group[split]
        for name, value in arrays.items():
            arr = sub[name]
            if (split, name) not in self._codecs:
                self._codecs[(split, name)] = chunk_codec(arr) if value.ndim == 3 else None
            if codec := self._codecs[(split, name)]:
                self._write_chunks(split, name, arr, codec.encode, start, value)
            elif value.ndim == 1:
                arr[start:start + len(value)] = value
            else:
                arr[start:start + len(value), : value.shape[1]] = value
        sub["done"][block] = 1

    def _write_chunks(self, split: str, name: str, arr, encode, start: int, value: np.ndarray) -> None:
        """Encode and write a block's time chunks directly; they are whole chunks by construction."""
        chunk, tc = arr.chunks[0], arr.chunks[1]
        fill = arr.metadata.fill_value
        i = start // chunk
        for j in range(-(-value.shape[1] // tc)):
            piece = value[:, j * tc:(j + 1) * tc]
            if piece.shape[0] < chunk or piece.shape[1] < tc:  # edge chunks are stored whole, fill-padded
                full = np.full((chunk, tc) + piece.shape[2:], fill, dtype=arr.dtype)
                full[: piece.shape[0], : piece.shape[1]] = piece
                piece = full
            raw = np.ascontiguousarray(piece, dtype=arr.dtype)
            key = arr.metadata.chunk_key_encoding.encode_chunk_key((i, j) + (0,) * (value.ndim - 2))
            path = self.path / split / name / key
            path.parent.mkdir(parents=True, exist_ok=True)
            write_atomically(path, encode(raw))


def manifest_fingerprint(manifest: dict) -> str:
    """A hash of everything a cache holds (the manifest less its volatile fields)."""
    import hashlib

    def strip(d, path=()):
        if not isinstance(d, dict):
            return d
        return {k: strip(v, path + (k,)) for k, v in d.items() if not is_volatile(path + (k,))}

    return hashlib.sha256(json.dumps(strip(manifest), sort_keys=True).encode()).hexdigest()
