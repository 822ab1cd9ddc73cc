"""`sherl-pipe verify`: check every stored chunk's checksum and that every chunk a done block must
have exists; optionally mark the blocks with bad chunks not done, so `extract` redoes exactly those."""

from __future__ import annotations

from dataclasses import dataclass, field

from sherl_pipe.cache import access
from sherl_pipe.cache.codec import checksum_ok
from sherl_pipe.cache.store import Cache, ChunkError
from sherl_pipe.cache.writer import BlockWriter

BATCH = 64  # chunks fetched at once (concurrently from an object store)


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
        stored = sorted(cache.chunk_keys(split, name).items())
        for i in range(0, len(stored), BATCH):
            part = stored[i:i + BATCH]
            for (coords, _), data in zip(part, access.get_many(cache.data, [k for _, k in part], cache.store)):
                report.chunks_checked += 1
                if data is None:  # listed, then gone: deleted while verify ran
                    report.problems.append(Problem(split, name, coords, "missing"))
                elif not checksum_ok(data.as_buffer_like()):
                    report.problems.append(Problem(split, name, coords, "checksum mismatch (damaged or truncated)"))
            if progress is not None:
                progress(len(part))
    try:
        missing = cache.missing_chunks(split)
    except ChunkError:  # lengths or done is damaged: already reported above
        return
    for name, coords in missing.items():
        report.problems.extend(Problem(split, name, c, "missing") for c in coords)


def count_chunks(cache: Cache) -> int:
    return sum(len(cache.chunk_keys(s, n)) for s in cache.splits for n in cache.array_names(s))


def mark_bad_blocks(cache: Cache, report: VerifyReport) -> None:
    """Set done[b] = 0 for every block holding a bad chunk (a bad `done` chunk is rewritten as 0)."""

    writer = None
    for split in cache.splits:
        blocks = sorted({int(p.coords[0]) for p in report.problems if p.split == split})
        if not blocks:
            continue
        writer = writer or BlockWriter(cache.data)
        for b in blocks:
            writer.set_done(split, b, 0)
        report.marked[split] = blocks


def verify_cache(where, mark_bad: bool = False, progress=None, options: dict | None = None) -> VerifyReport:
    """Read every stored chunk of every array once (checksums only, nothing is decoded)."""
    cache = Cache(where, options)
    if progress is not None and hasattr(progress, "set_total"):
        progress.set_total(count_chunks(cache))
    report = VerifyReport()
    for split in cache.splits:
        _scan_split(cache, split, report, progress)
    if mark_bad and report.problems:
        mark_bad_blocks(cache, report)
    return report
