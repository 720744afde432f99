"""Significance tests for comparing validation accuracies of training runs.

One accuracy on n items has a standard error of sqrt(p(1-p)/n) (about 1.2 points on
GSM8K's 1319 items), so a difference between two runs means something only when a
paired test says so. Two kinds of noise matter and are tested separately:

- evaluation noise (which items happen to be in the test set): McNemar and the paired
  bootstrap, both paired over the same items;
- training noise (which seed the run drew): a paired t-test over seeds.

A comparison that is not significant says how large an effect it could have missed: its
minimal detectable effect (MDE), the true difference the deciding test would find with 80 %
power at alpha 0.05, from the spread it observed.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
from scipy import stats as sps
from scipy.optimize import brentq

ALPHA = 0.05
POWER = 0.8
MAX_SEEDS = 1000  # seeds_needed gives up (None) beyond this


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
    sd: float | None = None  # standard deviation of the per-seed differences
    mde: float | None = None  # paired_t_mde at that sd and n_seeds


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
    sd = float(diffs.std(ddof=1))
    half = float(sps.t.ppf(0.975, n - 1)) * sd / math.sqrt(n)
    return SeedTestResult(n, mean, mean - half, mean + half, p_value, "paired t-test", sd,
                          paired_t_mde(sd, n))


def paired_t_power(effect: float, sd: float, n: int, alpha: float = ALPHA) -> float:
    """Power of the two-sided paired t-test over ``n`` pairs whose differences have standard
    deviation ``sd``, against a true mean difference ``effect`` (noncentral t)."""
    if n < 2 or sd <= 0:
        raise ValueError(f"paired_t_power needs n >= 2 and sd > 0, got n={n}, sd={sd}")
    df, nc = n - 1, abs(effect) * math.sqrt(n) / sd
    crit = float(sps.t.ppf(1 - alpha / 2, df))
    # the far tail can come back NaN from scipy where it underflows: it is 0 there
    tails = np.nan_to_num([sps.nct.sf(crit, df, nc), sps.nct.cdf(-crit, df, nc)])
    return float(tails.sum())


def paired_t_mde(sd: float, n: int, alpha: float = ALPHA, power: float = POWER) -> float:
    """The smallest true mean difference the paired t-test over ``n`` seeds detects with
    ``power`` (same units as ``sd``, the standard deviation of the per-seed differences)."""
    if n < 2 or not sd > 0:
        raise ValueError(f"paired_t_mde needs n >= 2 and sd > 0, got n={n}, sd={sd}")
    high = sd
    while paired_t_power(high, sd, n, alpha) < power:
        high *= 2
    return float(brentq(lambda e: paired_t_power(e, sd, n, alpha) - power, 0.0, high,
                        xtol=1e-12 * sd))


def seeds_needed(sd: float, effect: float, alpha: float = ALPHA,
                 power: float = POWER) -> int | None:
    """The fewest seeds (>= 2) whose paired t-test detects ``effect`` with ``power``; None
    beyond ``MAX_SEEDS``."""
    if not sd > 0 or not effect > 0:
        raise ValueError(f"seeds_needed needs sd > 0 and effect > 0, got {sd}, {effect}")

    def enough(n: int) -> bool:  # power grows with n
        return paired_t_power(effect, sd, n, alpha) >= power

    low, high = 2, 2
    while not enough(high):  # bracket, then bisect
        if high >= MAX_SEEDS:
            return None
        low, high = high + 1, min(2 * high, MAX_SEEDS)
    while low < high:
        mid = (low + high) // 2
        if enough(mid):
            high = mid
        else:
            low = mid + 1
    return high


def mcnemar_mde(discordant: float, n_items: int, alpha: float = ALPHA,
                power: float = POWER) -> float:
    """MDE (a fraction) of McNemar's test over ``n_items`` paired items, a fraction
    ``discordant`` of which the two runs score differently (normal approximation: the
    difference has standard error sqrt(discordant / n) under the null)."""
    if n_items <= 0 or not 0 < discordant <= 1:
        raise ValueError(f"mcnemar_mde needs n_items > 0 and 0 < discordant <= 1, got "
                         f"{n_items}, {discordant}")
    z = float(sps.norm.ppf(1 - alpha / 2) + sps.norm.ppf(power))
    return z * math.sqrt(discordant / n_items)


def holm(p_values: Sequence[float]) -> list[float]:
    """Holm's step-down adjusted p-values: rejecting where they are below alpha keeps the
    chance of any false positive among the family of tests at alpha."""
    order = sorted(range(len(p_values)), key=lambda i: p_values[i])
    adjusted, running = [0.0] * len(p_values), 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (len(p_values) - rank) * p_values[i]))
        adjusted[i] = running
    return adjusted


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
