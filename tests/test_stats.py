import math

import numpy as np
import pytest

from aqn.experiments.stats import (
    accuracy_se,
    mcnemar,
    paired_bootstrap,
    seed_test,
    wilson_interval,
)


def test_accuracy_se_on_gsm8k():
    # 77 % on GSM8K's 1319 test items: one accuracy is uncertain by about 1.2 points.
    assert 100 * accuracy_se(0.77, 1319) == pytest.approx(1.16, abs=0.005)
    with pytest.raises(ValueError):
        accuracy_se(0.5, 0)


def test_wilson_interval():
    low, high = wilson_interval(8, 10)
    assert (low, high) == pytest.approx((0.4902, 0.9433), abs=1e-4)
    low, high = wilson_interval(0, 20)
    assert low == 0.0 and 0 < high < 0.2


def test_mcnemar_identical_results_are_not_significant():
    correct = [True] * 70 + [False] * 30
    r = mcnemar(correct, correct)
    assert (r.n, r.b_only, r.a_only, r.diff, r.p_value) == (100, 0, 0, 0.0, 1.0)


def test_mcnemar_large_difference():
    a = [i < 80 for i in range(200)]  # 40 %
    b = [i < 160 for i in range(200)]  # 80 %, a superset of a's correct items
    r = mcnemar(a, b)
    assert (r.b_only, r.a_only) == (80, 0)
    assert r.diff == pytest.approx(0.4)
    assert r.p_value < 1e-6


def test_mcnemar_exact_small_case():
    # 6 items only b gets right, 1 only a, 3 both: p = 2 * P(X <= 1 | n=7, 1/2) = 16/128.
    a = [False] * 6 + [True] + [True] * 3
    b = [True] * 6 + [False] + [True] * 3
    r = mcnemar(a, b)
    assert (r.b_only, r.a_only) == (6, 1)
    assert r.p_value == pytest.approx(0.125)
    assert r.diff == pytest.approx(0.5)
    with pytest.raises(ValueError):
        mcnemar([True], [True, False])


def test_paired_bootstrap_ci_and_determinism():
    rng = np.random.default_rng(1)
    a = (rng.random(500) < 0.5).astype(float)
    b = np.where(rng.random(500) < 0.2, 1.0, a)  # b fixes about 10 % of items
    r = paired_bootstrap(a, b, seed=3)
    assert r.diff == pytest.approx(float(np.mean(b - a)))
    assert r.ci_low < r.diff < r.ci_high
    assert r.ci_low > 0 and r.p_value < 1e-3
    assert paired_bootstrap(a, b, seed=3) == r


def test_paired_bootstrap_identical_scores():
    a = [1.0, 0.0, 1.0, 1.0]
    r = paired_bootstrap(a, a, n_resamples=200)
    assert (r.diff, r.ci_low, r.ci_high, r.p_value) == (0.0, 0.0, 0.0, 1.0)


def test_seed_test_matches_hand_computation():
    a = {1: 0.50, 2: 0.60, 3: 0.70, 9: 0.1}
    b = {1: 0.51, 2: 0.63, 3: 0.72, 7: 0.9}  # seeds 7 and 9 are unpaired
    r = seed_test(a, b)
    # Differences 0.01, 0.03, 0.02: mean 0.02, sd 0.01, t = 0.02 / (0.01 / sqrt 3).
    # With 2 degrees of freedom the t distribution has closed forms:
    # two-sided p = 1 - t / sqrt(t^2 + 2), and the 97.5 % quantile is
    # q = 0.95 * sqrt(2 / (1 - 0.95^2)).
    t = 0.02 / (0.01 / math.sqrt(3))
    q = 0.95 * math.sqrt(2 / (1 - 0.95**2))
    assert r.n_seeds == 3
    assert r.mean_diff == pytest.approx(0.02)
    assert r.p_value == pytest.approx(1 - t / math.sqrt(t * t + 2), rel=1e-6)
    half = q * 0.01 / math.sqrt(3)
    assert (r.ci_low, r.ci_high) == pytest.approx((0.02 - half, 0.02 + half), rel=1e-6)
    assert r.method == "paired t-test"


def test_seed_test_needs_two_seeds():
    r = seed_test({1: 0.5, 2: 0.6}, {2: 0.7, 3: 0.8})
    assert r.n_seeds == 1 and r.p_value is None and r.method == "n/a"
    assert r.mean_diff == pytest.approx(0.1)


def test_seed_test_zero_variance_is_undetermined():
    # +3.0 points in both seeds, not bit-equal in floats: a t-test would say p ~ 1e-16
    r = seed_test({1: 0.2825, 2: 0.3}, {1: 0.3125, 2: 0.33})
    assert r.p_value is None and "zero variance" in r.method
    assert r.mean_diff == pytest.approx(0.03) and r.ci_low is None
    r = seed_test({1: 0.5, 2: 0.25}, {1: 0.5, 2: 0.25})
    assert r.p_value is None and "zero variance" in r.method


# --- power: the minimal detectable effect (MDE) -------------------------------------------


def test_paired_t_mde_against_the_hand_formula():
    from scipy import stats as sps

    from aqn.experiments.stats import paired_t_mde

    # By hand: MDE ~ (t_{0.975, n-1} + t_{0.8, n-1}) sd / sqrt(n), close for n >= 5 ...
    for n in (5, 10, 30):
        hand = (sps.t.ppf(0.975, n - 1) + sps.t.ppf(0.8, n - 1)) * 3.0 / math.sqrt(n)
        assert paired_t_mde(3.0, n) == pytest.approx(hand, rel=0.03)
    # ... and the normal one for many seeds: (1.96 + 0.8416) sd / sqrt(n)
    assert paired_t_mde(2.0, 400) == pytest.approx(2.8016 * 2.0 / 20, rel=0.005)
    # Two seeds leave one degree of freedom: t_{0.975, 1} = 12.7, so the MDE is huge.
    assert paired_t_mde(1.0, 2) > 10
    with pytest.raises(ValueError):
        paired_t_mde(0.0, 4)


def test_paired_t_mde_has_its_power_in_simulation():
    from scipy import stats as sps

    from aqn.experiments.stats import paired_t_mde

    rng = np.random.default_rng(0)
    for n, sd in ((3, 2.5), (6, 1.0)):
        mde = paired_t_mde(sd, n)
        diffs = rng.normal(mde, sd, size=(40_000, n))
        rejected = sps.ttest_1samp(diffs, 0.0, axis=1).pvalue < 0.05
        assert rejected.mean() == pytest.approx(0.80, abs=0.01)
        at_half = sps.ttest_1samp(rng.normal(mde / 2, sd, size=(40_000, n)), 0.0,
                                  axis=1).pvalue < 0.05
        assert at_half.mean() < 0.5  # a smaller effect is missed more often


def test_seeds_needed():
    from aqn.experiments.stats import paired_t_mde, seeds_needed

    # Cohen's dz = 1 (effect = sd) needs 10 pairs at 80 % power (power 0.803 at n = 10).
    assert seeds_needed(1.0, 1.0) == 10
    n = seeds_needed(3.0, 2.5)
    assert paired_t_mde(3.0, n) <= 2.5 < paired_t_mde(3.0, n - 1)
    assert seeds_needed(100.0, 0.01) is None  # beyond MAX_SEEDS


def test_seed_test_states_its_mde():
    from aqn.experiments.stats import paired_t_mde

    a = {1: 0.60, 2: 0.62, 3: 0.58, 4: 0.61}
    b = {1: 0.63, 2: 0.62, 3: 0.62, 4: 0.66}
    r = seed_test(a, b)
    sd = float(np.std([0.03, 0.0, 0.04, 0.05], ddof=1))
    assert r.sd == pytest.approx(sd)
    assert r.mde == pytest.approx(paired_t_mde(sd, 4))


def test_mcnemar_mde_matches_a_simulation_of_mcnemar():
    from aqn.experiments.stats import mcnemar_mde

    n, disc = 400, 0.2
    mde = mcnemar_mde(disc, n)
    assert mde == pytest.approx(2.8016 * math.sqrt(disc / n), rel=1e-3)
    # Items discordant with probability 0.2, skewed so that acc(b) - acc(a) = mde on average.
    rng = np.random.default_rng(2)
    p_b = 0.5 + mde / (2 * disc)
    hits = 0
    for _ in range(2_000):
        d = rng.random(n) < disc
        b_wins = rng.random(n) < p_b
        a = np.where(d & ~b_wins, 1, 0).astype(bool)
        b = np.where(d & b_wins, 1, 0).astype(bool)
        hits += mcnemar(a, b).p_value < 0.05
    assert hits / 2_000 == pytest.approx(0.80, abs=0.05)  # exact test vs normal approximation


def test_holm_by_hand():
    from aqn.experiments.stats import holm

    # by hand: sorted 0.01, 0.02, 0.04, 0.30 -> x4, x3, x2, x1, made monotone
    assert holm([0.04, 0.01, 0.30, 0.02]) == pytest.approx([0.08, 0.04, 0.30, 0.06])
    assert holm([0.5, 0.6]) == pytest.approx([1.0, 1.0])
    assert holm([]) == []
