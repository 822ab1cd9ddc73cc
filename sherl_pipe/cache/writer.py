"""Creating a cache (or reopening one to finish it) and writing blocks into it.

A block is exactly one chunk along samples, so no two writers ever touch the same chunk, and
`done[b]` is written only after all of block b's data: a block whose flag is not set is redone on
the next run. One process writes a cache at a time: a second one waits for the first's lock, then
finds the blocks it finished done. Only the lock holder removes stray `*.partial` files, so it
never deletes another writer's files in flight.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

import numpy as np

from sherl_pipe.version import __version__
from sherl_pipe.atomic import write_atomically
from sherl_pipe.cache.codec import chunk_codec, chunk_path
from sherl_pipe.cache.manifest import FORMAT_VERSION, MANIFEST_KEY, jsonable, manifest_diff
from sherl_pipe.cache.store import Cache, check_cache_path, is_sherl_cache
from sherl_pipe.errors import CacheMismatch, SherlError, naming
from sherl_pipe.folders import clear_folder, ensure_writable, has_files, refuse_cwd
from sherl_pipe.locks import FolderLock

WAIT_MESSAGE = "another sherl-pipe process is writing this cache; waiting for it to finish"


def stored_whole(arr):
    """The array set to store every chunk it writes, all-fill ones too (a runtime setting zarr does
    not keep with the array), so that a chunk missing from a done block always means damage."""
    return arr.with_config({"write_empty_chunks": True})


def remove_partials(root: Path) -> int:
    """Delete the temporary files an interrupted write leaves behind (ours and zarr's: *.partial)."""
    count = 0
    for path in root.rglob("*.partial"):
        path.unlink(missing_ok=True)
        count += 1
    return count


def check_target(path: Path, overwrite: bool) -> bool:
    """Whether a cache folder may be written (checked before any work): not a file, not someone
    else's folder, not the current directory to be overwritten, writable. True if it holds files."""
    check_cache_path(path)
    existing = path.is_dir() and has_files(path)
    if existing and not is_sherl_cache(path):
        raise SherlError(f"cache {path}: exists and is not a sherl-pipe cache (no manifest in its "
                         f"zarr.json); it is never deleted: choose another extract.cache path")
    if existing and overwrite:
        refuse_cwd(path, "cache")
    ensure_writable(path, "cache")
    return existing


class CacheWriter:
    """Creates (or reopens and checks) a cache, holding its lock, and writes blocks into it."""

    def __init__(self, path: str | os.PathLike, manifest: dict, overwrite: bool = False,
                 log: Callable[[str], None] = print):
        self.path = Path(path)
        self.manifest = jsonable({**manifest, "format_version": FORMAT_VERSION, "tool_version": __version__})
        check_target(self.path, overwrite)
        self.lock = FolderLock(self.path)
        self.lock.acquire(wait=True, on_wait=lambda: log(f"cache {self.path}: {WAIT_MESSAGE}"))
        try:
            with naming(self.path):
                self._open(overwrite)
        except BaseException:
            self.lock.release()
            raise
        self._codecs = {}

    def _open(self, overwrite: bool) -> None:
        import zarr

        if overwrite and has_files(self.path):
            clear_folder(self.path)
        self.resumed = has_files(self.path)
        if not self.resumed:
            # never open_group(mode="w"): it deletes and recreates the folder, and with it the
            # inode this process's lock is on, so a second extractor locked the new folder and
            # wrote beside the first (zarr's ContainsArrayError, or blocks written twice)
            self.group = zarr.create_group(str(self.path), attributes={MANIFEST_KEY: self.manifest}, overwrite=False)
            return
        diffs = manifest_diff(Cache(self.path).manifest, self.manifest)
        if diffs:
            raise CacheMismatch(f"cache {self.path}: exists with a different manifest ({'; '.join(map(str, diffs[:6]))}"
                                f"{'; ...' if len(diffs) > 6 else ''}); use --overwrite to replace it, "
                                f"or choose another extract.cache path", diffs)
        remove_partials(self.path)
        self.group = zarr.open_group(str(self.path), mode="r+")

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
        cache = Cache(self.path)
        done = cache.done_flags(split)
        missing = cache.missing_chunks(split)
        broken = sorted({int(c[0]) for coords in missing.values() for c in coords})
        for b in broken:
            stored_whole(self.group[f"{split}/done"])[b] = 0
            done[b] = 0
        return [int(b) for b in np.flatnonzero(done == 0)], len(broken)

    def write_block(self, split: str, block: int, start: int, arrays: dict[str, np.ndarray]) -> None:
        """Write one block's arrays, then mark it done.

        Each array covers samples start..start+len; 2-D and 3-D ones cover the first `width` time
        positions, a multiple of the time chunk (or all of T): the chunks past it stay unwritten,
        which Zarr reads back as zeros (pad ids for input_ids)."""
        sub = self.group[split]
        for name, value in arrays.items():
            arr = stored_whole(sub[name])
            if (split, name) not in self._codecs:
                self._codecs[(split, name)] = chunk_codec(arr) if value.ndim == 3 else None
            with naming(self.path / split / name):  # zarr's own writes name no file on a full disk
                if codec := self._codecs[(split, name)]:
                    self._write_chunks(split, name, arr, codec.encode, start, value)
                elif value.ndim == 1:
                    arr[start:start + len(value)] = value
                else:
                    arr[start:start + len(value), : value.shape[1]] = value
        with naming(self.path / split / "done"):
            stored_whole(sub["done"])[block] = 1

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
            path = chunk_path(self.path / split / name, arr, (i, j))
            path.parent.mkdir(parents=True, exist_ok=True)
            write_atomically(path, encode(raw))
