"""Seeded, stratified splits of one file's rows."""

from __future__ import annotations

import math

import numpy as np

from sherl_pipe.errors import SherlError


def split_indices(labels, sizes: tuple[float, ...], seed: int, stratify: bool, where: str) -> list[np.ndarray]:
    n = len(labels)
    if all(float(s).is_integer() and s >= 1 or s == 0 for s in sizes):
        counts = [int(s) for s in sizes]
    elif all(0 <= s < 1 for s in sizes) and sum(sizes) <= 1 + 1e-9:
        counts = [int(math.floor(s * n)) for s in sizes]
    else:
        raise SherlError(f"data.split_sizes {list(sizes)}: give three counts (>= 1) or three fractions that sum to at most 1")
    if sum(counts) > n:
        raise SherlError(f"data.split_sizes {list(sizes)}: asks for {sum(counts)} rows but {where} has {n} "
                         f"after filtering and de-duplication; lower the sizes")
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
