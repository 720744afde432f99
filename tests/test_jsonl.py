import json
import re

import pytest

from aqn.data.jsonl import DataError, load_jsonl


def _write(tmp_path, text):
    path = tmp_path / "data.jsonl"
    path.write_text(text, encoding="utf-8")
    return path


def test_reads_rows_and_skips_blank_lines(tmp_path):
    rows = [{"question": "q1", "answer": "a1"}, {"question": "q2", "answer": "a2"}]
    path = _write(tmp_path, json.dumps(rows[0]) + "\n\n  \n" + json.dumps(rows[1]) + "\n")
    assert load_jsonl(path, ("question", "answer")) == rows


def test_malformed_line_names_file_and_line(tmp_path):
    path = _write(tmp_path, '{"question": "q"}\n\n{"question": \n')
    with pytest.raises(DataError, match=re.escape(f"{path}:3: ") + "malformed JSON"):
        load_jsonl(path, ("question",))


def test_missing_key_names_file_line_and_key(tmp_path):
    path = _write(tmp_path, '{"question": "q", "answer": "a"}\n{"question": "q"}\n')
    with pytest.raises(DataError, match=re.escape(f"{path}:2: ") + "missing required key 'answer'"):
        load_jsonl(path, ("question", "answer"))


def test_non_object_row(tmp_path):
    path = _write(tmp_path, "[1, 2]\n")
    with pytest.raises(DataError, match=re.escape(f"{path}:1: ") + "expected a JSON object"):
        load_jsonl(path)


@pytest.mark.parametrize("text", ["", "\n \n"])
def test_empty_dataset(tmp_path, text):
    path = _write(tmp_path, text)
    with pytest.raises(DataError, match="dataset is empty"):
        load_jsonl(path, ("question",))


def test_data_error_is_value_error():
    assert issubclass(DataError, ValueError)
