"""Read access to a cache: its manifest, arrays, completeness, and which chunks must exist.

A done block has every chunk of its 1-D arrays and, for its 2-D and 3-D arrays, every time chunk
up to its longest sample (the rest are all padding and never written). `expected_chunks` derives
that set from the checksummed `lengths` array, so a deleted chunk is found by listing the files,
without reading them.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from sherl_pipe.cache.codec import ChunkError, checksum_ok
from sherl_pipe.cache.manifest import FORMAT_VERSION, MANIFEST_KEY
from sherl_pipe.errors import SherlError

SIDE_1D = ("lengths", "labels", "row_ids")


def tier_name(t: int) -> str:
    return f"h{t}"


def is_tier_name(name: str) -> bool:
    return name[:1] == "h" and name[1:].isdigit()


def is_sherl_cache(path: Path) -> bool:
    """A folder whose Zarr group attributes hold a sherl-pipe manifest."""
    try:
        meta = json.loads((Path(path) / "zarr.json").read_text())
    except (OSError, ValueError):
        return False
    return isinstance(meta, dict) and isinstance(meta.get("attributes", {}).get(MANIFEST_KEY), dict)


def check_cache_path(path: Path) -> None:
    if path.exists() and not path.is_dir():
        raise SherlError(f"cache {path}: is a file, not a cache folder; set extract.cache (or --cache) to a folder")


class Cache:
    """Read access to a finished or partial cache."""

    def __init__(self, path: str | os.PathLike):
        import zarr

        self.path = Path(path)
        check_cache_path(self.path)
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
                             f"{FORMAT_VERSION}; re-extract it with this version of sherl-pipe (--overwrite)")
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

    def array_names(self, split: str) -> list[str]:
        return [n for n, _ in self.group[split].arrays()]

    def read(self, split: str, name: str) -> np.ndarray:
        """A whole (small) array, its checksums verified by zarr; a bad chunk is named."""
        arr = self.array(split, name)
        try:
            return arr[:]
        except Exception:  # zarr raises ValueError for a checksum, codec errors for garbage
            for coords, path in self.chunk_files(split, name).items():
                if not checksum_ok(path.read_bytes()):
                    raise ChunkError(self.path, split, name, coords, "checksum mismatch (the chunk file is "
                                     "damaged or truncated)") from None
            raise

    def chunk_files(self, split: str, name: str) -> dict[tuple, Path]:
        """The stored chunk files of an array, by chunk coordinates (the width axis dropped)."""
        arr = self.array(split, name)
        root = self.path / split / name / "c"
        out = {}
        if not root.is_dir():
            return out
        for dirpath, _, files in os.walk(root):
            rel = Path(dirpath).relative_to(root).parts
            for f in files:
                if not f.endswith(".partial") and all(p.isdigit() for p in (*rel, f)):
                    coords = tuple(int(p) for p in (*rel, f))
                    out[coords[:2] if arr.ndim == 3 else coords] = Path(dirpath) / f
        return out

    def done_flags(self, split: str) -> np.ndarray:
        info = self.split_info(split)
        if "done" not in self.array_names(split):
            return np.zeros(info["blocks"], dtype=np.uint8)
        return self.read(split, "done")

    def expected_chunks(self, split: str, blocks: np.ndarray) -> dict[str, set]:
        """The chunk coordinates each array must hold for these (done) blocks."""
        chunk = self.manifest["chunk_size"]
        names = [n for n in self.array_names(split) if n != "done"]
        out = {n: {(int(b),) for b in blocks} for n in names if n in SIDE_1D}
        if not len(blocks):
            return {n: set() for n in names}
        lengths = self.read(split, "lengths")
        for name in names:
            if name in SIDE_1D:
                continue
            tc = self.array(split, name).chunks[1]
            out[name] = {(int(b), j) for b in blocks
                         for j in range(-(-int(lengths[b * chunk:(b + 1) * chunk].max()) // tc))}
        return out

    def missing_chunks(self, split: str, blocks: np.ndarray | None = None) -> dict[str, list[tuple]]:
        """Chunks that done blocks must have and that are not there, by array."""
        if blocks is None:
            blocks = np.flatnonzero(self.done_flags(split))
        side = {n: {(int(b),) for b in blocks} for n in SIDE_1D if n in self.array_names(split)}
        missing = {n: sorted(want - set(self.chunk_files(split, n))) for n, want in side.items()}
        if any(missing.values()):  # lengths itself is incomplete: the rest cannot be derived
            return {n: m for n, m in missing.items() if m}
        for name, want in self.expected_chunks(split, blocks).items():
            gone = sorted(want - set(self.chunk_files(split, name)))
            if gone:
                missing[name] = gone
        return {n: m for n, m in missing.items() if m}

    def require_present(self, split: str) -> None:
        """Every chunk of the split's done blocks exists (a cheap check: file listings only)."""
        missing = self.missing_chunks(split)
        for name, coords in missing.items():
            raise ChunkError(self.path, split, name, coords[0], "missing")

    def dask_array(self, split: str, name: str):
        """A lazy dask array over one cached array (e.g. 'h3'), chunked like the cache, for analysis
        beyond sherl-pipe: `cache.dask_array("train", "h5")[:, 0].mean(0).compute()`."""
        import dask.array as da

        from sherl_pipe.storage import LOSSY, SCALE_BYTES, decode_numpy  # lazily: it imports torch

        self.require_complete(split)
        arr = da.from_zarr(self.array(split, name))
        fmt = self.manifest["dtype"]
        if is_tier_name(name) and fmt in LOSSY:  # decoded values
            return arr.map_blocks(decode_numpy, fmt, dtype="float32",
                                  chunks=arr.chunks[:2] + ((arr.shape[2] - SCALE_BYTES,),))
        return arr

    def blocks_done(self, split: str) -> tuple[int, int]:
        return int(self.done_flags(split).sum()), self.split_info(split)["blocks"]

    def is_complete(self, split: str | None = None) -> bool:
        splits = [split] if split else self.splits
        return all(self.blocks_done(s)[0] == self.blocks_done(s)[1] for s in splits)

    def require_complete(self, split: str) -> None:
        done, total = self.blocks_done(split)
        if done != total:
            raise SherlError(f"cache {self.path}: split '{split}' is incomplete ({done}/{total} blocks); "
                             f"rerun `sherl-pipe extract` with the same pipeline to finish it")
        self.require_present(split)

    def bytes_on_disk(self, split: str | None = None, name: str | None = None) -> int:
        root = self.path / split if split else self.path
        if name:
            root = root / name
        return sum(f.stat().st_size for f in root.rglob("*") if f.is_file())
