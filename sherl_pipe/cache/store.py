"""Read access to a cache: its manifest, arrays, completeness, and which chunks must exist.

A cache is read through its zarr store (location.py): a local folder or an object store alike.
A done block has every chunk of its 1-D arrays and, for its 2-D and 3-D arrays, every time chunk
up to its longest sample (the rest are all padding and never written). `expected_chunks` derives
that set from the checksummed `lengths` array, so a deleted chunk is found by listing each
array's keys once, without reading them. Only `done` says a block is written, never a listing.
"""

from __future__ import annotations

import json
import os

import numpy as np

from sherl_pipe.cache import access
from sherl_pipe.cache.codec import ChunkError, checksum_ok
from sherl_pipe.cache.location import Location, as_location
from sherl_pipe.cache.manifest import FORMAT_VERSION, MANIFEST_KEY
from sherl_pipe.errors import SherlError

SIDE_1D = ("lengths", "labels", "row_ids")


def tier_name(t: int) -> str:
    return f"h{t}"


def is_tier_name(name: str) -> bool:
    return name[:1] == "h" and name[1:].isdigit()


def read_manifest(where) -> dict | None:
    """The sherl-pipe manifest in a location's zarr.json, or None (nothing there, or not ours).
    A remote store's refusal (no bucket, no access) is an error, not a missing cache."""
    loc = as_location(where)
    if loc.is_local and not (loc.path / "zarr.json").is_file():
        return None
    data = access.get(loc, "zarr.json")
    if data is None:
        return None
    try:
        meta = json.loads(data.to_bytes())
    except ValueError:
        return None
    manifest = meta.get("attributes", {}).get(MANIFEST_KEY) if isinstance(meta, dict) else None
    return manifest if isinstance(manifest, dict) else None


def is_sherl_cache(where) -> bool:
    """A location whose Zarr group attributes hold a sherl-pipe manifest."""
    return read_manifest(where) is not None


def check_cache_path(where) -> None:
    loc = as_location(where)
    if loc.is_local and loc.path.exists() and not loc.path.is_dir():
        raise SherlError(f"cache {loc}: is a file, not a cache folder; set extract.cache (or --cache) to a folder")


def chunk_coords(key: str, prefix: str, ndim: int) -> tuple | None:
    """The chunk coordinates of KEY under an array's `c/` PREFIX (the width axis dropped), or None
    for anything else there (a local writer's `*.partial` temporary)."""
    parts = key[len(prefix):].split("/")
    if not all(p.isdigit() for p in parts):
        return None
    coords = tuple(int(p) for p in parts)
    return coords[:2] if ndim == 3 else coords


DATA_PREFIX = "arrays-"  # an object-store cache's arrays live under arrays-<nonce>/ (data_location)


def new_data_key() -> str:
    import uuid

    return f"{DATA_PREFIX}{uuid.uuid4().hex[:12]}"


def data_location(root: Location, manifest: dict) -> Location:
    """Where a cache's arrays live. On an object store each cache made anew (a first extraction, or
    --overwrite) puts them under a key of its own that its manifest names: a writer that lost its
    lease while paused and wakes later writes under its own key, which no reader of the new cache
    reads (a cache made by another extraction of other rows took 32 rows of the paused one's, and
    read as complete). Local folders keep the kernel's lock (a paused writer keeps it too), and
    caches made before this hold their arrays at the root."""
    key = manifest.get("arrays")
    return root.child(key) if key else root


class Cache:
    """Read access to a finished or partial cache: `location` its root (the manifest), `data` where
    its arrays are (data_location), `store` the latter's store."""

    def __init__(self, where: str | os.PathLike | Location, options: dict | None = None):

        self.location = as_location(where, options)
        self.path = str(self.location)  # for messages: a folder or a URL
        check_cache_path(self.location)
        missing = SherlError(f"cache {self.path}: not found (no zarr.json); run `sherl-pipe extract` first")
        if self.location.is_local and not (self.location.path / "zarr.json").is_file():
            raise missing
        root = self.location.store(read_only=True)
        if access.get(self.location, "zarr.json", root) is None:
            access.any_key(self.location, "", root)  # a missing bucket is named as such, not as no cache
            raise missing
        self.group = self._open_group(self.location, root, lambda exc: f"cannot open as a Zarr group ({exc})")
        manifest = self.group.attrs.get(MANIFEST_KEY)
        self.data, self.store = self.location, root
        self._listed: dict = {}  # listings kept for this Cache's life (it reads; writers open a new one)
        if not isinstance(manifest, dict):
            raise SherlError(f"cache {self.path}: no sherl-pipe manifest in its attributes; not a sherl-pipe cache")
        if manifest.get("format_version") != FORMAT_VERSION:
            raise SherlError(f"cache {self.path}: format version {manifest.get('format_version')} is not "
                             f"{FORMAT_VERSION}; re-extract it with this version of sherl-pipe (--overwrite)")
        self.manifest = manifest
        if manifest.get("arrays"):  # the writer makes this group before the manifest: gone or damaged since
            self.data = data_location(self.location, manifest)
            self.store = self.data.store(read_only=True)
            self.group = self._open_group(self.data, self.store, lambda exc: (
                f"its arrays ({manifest['arrays']}/) cannot be opened ({type(exc).__name__}: {str(exc)[:160]}); "
                f"`sherl-pipe verify {self.path}` checks the cache"))

    def _open_group(self, loc: Location, store, why):
        """The Zarr group at LOC, read-only; a damaged one is one line, WHY(exc) saying what."""
        import zarr

        try:
            with access.translated(loc):
                return zarr.open_group(store=store, mode="r")
        except SherlError:
            raise
        except Exception as exc:  # zarr raises several types for a damaged group
            raise SherlError(f"cache {self.path}: {why(exc)}") from None

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
        """The split's arrays (listed once per Cache: on an object store a listing and a metadata
        request per array)."""
        if ("names", split) not in self._listed:
            self._listed[("names", split)] = [n for n, _ in self.group[split].arrays()]
        return list(self._listed[("names", split)])

    def read(self, split: str, name: str) -> np.ndarray:
        """A whole (small) array, its checksums verified by zarr; a bad chunk is named."""
        arr = self.array(split, name)
        try:
            return arr[:]
        except Exception:  # zarr raises ValueError for a checksum, codec errors for garbage
            keys = self.chunk_keys(split, name)
            for coords, data in zip(keys, access.get_many(self.data, list(keys.values()), self.store)):
                if data is not None and not checksum_ok(data.as_buffer_like()):
                    raise ChunkError(self.path, split, name, coords, "checksum mismatch (the stored chunk is "
                                     "damaged or truncated)") from None
            raise

    def chunk_keys(self, split: str, name: str) -> dict[tuple, str]:
        """The stored chunks of an array, by chunk coordinates (the width axis dropped): their
        store keys, from one listing of the array's prefix (kept: a check lists each array once)."""
        if (split, name) not in self._listed:
            arr = self.array(split, name)
            prefix = f"{split}/{name}/c/"
            out = {}
            for key in access.keys(self.data, prefix, self.store):
                coords = chunk_coords(key, prefix, arr.ndim)
                if coords is not None:
                    out[coords] = key
            self._listed[(split, name)] = out
        return self._listed[(split, name)]

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
        missing = {n: sorted(want - set(self.chunk_keys(split, n))) for n, want in side.items()}
        if any(missing.values()):  # lengths itself is incomplete: the rest cannot be derived
            return {n: m for n, m in missing.items() if m}
        for name, want in self.expected_chunks(split, blocks).items():
            gone = sorted(want - set(self.chunk_keys(split, name)))
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

        from sherl_pipe.formats import LOSSY, SCALE_BYTES, decode_numpy  # lazily: it imports torch

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
        """Bytes stored (on disk, or in the object store) under the cache, a split or an array."""
        prefix = "/".join(p for p in (split, name) if p)
        if not prefix:
            return access.size(self.location, "")
        return access.size(self.data, f"{prefix}/", self.store)
