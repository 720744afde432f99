"""Prompt styles: how a question becomes the chat messages the model sees.

- ``plain``: the question alone (what the tiny base was trained on).
- ``verl``: the question followed by verl's GSM8K instruction to answer after "####"
  (docs/reference.md#gsm8k-data-and-prompt); scored by the ``strict`` / ``flexible`` /
  ``numeric`` rules.
- ``qerl``: QeRL's reasoning format, a system message asking for
  ``<think>...</think><answer>...</answer>``; scored 2.0 for the right answer inside
  ``<answer>`` plus 0.2 for the format (``aqn.rewards.qerl``).
"""

from __future__ import annotations

PROMPT_STYLES = ("plain", "verl", "qerl")
# The style a source uses when data.prompt_style is null.
DEFAULT_STYLE = {"arith": "plain", "gsm8k": "verl"}

VERL_INSTRUCTION = 'Let\'s think step by step and output the final answer after "####".'
QERL_SYSTEM = (
    "A conversation between User and Assistant. The user asks a question, and the "
    "Assistant solves it. The Assistant first thinks about the reasoning process and then "
    "gives the final answer. The reasoning process and the answer are enclosed within "
    "<think> </think> and <answer> </answer> tags, respectively, i.e., "
    "<think> reasoning process here </think><answer> answer here </answer>. "
    "The answer is a single number."
)


def build_prompt(question: str, style: str) -> list[dict[str, str]]:
    """The chat messages for ``question`` in ``style``."""
    if style == "plain":
        return [{"role": "user", "content": question}]
    if style == "verl":
        return [{"role": "user", "content": f"{question} {VERL_INSTRUCTION}"}]
    if style == "qerl":
        return [{"role": "system", "content": QERL_SYSTEM},
                {"role": "user", "content": question}]
    raise ValueError(f"unknown prompt style {style!r}; known: {', '.join(PROMPT_STYLES)}")
