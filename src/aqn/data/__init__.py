"""Tasks: records with a chat prompt, a ground truth and a data source."""

from __future__ import annotations

from collections.abc import Sequence

from aqn.data.arith import make_split
from aqn.data.gsm8k import load_gsm8k
from aqn.data.jsonl import DataError
from aqn.data.prompts import DEFAULT_STYLE, build_prompt

SOURCES = ("arith", "gsm8k")


def load_task(source: str, max_train_samples: int | None, max_val_samples: int | None,
              seed: int, difficulty: Sequence[int] = (1, 2, 3), path: str | None = None,
              prompt_style: str | None = None, wording: str = "words"
              ) -> tuple[list[dict], list[dict]]:
    """(train, validation) records of a task; validation never overlaps training.

    arith: that many generated problems per split, in ``wording``. gsm8k: the files under
    ``path``, or a seeded subset of that many rows. ``prompt_style`` (null: the source's
    default) decides the chat messages of each record.
    """
    train, val = _load_source(source, max_train_samples, max_val_samples, seed, difficulty,
                              path, wording)
    style = prompt_style or DEFAULT_STYLE[source]
    for record in train + val:
        record["prompt"] = build_prompt(record["question"], style)
    return train, val


def train_size(source: str, path: str | None, max_train_samples: int | None) -> int:
    """How many train prompts ``load_task`` gives (an epoch's prompts)."""
    if source == "arith":
        if max_train_samples is None:
            raise DataError("the arith task needs data.max_train_samples")
        return max_train_samples
    return len(_load_source(source, max_train_samples, 1, 0, (), path, "words")[0])


def _load_source(source, max_train_samples, max_val_samples, seed, difficulty, path, wording):
    if source == "arith":
        if max_train_samples is None or max_val_samples is None:
            raise DataError("the arith task needs data.max_train_samples and "
                            "data.max_val_samples (how many problems to generate)")
        difficulty = tuple(difficulty)
        return tuple(make_split(split, n, seed=seed, difficulty=difficulty, wording=wording)
                     for split, n in (("train", max_train_samples), ("test", max_val_samples)))
    if source == "gsm8k":
        if path is None:
            raise DataError("data.source=gsm8k needs data.path: a directory with train.jsonl "
                            "and test.jsonl (e.g. ../shared/data/gsm8k)")
        return (load_gsm8k(path, "train", max_train_samples, seed),
                load_gsm8k(path, "test", max_val_samples, seed))
    raise DataError(f"unknown data source {source!r}; known: {', '.join(SOURCES)}")


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
