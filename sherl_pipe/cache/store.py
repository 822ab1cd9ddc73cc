"""Read access to a cache: its manifest, arrays and completeness."""

from __future__ import annotations

import os
from pathlib import Path

from sherl_pipe.cache.manifest import FORMAT_VERSION, MANIFEST_KEY
from sherl_pipe.errors import SherlError

FP16_MAX = 65504.0


def tier_name(t: int) -> str:
    return f"h{t}"


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
