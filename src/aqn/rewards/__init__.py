"""Reward functions, chosen by the data source of a record and the prompt style."""

from collections.abc import Callable
from functools import partial

from aqn.rewards import gsm8k, qerl

RewardFn = Callable[[str, str], float]

# Both sources end their worked answers with "#### N", so both use the GSM8K rules.
KNOWN_DATA_SOURCES = ("arith", "openai/gsm8k")
# A response counts as correct at or above this score (1.0 of the 0/1 rules; qerl's 2.0 or
# 2.2, never its 0.2 for the format alone).
CORRECT_AT = 1.0


def get_reward_fn(data_source: str, method: str = "strict", prompt_style: str = "verl"
                  ) -> RewardFn:
    """A function `(response, ground_truth) -> float` for records of `data_source`."""
    if data_source not in KNOWN_DATA_SOURCES:
        raise ValueError(
            f"unknown data source {data_source!r}; known: {', '.join(KNOWN_DATA_SOURCES)}"
        )
    gsm8k.check_method(method)
    if prompt_style == "qerl":
        return partial(qerl.compute_score, method=method)
    return partial(gsm8k.compute_score, method=method)


def extract_answer(response: str, method: str = "strict", prompt_style: str = "verl"
                   ) -> str | None:
    """The answer a reward function reads from ``response`` (for per-item files)."""
    if prompt_style == "qerl":
        return qerl.extract_answer(response)
    return gsm8k.extract_solution(response, method)
