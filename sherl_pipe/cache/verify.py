"""`sherl-pipe verify`: check every stored chunk's checksum and that every chunk a done block must
have exists; optionally mark the blocks with bad chunks not done, so `extract` redoes exactly those."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from sherl_pipe.cache.codec import checksum_ok
from sherl_pipe.cache.store import Cache, ChunkError


@dataclass
class Problem:
    split: str
    array: str
    coords: tuple
    what: str

    def __str__(self) -> str:
        return f"split '{self.split}', array '{self.array}', chunk {self.coords}: {self.what}"


@dataclass
class VerifyReport:
    chunks_checked: int = 0
    problems: list[Problem] = field(default_factory=list)
    marked: dict[str, list[int]] = field(default_factory=dict)  # split -> blocks marked not done

    @property
    def ok(self) -> bool:
        return not self.problems


def _scan_split(cache: Cache, split: str, report: VerifyReport, progress) -> None:
    names = cache.array_names(split)
    for name in names:
        for coords, path in sorted(cache.chunk_files(split, name).items()):
            report.chunks_checked += 1
            if not checksum_ok(path.read_bytes()):
                report.problems.append(Problem(split, name, coords, "checksum mismatch (damaged or truncated)"))
            if progress is not None:
                progress(1)
    try:
        missing = cache.missing_chunks(split)
    except ChunkError:  # lengths or done is damaged: already reported above
        return
    for name, coords in missing.items():
        report.problems.extend(Problem(split, name, c, "missing") for c in coords)


def count_chunks(cache: Cache) -> int:
    return sum(len(cache.chunk_files(s, n)) for s in cache.splits for n in cache.array_names(s))


def mark_bad_blocks(cache: Cache, report: VerifyReport) -> None:
    """Set done[b] = 0 for every block holding a bad chunk (a bad `done` chunk is rewritten as 0)."""
    import zarr

    for split in cache.splits:
        blocks = sorted({int(p.coords[0]) for p in report.problems if p.split == split})
        if not blocks:
            continue
        done = zarr.open_array(str(cache.path / split / "done"), mode="r+").with_config({"write_empty_chunks": True})
        for b in blocks:
            done[b] = np.uint8(0)
        report.marked[split] = blocks


def verify_cache(path, mark_bad: bool = False, progress=None) -> VerifyReport:
    """Read every chunk file of every array once (checksums only, nothing is decoded)."""
    cache = Cache(path)
    if progress is not None and hasattr(progress, "set_total"):
        progress.set_total(count_chunks(cache))
    report = VerifyReport()
    for split in cache.splits:
        _scan_split(cache, split, report, progress)
    if mark_bad and report.problems:
        mark_bad_blocks(cache, report)
    return report
