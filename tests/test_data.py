"""Tests for edge_runtime.data: the real CLINC150 and Banking77 files, and malformed inputs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from edge_runtime.data import (
    OOS_LABEL,
    Example,
    load_clinc150,
    load_csv,
    load_jsonl,
    load_split,
)
from edge_runtime.errors import DataFormatError

# The reference data sets are read in place, outside the repository, and never copied into it.
DATA_DIR = Path(__file__).resolve().parents[2] / "shared" / "data"
CLINC150_DIR = DATA_DIR / "clinc150"
BANKING77_DIR = DATA_DIR / "banking77"

needs_clinc150 = pytest.mark.skipif(
    not (CLINC150_DIR / "data_full.json").is_file(),
    reason=f"CLINC150 not found in {CLINC150_DIR}",
)
needs_banking77 = pytest.mark.skipif(
    not (BANKING77_DIR / "train.csv").is_file(),
    reason=f"Banking77 not found in {BANKING77_DIR}",
)


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8", newline="")
    return path


def write_clinc150(folder: Path, data: dict) -> Path:
    """Write data_full.json pretty-printed with an indent of 4, as the real file is."""
    return write(folder / "data_full.json", json.dumps(data, indent=4))


def clinc150_data(**overrides) -> dict:
    data = {
        "train": [["book a flight", "book_flight"], ["what's my balance", "balance"]],
        "val": [["fly me to rome", "book_flight"]],
        "test": [["how much money do i have", "balance"]],
        "oos_train": [["tell me a joke", "oos"]],
        "oos_val": [["sing a song", "oos"]],
        "oos_test": [["what is love", "oos"]],
    }
    data.update(overrides)
    return data


# In json.dumps(data, indent=4) the first key's value opens on line 2, its record 0 starts on
# line 3 and record 1 on line 7, because a two-string record takes four lines.
RECORD_0_LINE = 3
RECORD_1_LINE = 7


# ---------------------------------------------------------------------------------------------
# Real data sets


@needs_clinc150
def test_clinc150_train_size():
    examples = load_clinc150(CLINC150_DIR, "train")
    assert len(examples) == 15_100


@needs_clinc150
def test_clinc150_train_labels():
    labels = {example.label for example in load_clinc150(CLINC150_DIR, "train")}
    assert len(labels) == 151
    assert OOS_LABEL in labels


@needs_clinc150
def test_clinc150_oos_last():
    examples = load_clinc150(CLINC150_DIR, "train")
    labels = [example.label for example in examples]
    assert labels[-100:] == [OOS_LABEL] * 100
    assert OOS_LABEL not in labels[:15_000]


@needs_clinc150
def test_clinc150_val_size():
    assert len(load_clinc150(CLINC150_DIR, "val")) == 3_100


@needs_clinc150
def test_clinc150_test_size():
    assert len(load_clinc150(CLINC150_DIR, "test")) == 5_500


@needs_clinc150
def test_clinc150_without_oos():
    examples = load_clinc150(CLINC150_DIR, "train", include_oos=False)
    labels = {example.label for example in examples}
    assert len(examples) == 15_000
    assert len(labels) == 150
    assert OOS_LABEL not in labels


@needs_clinc150
def test_clinc150_file_path():
    from_file = load_clinc150(CLINC150_DIR / "data_full.json", "val")
    from_folder = load_clinc150(CLINC150_DIR, "val")
    assert from_file == from_folder


@needs_clinc150
def test_clinc150_first_record():
    examples = load_clinc150(CLINC150_DIR, "train")
    assert isinstance(examples[0], Example)
    assert examples[0].text == "what expression would i use to say i love you if i were an italian"
    assert examples[0].label == "translate"


@needs_clinc150
def test_clinc150_real_line(tmp_path):
    # Blank one text in a copy of the real file and check that the error points to the line
    # where its record starts, the line above the text.
    original = (CLINC150_DIR / "data_full.json").read_text(encoding="utf-8")
    target = '"what expression would i use to say i love you if i were an italian"'
    offset = original.index(target)
    text_line = original.count("\n", 0, offset) + 1
    write(tmp_path / "data_full.json", original.replace(target, '"   "', 1))

    with pytest.raises(DataFormatError) as info:
        load_clinc150(tmp_path, "train")
    assert info.value.line == text_line - 1
    assert info.value.field == "text"


@needs_banking77
def test_banking77_train_size():
    examples = load_csv(BANKING77_DIR / "train.csv", label_field="category")
    assert len(examples) == 10_003
    assert len({example.label for example in examples}) == 77


@needs_banking77
def test_banking77_test_size():
    examples = load_csv(BANKING77_DIR / "test.csv", label_field="category")
    assert len(examples) == 3_080
    assert len({example.label for example in examples}) == 77


@needs_banking77
def test_banking77_texts_stripped():
    # The raw file has texts with leading or trailing line breaks inside quoted fields.
    examples = load_csv(BANKING77_DIR / "train.csv", label_field="category")
    assert all(example.text == example.text.strip() for example in examples)
    assert all(example.text for example in examples)
    assert examples[0] == Example("I am still waiting on my card?", "card_arrival")


@needs_banking77
def test_banking77_default_label_field():
    with pytest.raises(DataFormatError) as info:
        load_csv(BANKING77_DIR / "train.csv")
    assert info.value.line == 1
    assert info.value.field == "label"
    assert "['text', 'category']" in str(info.value)


@needs_clinc150
def test_split_detects_clinc150():
    assert load_split(CLINC150_DIR, "test") == load_clinc150(CLINC150_DIR, "test")


@needs_banking77
def test_split_detects_banking77():
    expected = load_csv(BANKING77_DIR / "test.csv", label_field="category")
    assert load_split(BANKING77_DIR, "test") == expected


@needs_banking77
def test_split_missing_banking77_val():
    with pytest.raises(FileNotFoundError) as info:
        load_split(BANKING77_DIR, "val")
    message = str(info.value)
    assert str(BANKING77_DIR) in message
    assert "'val'" in message
    assert "data_full.json" in message
    assert "val.csv" in message
    assert "val.jsonl" in message


# ---------------------------------------------------------------------------------------------
# CLINC150 format errors


def test_clinc150_small_file(tmp_path):
    write_clinc150(tmp_path, clinc150_data())
    examples = load_clinc150(tmp_path, "train")
    assert examples == [
        Example("book a flight", "book_flight"),
        Example("what's my balance", "balance"),
        Example("tell me a joke", OOS_LABEL),
    ]


def test_clinc150_unknown_split(tmp_path):
    write_clinc150(tmp_path, clinc150_data())
    with pytest.raises(ValueError, match="unknown CLINC150 split 'dev'"):
        load_clinc150(tmp_path, "dev")


def test_clinc150_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_clinc150(tmp_path, "train")


def test_clinc150_invalid_json(tmp_path):
    # The comma after the first record is missing, so the decoder stops on line 4.
    path = write(
        tmp_path / "data_full.json",
        '{\n    "train": [\n        ["a", "b"]\n        ["c", "d"]\n    ]\n}\n',
    )
    with pytest.raises(DataFormatError) as info:
        load_clinc150(path, "train", include_oos=False)
    assert info.value.path == str(path)
    assert info.value.line == 4
    assert info.value.field is None
    assert "invalid JSON" in info.value.problem


def test_clinc150_empty_file(tmp_path):
    path = write(tmp_path / "data_full.json", "")
    with pytest.raises(DataFormatError) as info:
        load_clinc150(path, "train")
    assert info.value.line == 1


def test_clinc150_not_object(tmp_path):
    path = write(tmp_path / "data_full.json", '\n\n[["a", "b"]]\n')
    with pytest.raises(DataFormatError) as info:
        load_clinc150(path, "train")
    assert info.value.line == 3
    assert info.value.field is None
    assert "found a array" not in info.value.problem
    assert "found an array" in info.value.problem


def test_clinc150_missing_split(tmp_path):
    data = clinc150_data()
    del data["val"]
    path = write_clinc150(tmp_path, data)
    with pytest.raises(DataFormatError) as info:
        load_clinc150(path, "val")
    assert info.value.line is None
    assert info.value.field == "val"
    assert "missing key 'val'" in info.value.problem


def test_clinc150_missing_oos_split(tmp_path):
    data = clinc150_data()
    del data["oos_test"]
    write_clinc150(tmp_path, data)
    with pytest.raises(DataFormatError) as info:
        load_clinc150(tmp_path, "test")
    assert info.value.line is None
    assert info.value.field == "oos_test"


def test_clinc150_missing_oos_ignored(tmp_path):
    data = clinc150_data()
    del data["oos_test"]
    write_clinc150(tmp_path, data)
    examples = load_clinc150(tmp_path, "test", include_oos=False)
    assert examples == [Example("how much money do i have", "balance")]


def test_clinc150_split_not_list(tmp_path):
    write_clinc150(tmp_path, {"train": {"a": "b"}, "oos_train": []})
    with pytest.raises(DataFormatError) as info:
        load_clinc150(tmp_path, "train")
    assert info.value.line == 2
    assert info.value.field == "train"
    assert "found an object" in info.value.problem


def test_clinc150_record_three_items(tmp_path):
    data = clinc150_data(train=[["a", "b"], ["c", "d", "e"]])
    write_clinc150(tmp_path, data)
    with pytest.raises(DataFormatError) as info:
        load_clinc150(tmp_path, "train")
    assert info.value.line == RECORD_1_LINE
    assert info.value.field == "train[1]"
    assert "found an array of 3 items" in info.value.problem


def test_clinc150_record_not_list(tmp_path):
    data = clinc150_data(train=["just a string"])
    write_clinc150(tmp_path, data)
    with pytest.raises(DataFormatError) as info:
        load_clinc150(tmp_path, "train")
    assert info.value.line == RECORD_0_LINE
    assert info.value.field == "train[0]"
    assert "found a string" in info.value.problem


def test_clinc150_text_not_string(tmp_path):
    data = clinc150_data(train=[["a", "b"], [42, "d"]])
    write_clinc150(tmp_path, data)
    with pytest.raises(DataFormatError) as info:
        load_clinc150(tmp_path, "train")
    assert info.value.line == RECORD_1_LINE
    assert info.value.field == "text"
    assert "found a number" in info.value.problem


def test_clinc150_intent_not_string(tmp_path):
    data = clinc150_data(train=[["a", None]])
    write_clinc150(tmp_path, data)
    with pytest.raises(DataFormatError) as info:
        load_clinc150(tmp_path, "train")
    assert info.value.line == RECORD_0_LINE
    assert info.value.field == "intent"
    assert "found null" in info.value.problem


def test_clinc150_empty_text(tmp_path):
    data = clinc150_data(train=[["a", "b"], [" \t ", "d"]])
    write_clinc150(tmp_path, data)
    with pytest.raises(DataFormatError) as info:
        load_clinc150(tmp_path, "train")
    assert info.value.line == RECORD_1_LINE
    assert info.value.field == "text"
    assert "empty text" in info.value.problem


def test_clinc150_empty_intent(tmp_path):
    data = clinc150_data(train=[["a", ""]])
    write_clinc150(tmp_path, data)
    with pytest.raises(DataFormatError) as info:
        load_clinc150(tmp_path, "train")
    assert info.value.line == RECORD_0_LINE
    assert info.value.field == "intent"


def test_clinc150_oos_wrong_intent(tmp_path):
    data = clinc150_data(oos_train=[["tell me a joke", "joke"]])
    write_clinc150(tmp_path, {"oos_train": data["oos_train"], "train": data["train"]})
    with pytest.raises(DataFormatError) as info:
        load_clinc150(tmp_path, "train")
    assert info.value.line == RECORD_0_LINE
    assert info.value.field == "intent"
    assert "'joke'" in info.value.problem


def test_clinc150_in_scope_oos(tmp_path):
    data = clinc150_data(train=[["a", "b"], ["c", "oos"]])
    write_clinc150(tmp_path, data)
    with pytest.raises(DataFormatError) as info:
        load_clinc150(tmp_path, "train", include_oos=False)
    assert info.value.line == RECORD_1_LINE
    assert info.value.field == "intent"


def test_clinc150_later_key_line(tmp_path):
    # "val" comes after "train" with its two records, so its value opens on line 12.
    data = clinc150_data(val=[["ok", "b"], ["", "d"]])
    write_clinc150(tmp_path, data)
    with pytest.raises(DataFormatError) as info:
        load_clinc150(tmp_path, "val")
    assert info.value.line == 12 + 1 + 4
    assert info.value.field == "text"


def test_clinc150_tricky_strings(tmp_path):
    # Brackets, commas, quotes and escaped line breaks inside strings must not move the
    # record positions.
    tricky = ['a [b], "c"', "x"]
    data = clinc150_data(train=[tricky, ["line\nbreak ]]", "y"], ["z", 7]])
    write_clinc150(tmp_path, data)
    with pytest.raises(DataFormatError) as info:
        load_clinc150(tmp_path, "train")
    assert info.value.line == RECORD_1_LINE + 4
    assert info.value.field == "intent"


def test_clinc150_compact_line(tmp_path):
    # Written on one line, every record starts on line 1.
    path = write(tmp_path / "data_full.json", json.dumps(clinc150_data(train=[["a", 1]])))
    with pytest.raises(DataFormatError) as info:
        load_clinc150(path, "train")
    assert info.value.line == 1
    assert info.value.field == "intent"


def test_clinc150_strips_text(tmp_path):
    write_clinc150(tmp_path, clinc150_data(train=[["  padded text \n", " label "]]))
    examples = load_clinc150(tmp_path, "train", include_oos=False)
    assert examples == [Example("padded text", "label")]


def test_clinc150_invalid_utf8(tmp_path):
    path = tmp_path / "data_full.json"
    path.write_bytes(b'{\n"train": [\n["caf\xe9", "b"]\n]\n}\n')
    with pytest.raises(DataFormatError) as info:
        load_clinc150(path, "train")
    assert info.value.line == 3
    assert "invalid UTF-8" in info.value.problem


def test_clinc150_bom(tmp_path):
    path = tmp_path / "data_full.json"
    path.write_bytes(b"\xef\xbb\xbf" + json.dumps(clinc150_data()).encode("utf-8"))
    assert len(load_clinc150(path, "val")) == 2


# ---------------------------------------------------------------------------------------------
# CSV format errors


def test_csv_small_file(tmp_path):
    path = write(tmp_path / "train.csv", 'text,label\nhello,greet\n"a, quoted text",other\n')
    assert load_csv(path) == [Example("hello", "greet"), Example("a, quoted text", "other")]


def test_csv_bom_crlf(tmp_path):
    path = tmp_path / "train.csv"
    path.write_bytes(b"\xef\xbb\xbftext,label\r\nhello,greet\r\n")
    assert load_csv(path) == [Example("hello", "greet")]


def test_csv_blank_lines(tmp_path):
    path = write(tmp_path / "train.csv", "text,label\n\nhello,greet\n\n")
    assert load_csv(path) == [Example("hello", "greet")]


def test_csv_extra_column(tmp_path):
    path = write(tmp_path / "train.csv", "id,label,text\n1,greet,hello\n")
    assert load_csv(path) == [Example("hello", "greet")]


def test_csv_missing_column(tmp_path):
    path = write(tmp_path / "train.csv", "text,intent\nhello,greet\n")
    with pytest.raises(DataFormatError) as info:
        load_csv(path)
    assert info.value.path == str(path)
    assert info.value.line == 1
    assert info.value.field == "label"
    assert "['text', 'intent']" in info.value.problem


def test_csv_missing_text_column(tmp_path):
    path = write(tmp_path / "train.csv", "sentence,label\nhello,greet\n")
    with pytest.raises(DataFormatError) as info:
        load_csv(path)
    assert info.value.line == 1
    assert info.value.field == "text"


def test_csv_duplicate_column(tmp_path):
    path = write(tmp_path / "train.csv", "text,label,label\nhello,greet,wave\n")
    with pytest.raises(DataFormatError) as info:
        load_csv(path)
    assert info.value.line == 1
    assert info.value.field == "label"


def test_csv_empty_file(tmp_path):
    path = write(tmp_path / "train.csv", "")
    with pytest.raises(DataFormatError) as info:
        load_csv(path)
    assert info.value.line is None
    assert "empty file" in info.value.problem


def test_csv_header_only(tmp_path):
    path = write(tmp_path / "train.csv", "text,label\n")
    assert load_csv(path) == []


def test_csv_too_many_fields(tmp_path):
    path = write(tmp_path / "train.csv", "text,label\nhello,greet\nhi, there,greet\n")
    with pytest.raises(DataFormatError) as info:
        load_csv(path)
    assert info.value.line == 3
    assert info.value.field is None
    assert "found 3" in info.value.problem


def test_csv_too_few_fields(tmp_path):
    path = write(tmp_path / "train.csv", "text,label\nhello\n")
    with pytest.raises(DataFormatError) as info:
        load_csv(path)
    assert info.value.line == 2
    assert "found 1" in info.value.problem


def test_csv_line_after_multiline(tmp_path):
    # The quoted text of the first row spans lines 2 to 4, so the bad row is on line 5.
    path = write(tmp_path / "train.csv", 'text,label\n"one\ntwo\nthree",greet\nbad\n')
    with pytest.raises(DataFormatError) as info:
        load_csv(path)
    assert info.value.line == 5


def test_csv_multiline_row_start(tmp_path):
    # An error in a row whose text spans lines is reported at the line where the row starts.
    path = write(tmp_path / "train.csv", 'text,label\nhello,greet\n"\n\n",greet\n')
    with pytest.raises(DataFormatError) as info:
        load_csv(path)
    assert info.value.line == 3
    assert info.value.field == "text"


def test_csv_empty_label(tmp_path):
    path = write(tmp_path / "train.csv", "text,label\nhello,greet\nhi,  \n")
    with pytest.raises(DataFormatError) as info:
        load_csv(path)
    assert info.value.line == 3
    assert info.value.field == "label"
    assert "empty label" in info.value.problem


def test_csv_empty_text(tmp_path):
    path = write(tmp_path / "train.csv", 'text,label\n"   ",greet\n')
    with pytest.raises(DataFormatError) as info:
        load_csv(path)
    assert info.value.line == 2
    assert info.value.field == "text"


def test_csv_empty_category(tmp_path):
    path = write(tmp_path / "train.csv", "text,category\nhello,\n")
    with pytest.raises(DataFormatError) as info:
        load_csv(path, label_field="category")
    assert info.value.line == 2
    assert info.value.field == "category"


def test_csv_stray_quote(tmp_path):
    path = write(tmp_path / "train.csv", 'text,label\nhello,greet\n"hi" there,greet\n')
    with pytest.raises(DataFormatError) as info:
        load_csv(path)
    assert info.value.line == 3
    assert "invalid CSV" in info.value.problem


def test_csv_invalid_utf8(tmp_path):
    path = tmp_path / "train.csv"
    path.write_bytes(b"text,label\nhello,greet\ncaf\xe9,order\n")
    with pytest.raises(DataFormatError) as info:
        load_csv(path)
    assert info.value.line == 3
    assert "invalid UTF-8" in info.value.problem


# ---------------------------------------------------------------------------------------------
# JSON Lines format errors


def test_jsonl_small_file(tmp_path):
    path = write(
        tmp_path / "train.jsonl",
        '{"text": " hello ", "label": "greet", "id": 1}\n\n   \n{"text": "bye", "label": "part"}',
    )
    assert load_jsonl(path) == [Example("hello", "greet"), Example("bye", "part")]


def test_jsonl_custom_fields(tmp_path):
    path = write(tmp_path / "train.jsonl", '{"query": "hello", "intent": "greet"}\n')
    examples = load_jsonl(path, text_field="query", label_field="intent")
    assert examples == [Example("hello", "greet")]


def test_jsonl_invalid_json(tmp_path):
    path = write(tmp_path / "train.jsonl", '{"text": "a", "label": "b"}\n\n{"text": "c", \n')
    with pytest.raises(DataFormatError) as info:
        load_jsonl(path)
    assert info.value.path == str(path)
    assert info.value.line == 3
    assert info.value.field is None
    assert "invalid JSON" in info.value.problem


def test_jsonl_not_object(tmp_path):
    path = write(tmp_path / "train.jsonl", '{"text": "a", "label": "b"}\n["c", "d"]\n')
    with pytest.raises(DataFormatError) as info:
        load_jsonl(path)
    assert info.value.line == 2
    assert info.value.field is None
    assert "found an array" in info.value.problem


def test_jsonl_missing_label(tmp_path):
    path = write(tmp_path / "train.jsonl", '{"text": "a", "label": "b"}\n{"text": "c"}\n')
    with pytest.raises(DataFormatError) as info:
        load_jsonl(path)
    assert info.value.line == 2
    assert info.value.field == "label"
    assert "missing field" in info.value.problem


def test_jsonl_missing_text(tmp_path):
    path = write(tmp_path / "train.jsonl", '{"label": "b"}\n')
    with pytest.raises(DataFormatError) as info:
        load_jsonl(path)
    assert info.value.line == 1
    assert info.value.field == "text"


def test_jsonl_label_not_string(tmp_path):
    path = write(tmp_path / "train.jsonl", '{"text": "a", "label": 3}\n')
    with pytest.raises(DataFormatError) as info:
        load_jsonl(path)
    assert info.value.line == 1
    assert info.value.field == "label"
    assert "found a number" in info.value.problem


def test_jsonl_empty_text(tmp_path):
    text = '\n{"text": "a", "label": "b"}\n{"text": " ", "label": "b"}\n'
    path = write(tmp_path / "train.jsonl", text)
    with pytest.raises(DataFormatError) as info:
        load_jsonl(path)
    assert info.value.line == 3
    assert info.value.field == "text"


def test_jsonl_empty_label(tmp_path):
    path = write(tmp_path / "train.jsonl", '{"text": "a", "label": ""}\n')
    with pytest.raises(DataFormatError) as info:
        load_jsonl(path)
    assert info.value.line == 1
    assert info.value.field == "label"


def test_jsonl_crlf(tmp_path):
    text = '{"text": "a", "label": "b"}\r\n{"text": "c", "label": "d"}\r\n'
    path = write(tmp_path / "train.jsonl", text)
    assert load_jsonl(path) == [Example("a", "b"), Example("c", "d")]


# ---------------------------------------------------------------------------------------------
# Format detection


def test_split_csv_label(tmp_path):
    write(tmp_path / "val.csv", "text,label\nhello,greet\n")
    assert load_split(tmp_path, "val") == [Example("hello", "greet")]


def test_split_csv_category(tmp_path):
    write(tmp_path / "val.csv", "text,category\nhello,greet\n")
    assert load_split(tmp_path, "val") == [Example("hello", "greet")]


def test_split_csv_no_label(tmp_path):
    path = write(tmp_path / "val.csv", "text,intent\nhello,greet\n")
    with pytest.raises(DataFormatError) as info:
        load_split(tmp_path, "val")
    assert info.value.path == str(path)
    assert info.value.line == 1
    assert info.value.field == "label"
    assert "['text', 'intent']" in info.value.problem


def test_split_csv_no_text(tmp_path):
    write(tmp_path / "val.csv", "query,label\nhello,greet\n")
    with pytest.raises(DataFormatError) as info:
        load_split(tmp_path, "val")
    assert info.value.line == 1
    assert info.value.field == "text"


def test_split_jsonl(tmp_path):
    write(tmp_path / "test.jsonl", '{"text": "hello", "label": "greet"}\n')
    assert load_split(tmp_path, "test") == [Example("hello", "greet")]


def test_split_clinc150_first(tmp_path):
    write_clinc150(tmp_path, clinc150_data())
    write(tmp_path / "val.csv", "text,label\nhello,greet\n")
    examples = load_split(tmp_path, "val")
    assert examples == [
        Example("fly me to rome", "book_flight"),
        Example("sing a song", OOS_LABEL),
    ]


def test_split_csv_before_jsonl(tmp_path):
    write(tmp_path / "val.csv", "text,label\nfrom csv,greet\n")
    write(tmp_path / "val.jsonl", '{"text": "from jsonl", "label": "greet"}\n')
    assert load_split(tmp_path, "val") == [Example("from csv", "greet")]


def test_split_missing(tmp_path):
    write(tmp_path / "train.csv", "text,label\nhello,greet\n")
    with pytest.raises(FileNotFoundError) as info:
        load_split(tmp_path, "test")
    message = str(info.value)
    assert str(tmp_path) in message
    assert "'test'" in message
    assert "test.csv" in message
    assert "test.jsonl" in message
    assert "data_full.json" in message


def test_split_missing_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        load_split(tmp_path / "absent", "train")


def test_split_invalid_name(tmp_path):
    with pytest.raises(ValueError, match="invalid split name"):
        load_split(tmp_path, "../train")


def test_split_clinc150_unknown(tmp_path):
    write_clinc150(tmp_path, clinc150_data())
    with pytest.raises(ValueError, match="unknown CLINC150 split"):
        load_split(tmp_path, "dev")
