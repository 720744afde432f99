import re
import string

import pytest

from aqn.data import arith
from aqn.data.arith import make_split
from aqn.rewards import get_reward_fn

STEP_RE = re.compile(r"^(\d+)([+\-*])(\d+)=(\d+)$")
ALLOWED_CHARS = set(string.printable) - set("\t\r\x0b\x0c")


@pytest.fixture(scope="module")
def train():
    return make_split("train", 500, seed=0)


def test_deterministic(train):
    assert make_split("train", 500, seed=0) == train
    assert make_split("train", 500, seed=1) != train
    assert make_split("train", 50, seed=0, difficulty=(3, 1)) == make_split(
        "train", 50, seed=0, difficulty=(1, 3)
    )


def test_record_fields(train):
    for i, r in enumerate(train[:20]):
        assert r["id"] == f"arith-train-{i}"
        assert r["data_source"] == "arith"
        assert r["prompt"] == [{"role": "user", "content": r["question"]}]


@pytest.mark.parametrize("train_seed,test_seed", [(0, 1), (0, 0), (7, 3)])
def test_splits_disjoint(train_seed, test_seed):
    train_q = {r["question"] for r in make_split("train", 500, seed=train_seed)}
    test_q = {r["question"] for r in make_split("test", 200, seed=test_seed)}
    assert len(train_q) == 500 and len(test_q) == 200
    assert train_q.isdisjoint(test_q)


def test_answers_correct(train):
    reward = get_reward_fn("arith")
    for r in train:
        *steps, last = r["answer"].split("\n")
        assert 1 <= len(steps) <= 2
        for line in steps:
            a, op, b, c = STEP_RE.match(line).groups()
            expected = {"+": int(a) + int(b), "-": int(a) - int(b), "*": int(a) * int(b)}[op]
            assert int(c) == expected
        assert int(c) == int(r["ground_truth"])  # the last step gives the answer
        assert last == f"#### {r['ground_truth']}"
        assert reward(r["answer"], r["ground_truth"]) == 1.0


def test_text_is_short_printable_ascii(train):
    for r in train:
        assert len(r["question"]) <= 100
        assert set(r["question"] + r["answer"]) <= ALLOWED_CHARS


@pytest.mark.parametrize("level", [1, 2, 3])
def test_difficulty_respected(level):
    records = make_split("test", 100, seed=2, difficulty=level)
    assert {r["difficulty"] for r in records} == {level}
    for r in records:
        steps = [STEP_RE.match(line).groups() for line in r["answer"].split("\n")[:-1]]
        ops = [op for _, op, _, _ in steps]
        numbers = [int(x) for a, _, b, _ in steps for x in (a, b)]
        if level == 1:
            assert len(steps) == 1 and ops[0] in "+-" and max(numbers) <= 20
        elif level == 2:
            assert len(steps) == 2 and set(ops) <= set("+-")
        else:
            assert len(steps) == 2 and ops[0] == "*" and max(numbers[:2]) <= 9
        assert int(r["ground_truth"]) >= 0


def test_all_levels_by_default(train):
    assert {r["difficulty"] for r in train} == {1, 2, 3}


def test_bad_arguments():
    with pytest.raises(ValueError, match="split"):
        make_split("validation", 5)
    with pytest.raises(ValueError, match="difficulty"):
        make_split("train", 5, difficulty=4)
    with pytest.raises(ValueError, match="difficulty"):
        make_split("train", 5, difficulty=())


def test_space_too_small(monkeypatch):
    # A single fixed question: at most one problem exists in either split.
    def one_problem(rng):
        return "Tom has 1 apple. How many apples does he have?", [(1, "+", 0, 1)]

    monkeypatch.setattr(arith, "_TEMPLATES", {1: (one_problem,), 2: (), 3: ()})
    split = arith.split_of("Tom has 1 apple. How many apples does he have?")
    assert len(make_split(split, 1, difficulty=1)) == 1
    with pytest.raises(ValueError, match="problem space is too small"):
        make_split(split, 2, difficulty=1)


SYMBOLIC_RE = re.compile(r"^(\d)([+\-*])(\d)(?:([+\-])(\d))?$")


def _value(question: str) -> int:
    """The value of a symbolic question, parsed without eval: ``a op b [op c]``, the
    product (level 3 only) first."""
    a, op1, b, op2, c = SYMBOLIC_RE.match(question).groups()
    first = {"+": int(a) + int(b), "-": int(a) - int(b), "*": int(a) * int(b)}[op1]
    return first if op2 is None else first + int(c) if op2 == "+" else first - int(c)


@pytest.mark.parametrize("split", ["train", "test"])
def test_symbolic_problems(split):
    records = make_split(split, 500, seed=0, wording="symbols")
    assert records == make_split(split, 500, seed=0, wording="symbols")
    reward = get_reward_fn("arith")
    for r in records:
        assert int(r["ground_truth"]) == _value(r["question"]) >= 0
        *steps, last = r["answer"].split("\n")
        assert len(steps) == (1 if r["difficulty"] == 1 else 2)
        assert ("*" in r["question"]) == (r["difficulty"] == 3)
        # the worked answer's first step restates the question's first operation
        assert steps[0].split("=")[0] == r["question"][:3]
        assert last == f"#### {r['ground_truth']}" and reward(r["answer"], r["ground_truth"])
    assert {r["difficulty"] for r in records} == {1, 2, 3}


def test_symbolic_splits_disjoint_and_small():
    train = {r["question"] for r in make_split("train", 2000, seed=0, wording="symbols")}
    test = {r["question"] for r in make_split("test", 400, seed=3, wording="symbols")}
    assert train.isdisjoint(test)
    # one-digit operands: the whole space is small, asking for more than it holds is an error
    with pytest.raises(ValueError, match="problem space is too small"):
        make_split("test", 1000, seed=0, wording="symbols")
    with pytest.raises(ValueError, match="wording"):
        make_split("train", 5, wording="emoji")


def test_other_format_keeps_the_working_and_scores_zero():
    r = make_split("train", 1, seed=0, difficulty=2, wording="symbols")[0]
    other = arith.other_format(r["answer"])
    assert other.rsplit("\n", 1)[0] == r["answer"].rsplit("\n", 1)[0]
    assert other.endswith(f"\nThe answer is {r['ground_truth']}.")
    reward = get_reward_fn("arith")  # strict, as verl: only "#### N" counts
    assert reward(other, r["ground_truth"]) == 0.0
    assert get_reward_fn("arith", "numeric")(other, r["ground_truth"]) == 1.0
