"""Significance tests for comparing validation accuracies of training runs.

One accuracy on n items has a standard error of sqrt(p(1-p)/n) (about 1.2 points on
GSM8K's 1319 items), so a difference between two runs means something only when a
paired test says so. Two kinds of noise matter and are tested separately:

- evaluation noise (which items happen to be in the test set): McNemar and the paired
  bootstrap, both paired over the same items;
- training noise (which seed the run drew): a paired t-test over seeds.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
from scipy import stats as sps

ALPHA = 0.05


def accuracy_se(p: float, n: int) -> float:
    """Standard error of an accuracy ``p`` (a fraction) measured on ``n`` items."""
    if n <= 0:
        raise ValueError(f"accuracy_se needs n > 0 items, got {n}")
    return math.sqrt(p * (1.0 - p) / n)


def wilson_interval(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson score interval for ``k`` successes out of ``n`` (95 % for z = 1.96).

    Unlike p +- z*SE it stays inside [0, 1] and is sensible for p near 0 or 1.
    """
    if n <= 0:
        raise ValueError(f"wilson_interval needs n > 0, got {n}")
    p = k / n
    denom = 1.0 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1.0 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


@dataclass(frozen=True)
class McNemarResult:
    n: int  # paired items
    b_only: int  # items only b got right
    a_only: int  # items only a got right
    diff: float  # acc(b) - acc(a), a fraction
    p_value: float
    method: str


def mcnemar(a_correct: Sequence[bool], b_correct: Sequence[bool]) -> McNemarResult:
    """Exact McNemar test of acc(b) vs acc(a) on the same items (same order).

    Only discordant items carry information: under the null each is equally likely to
    favour a or b, so b_only ~ Binomial(b_only + a_only, 1/2), tested two-sided.
    """
    a = np.asarray(a_correct, dtype=bool)
    b = np.asarray(b_correct, dtype=bool)
    if a.shape != b.shape or a.ndim != 1 or a.size == 0:
        raise ValueError(
            f"mcnemar needs two equally long non-empty 1-D sequences, got {a.shape} and {b.shape}"
        )
    b_only = int(np.sum(b & ~a))
    a_only = int(np.sum(a & ~b))
    discordant = b_only + a_only
    if discordant == 0:
        p_value, method = 1.0, "exact McNemar (no discordant pairs)"
    else:
        p_value = float(sps.binomtest(b_only, discordant, 0.5).pvalue)
        method = "exact McNemar (two-sided binomial on discordant pairs)"
    return McNemarResult(a.size, b_only, a_only, (b_only - a_only) / a.size, p_value, method)


@dataclass(frozen=True)
class BootstrapResult:
    diff: float  # mean(b - a)
    ci_low: float  # 95 % percentile interval of the resampled mean difference
    ci_high: float
    p_value: float


def paired_bootstrap(
    a_scores: Sequence[float],
    b_scores: Sequence[float],
    n_resamples: int = 10_000,
    seed: int = 0,
) -> BootstrapResult:
    """Paired bootstrap of mean(b - a): resample items with replacement.

    The two-sided p-value is 2 * min(P(diff* <= 0), P(diff* >= 0)), clipped to 1.
    Deterministic for a given ``seed``.
    """
    a = np.asarray(a_scores, dtype=float)
    b = np.asarray(b_scores, dtype=float)
    if a.shape != b.shape or a.ndim != 1 or a.size == 0:
        raise ValueError(
            f"paired_bootstrap needs two equally long non-empty 1-D sequences, "
            f"got {a.shape} and {b.shape}"
        )
    d = b - a
    n = d.size
    rng = np.random.default_rng(seed)
    means = np.empty(n_resamples)
    # Resample in chunks so 10k resamples of a few thousand items stay small in memory.
    chunk = max(1, 2_000_000 // n)
    for start in range(0, n_resamples, chunk):
        stop = min(start + chunk, n_resamples)
        idx = rng.integers(0, n, size=(stop - start, n))
        means[start:stop] = d[idx].mean(axis=1)
    ci_low, ci_high = np.percentile(means, [2.5, 97.5])
    p_value = min(1.0, 2.0 * min(np.mean(means <= 0), np.mean(means >= 0)))
    return BootstrapResult(float(d.mean()), float(ci_low), float(ci_high), float(p_value))


@dataclass(frozen=True)
class SeedTestResult:
    n_seeds: int  # seeds both variants have
    mean_diff: float | None  # mean over paired seeds of b - a
    ci_low: float | None  # t-based 95 % interval of the mean difference
    ci_high: float | None
    p_value: float | None
    method: str


def seed_test(a_by_seed: dict[int, float], b_by_seed: dict[int, float]) -> SeedTestResult:
    """Paired t-test of b - a over the seeds both dicts have (seed -> accuracy).

    Needs at least 2 paired seeds (else p_value is None, method "n/a"). When every
    difference is the same (up to float rounding; common with 2 seeds, since accuracies
    on N items move in steps of 1/N) there is no estimate of the seed variance at all:
    p_value is None and ``method`` says so, rather than a t-test on rounding noise
    returning p ~ 1e-16.
    """
    seeds = sorted(set(a_by_seed) & set(b_by_seed))
    diffs = np.array([b_by_seed[s] - a_by_seed[s] for s in seeds], dtype=float)
    n = len(seeds)
    mean = float(diffs.mean()) if n else None
    if n < 2:
        return SeedTestResult(n, mean, None, None, None, "n/a")
    if np.allclose(diffs, diffs[0], rtol=0.0, atol=1e-9):
        return SeedTestResult(n, mean, None, None, None,
                              "undetermined: the same difference in every seed (zero variance)")
    a = np.array([a_by_seed[s] for s in seeds])
    b = np.array([b_by_seed[s] for s in seeds])
    p_value = float(sps.ttest_rel(b, a).pvalue)
    half = float(sps.t.ppf(0.975, n - 1)) * float(diffs.std(ddof=1)) / math.sqrt(n)
    return SeedTestResult(n, mean, mean - half, mean + half, p_value, "paired t-test")


def avg(values: Iterable[float]) -> float | None:
    values = list(values)
    return sum(values) / len(values) if values else None


def mean_curve(curves: Iterable[dict[int, float]]) -> dict[int, float]:
    """Per step, the mean over the curves that have that step."""
    by_step: dict[int, list[float]] = {}
    for curve in curves:
        for step, value in curve.items():
            by_step.setdefault(step, []).append(value)
    return {s: sum(v) / len(v) for s, v in sorted(by_step.items())}
