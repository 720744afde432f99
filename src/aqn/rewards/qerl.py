"""QeRL's GSM8K reward for the ``qerl`` prompt style: 2.0 when the number inside the last
``<answer>...</answer>`` equals the ground truth, plus 0.2 when the whole response has the
``<think>...</think><answer>...</answer>`` shape. A correct answer therefore scores 2.0 or
2.2; accuracy counts scores >= ``aqn.rewards.CORRECT_AT`` (1.0), never the format alone."""

from __future__ import annotations

import re

from aqn.rewards.gsm8k import answers_match, clean_number

CORRECT_SCORE = 2.0
FORMAT_SCORE = 0.2
_FORMAT_RE = re.compile(r"^\s*<think>.*?</think>\s*<answer>.*?</answer>\s*$", re.DOTALL)
_ANSWER_RE = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)


def extract_answer(response: str) -> str | None:
    found = _ANSWER_RE.findall(response)
    return clean_number(found[-1].strip()) if found else None


def compute_score(response: str, ground_truth: str, method: str = "strict") -> float:
    answer = extract_answer(response)
    score = FORMAT_SCORE if _FORMAT_RE.match(response) else 0.0
    if answer is not None and answers_match(answer, ground_truth, method):
        score += CORRECT_SCORE
    return score
