"""Tasks: records with a chat prompt, a ground truth and a data source."""

from __future__ import annotations

from collections.abc import Sequence

from aqn.data.arith import make_split
from aqn.data.jsonl import DataError


def load_task(source: str, train_size: int, val_size: int, seed: int,
              difficulty: Sequence[int] = (1, 2, 3)) -> tuple[list[dict], list[dict]]:
    """(train, validation) records of a task; validation never overlaps training."""
    if source == "arith":
        difficulty = tuple(difficulty)
        return (make_split("train", train_size, seed=seed, difficulty=difficulty),
                make_split("test", val_size, seed=seed, difficulty=difficulty))
    raise DataError(f"unknown data source {source!r}; known: arith")


def encode_prompts(tokenizer, records: Sequence[dict], max_length: int) -> list[list[int]]:
    """Token ids of each record's chat prompt with the generation prompt appended."""
    out = []
    for r in records:
        text = tokenizer.apply_chat_template(r["prompt"], add_generation_prompt=True,
                                             tokenize=False)
        ids = tokenizer.encode(text, add_special_tokens=False)
        if len(ids) > max_length:
            raise DataError(f"prompt of {r['id']} has {len(ids)} tokens, more than "
                            f"data.max_prompt_length={max_length}")
        out.append(ids)
    return out
