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


def test_a_torn_last_line_is_left_out_only_when_asked(tmp_path):
    path = _write(tmp_path, '{"a": 1}\n{"a": 2}\n{"a": 3, "b"')  # writer killed mid-line
    assert load_jsonl(path, torn_tail_ok=True) == [{"a": 1}, {"a": 2}]
    with pytest.raises(DataError, match=re.escape(f"{path}:3: ") + "malformed JSON"):
        load_jsonl(path)
    whole = _write(tmp_path, '{"a": 1}\n{"a": 2}')  # a complete last line without "\n"
    assert load_jsonl(whole, torn_tail_ok=True) == [{"a": 1}, {"a": 2}]
    bad = _write(tmp_path, '{"a": 1}\n{oops\n{"a": 3')  # only the last line may be torn
    with pytest.raises(DataError, match=re.escape(f"{bad}:2: ")):
        load_jsonl(bad, torn_tail_ok=True)
