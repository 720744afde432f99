import math

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
