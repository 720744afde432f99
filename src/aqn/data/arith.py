"""Seeded arithmetic word problems with GSM8K-style worked answers.

The texts are short and plain ASCII because a tiny character-level model is trained on them.

Levels:
  1: one addition or subtraction, numbers 0-20, result non-negative;
  2: two +/- steps, numbers up to 50;
  3: a multiplication of small numbers, then a +/- step.

Wordings: ``words`` (the short stories above) or ``symbols`` (the bare expression, e.g.
``4*7-9``, with one-digit operands: levels 1-2 are one or two +/- steps on 0-9, level 3 a
product of 2-9 then a +/- step on 0-9). The symbolic problems are a quarter of the tokens and
their steps are few facts that many problems share, which is what lets a CPU pretrain a base
that solves half of them in two minutes (the tiny-base testbed).

Every question goes to train or test by a hash of its text, never by the seed, so the two
splits cannot share a question whatever seeds are used.
"""

import hashlib
import random
from collections.abc import Callable

from aqn.errors import InputError

DATA_SOURCE = "arith"
LEVELS = (1, 2, 3)
SPLITS = ("train", "test")
WORDINGS = ("words", "symbols")
TRAIN_PERCENT = 80

# Each step is (left, operator, right, result); the answer shows one "a+b=c" line per step.
Step = tuple[int, str, int, int]
Template = Callable[[random.Random], tuple[str, list[Step]]]

# Give up after this many draws in a row that bring no new question of the requested split.
_MAX_MISSES = 10_000

_PEOPLE = (
    ("Tom", "he"),
    ("Ann", "she"),
    ("Sam", "he"),
    ("Mia", "she"),
    ("Ben", "he"),
    ("Zoe", "she"),
    ("Max", "he"),
    ("Eva", "she"),
)
_OBJECTS = ("apple", "pen", "card", "book", "egg", "coin", "ball", "shell")


def _step(a: int, op: str, b: int) -> Step:
    result = {"+": a + b, "-": a - b, "*": a * b}[op]
    return (a, op, b, result)


def _count(n: int, obj: str) -> str:
    return f"{n} {obj}" if n == 1 else f"{n} {obj}s"


def _person(rng: random.Random) -> tuple[str, str, str]:
    name, pronoun = rng.choice(_PEOPLE)
    return name, pronoun, pronoun.capitalize()


def _l1_buy(rng: random.Random) -> tuple[str, list[Step]]:
    name, he, He = _person(rng)
    obj = rng.choice(_OBJECTS)
    a, b = rng.randint(0, 20), rng.randint(1, 20)
    q = f"{name} has {_count(a, obj)}. {He} buys {b} more. How many {obj}s does {he} have?"
    return q, [_step(a, "+", b)]


def _l1_give(rng: random.Random) -> tuple[str, list[Step]]:
    name, _, He = _person(rng)
    obj = rng.choice(_OBJECTS)
    a = rng.randint(1, 20)
    b = rng.randint(1, a)
    q = f"{name} has {_count(a, obj)}. {He} gives {b} to a friend. How many {obj}s are left?"
    return q, [_step(a, "-", b)]


def _l1_together(rng: random.Random) -> tuple[str, list[Step]]:
    (name1, _), (name2, _) = rng.sample(_PEOPLE, 2)
    obj = rng.choice(_OBJECTS)
    a, b = rng.randint(0, 20), rng.randint(0, 20)
    q = f"{name1} has {_count(a, obj)} and {name2} has {b}. How many {obj}s do they have?"
    return q, [_step(a, "+", b)]


def _l2_buy_give(rng: random.Random) -> tuple[str, list[Step]]:
    name, _, He = _person(rng)
    obj = rng.choice(_OBJECTS)
    a, b = rng.randint(0, 50), rng.randint(1, 50)
    c = rng.randint(1, min(50, a + b))
    q = (
        f"{name} has {_count(a, obj)}. {He} buys {b} more, then gives away {c}. "
        f"How many {obj}s are left?"
    )
    first = _step(a, "+", b)
    return q, [first, _step(first[3], "-", c)]


def _l2_lose_find(rng: random.Random) -> tuple[str, list[Step]]:
    name, he, He = _person(rng)
    obj = rng.choice(_OBJECTS)
    a = rng.randint(1, 50)
    b, c = rng.randint(1, a), rng.randint(1, 50)
    q = (
        f"{name} has {_count(a, obj)}. {He} loses {b}, then finds {c}. "
        f"How many {obj}s does {he} have now?"
    )
    first = _step(a, "-", b)
    return q, [first, _step(first[3], "+", c)]


def _l2_two_days(rng: random.Random) -> tuple[str, list[Step]]:
    name, _, He = _person(rng)
    obj = rng.choice(_OBJECTS)
    a, b = rng.randint(1, 50), rng.randint(1, 50)
    c = rng.randint(1, min(50, a + b))
    q = (
        f"{name} gets {_count(a, obj)} on Monday and {b} on Tuesday. {He} loses {c}. "
        f"How many are left?"
    )
    first = _step(a, "+", b)
    return q, [first, _step(first[3], "-", c)]


def _l3_bags_give(rng: random.Random) -> tuple[str, list[Step]]:
    name, _, He = _person(rng)
    obj = rng.choice(_OBJECTS)
    a, b = rng.randint(2, 9), rng.randint(2, 9)
    c = rng.randint(1, min(20, a * b))
    q = f"{name} buys {a} bags of {b} {obj}s. {He} gives away {c}. How many {obj}s are left?"
    first = _step(a, "*", b)
    return q, [first, _step(first[3], "-", c)]


def _l3_has_buys(rng: random.Random) -> tuple[str, list[Step]]:
    name, he, He = _person(rng)
    obj = rng.choice(_OBJECTS)
    c, a, b = rng.randint(0, 20), rng.randint(2, 9), rng.randint(2, 9)
    q = (
        f"{name} has {_count(c, obj)}. {He} buys {a} boxes of {b}. "
        f"How many {obj}s does {he} have now?"
    )
    first = _step(a, "*", b)
    return q, [first, _step(c, "+", first[3])]


def _l3_change(rng: random.Random) -> tuple[str, list[Step]]:
    name, _, He = _person(rng)
    obj = rng.choice(_OBJECTS)
    a, b = rng.randint(2, 9), rng.randint(2, 9)
    paid = rng.choice([note for note in (20, 50, 100) if note >= a * b])
    q = f"{name} buys {a} {obj}s at ${b} each and pays ${paid}. How many dollars is the change?"
    first = _step(a, "*", b)
    return q, [first, _step(paid, "-", first[3])]


_TEMPLATES: dict[int, tuple[Template, ...]] = {
    1: (_l1_buy, _l1_give, _l1_together),
    2: (_l2_buy_give, _l2_lose_find, _l2_two_days),
    3: (_l3_bags_give, _l3_has_buys, _l3_change),
}


def _sym_level1(rng: random.Random) -> list[Step]:
    a = rng.randint(0, 9)
    return [_step(a, "+", rng.randint(0, 9)) if rng.random() < 0.5
            else _step(a, "-", rng.randint(0, a))]


def _sym_level2(rng: random.Random) -> list[Step]:
    first = _sym_level1(rng)[0]
    total = first[3]
    if first[1] == "+":
        return [first, _step(total, "-", rng.randint(0, min(9, total)))]
    return [first, _step(total, "+", rng.randint(0, 9))]


def _sym_level3(rng: random.Random) -> list[Step]:
    first = _step(rng.randint(2, 9), "*", rng.randint(2, 9))
    product = first[3]
    if rng.random() < 0.5:
        return [first, _step(product, "+", rng.randint(0, 9))]
    return [first, _step(product, "-", rng.randint(0, min(9, product)))]


_SYMBOLIC: dict[int, Callable[[random.Random], list[Step]]] = {
    1: _sym_level1, 2: _sym_level2, 3: _sym_level3}


def _symbolic(level: int, rng: random.Random) -> tuple[str, list[Step]]:
    """A symbolic problem: every later step continues from the previous result."""
    steps = _SYMBOLIC[level](rng)
    a, op, b, _ = steps[0]
    return f"{a}{op}{b}" + "".join(f"{op}{right}" for _, op, right, _ in steps[1:]), steps


def split_of(question: str) -> str:
    """The split a question belongs to, from a stable hash of its text."""
    bucket = int.from_bytes(hashlib.sha256(question.encode("utf-8")).digest()[:8], "big") % 100
    return "train" if bucket < TRAIN_PERCENT else "test"


def _worked_answer(steps: list[Step]) -> str:
    lines = [f"{a}{op}{b}={result}" for a, op, b, result in steps]
    lines.append(f"#### {steps[-1][3]}")
    return "\n".join(lines)


def other_format(answer: str) -> str:
    """The worked answer with its final ``#### N`` line written ``The answer is N.``: the
    other common way to end a solution, which verl's strict GSM8K reward scores 0."""
    working, final = answer.rsplit("\n", 1)
    return f"{working}\nThe answer is {final.removeprefix('#### ')}."


def _levels(difficulty: int | tuple[int, ...]) -> tuple[int, ...]:
    requested = (difficulty,) if isinstance(difficulty, int) else tuple(difficulty)
    if not requested or any(level not in LEVELS for level in requested):
        raise ValueError(f"difficulty must be one or more of {LEVELS}, got {difficulty!r}")
    # Sorted so that (3, 1) and (1, 3) give the same problems.
    return tuple(sorted(set(requested)))


def make_split(
    split: str, n: int, seed: int = 0, difficulty: int | tuple[int, ...] = LEVELS,
    wording: str = "words",
) -> list[dict]:
    """`n` distinct problems of `split`, a pure function of the arguments."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if wording not in WORDINGS:
        raise ValueError(f"wording must be one of {WORDINGS}, got {wording!r}")
    if n < 0:
        raise ValueError(f"n must be non-negative, got {n}")
    levels = _levels(difficulty)
    rng = random.Random(seed)
    records: list[dict] = []
    seen: set[str] = set()
    misses = 0
    while len(records) < n:
        level = rng.choice(levels)
        if wording == "symbols":
            question, steps = _symbolic(level, rng)
        else:
            question, steps = rng.choice(_TEMPLATES[level])(rng)
        if question in seen or split_of(question) != split:
            misses += 1
            if misses >= _MAX_MISSES:
                raise InputError(
                    f"found only {len(records)} of {n} distinct {split!r} problems at difficulty "
                    f"{levels}: the problem space is too small for n={n} (data.max_train_samples "
                    "/ max_val_samples)"
                )
            continue
        misses = 0
        seen.add(question)
        records.append(
            {
                "id": f"arith-{split}-{len(records)}",
                "data_source": DATA_SOURCE,
                "question": question,
                "answer": _worked_answer(steps),
                "ground_truth": str(steps[-1][3]),
                "difficulty": level,
                "prompt": [{"role": "user", "content": question}],
            }
        )
    return records
