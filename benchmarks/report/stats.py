"""Statistics of the report: paired bootstrap over seeds and test examples, t intervals, exact binomial tests.

Everything is deterministic: bootstrap draws come from a generator seeded by a fixed number and the
comparison's name, so the same run JSONs always give the same intervals.
"""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass
from fractions import Fraction
from functools import reduce

import numpy as np

from benchmarks.runner.health import binom_sf  # noqa: F401 - one exact binomial test (the runner's), re-exported

BOOT_REPS = 2000  # ~0.4 s per comparison of 5 seeds x 3000 examples; bounds' Monte Carlo error < 0.1 SE
BOOT_SEED = 20240917
# Smallest detectable difference = (z_{1-alpha/2} + z_{power}) x SE = (1.960 + 0.842) x SE: a true difference
# this large is found (interval excludes 0) with 80% power at two-sided alpha 0.05.
MDE_FACTOR = 2.8

# Two-sided 95% Student t quantiles t_{0.975, df}; df > 30 uses the normal value (error < 2%).
_T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228,
         11: 2.201, 12: 2.179, 13: 2.160, 14: 2.145, 15: 2.131, 16: 2.120, 17: 2.110, 18: 2.101, 19: 2.093,
         20: 2.086, 21: 2.080, 22: 2.074, 23: 2.069, 24: 2.064, 25: 2.060, 26: 2.056, 27: 2.052, 28: 2.048,
         29: 2.045, 30: 2.042}


def t975(df: int) -> float:
    """Two-sided 95% Student t quantile for ``df`` degrees of freedom."""
    return _T975.get(df, 1.960)


def paired_ci(diffs: list[float]) -> tuple[float, float, float]:
    """Mean difference and its 95% t confidence interval (nan bounds for n < 2)."""
    n = len(diffs)
    mean = sum(diffs) / n
    if n < 2:
        return mean, math.nan, math.nan
    sd = math.sqrt(sum((d - mean) ** 2 for d in diffs) / (n - 1))
    half = t975(n - 1) * sd / math.sqrt(n)
    return mean, mean - half, mean + half




def decode_correct(bits: str) -> np.ndarray:
    """The per-example correctness string of a record (``"0110..."``) as a bool array."""
    return np.frombuffer(bits.encode("ascii"), dtype=np.uint8) == ord("1")


def infer_n(scores: list[float], max_n: int = 100_000) -> int | None:
    """Smallest test size consistent with every accuracy in ``scores`` (lcm of their exact denominators).

    For old records without per-example results: accuracies are k/n, so n is a multiple of each
    denominator; with many runs on one split the lcm is n itself. None if any score is not such a fraction.
    """
    dens = []
    for s in scores:
        if s is None or not math.isfinite(s) or not 0 <= s <= 1:
            return None
        f = Fraction(s).limit_denominator(max_n)
        if float(f) != float(s):
            return None
        dens.append(f.denominator)
    if not dens:
        return None
    n = reduce(lambda a, b: a * b // math.gcd(a, b), dens)
    return n if n <= max_n else None


@dataclass
class Interval:
    """A difference (in the scores' units), its 95% interval and standard error, and how it was made."""

    mean: float
    lo: float
    hi: float
    se: float
    method: str  # "bootstrap" | "t" | "none"
    seeds: int
    n: int | None = None
    reps: np.ndarray | None = None  # bootstrap replicates (for pooling); None for t intervals

    @property
    def mde(self) -> float:
        """Smallest difference detectable with 80% power at two-sided alpha 0.05 (``MDE_FACTOR`` x SE)."""
        return MDE_FACTOR * self.se if math.isfinite(self.se) else math.nan

    @property
    def excludes_zero(self) -> bool | None:
        if not (math.isfinite(self.lo) and math.isfinite(self.hi)):
            return None
        return self.lo > 0 or self.hi < 0


def _rng(key: str) -> np.random.Generator:
    return np.random.default_rng([BOOT_SEED, zlib.crc32(key.encode())])


def bootstrap_paired(a: np.ndarray, b: np.ndarray, key: str, reps: int = BOOT_REPS) -> Interval:
    """Paired bootstrap of mean(a) - mean(b) over seeds and test examples.

    ``a`` and ``b`` are (seeds x examples) 0/1 arrays, row i of both from the same seed, column j the same
    test example. Each replicate draws seeds with replacement and, independently, test examples with
    replacement; the same example draw is used for every seed and both methods (the test set is shared),
    so the interval covers seed-to-seed and test-sampling variation. Percentile interval, SE = replicate std.
    """
    d = a.astype(np.int8) - b.astype(np.int8)  # -1/0/1: int8 gathers and int32 sums are exact and fast
    s, n = d.shape
    rng = _rng(key)
    chunk = max(1, min(500, 4_000_000 // (s * n)))  # bounded memory: seeds x chunk x examples floats
    out = np.empty(reps, dtype=np.float64)
    for start in range(0, reps, chunk):
        m = min(chunk, reps - start)
        ex = rng.integers(0, n, size=(m, n), dtype=np.int32)
        sd = rng.integers(0, s, size=(m, s))
        per_seed = d[:, ex].sum(axis=2, dtype=np.int32) / n  # seeds x m: each seed's mean difference per example draw
        out[start:start + m] = np.take_along_axis(per_seed.T, sd, axis=1).mean(axis=1)
    lo, hi = np.percentile(out, [2.5, 97.5])
    return Interval(float(d.mean(dtype=np.float64)), float(lo), float(hi), float(out.std(ddof=1)), "bootstrap", s, n, out)


def t_interval(diffs: list[float], n: int | None = None) -> Interval:
    """Seed-level paired t interval (the fallback when records hold no per-example results)."""
    mean, lo, hi = paired_ci(diffs)
    k = len(diffs)
    se = math.sqrt(sum((x - mean) ** 2 for x in diffs) / (k - 1)) / math.sqrt(k) if k > 1 else math.nan
    return Interval(mean, lo, hi, se, "t" if k > 1 else "none", k, n)


def pooled(intervals: list[Interval]) -> Interval | None:
    """Unweighted mean of task differences (tasks fixed, each task's sampling independent), with a 95% interval.

    All tasks bootstrapped: percentile interval of the mean of one replicate per task. Otherwise, when every task
    has a seed-level t interval: normal interval with SE = sqrt(sum SE_i^2) / K. Otherwise (a task with one seed
    and no per-example results) no interval; the SE (for the MDE) still combines the tasks' SEs when known.
    """
    if not intervals:
        return None
    k = len(intervals)
    mean = sum(i.mean for i in intervals) / k
    seeds = min(i.seeds for i in intervals)
    if all(i.reps is not None for i in intervals):
        reps = np.mean(np.stack([i.reps for i in intervals]), axis=0)
        lo, hi = np.percentile(reps, [2.5, 97.5])
        return Interval(mean, float(lo), float(hi), float(reps.std(ddof=1)), "bootstrap", seeds, None, reps)
    se = math.sqrt(sum(i.se ** 2 for i in intervals)) / k
    if all(i.method in ("t", "bootstrap") for i in intervals) and math.isfinite(se):
        return Interval(mean, mean - 1.96 * se, mean + 1.96 * se, se, "normal from task SEs", seeds)
    return Interval(mean, math.nan, math.nan, se, "none (a task has 1 seed and no per-example results)", seeds)
