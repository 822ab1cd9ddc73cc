"""Creating a cache (or reopening one to finish it) and writing blocks into it.

A block is exactly one chunk along samples, so no two writers ever touch the same chunk, and
`done[b]` is written only after all of block b's data: a block whose flag is not set is redone on
the next run.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np

from sherl_pipe import __version__
from sherl_pipe.atomic import write_atomically
from sherl_pipe.cache.codec import chunk_codec, chunk_path
from sherl_pipe.cache.manifest import FORMAT_VERSION, MANIFEST_KEY, jsonable, manifest_diff
from sherl_pipe.cache.store import Cache
from sherl_pipe.errors import CacheMismatch, SherlError


def remove_partials(root: Path) -> int:
    """Delete the temporary files an interrupted write leaves behind (zarr writes KEY.<uuid>.partial)."""
    count = 0
    for path in root.rglob("*.partial"):
        path.unlink(missing_ok=True)
        count += 1
    return count


class CacheWriter:
    """Creates (or reopens and checks) a cache and writes blocks into it."""

    def __init__(self, path: str | os.PathLike, manifest: dict, overwrite: bool = False):
        import zarr

        self.path = Path(path)
        self.manifest = jsonable({**manifest, "format_version": FORMAT_VERSION, "tool_version": __version__})
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
        specs = {f"h{tier}": ((n, t, d), (chunk, tc, d), dtype, 0, compressors) for tier in tiers}
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
            sub.create_array(name, shape=shape, chunks=chunks, dtype=dt, fill_value=fill, compressors=comp)

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
            path = chunk_path(self.path / split / name, arr, (i, j))
            path.parent.mkdir(parents=True, exist_ok=True)
            write_atomically(path, encode(raw))
