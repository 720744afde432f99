"""GSM8K from a directory of ``train.jsonl`` / ``test.jsonl`` (openai/grade-school-math
format: ``question`` and ``answer`` with the result after ``#### ``), or from the HF hub
(``data.path: openai/gsm8k``, needs network and the ``datasets`` package); prompted as verl
does unless another prompt style is chosen."""

from __future__ import annotations

from pathlib import Path

from aqn.data.jsonl import DataError, load_jsonl_lines
from aqn.data.prompts import build_prompt
from aqn.hashing import derive_seed

DATA_SOURCE = "openai/gsm8k"
SPLIT_FILES = {"train": "train.jsonl", "test": "test.jsonl"}


def ground_truth(answer: str) -> str:
    """The number after the last ``#### ``, commas removed (as verl extracts it)."""
    return answer.split("####")[-1].strip().replace(",", "")


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def load_gsm8k(directory: str | Path, split: str, max_samples: int | None = None,
               seed: int = 0) -> list[dict]:
    """Records of one split; ``max_samples`` takes a seeded subset that is the same in every
    run and variant with that seed, so comparisons over it stay paired."""
    path = Path(directory) / SPLIT_FILES[split]
    if path.exists():
        rows = load_jsonl_lines(path, required_keys=("question", "answer"))
        where = [f"{path}:{lineno}" for lineno, _ in rows]
        rows = [row for _, row in rows]
    elif str(directory) == DATA_SOURCE:
        rows = _hub_rows(split)
        where = [f"{DATA_SOURCE} {split} row {i + 1}" for i in range(len(rows))]
    else:
        raise DataError(f"{path}: no such file (data.path must be a directory with "
                        f"train.jsonl and test.jsonl in the GSM8K format, or {DATA_SOURCE} "
                        "for the hub copy)")
    records = []
    for i, row in enumerate(rows):
        for key in ("question", "answer"):
            if not isinstance(row[key], str) or not row[key].strip():
                raise DataError(f"{where[i]}: {key!r} must be a non-empty string, got "
                                f"{row[key]!r}")
        truth = ground_truth(row["answer"])
        if "####" not in row["answer"] or not truth:
            raise DataError(f"{where[i]}: the answer has no '#### <answer>'")
        if not _is_number(truth):
            raise DataError(f"{where[i]}: the answer after '####' must be a number (no reward "
                            f"can match {truth!r})")
        records.append({
            "id": f"gsm8k-{split}-{i}",
            "data_source": DATA_SOURCE,
            "question": row["question"],
            "answer": row["answer"],
            "ground_truth": truth,
            "prompt": build_prompt(row["question"], "verl"),
        })
    if max_samples is not None and max_samples < len(records):
        keep = sorted(range(len(records)), key=lambda i: derive_seed(seed, records[i]["id"]))
        records = [records[i] for i in sorted(keep[:max_samples])]
    return records


def _hub_rows(split: str) -> list[dict]:
    try:
        import datasets
    except ImportError:
        raise DataError(f"data.path={DATA_SOURCE} loads from the HF hub and needs the datasets "
                        "package (pip install datasets); or pass a local copy: data.path=DIR, "
                        "a directory with train.jsonl and test.jsonl") from None
    try:
        return list(datasets.load_dataset(DATA_SOURCE, "main", split=split))
    except Exception as e:  # offline, or the hub refused: say what to do instead
        raise DataError(f"cannot load {DATA_SOURCE} from the hub ({type(e).__name__}: {e}); "
                        "with no network, pass a local copy: data.path=DIR, a directory with "
                        "train.jsonl and test.jsonl (GSM8K's own files)") from None
