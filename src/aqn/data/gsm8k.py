"""GSM8K from a directory of ``train.jsonl`` / ``test.jsonl`` (openai/grade-school-math
format: ``question`` and ``answer`` with the result after ``#### ``), prompted as verl does."""

from __future__ import annotations

from pathlib import Path

from aqn.data.jsonl import DataError, load_jsonl
from aqn.hashing import derive_seed

DATA_SOURCE = "openai/gsm8k"
INSTRUCTION = 'Let\'s think step by step and output the final answer after "####".'
SPLIT_FILES = {"train": "train.jsonl", "test": "test.jsonl"}


def ground_truth(answer: str) -> str:
    """The number after the last ``#### ``, commas removed (as verl extracts it)."""
    return answer.split("####")[-1].strip().replace(",", "")


def load_gsm8k(directory: str | Path, split: str, max_samples: int | None = None,
               seed: int = 0) -> list[dict]:
    """Records of one split; ``max_samples`` takes a seeded subset that is the same in every
    run and variant with that seed, so comparisons over it stay paired."""
    path = Path(directory) / SPLIT_FILES[split]
    if not path.exists():
        raise DataError(f"{path}: no such file (data.path must be a directory with "
                        "train.jsonl and test.jsonl in the GSM8K format)")
    rows = load_jsonl(path, required_keys=("question", "answer"))
    records = []
    for i, row in enumerate(rows):
        truth = ground_truth(row["answer"])
        if "####" not in row["answer"] or not truth:
            raise DataError(f"{path}: row {i + 1} has no '#### <answer>' in its answer")
        records.append({
            "id": f"gsm8k-{split}-{i}",
            "data_source": DATA_SOURCE,
            "question": row["question"],
            "answer": row["answer"],
            "ground_truth": truth,
            "prompt": [{"role": "user", "content": f"{row['question']} {INSTRUCTION}"}],
        })
    if max_samples is not None and max_samples < len(records):
        keep = sorted(range(len(records)), key=lambda i: derive_seed(seed, records[i]["id"]))
        records = [records[i] for i in sorted(keep[:max_samples])]
    return records
