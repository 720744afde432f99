"""Strict JSONL loading: bad data fails loudly, naming the file and line."""

import json
from pathlib import Path

from aqn.errors import InputError


class DataError(InputError):
    """A dataset file is empty or has a malformed or incomplete row."""


def load_jsonl(path: str | Path, required_keys: tuple[str, ...] = (),
               allow_empty: bool = False, torn_tail_ok: bool = False) -> list[dict]:
    """Read one JSON object per line, skipping blank lines.

    Raises DataError on a line that is not a JSON object, a row missing one of
    `required_keys`, or (unless `allow_empty`) a file with no rows.
    """
    return [row for _, row in load_jsonl_lines(path, required_keys, allow_empty, torn_tail_ok)]


def load_jsonl_lines(path: str | Path, required_keys: tuple[str, ...] = (),
                     allow_empty: bool = False, torn_tail_ok: bool = False
                     ) -> list[tuple[int, dict]]:
    """``load_jsonl`` with the line number of each row, for errors that name it.

    ``torn_tail_ok``: a last line without its newline that does not parse (a log whose
    writer was killed, or is still writing) is left out instead of raising.
    """
    rows = []
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            if torn_tail_ok and not raw.endswith(b"\n"):
                try:
                    json.loads(raw)
                except ValueError:
                    break
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise DataError(f"{path}:{lineno}: not UTF-8 text (byte {e.start + 1} of the "
                                "line)") from None
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{lineno}: malformed JSON: {e.msg}") from e
            if not isinstance(row, dict):
                raise DataError(
                    f"{path}:{lineno}: expected a JSON object, got {type(row).__name__}"
                )
            for key in required_keys:
                if key not in row:
                    raise DataError(f"{path}:{lineno}: missing required key {key!r}")
            rows.append((lineno, row))
    if not rows and not allow_empty:
        raise DataError(f"{path}: dataset is empty")
    return rows
