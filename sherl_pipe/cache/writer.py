"""Creating a cache (or reopening one to finish it) and writing blocks into it.

A block is exactly one chunk along samples, so no two writers ever touch the same chunk. A block's
chunks are written first, each as one value through the store (one PUT on an object store, which
has no rename), and its `done` chunk last: `done[b]` is the only proof that block b is written,
and a block whose flag is not set is redone on the next run. Blocks are deterministic (an
eval-mode forward, a fixed dtype, codec and sample order), so a block written twice (dask may run
a task twice) leaves identical bytes.

One extraction writes a cache at a time (lease.py): on a local folder a second one waits for the
first's lock, then finds the blocks it finished done; on an object store it is refused. Only the
lock holder removes a local writer's stray `*.partial` files, so it never deletes another
writer's files in flight.
"""

from __future__ import annotations

import os
from typing import Callable

import numpy as np

from sherl_pipe.cache import access
from sherl_pipe.cache.codec import chunk_codec, chunk_key
from sherl_pipe.cache.lease import SUFFIX, WAIT_MESSAGE, take_cache_lock  # noqa: F401 (WAIT_MESSAGE: tests)
from sherl_pipe.cache.location import Location, as_location
from sherl_pipe.cache.manifest import FORMAT_VERSION, MANIFEST_KEY, jsonable, manifest_diff
from sherl_pipe.cache.store import Cache, check_cache_path, data_location, is_sherl_cache, new_data_key
from sherl_pipe.errors import CacheMismatch, SherlError
from sherl_pipe.folders import ensure_writable, has_files, refuse_cwd
from sherl_pipe.version import __version__


def remove_partials(loc: Location) -> int:
    """Delete the temporaries an interrupted local write leaves behind (zarr's: *.partial). Object
    stores have none: a PUT is whole or absent."""
    if not loc.is_local:
        return 0
    stray = [k for k in access.keys(loc, "") if k.endswith(".partial")]
    access.delete_many(loc, stray)
    return len(stray)


def has_content(loc: Location) -> bool:
    if loc.is_local:
        return loc.path.is_dir() and has_files(loc.path)
    return access.any_key(loc, "")


def check_target(where, overwrite: bool) -> bool:
    """Whether a cache location may be written (checked before any work): not a file, not someone
    else's folder or prefix, not the current directory to be overwritten, writable. True if it
    holds anything."""
    loc = as_location(where)
    check_cache_path(loc)
    if not loc.is_local and loc.sibling(SUFFIX) is None:
        # the lease lives beside the cache; at a bucket's root it would sit inside it
        raise SherlError(f"cache {loc}: a cache on an object store needs a prefix inside the bucket, e.g. "
                         f"{str(loc).rstrip('/')}/my-cache; set extract.cache (or --cache) to one")
    existing = has_content(loc)
    if existing and not is_sherl_cache(loc):
        what = "exists" if loc.is_local else "holds objects"
        raise SherlError(f"cache {loc}: {what} and is not a sherl-pipe cache (no manifest in its zarr.json); it "
                         f"is never deleted: choose another extract.cache path")
    if loc.is_local:
        if existing and overwrite:
            refuse_cwd(loc.path, "cache")
        ensure_writable(loc.path, "cache")
    else:
        access.probe_write(loc.sibling(SUFFIX) or loc)  # denied writes are named now, not after the model loads
    return existing


class BlockWriter:
    """Writes blocks into a cache whose arrays exist, at WHERE, the cache's data location
    (store.data_location): what an extraction's worker needs (a dask worker opens one per cache and
    process, not per block). FENCE, called before each block is written, raises once the writer
    may no longer write (its extraction lost the cache's lease)."""

    def __init__(self, where, group=None, fence: Callable[[], None] = lambda: None):
        import zarr

        self.fence = fence
        self.location = as_location(where)
        self.store = self.location.store()
        with access.translated(self.location):
            self.group = group if group is not None else zarr.open_group(store=self.store, mode="r+")
        self._arrays: dict = {}

    def array(self, split: str, name: str):
        """The array and its chunk codec (opened once)."""
        if (split, name) not in self._arrays:
            arr = self.group[f"{split}/{name}"]
            self._arrays[(split, name)] = (arr, chunk_codec(arr))
        return self._arrays[(split, name)]

    def write_block(self, split: str, block: int, arrays: dict[str, np.ndarray]) -> None:
        """Write one block's arrays, then mark it done.

        1-D arrays hold the block's samples; 2-D and 3-D ones their first `width` time positions,
        a multiple of the time chunk (or all of T): the chunks past it stay unwritten, which zarr
        reads back as fill (zeros, pad ids for input_ids). Every chunk is stored whole, edge chunks
        fill-padded, so a chunk missing from a done block always means damage."""
        items = []
        for name, value in arrays.items():
            items += self._encoded(split, name, block, value)
        self.fence()
        access.put_many(self.location, items, self.store, where=f"{split}/")
        self.set_done(split, block, 1)

    def set_done(self, split: str, block: int, value: int) -> None:
        arr, codec = self.array(split, "done")
        access.put(self.location, chunk_key(arr, (block,)), codec.encode(np.full(1, value, dtype=np.uint8)),
                   self.store)

    def _encoded(self, split: str, name: str, block: int, value: np.ndarray) -> list[tuple[str, bytes]]:
        arr, codec = self.array(split, name)
        fill = arr.metadata.fill_value
        if value.ndim == 1:
            pieces = [((block,), value)]
        else:
            tc = arr.chunks[1]
            pieces = [((block, j), value[:, j * tc:(j + 1) * tc]) for j in range(-(-value.shape[1] // tc))]
        out = []
        for coords, piece in pieces:
            if piece.shape != tuple(arr.chunks):  # edge chunks are stored whole, fill-padded
                full = np.full(arr.chunks, fill, dtype=arr.dtype)
                full[tuple(slice(0, n) for n in piece.shape)] = piece
                piece = full
            out.append((chunk_key(arr, coords), codec.encode(np.ascontiguousarray(piece, dtype=arr.dtype))))
        return out


class CacheWriter:
    """Creates (or reopens and checks) a cache, holding its lock, and writes blocks into it."""

    def __init__(self, where: str | os.PathLike | Location, manifest: dict, overwrite: bool = False,
                 log: Callable[[str], None] = print, lease_seconds: float | None = None):
        self.location = as_location(where)
        self.path = str(self.location)
        self.manifest = jsonable({**manifest, "format_version": FORMAT_VERSION, "tool_version": __version__})
        check_target(self.location, overwrite)
        self.lock = take_cache_lock(self.location, log, lease_seconds)
        try:
            with access.translated(self.location):
                self._open(overwrite)
        except BaseException:
            self.lock.release()
            raise

    def _open(self, overwrite: bool) -> None:
        import zarr

        store = self.location.store()
        if overwrite and has_content(self.location):
            access.clear(self.location)  # keeps a local folder itself, and so the lock on it
        self.resumed = has_content(self.location)
        if not self.resumed:
            if not self.location.is_local:  # its arrays under a key of its own (store.data_location)
                self.manifest = {**self.manifest, "arrays": new_data_key()}
            self.data = data_location(self.location, self.manifest)
            # never open_group(mode="w"): it deletes and recreates the folder, and with it the
            # inode this process's lock is on, so a second extractor locked the new folder and
            # wrote beside the first (zarr's ContainsArrayError, or blocks written twice). The
            # arrays' group first: a reader that finds the manifest finds it too.
            data = None if self.data == self.location else zarr.create_group(store=self.data.store(), overwrite=False)
            group = zarr.create_group(store=store, attributes={MANIFEST_KEY: self.manifest}, overwrite=False)
            self.blocks = BlockWriter(self.data, group if data is None else data, self.check_lock)
            return
        found = Cache(self.location)
        diffs = manifest_diff(found.manifest, self.manifest)
        if diffs:
            raise CacheMismatch(f"cache {self.path}: exists with a different manifest ({'; '.join(map(str, diffs[:6]))}"
                                f"{'; ...' if len(diffs) > 6 else ''}); use --overwrite to replace it, "
                                f"or choose another extract.cache path", diffs)
        self.manifest, self.data = found.manifest, found.data
        remove_partials(self.location)
        self.blocks = BlockWriter(self.data, zarr.open_group(store=self.data.store(), mode="r+"), self.check_lock)

    @property
    def group(self):
        return self.blocks.group

    def check_lock(self) -> None:
        """Raise if this writer lost its lease (object stores: frozen past its expiry)."""
        self.lock.check()

    def close(self) -> None:
        self.lock.release()

    def create_split(self, split: str, n: int, t: int, d: int, tiers: list[int], dtype: str, compressors,
                     chunk: int, time_chunk: int, label_dtype: str, pad_id: int, with_types: bool) -> None:
        tc = min(time_chunk, t)
        checksum_only = compressors[-1:]
        specs = {f"h{tier}": ((n, t, d), (chunk, tc, d), dtype, 0, compressors) for tier in tiers}
        specs["input_ids"] = ((n, t), (chunk, tc), "int32", pad_id, compressors)
        if with_types:
            specs["token_type_ids"] = ((n, t), (chunk, tc), "int8", 0, compressors)
        specs["lengths"] = ((n,), (chunk,), "int32", 0, checksum_only)
        specs["labels"] = ((n,), (chunk,), label_dtype, 0, checksum_only)
        specs["row_ids"] = ((n,), (chunk,), "int64", -1, checksum_only)
        specs["done"] = ((-(-n // chunk),), (1,), "uint8", 0, checksum_only)
        with access.translated(self.location, split):
            sub = self.group.require_group(split)
            for name, (shape, chunks, dt, fill, comp) in specs.items():
                if name in sub:
                    arr = sub[name]
                    if arr.shape != shape or arr.chunks != chunks or str(arr.dtype) != dt:
                        raise SherlError(f"cache {self.path}: array {split}/{name} has shape {arr.shape} dtype "
                                         f"{arr.dtype}, expected {shape} {dt}; the cache is damaged: use --overwrite")
                    continue
                sub.create_array(name, shape=shape, chunks=chunks, dtype=dt, fill_value=fill, compressors=comp)

    def pending_blocks(self, split: str) -> tuple[list[int], int]:
        """Blocks to write: those not done, and done ones with missing chunks (their count is returned)."""
        cache = Cache(self.location)
        done = cache.done_flags(split)
        missing = cache.missing_chunks(split)
        broken = sorted({int(c[0]) for coords in missing.values() for c in coords})
        for b in broken:
            self.blocks.set_done(split, b, 0)
            done[b] = 0
        return [int(b) for b in np.flatnonzero(done == 0)], len(broken)

    def write_block(self, split: str, block: int, start: int, arrays: dict[str, np.ndarray]) -> None:
        self.blocks.write_block(split, block, arrays)
