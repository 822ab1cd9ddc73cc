"""The interval of one method's mean score minus the reference's, covering both sources of noise a
comparison has: which seeds were trained, and which rows happen to be in the test set.

A bootstrap over test rows alone (what compare printed before) holds each method's seeds fixed, so
two methods drawn from the same distribution looked different whenever their few seeds happened to
land apart (with 2 and 3 seeds at a seed-to-seed sd of 1.4 points it excluded 0 about 1 time in 6,
not 1 in 20). Here the variance of the difference is the sum of

- the seed part, s_m^2 / n_m for each method m, from its per-seed scores on the test set, and
- the row part, the variance over bootstrap resamples of the test rows (the same rows for both
  methods, so what is common to them cancels) of the difference of the seed means;

and the interval is difference +- t * sqrt(sum), with t from Student's t at the Welch-Satterthwaite
degrees of freedom of the seed part (the row part counts as known). The seed-level scores already
carry some row noise, so the sum errs wide, not narrow. With 2-3 seeds a method the interval is wide
(t at about 2 degrees of freedom is about 4): that is what so few seeds can say. Fewer than 2 seeds
on either side give no interval, since nothing then measures the seed noise.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np

Score = Callable[[np.ndarray, np.ndarray], float]  # (predictions, gold) -> the metric


@dataclass(frozen=True)
class Interval:
    difference: float  # mean over the method's seeds - mean over the reference's
    low: float
    high: float
    se: float  # the standard error of the difference, seeds and rows together
    df: float  # degrees of freedom of the t quantile
    n: int  # the method's seeds
    n_reference: int

    def excludes_zero(self) -> bool:
        return self.low > 0 or self.high < 0


def difference_interval(reference: Sequence[np.ndarray], own: Sequence[np.ndarray], gold: np.ndarray, score: Score,
                        level: float = 0.95, reps: int = 1000, seed: int = 0) -> Interval | None:
    """REFERENCE and OWN: each seed's predictions on the test rows GOLD; SCORE turns predictions
    and gold into the metric. None with fewer than 2 seeds on either side."""
    from scipy.stats import t as student_t

    if len(reference) < 2 or len(own) < 2:
        return None
    ref = np.array([score(p, gold) for p in reference])
    mine = np.array([score(p, gold) for p in own])
    seed_var = (mine.var(ddof=1) / len(mine), ref.var(ddof=1) / len(ref))
    rng = np.random.default_rng(seed)
    rows = []
    for _ in range(reps):
        idx = rng.integers(0, len(gold), len(gold))
        rows.append(np.mean([score(p[idx], gold[idx]) for p in own])
                    - np.mean([score(p[idx], gold[idx]) for p in reference]))
    row_var = float(np.var(rows, ddof=1))
    total = seed_var[0] + seed_var[1] + row_var
    spread = seed_var[0] ** 2 / (len(mine) - 1) + seed_var[1] ** 2 / (len(ref) - 1)
    df = float("inf") if spread == 0 else total ** 2 / spread
    half = float(student_t.ppf(0.5 + level / 2, df)) * total ** 0.5
    diff = float(mine.mean() - ref.mean())
    return Interval(diff, diff - half, diff + half, total ** 0.5, df, len(mine), len(ref))
