"""Tests for the [data] keys of a build config (export.config), reading the splits they name
(export.dataset), edge_runtime.data.load_examples and eval on a CSV with other column names."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from edge_runtime.data import Example, load_examples, load_split
from edge_runtime.errors import ConfigError, DataFormatError
from edge_runtime.evaluate import out_of_scope_label as package_out_of_scope_label
from export.config import load_config, parse_config
from export.dataset import carve_validation, load_splits, out_of_scope_label, resolve_sources
from tests.conftest import CLI_TRUST, CLINC150_DIR, DATA_DIR, ROOT

BANKING77_DIR = DATA_DIR / "banking77"
BANKING77_CONFIG = ROOT / "export" / "configs" / "banking77.toml"


def write_csv(path: Path, rows: list[tuple[str, str]], header=("text", "label")) -> Path:
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows(rows)
    return path


def write_jsonl(path: Path, rows: list[tuple[str, str]], fields=("text", "label")) -> Path:
    with open(path, "w", encoding="utf-8") as handle:
        for text, label in rows:
            handle.write(json.dumps({fields[0]: text, fields[1]: label}) + "\n")
    return path


def rows(per_label: int, prefix: str, labels=("balance", "transfer", "alarm")) -> list:
    return [
        (f"{prefix} query {i} for {label}", label) for label in labels for i in range(per_label)
    ]


def data_config(folder: Path | str, **data):
    return parse_config({"data": {"path": str(folder), **data}}).data


# [data] keys rejected by parse_config, each naming the key


@pytest.mark.parametrize(
    ("data", "key"),
    [
        ({"fromat": "csv"}, "fromat"),
        ({"validation_fraction": "0.1"}, "data.validation_fraction"),
        ({"text_field": 3}, "data.text_field"),
        ({"split_seed": 1.5}, "data.split_seed"),
        ({"format": "xml"}, "data.format"),
        ({"validation": "holdout"}, "data.validation"),
        ({"validation_fraction": 0.0}, "data.validation_fraction"),
        ({"validation_fraction": 0.6}, "data.validation_fraction"),
        ({"validation_fraction": -0.1}, "data.validation_fraction"),
        ({"min_examples_per_label": 0}, "data.min_examples_per_label"),
        ({"format": "clinc150", "train_file": "train.csv"}, "data.train_file"),
        ({"format": "clinc150", "out_of_scope_label": "none"}, "data.out_of_scope_label"),
        ({"train_file": "train.txt"}, "data.format"),
        ({"test_file": "   "}, "data.test_file"),
        ({"label_field": "text"}, "data.label_field"),
        ({"text_field": ""}, "data.text_field"),
        ({"validation": "carve", "validation_file": "val.csv"}, "data.validation_file"),
        ({"train_split": "../train"}, "data.train_split"),
    ],
)
def test_invalid_data_key(data, key):
    with pytest.raises(ConfigError, match=key):
        data_config("data", **data)


def test_fraction_error_says_range():
    with pytest.raises(ConfigError, match=r"above 0 and at most 0\.5"):
        data_config("data", validation_fraction=1.0)


def test_format_error_lists_formats(tmp_path):
    path = tmp_path / "build.toml"
    path.write_text('[data]\npath = "x"\nformat = "tsv"\n', encoding="utf-8")

    with pytest.raises(ConfigError, match="'auto', 'clinc150', 'csv', 'jsonl'") as caught:
        load_config(path)
    assert str(path) in str(caught.value)


def test_data_defaults():
    data = data_config("data")

    assert data.format == "auto"
    assert (data.train_file, data.validation_file, data.test_file) == ("", "", "")
    assert (data.text_field, data.label_field) == ("text", "label")
    assert data.validation == "auto"
    assert data.validation_fraction == 0.1
    assert data.split_seed == 0
    assert data.out_of_scope_label == ""
    assert data.min_examples_per_label == 10


@pytest.mark.parametrize(
    ("path", "name"),
    [
        ("../shared/data/banking77", "banking77"),
        ("data/clinc150/data_full.json", "clinc150"),
        ("data/Support Tickets 2024/", "Support-Tickets-2024"),
    ],
)
def test_output_defaults_from_data_folder(path, name):
    config = parse_config({"data": {"path": path}})

    assert config.output.name == name
    assert config.output.dir == f"build/{name}"


def test_output_keys_kept():
    config = parse_config({"data": {"path": "data/x"}, "output": {"name": "support"}})
    assert config.output.dir == "build/support"

    config = parse_config({"data": {"path": "data/x"}, "output": {"dir": "out", "name": "s"}})
    assert (config.output.dir, config.output.name) == ("out", "s")


def test_explicit_format_accepts_any_suffix():
    data = data_config("data", format="csv", train_file="train.txt", test_file="test.tsv")

    assert data.train_file == "train.txt"


# Finding and reading the split files


def test_csv_folder_carves_validation(tmp_path):
    write_csv(tmp_path / "train.csv", rows(20, "train"))
    write_csv(tmp_path / "test.csv", rows(5, "test"))

    train, validation, test = load_splits(data_config(tmp_path))
    assert len(train) == 54
    assert Counter(e.label for e in validation) == {"balance": 2, "transfer": 2, "alarm": 2}
    assert len(test) == 15
    assert resolve_sources(data_config(tmp_path)).validation is None


def test_validation_file_found(tmp_path):
    write_csv(tmp_path / "train.csv", rows(20, "train"))
    write_csv(tmp_path / "val.csv", rows(4, "val"))
    write_csv(tmp_path / "test.csv", rows(5, "test"))

    train, validation, _ = load_splits(data_config(tmp_path))
    assert len(train) == 60
    assert validation[0].text == "val query 0 for balance"


def test_carve_ignores_validation_file(tmp_path):
    write_csv(tmp_path / "train.csv", rows(20, "train"))
    write_csv(tmp_path / "val.csv", rows(4, "val"))
    write_csv(tmp_path / "test.csv", rows(5, "test"))

    train, validation, _ = load_splits(data_config(tmp_path, validation="carve"))
    assert len(train) == 54
    assert all(e.text.startswith("train") for e in validation)


def test_validation_file_required(tmp_path):
    write_csv(tmp_path / "train.csv", rows(20, "train"))
    write_csv(tmp_path / "test.csv", rows(5, "test"))

    with pytest.raises(ConfigError, match=r"data\.validation_file: no file for split 'val'"):
        load_splits(data_config(tmp_path, validation="file"))


def test_named_files_and_fields(tmp_path):
    (tmp_path / "exports").mkdir()
    header = ("utterance", "intent")
    write_csv(tmp_path / "exports" / "tickets-2024.csv", rows(20, "train"), header)
    write_jsonl(tmp_path / "held-out.jsonl", rows(5, "test"), header)
    data = data_config(
        tmp_path,
        train_file="exports/tickets-2024.csv",
        test_file="held-out.jsonl",
        text_field="utterance",
        label_field="intent",
    )

    sources = resolve_sources(data)
    assert (sources.train.data_format, sources.test.data_format) == ("csv", "jsonl")
    train, validation, test = load_splits(data)
    assert len(train) + len(validation) == 60
    assert test[0] == Example("test query 0 for balance", "balance")


def test_jsonl_folder(tmp_path):
    write_jsonl(tmp_path / "train.jsonl", rows(20, "train"))
    write_jsonl(tmp_path / "test.jsonl", rows(5, "test"))

    train, _, test = load_splits(data_config(tmp_path, format="jsonl"))
    assert len(train) == 54
    assert len(test) == 15


def test_missing_path(tmp_path):
    with pytest.raises(ConfigError, match=r"data\.path: folder .*absent.* not found"):
        load_splits(data_config(tmp_path / "absent"))


def test_missing_train_file(tmp_path):
    write_csv(tmp_path / "test.csv", rows(5, "test"))

    with pytest.raises(
        ConfigError,
        match=r"data\.train_file: no file for split 'train'.*"
        r"'train\.csv' or 'train\.jsonl'",
    ):
        load_splits(data_config(tmp_path))


def test_missing_named_file(tmp_path):
    write_csv(tmp_path / "test.csv", rows(5, "test"))

    with pytest.raises(ConfigError, match=r"data\.train_file: file .*tickets\.csv' not found"):
        load_splits(data_config(tmp_path, train_file="tickets.csv"))


def test_path_is_a_file(tmp_path):
    path = write_csv(tmp_path / "train.csv", rows(20, "train"))

    with pytest.raises(ConfigError, match=r"data\.path: .* is a file"):
        load_splits(data_config(path))


def test_missing_label_column_names_key(tmp_path):
    write_csv(tmp_path / "train.csv", rows(20, "train"), ("text", "category"))
    write_csv(tmp_path / "test.csv", rows(5, "test"), ("text", "category"))

    with pytest.raises(
        ConfigError,
        match=r"data\.label_field is 'label'.*"
        r"\['text', 'category'\].*set data\.label_field",
    ):
        load_splits(data_config(tmp_path))


def test_missing_text_key_names_key(tmp_path):
    write_jsonl(tmp_path / "train.jsonl", rows(20, "train"), ("query", "label"))
    write_jsonl(tmp_path / "test.jsonl", rows(5, "test"), ("query", "label"))

    with pytest.raises(
        ConfigError,
        match=r"data\.text_field is 'text'.*'query'.*key that "
        r"contains the query text",
    ):
        load_splits(data_config(tmp_path))


def test_later_missing_key_stays_data_error(tmp_path):
    path = write_jsonl(tmp_path / "train.jsonl", rows(20, "train"))
    with open(path, "a", encoding="utf-8") as handle:
        handle.write(json.dumps({"txt": "typo in the key", "label": "alarm"}) + "\n")
    write_jsonl(tmp_path / "test.jsonl", rows(5, "test"))

    with pytest.raises(DataFormatError, match="line 61, field 'text': missing field"):
        load_splits(data_config(tmp_path))


def test_malformed_row_stays_data_error(tmp_path):
    (tmp_path / "train.csv").write_text("text,label\nhello,a,extra\n", encoding="utf-8")
    write_csv(tmp_path / "test.csv", rows(5, "test"))

    with pytest.raises(DataFormatError, match="line 2"):
        load_splits(data_config(tmp_path))


def test_clinc150_folder_and_file(tmp_path):
    layout = {
        "train": [["what is my balance", "balance"], ["set an alarm", "alarm"]],
        "val": [["balance please", "balance"]],
        "test": [["wake me up", "alarm"]],
        "oos_train": [["tell me a joke", "oos"]],
        "oos_val": [],
        "oos_test": [],
    }
    (tmp_path / "data_full.json").write_text(json.dumps(layout), encoding="utf-8")

    for path in (tmp_path, tmp_path / "data_full.json"):
        data = data_config(path)
        train, validation, test = load_splits(data)
        assert [e.label for e in train] == ["balance", "alarm", "oos"]
        assert len(validation) == 1
        assert len(test) == 1
        assert out_of_scope_label(data) == "oos"


def test_clinc150_other_out_of_scope_label(tmp_path):
    layout = {key: [] for key in ("train", "val", "test", "oos_train", "oos_val", "oos_test")}
    (tmp_path / "data_full.json").write_text(json.dumps(layout), encoding="utf-8")

    with pytest.raises(ConfigError, match=r"data\.out_of_scope_label is 'other'"):
        resolve_sources(data_config(tmp_path, out_of_scope_label="other"))


def test_clinc150_format_needs_file(tmp_path):
    write_csv(tmp_path / "train.csv", rows(20, "train"))

    with pytest.raises(ConfigError, match=r"no data_full\.json, but data\.format is 'clinc150'"):
        resolve_sources(data_config(tmp_path, format="clinc150"))


def test_out_of_scope_label_of_csv(tmp_path):
    write_csv(tmp_path / "train.csv", rows(20, "train"))

    assert out_of_scope_label(data_config(tmp_path)) == ""
    assert out_of_scope_label(data_config(tmp_path, out_of_scope_label="other")) == "other"


# The stratified, seeded carve


def carve_input() -> list[Example]:
    sizes = {"a": 40, "b": 11, "c": 2, "d": 1}
    return [Example(f"{label} text {i}", label) for label, n in sizes.items() for i in range(n)]


def test_carve_stratified_counts():
    train, validation = carve_validation(carve_input(), 0.1, seed=0)

    assert Counter(e.label for e in validation) == {"a": 4, "b": 1, "c": 1}
    assert Counter(e.label for e in train) == {"a": 36, "b": 10, "c": 1, "d": 1}


def test_carve_keeps_every_example_once():
    examples = carve_input()
    train, validation = carve_validation(examples, 0.25, seed=3)

    assert sorted(train + validation, key=examples.index) == examples
    assert train == [e for e in examples if e in train]
    assert validation == [e for e in examples if e in validation]


def test_carve_seeded():
    examples = carve_input()

    assert carve_validation(examples, 0.2, seed=1) == carve_validation(examples, 0.2, seed=1)
    assert carve_validation(examples, 0.2, seed=1) != carve_validation(examples, 0.2, seed=2)


def test_carve_keeps_copies_together():
    examples = [Example(f"text {i}", "a") for i in range(30)] + [
        Example("Text 7", "a"),
        Example("text  7", "b"),
    ]
    examples += [Example(f"other {i}", "b") for i in range(30)]
    for seed in range(10):
        train, validation = carve_validation(examples, 0.3, seed=seed)
        in_validation = [
            e for e in examples if e.text.lower().split() == ["text", "7"] and e in validation
        ]
        assert len(in_validation) in (0, 3), seed


# load_examples, the reader of edge-runtime eval


def test_load_examples_folder_like_load_split(tmp_path):
    write_csv(tmp_path / "test.csv", rows(3, "test"), ("text", "category"))

    assert load_examples(tmp_path, "test") == load_split(tmp_path, "test")


def test_load_examples_csv_file_fields(tmp_path):
    path = write_csv(tmp_path / "tickets.csv", rows(3, "t"), ("utterance", "intent"))

    examples = load_examples(path, data_format="auto", text_field="utterance", label_field="intent")
    assert examples[0] == Example("t query 0 for balance", "balance")
    with pytest.raises(DataFormatError, match="missing label column 'category' or 'label'"):
        load_examples(path)


def test_load_examples_category_column(tmp_path):
    path = write_csv(tmp_path / "test.csv", rows(2, "t"), ("text", "category"))

    assert load_examples(path)[1].label == "balance"


def test_load_examples_jsonl_in_folder(tmp_path):
    write_jsonl(tmp_path / "holdout.jsonl", rows(2, "h"), ("q", "y"))

    examples = load_examples(tmp_path, "holdout", "jsonl", text_field="q", label_field="y")
    assert len(examples) == 6


def test_load_examples_errors(tmp_path):
    odd = tmp_path / "data.tsv"
    odd.write_text("text\tlabel\n", encoding="utf-8")

    with pytest.raises(ConfigError, match="cannot tell the format"):
        load_examples(odd)
    with pytest.raises(ConfigError, match="unknown data format 'xml'"):
        load_examples(odd, data_format="xml")
    with pytest.raises(FileNotFoundError, match="absent.csv"):
        load_examples(tmp_path / "absent.csv")
    with pytest.raises(FileNotFoundError, match="looked for data_full.json, test.csv"):
        load_examples(tmp_path, "test", text_field="q")


def test_package_out_of_scope_label():
    assert package_out_of_scope_label({}) == "oos"
    assert package_out_of_scope_label({"provenance": {"data": {}}}) == "oos"
    manifest = {"provenance": {"data": {"out_of_scope_label": ""}}}
    assert package_out_of_scope_label(manifest) == ""


# The real Banking77 config


def test_banking77_config_splits():
    if not (BANKING77_DIR / "train.csv").is_file():
        pytest.skip(f"Banking77 not found at {BANKING77_DIR}")
    config = load_config(BANKING77_CONFIG, {"data.path": str(BANKING77_DIR)})
    train, validation, test = load_splits(config.data)
    categories = json.loads((BANKING77_DIR / "categories.json").read_text(encoding="utf-8"))

    assert {e.label for e in train} == set(categories)
    assert {e.label for e in validation} == set(categories)
    assert len(train) + len(validation) == 10003
    assert 0.09 < len(validation) / 10003 < 0.11
    assert len(test) == 3080
    assert out_of_scope_label(config.data) == ""
    assert not {e.text for e in train} & {e.text for e in validation}


# edge-runtime eval on a CSV whose columns are not text,label


@pytest.mark.slow
def test_eval_csv_with_named_fields(tiny_build, tmp_path):
    labels = set(tiny_build.report["config"]["data"]["labels"])
    queries = [e for e in load_split(CLINC150_DIR, "test") if e.label in labels][:60]
    path = write_csv(
        tmp_path / "queries.csv", [(e.text, e.label) for e in queries], ("utterance", "intent")
    )

    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "edge_runtime",
            "eval",
            "--data",
            str(path),
            "--format",
            "csv",
            "--text-field",
            "utterance",
            "--label-field",
            "intent",
            "--json",
            "--package",
            str(tiny_build.student_package),
            "--teacher-package",
            str(tiny_build.teacher_package),
            *CLI_TRUST,
        ],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stderr
    body = json.loads(result.stdout)
    assert body["n"] == 60
    assert body["data"]["format"] == "csv"
    assert body["out_of_scope_label"] == "oos"
    expected_oos = sum(e.label == "oos" for e in queries)
    assert (body["oos_recall"] is None) == (expected_oos == 0)


@pytest.mark.slow
def test_tiny_build_reports_checks(tiny_build):
    checks = tiny_build.report["data_checks"]

    assert checks["fatal"] == []
    assert checks["sources"]["validation"].endswith("(clinc150, key 'val')")
    assert checks["split_sizes"]["train"] == 8 * 40
