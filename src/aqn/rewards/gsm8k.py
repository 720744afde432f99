"""GSM8K answer extraction and scoring.

`strict` and `flexible` follow verl's GSM8K reward (docs/reference.md#gsm8k-reward) so that our
accuracies compare with the seed's runs. `numeric` is ours: the same extraction, but the
answer is compared with the ground truth by value, so `1,234`, `1234.0` and `$1234` all
count as `1234`. Model output is only parsed with regexes and `Decimal`, never evaluated.
"""

import re
from decimal import Decimal, InvalidOperation

METHODS = ("strict", "flexible", "numeric")

# verl looks only at the tail of the response: the final answer belongs at the end, and
# regexes over long degenerate generations are slow.
_CLIP_CHARS = 300
_STRICT_RE = re.compile(r"#### (-?[0-9.,]+)")
_NUMBER_RE = re.compile(r"-?[0-9.,]+")


def check_method(method: str) -> None:
    """Raise ValueError unless `method` is one of METHODS."""
    if method not in METHODS:
        raise ValueError(f"unknown GSM8K reward method {method!r}; valid: {', '.join(METHODS)}")


def clean_number(number: str) -> str:
    """`number` without commas and `$` (how strict extraction writes an answer)."""
    return number.replace(",", "").replace("$", "")


def extract_solution(text: str, method: str = "strict") -> str | None:
    """The final answer in the last 300 characters of `text`, or None.

    strict (verl's): the last `#### N`, commas and `$` removed. flexible (verl's): the last
    match of the number pattern that is not "" or "." (else the first match), as written,
    commas included. numeric (ours): the last `#### N`, else the last number with a digit,
    commas and `$` removed.
    """
    check_method(method)
    tail = text[-_CLIP_CHARS:]
    if method == "flexible":
        found = _NUMBER_RE.findall(tail)
        real = [m for m in found if m not in ("", ".")]
        if real:
            return real[-1]
        return found[0] if found else None  # where verl's loop ends when no match is real
    found = _STRICT_RE.findall(tail)
    if found:
        return clean_number(found[-1])
    if method == "strict":
        return None
    # The number regex also matches bare punctuation such as "." or ","; skip those.
    for match in reversed(_NUMBER_RE.findall(tail)):
        number = clean_number(match)
        if any(ch.isdigit() for ch in number):
            return number
    return None


def _to_number(text: str) -> Decimal | None:
    try:
        value = Decimal(clean_number(text.strip()))
    except InvalidOperation:
        return None
    return value if value.is_finite() else None


def answers_match(answer: str, ground_truth: str, method: str = "strict") -> bool:
    """Whether an extracted answer equals the ground truth: as strings (strict, flexible, as
    verl: `1,234` is not `1234` under flexible), or by value (numeric)."""
    if method == "numeric":
        value = _to_number(answer)
        return value is not None and value == _to_number(ground_truth)
    return answer == ground_truth


def compute_score(
    response: str,
    ground_truth: str,
    method: str = "strict",
    format_score: float = 0.0,
    score: float = 1.0,
) -> float:
    """`score` for a correct answer, `format_score` for a wrong one, 0.0 when none is found."""
    answer = extract_solution(response, method)
    if answer is None:
        return 0.0
    return score if answers_match(answer, ground_truth, method) else format_score
