"""Reward functions, chosen by the data source of a record."""

from collections.abc import Callable
from functools import partial

from aqn.rewards.gsm8k import check_method, compute_score

RewardFn = Callable[[str, str], float]

# Both sources end their worked answers with "#### N", so both use the GSM8K rule.
KNOWN_DATA_SOURCES = ("arith", "openai/gsm8k")


def get_reward_fn(data_source: str, method: str = "strict") -> RewardFn:
    """A function `(response, ground_truth) -> float` for records of `data_source`."""
    if data_source not in KNOWN_DATA_SOURCES:
        raise ValueError(
            f"unknown data source {data_source!r}; known: {', '.join(KNOWN_DATA_SOURCES)}"
        )
    check_method(method)
    return partial(compute_score, method=method)
