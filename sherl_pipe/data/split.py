"""Seeded, stratified splits of one file's rows."""

from __future__ import annotations

import math

import numpy as np

from sherl_pipe.errors import SherlError


def split_counts(n: int, sizes: tuple[float, ...], key: str, names: tuple[str, ...], where: str) -> list[int]:
    """Rows per split from counts (>= 1) or fractions (< 1, summing to at most 1); a split asked
    for (size > 0) that would get no rows is refused rather than dropped."""
    if all(float(s).is_integer() and s >= 1 or s == 0 for s in sizes):
        counts = [int(s) for s in sizes]
    elif all(0 <= s < 1 for s in sizes) and sum(sizes) <= 1 + 1e-9:
        counts = fraction_counts(n, sizes)
    else:
        raise SherlError(f"{key} {list(sizes)}: give counts (>= 1) or fractions that sum to at most 1")
    if sum(counts) > n:
        raise SherlError(f"{key} {list(sizes)}: asks for {sum(counts)} rows but {where} has {n} "
                         f"after filtering and de-duplication; lower the sizes")
    for size, count, name in zip(sizes, counts, names):
        if size > 0 and count == 0:
            raise SherlError(f"{key} {list(sizes)}: the {name} split gets 0 of the {n} rows; raise its size")
        if name == "train" and count == 0:
            raise SherlError(f"{key} {list(sizes)}: the train split is empty; give it rows")
    return counts


def fraction_counts(n: int, sizes) -> list[int]:
    """Rows for fractions of n: flooring each dropped up to one row per split (0.7 / 0.15 / 0.15 of
    10 rows gave 7 / 1 / 1); the rows the fractions' sum covers are handed out by largest remainder."""
    shares = [s * n for s in sizes]
    counts = [int(math.floor(x)) for x in shares]
    total = min(n, int(math.floor(sum(shares) + 1e-6)))
    for i in sorted(range(len(sizes)), key=lambda i: counts[i] - shares[i])[: total - sum(counts)]:
        counts[i] += 1
    return counts


def split_indices(labels, sizes: tuple[float, ...], seed: int, stratify: bool, where: str,
                  key: str = "data.split_sizes", names: tuple[str, ...] = ("train", "validation", "test")
                  ) -> list[np.ndarray]:
    n = len(labels)
    counts = split_counts(n, sizes, key, names, where)
    rng = np.random.default_rng(seed)
    groups = [np.flatnonzero(np.asarray(labels) == c) for c in sorted(set(labels))] if stratify else [np.arange(n)]
    groups = [rng.permutation(g) for g in groups]
    taken = np.zeros(len(groups), dtype=np.int64)
    out = []
    for count in counts:
        # Largest-remainder allocation keeps every split's class mix close to the whole file's.
        avail = np.array([len(g) - t for g, t in zip(groups, taken)], dtype=np.float64)
        share = count * avail / max(avail.sum(), 1)
        alloc = np.minimum(np.floor(share).astype(np.int64), avail.astype(np.int64))
        for j in np.argsort(-(share - alloc), kind="stable"):
            if alloc.sum() >= count:
                break
            if alloc[j] < avail[j]:
                alloc[j] += 1
        idx = np.concatenate([g[t:t + a] for g, t, a in zip(groups, taken, alloc)])
        taken += alloc
        out.append(np.sort(idx))
    return out
