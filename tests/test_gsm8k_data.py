import json
from pathlib import Path

import pytest

from aqn.data import DataError, encode_prompts, load_task
from aqn.data.gsm8k import ground_truth, load_gsm8k
from aqn.data.prompts import VERL_INSTRUCTION as INSTRUCTION
from aqn.models import build_tiny
from aqn.rewards import get_reward_fn

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "gsm8k"


def write_split(d: Path, name: str, rows: list) -> None:
    d.mkdir(exist_ok=True)
    (d / name).write_text("".join(r if isinstance(r, str) else json.dumps(r) + "\n"
                                  for r in rows))


ROW = {"question": "What is 1,000 + 234?", "answer": "1000+234=1234\n#### 1,234"}


def test_ground_truth_as_verl():
    assert ground_truth("a\n#### 1,234") == "1234"
    assert ground_truth("#### -5") == "-5"


def test_records_and_prompt(tmp_path):
    write_split(tmp_path, "train.jsonl", [ROW, ROW])
    write_split(tmp_path, "test.jsonl", [ROW])
    train, val = load_task("gsm8k", None, None, 0, path=str(tmp_path))
    assert len(train) == 2 and len(val) == 1
    assert val[0]["ground_truth"] == "1234" and val[0]["data_source"] == "openai/gsm8k"
    assert val[0]["prompt"] == [{"role": "user",
                                 "content": f"What is 1,000 + 234? {INSTRUCTION}"}]
    reward = get_reward_fn("openai/gsm8k")
    assert reward(ROW["answer"], val[0]["ground_truth"]) == 1.0
    assert reward("so #### 1235", val[0]["ground_truth"]) == 0.0


def test_malformed_row_names_file_and_line(tmp_path):
    write_split(tmp_path, "train.jsonl", [ROW, "{not json\n"])
    write_split(tmp_path, "test.jsonl", [ROW])
    with pytest.raises(DataError, match=r"train.jsonl:2: malformed JSON"):
        load_task("gsm8k", None, None, 0, path=str(tmp_path))
    write_split(tmp_path, "train.jsonl", [ROW, {"question": "q"}])
    with pytest.raises(DataError, match=r"train.jsonl:2: missing required key 'answer'"):
        load_task("gsm8k", None, None, 0, path=str(tmp_path))
    write_split(tmp_path, "train.jsonl", [{"question": "q", "answer": "no marker"}])
    with pytest.raises(DataError, match=r"train.jsonl:1: the answer has no '#### <answer>'"):
        load_task("gsm8k", None, None, 0, path=str(tmp_path))


@pytest.mark.parametrize("row, message", [
    ({"question": None, "answer": "#### 3"}, "'question' must be a non-empty string, got None"),
    ({"question": "  ", "answer": "#### 3"}, "'question' must be a non-empty string"),
    ({"question": "q", "answer": 3}, "'answer' must be a non-empty string, got 3"),
    ({"question": "q", "answer": "so #### two"},
     "the answer after '####' must be a number .*'two'"),
])
def test_rows_that_can_never_be_right_are_refused_with_their_line(tmp_path, row, message):
    write_split(tmp_path, "train.jsonl", [ROW, "\n", row])  # the blank line still counts
    write_split(tmp_path, "test.jsonl", [ROW])
    with pytest.raises(DataError, match=r"train.jsonl:3: " + message):
        load_task("gsm8k", None, None, 0, path=str(tmp_path))


def test_non_utf8_data_names_file_and_line(tmp_path):
    write_split(tmp_path, "train.jsonl", [ROW])
    write_split(tmp_path, "test.jsonl", [ROW])
    with open(tmp_path / "train.jsonl", "ab") as f:
        f.write(b'{"question": "caf\xe9", "answer": "#### 1"}\n')
    with pytest.raises(DataError, match=r"train.jsonl:2: not UTF-8 text"):
        load_task("gsm8k", None, None, 0, path=str(tmp_path))


def test_empty_dataset_and_missing_dir(tmp_path):
    write_split(tmp_path, "train.jsonl", [ROW])
    write_split(tmp_path, "test.jsonl", ["\n"])
    with pytest.raises(DataError, match="test.jsonl: dataset is empty"):
        load_task("gsm8k", None, None, 0, path=str(tmp_path))
    with pytest.raises(DataError, match="no such file"):
        load_task("gsm8k", None, None, 0, path=str(tmp_path / "nope"))
    with pytest.raises(DataError, match="needs data.path"):
        load_task("gsm8k", None, None, 0)


def test_prompt_too_long_is_an_error():
    _, tokenizer = build_tiny()
    rec = {"id": "x", "prompt": [{"role": "user", "content": "a" * 50}]}
    assert len(encode_prompts(tokenizer, [rec], 100)[0]) == 50 + 3  # <|user|> ... </s><|assistant|>
    with pytest.raises(DataError, match="prompt of x has 53 tokens"):
        encode_prompts(tokenizer, [rec], 52)


@pytest.mark.skipif(not SHARED.exists(), reason="shared GSM8K files not present")
def test_real_gsm8k_subset_is_seeded_and_stable():
    full = load_gsm8k(SHARED, "test")
    assert len(full) == 1319
    a = load_gsm8k(SHARED, "test", max_samples=50, seed=3)
    b = load_gsm8k(SHARED, "test", max_samples=50, seed=3)
    c = load_gsm8k(SHARED, "test", max_samples=50, seed=4)
    assert [r["id"] for r in a] == [r["id"] for r in b] != [r["id"] for r in c]
    assert len({r["id"] for r in a}) == 50
