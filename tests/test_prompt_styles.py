"""A real GSM8K row through prompt -> reward in each prompt style."""

from pathlib import Path

import pytest

from aqn.data import load_task
from aqn.data.prompts import QERL_SYSTEM, VERL_INSTRUCTION, build_prompt
from aqn.rewards import CORRECT_AT, extract_answer, get_reward_fn
from aqn.rewards.qerl import compute_score as qerl_score

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "gsm8k"


@pytest.fixture(scope="module")
def shared():
    if not (SHARED / "test.jsonl").exists():
        pytest.skip(f"{SHARED} not present")
    return str(SHARED)


@pytest.fixture(scope="module")
def real_row(shared):
    _, val = load_task("gsm8k", 1, 3, seed=0, path=shared)
    return val[0]


def test_verl_style_round_trip(real_row):
    assert real_row["prompt"] == [{"role": "user",
                                   "content": f"{real_row['question']} {VERL_INSTRUCTION}"}]
    truth = real_row["ground_truth"]
    reward = get_reward_fn("openai/gsm8k", "strict", "verl")
    assert reward(real_row["answer"], truth) == 1.0  # the dataset's own worked answer
    assert reward(f"some steps\n#### {int(truth) + 1}", truth) == 0.0
    assert reward(f"the answer is {truth}", truth) == 0.0  # strict needs "####"


def test_qerl_style_round_trip(shared):
    _, val = load_task("gsm8k", 1, 3, 0, path=shared, prompt_style="qerl")
    row = val[0]
    assert row["prompt"][0] == {"role": "system", "content": QERL_SYSTEM}
    assert row["prompt"][1] == {"role": "user", "content": row["question"]}
    truth = row["ground_truth"]
    reward = get_reward_fn("openai/gsm8k", "strict", "qerl")
    right = f"<think>add them up</think><answer>{truth}</answer>"
    assert reward(right, truth) == pytest.approx(2.2)
    assert reward(f"<answer>{truth}</answer>", truth) == 2.0  # right answer, no <think>
    assert reward(f"<think>x</think><answer>{int(truth) + 1}</answer>", truth) \
        == pytest.approx(0.2)
    assert reward(f"#### {truth}", truth) == 0.0  # verl's marker means nothing here
    assert extract_answer(right, prompt_style="qerl") == truth
    assert reward(right, truth) >= CORRECT_AT > reward("<think></think><answer>0</answer>",
                                                       truth)


def test_qerl_numeric_accepts_equal_values():
    response = "<think>t</think><answer>$1,234.0</answer>"
    assert qerl_score(response, "1234", "numeric") == pytest.approx(2.2)
    assert qerl_score(response, "1234", "strict") == pytest.approx(0.2)


def test_arith_prompt_styles():
    train, _ = load_task("arith", 2, 2, seed=0)
    assert train[0]["prompt"] == [{"role": "user", "content": train[0]["question"]}]
    train, _ = load_task("arith", 2, 2, seed=0, prompt_style="verl")
    assert train[0]["prompt"][0]["content"].endswith(VERL_INSTRUCTION)
    with pytest.raises(ValueError, match="unknown prompt style 'r1'"):
        build_prompt("q", "r1")


def test_subset_is_stable_and_paired(shared):
    a = load_task("gsm8k", 20, 10, seed=0, path=shared)
    b = load_task("gsm8k", 20, 10, seed=0, path=shared, prompt_style="qerl")
    c = load_task("gsm8k", 20, 10, seed=1, path=shared)
    assert [r["id"] for r in a[1]] == [r["id"] for r in b[1]]  # style never changes the items
    assert [r["id"] for r in a[1]] != [r["id"] for r in c[1]]
    assert not {r["id"] for r in a[0]} & {r["id"] for r in a[1]}
