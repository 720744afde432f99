import math
import warnings

import numpy as np
import pytest

from aqn.noise import PRESETS, SigmaSchedule, get_preset


def test_reference_233_step_case():
    s = SigmaSchedule(0.01, 0.001, 5, 233)
    rows = s.table()
    assert [r.first_step for r in rows] == [0, 47, 94, 140, 187]
    assert [r.last_step for r in rows] == [46, 93, 139, 186, 232]
    assert [round(r.sigma, 6) for r in rows] == [0.0, 0.01, 0.004642, 0.002154, 0.001]


def test_transitions_step_by_step():
    s = SigmaSchedule(0.01, 0.001, 5, 233)
    assert [s.stage(k) for k in (0, 46, 47, 93, 94, 139, 140, 186, 187, 232)] == [
        0, 0, 1, 1, 2, 2, 3, 3, 4, 4]
    assert s.sigma(46) == 0.0
    assert s.sigma(47) == 0.01
    assert s.sigma(232) == pytest.approx(0.001, rel=1e-12)


def test_steps_beyond_total_stay_in_last_stage():
    s = SigmaSchedule(0.05, 0.0005, 10, 100)
    assert s.stage(100) == 9 and s.stage(10_000) == 9
    assert s.sigma(10_000) == pytest.approx(0.0005, rel=1e-12)


def test_qerl_preset_uses_k_minus_2_and_even_stages():
    p = get_preset("qerl")
    s = SigmaSchedule(p.sigma_start, p.sigma_end, p.num_stages, 100)
    assert [r.first_step for r in s.table()] == list(range(0, 100, 10))
    ratio = (0.0005 / 0.05) ** (1 / 8)
    for k in range(1, 10):
        assert s.stage_sigma(k) == pytest.approx(0.05 * ratio ** (k - 1), rel=1e-12)


def test_paper_exponent_stops_short_of_sigma_end():
    s = SigmaSchedule(0.01, 0.001, 5, 233, exponent="paper")
    assert s.stage_sigma(1) == 0.01
    assert s.stage_sigma(4) == pytest.approx(0.01 * 0.1 ** (3 / 4), rel=1e-12)
    assert s.stage_sigma(4) > 0.001


def test_presets_values():
    expected = {
        "qerl": (0.05, 0.0005, 10),
        "qerl-scripts": (0.01, 0.0001, 10),
        "mild": (0.025, 0.00025, 10),
        "strong": (0.10, 0.001, 10),
        "small": (0.01, 0.001, 5),
    }
    assert {k: (p.sigma_start, p.sigma_end, p.num_stages) for k, p in PRESETS.items()} == expected
    with pytest.raises(ValueError, match="known: qerl"):
        get_preset("qerll")


def test_stage_boundaries_exact_when_divisible():
    # 100 steps / 10 stages: float division 100/10*k could drift; integer maths must not
    s = SigmaSchedule(0.05, 0.0005, 10, 100)
    for k in range(10):
        assert s.stage(10 * k) == k and (k == 0 or s.stage(10 * k - 1) == k - 1)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(sigma_start=0.0), "sigma_start must be a finite number > 0"),
        (dict(sigma_end=-1e-3), "sigma_end must be a finite number > 0"),
        (dict(sigma_start=math.nan), "sigma_start"),
        (dict(num_stages=2), "num_stages must be an integer >= 3"),
        (dict(num_stages=1, exponent="paper"), "num_stages must be an integer >= 2"),
        (dict(total_steps=0), "total_steps must be an integer > 0"),
        (dict(exponent="code"), "exponent must be one of"),
    ],
)
def test_bad_input(kwargs, match):
    args = dict(sigma_start=0.01, sigma_end=0.001, num_stages=5, total_steps=100) | kwargs
    with pytest.raises(ValueError, match=match):
        SigmaSchedule(**args)


def test_negative_step_rejected():
    with pytest.raises(ValueError, match="step must be an integer >= 0"):
        SigmaSchedule(0.01, 0.001, 5, 100).stage(-1)


def test_paper_exponent_allows_two_stages():
    s = SigmaSchedule(0.01, 0.001, 2, 10, exponent="paper")
    assert [r.sigma for r in s.table()] == [0.0, 0.01]


def test_growing_sigma_is_warned_not_refused():
    with pytest.warns(UserWarning, match="sigma_end .* > sigma_start"):
        s = SigmaSchedule(0.001, 0.01, 5, 100)
    assert s.stage_sigma(4) == pytest.approx(0.01)


def test_stage_boundaries_follow_qerls_float_code_on_a_grid():
    """QeRL's released code switches stage at ``step // (T / K)`` on floats; an independent
    transcription (numpy's float floor division) agrees at every (K, T, step) of the grid,
    and the exact-integer rule, kept as ``boundaries: exact``, differs on some of them."""
    disagree_exact = 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # T < K warns
        for k in range(3, 13):
            for t in range(1, 301):
                qerl = SigmaSchedule(0.01, 0.0001, k, t)
                exact = SigmaSchedule(0.01, 0.0001, k, t, boundaries="exact")
                for step in range(t + 3):
                    want = min(int(np.floor_divide(np.float64(step), np.float64(t) / k)), k - 1)
                    assert qerl.stage(step) == want, (k, t, step)
                    disagree_exact += exact.stage(step) != want
                for stage in range(1, k):
                    first = qerl.first_step(stage)
                    assert qerl.stage(first) >= stage and (first == 0
                                                           or qerl.stage(first - 1) < stage)
    assert disagree_exact > 0  # the choice matters: 1-step shifts on some (K, T)


def test_the_two_boundary_rules_agree_on_the_reference_runs():
    for t in (40, 116, 233):  # the demo, and the seed's run lengths
        qerl = SigmaSchedule(0.01, 0.0001, 10, t)
        exact = SigmaSchedule(0.01, 0.0001, 10, t, boundaries="exact")
        assert [qerl.stage(s) for s in range(t)] == [exact.stage(s) for s in range(t)]
