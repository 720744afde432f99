import json
from pathlib import Path

import pytest

from aqn.rewards import get_reward_fn
from aqn.rewards.gsm8k import compute_score, extract_solution

# ../shared beside the checkout (as on the dev machines and in CI)
GSM8K_TEST = Path(__file__).resolve().parents[2] / "shared" / "data" / "gsm8k" / "test.jsonl"


def test_strict_takes_last_match():
    assert extract_solution("#### 3 then #### 7") == "7"
    assert extract_solution("work\n#### -12") == "-12"


def test_strict_looks_only_at_last_300_chars():
    early = "#### 5" + "x" * 400
    assert extract_solution(early) is None
    assert extract_solution("#### 5" + "x" * 294) == "5"  # exactly 300 chars


def test_strict_needs_the_marker():
    assert extract_solution("The answer is 42.") is None
    assert extract_solution("####42") is None


def test_strict_strips_commas_and_flexible_keeps_them_as_verl():
    assert extract_solution("#### 1,234") == "1234"
    assert extract_solution("It costs $1,234 in total", "flexible") == "1,234"
    assert compute_score("#### 1,234", "1234", method="flexible") == 0.0


def test_flexible_finds_last_number_as_verl():
    assert extract_solution("3 apples and 5 pears, so 8 fruits.", "flexible") == "8"
    assert extract_solution("#### 4 but really -6", "flexible") == "-6"
    # verl skips only "" and ".": a bare "," or "..." is a (wrong) answer, worth the format score
    assert extract_solution("#### 18, so that's it...", "flexible") == "..."
    assert extract_solution("#### 18, so", "flexible") == "18,"
    assert extract_solution("no numbers here...", "flexible") == "..."
    assert compute_score("no numbers here...", "8", "flexible", format_score=0.1) == 0.1
    assert extract_solution("no numbers here", "flexible") is None


def test_numeric_prefers_marker_then_last_number():
    assert extract_solution("7 and 9\n#### 5\nsure 3", "numeric") == "5"
    assert extract_solution("7 and 9", "numeric") == "9"


@pytest.mark.parametrize("response", ["#### 1,234", "#### 1234.0", "so $1234", "1234.000 total"])
def test_numeric_accepts_equal_values(response):
    assert compute_score(response, "1234", method="numeric") == 1.0


def test_numeric_rejects_other_values():
    assert compute_score("#### 1235", "1234", method="numeric") == 0.0
    assert compute_score("#### 1235", "1234", method="numeric", format_score=0.1) == 0.1
    assert compute_score("#### 1.2.3", "1234", method="numeric", format_score=0.1) == 0.1
    # Strict compares strings, so the same values do not match there.
    assert compute_score("#### 1234.0", "1234") == 0.0


def test_compute_score_values():
    assert compute_score("3+5=8\n#### 8", "8") == 1.0
    assert compute_score("#### 8", "8", score=2.0) == 2.0
    assert compute_score("#### 9", "8", format_score=0.1) == 0.1
    assert compute_score("I think 8", "8", format_score=0.1) == 0.0
    assert compute_score("I think 8", "8", method="flexible") == 1.0


def test_unknown_method():
    with pytest.raises(ValueError, match="strict, flexible, numeric"):
        extract_solution("#### 1", "fuzzy")
    with pytest.raises(ValueError, match="numeric"):
        get_reward_fn("arith", "fuzzy")


def test_get_reward_fn():
    for source in ("arith", "openai/gsm8k"):
        fn = get_reward_fn(source)
        assert fn("#### 15", "15") == 1.0
        assert fn("#### 1,5", "15") == 1.0
        assert fn("15", "15") == 0.0
    assert get_reward_fn("arith", "numeric")("#### 15.0", "15") == 1.0
    with pytest.raises(ValueError, match="arith, openai/gsm8k"):
        get_reward_fn("math")


def _gsm8k_rows():
    if not GSM8K_TEST.exists():
        pytest.skip(f"{GSM8K_TEST} not present")
    rows = [json.loads(line) for line in GSM8K_TEST.read_text(encoding="utf-8").splitlines()]
    with_comma = next(r for r in rows if "," in r["answer"].split("#### ")[-1])
    return [rows[0], with_comma]


def test_real_gsm8k_rows():
    for row in _gsm8k_rows():
        gold = row["answer"].split("#### ")[-1].strip()
        truth = gold.replace(",", "")
        assert compute_score(row["answer"], truth) == 1.0
        wrong = row["answer"].rsplit("#### ", 1)[0] + f"#### {int(truth) + 1}"
        assert compute_score(wrong, truth) == 0.0
        assert compute_score(row["answer"], truth, method="numeric") == 1.0
