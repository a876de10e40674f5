"""Tests for export.data_checks: each check on small data files, the report, the command and
the build stopping before training on a fatal finding."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest

from edge_runtime.data import Example
from export.config import parse_config
from export.data_checks import (
    FATAL,
    WARNING,
    DataCheckError,
    check_build_data,
    main,
    run_data_checks,
    tokenizer_counter,
)
from export.dataset import load_splits, normalize_text

LABELS = ("card_arrival", "exchange_rate", "pin_blocked")


def count_words(texts: list[str]) -> list[int]:
    """A token count for tests that do not need the real tokenizer: words plus [CLS], [SEP]."""
    return [len(text.split()) + 2 for text in texts]


def clean_rows(per_label: int, split: str) -> list[tuple[str, str]]:
    """Distinct texts, ``per_label`` of each label; the split name keeps splits disjoint."""
    return [
        (f"{split} question number {i} about {label.replace('_', ' ')}", label)
        for label in LABELS
        for i in range(per_label)
    ]


def write_csv(path: Path, rows: list[tuple[str, str]]) -> Path:
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["text", "label"])
        writer.writerows(rows)
    return path


def write_data(folder: Path, train: list, test: list, validation: list | None = None) -> Path:
    folder.mkdir(exist_ok=True)
    write_csv(folder / "train.csv", train)
    write_csv(folder / "test.csv", test)
    if validation is not None:
        write_csv(folder / "val.csv", validation)
    return folder


def config_for(folder: Path, **data) -> object:
    return parse_config({"data": {"path": str(folder), **data}})


def check_folder(
    folder: Path, minimum: int = 5, max_length: int = 64, out_of_scope_label: str = "", **data
):
    """Load the splits of ``folder`` as a build would and run every check."""
    train, validation, test = load_splits(config_for(folder, **data).data)
    return run_data_checks(
        {"train": train, "validation": validation, "test": test},
        min_examples_per_label=minimum,
        max_length=max_length,
        count_tokens=count_words,
        out_of_scope_label=out_of_scope_label,
    )


def findings_of(report, check: str) -> list:
    return [finding for finding in report.findings if finding.check == check]


def test_clean_data_passes(tmp_path):
    folder = write_data(
        tmp_path / "data", clean_rows(10, "train"), clean_rows(3, "test"), clean_rows(3, "val")
    )
    report = check_folder(folder)

    assert report.findings == ()
    assert report.split_sizes == {"train": 30, "validation": 9, "test": 9}
    assert report.labels == 3
    assert "passed: empty_texts" in report.format()


def test_invisible_text_fatal(tmp_path):
    # A zero-width space survives the loader's whitespace strip but is not text.
    train = clean_rows(10, "train") + [("\u200b\u200b", "pin_blocked")]
    report = check_folder(write_data(tmp_path / "data", train, clean_rows(3, "test")))

    [finding] = findings_of(report, "empty_texts")
    assert finding.severity == FATAL
    assert finding.count == 1
    assert "pin_blocked" in finding.examples[0]


def test_empty_example_fatal():
    splits = {"train": [Example("", "a")] + [Example(f"text {i}", "ab"[i % 2]) for i in range(20)]}
    report = run_data_checks(
        splits, min_examples_per_label=1, max_length=64, count_tokens=count_words
    )

    assert [f.check for f in report.fatal] == ["empty_texts"]


def test_symbols_only_text_warning(tmp_path):
    train = clean_rows(10, "train") + [("???", "card_arrival"), ("-- !", "pin_blocked")]
    report = check_folder(write_data(tmp_path / "data", train, clean_rows(3, "test")))

    [finding] = findings_of(report, "texts_without_letters")
    assert finding.severity == WARNING
    assert finding.count == 2
    assert report.fatal == []


def test_conflicting_labels_fatal(tmp_path):
    # Case and spacing differ, but the uncased tokenizer gives both the same tokens.
    train = clean_rows(10, "train") + [
        ("Where is my card?", "card_arrival"),
        ("where is  my CARD?", "pin_blocked"),
    ]
    report = check_folder(write_data(tmp_path / "data", train, clean_rows(3, "test")))

    [finding] = findings_of(report, "conflicting_labels")
    assert finding.severity == FATAL
    assert finding.count == 1
    assert "'Where is my card?'" in finding.examples[0]
    assert "card_arrival, pin_blocked" in finding.examples[0]


def test_same_text_in_two_splits_not_a_conflict(tmp_path):
    train = clean_rows(10, "train") + [("Where is my card?", "card_arrival")]
    test = clean_rows(3, "test") + [("Where is my card?", "pin_blocked")]
    report = check_folder(write_data(tmp_path / "data", train, test))

    assert findings_of(report, "conflicting_labels") == []
    [finding] = findings_of(report, "split_label_conflicts")
    assert finding.severity == WARNING
    assert "card_arrival in train, pin_blocked in test" in finding.examples[0]


def test_repeated_text_warning(tmp_path):
    train = clean_rows(10, "train") + [("How do I unblock my PIN?", "pin_blocked")] * 3
    report = check_folder(write_data(tmp_path / "data", train, clean_rows(3, "test")))

    [finding] = findings_of(report, "repeated_texts")
    assert finding.severity == WARNING
    assert finding.count == 1
    assert "2 extra copies" in finding.message
    assert "(3 times)" in finding.examples[0]


def test_too_few_examples_fatal(tmp_path):
    train = clean_rows(10, "train") + [(f"refund number {i}", "refund") for i in range(4)]
    test = clean_rows(3, "test") + [("refund please", "refund")]
    report = check_folder(
        write_data(tmp_path / "data", train, test),
        minimum=5,
        validation="carve",
        validation_fraction=0.2,
    )

    [finding] = findings_of(report, "too_few_examples")
    assert finding.severity == FATAL
    # 4 refund rows leave 3 in train after the carve.
    assert finding.examples == ("'refund' (3)",)
    assert "data.min_examples_per_label" in finding.fix


def test_minimum_count_accepted(tmp_path):
    folder = write_data(
        tmp_path / "data", clean_rows(5, "train"), clean_rows(2, "test"), clean_rows(2, "val")
    )

    assert findings_of(check_folder(folder, minimum=5), "too_few_examples") == []
    assert len(findings_of(check_folder(folder, minimum=6), "too_few_examples")) == 1


def test_single_label_fatal():
    splits = {"train": [Example(f"text {i}", "only") for i in range(20)]}
    report = run_data_checks(
        splits, min_examples_per_label=1, max_length=64, count_tokens=count_words
    )

    [finding] = report.fatal
    assert finding.check == "too_few_examples"
    assert "at least 2" in finding.message


def test_label_only_in_test_fatal(tmp_path):
    test = clean_rows(3, "test") + [("I want a refund", "refund"), ("refund me", "refund")]
    report = check_folder(write_data(tmp_path / "data", clean_rows(10, "train"), test))

    [finding] = findings_of(report, "labels_not_in_train")
    assert finding.severity == FATAL
    assert finding.examples == ("'refund' (test: 2)",)


def test_label_missing_from_test_warning(tmp_path):
    test = [row for row in clean_rows(3, "test") if row[1] != "exchange_rate"]
    report = check_folder(write_data(tmp_path / "data", clean_rows(10, "train"), test))

    [finding] = findings_of(report, "labels_missing_from_split")
    assert finding.severity == WARNING
    assert finding.examples == ("'exchange_rate' (not in test)",)
    assert report.fatal == []


def test_out_of_scope_label_missing_fatal(tmp_path):
    folder = write_data(tmp_path / "data", clean_rows(10, "train"), clean_rows(3, "test"))
    report = check_folder(folder, out_of_scope_label="other")

    [finding] = findings_of(report, "out_of_scope_label")
    assert finding.severity == FATAL
    assert finding.examples == ("'other'",)


def test_out_of_scope_label_present(tmp_path):
    train = clean_rows(10, "train") + [(f"unrelated question {i}", "other") for i in range(10)]
    report = check_folder(
        write_data(tmp_path / "data", train, clean_rows(3, "test")), out_of_scope_label="other"
    )

    assert findings_of(report, "out_of_scope_label") == []


def test_split_overlap_warning(tmp_path):
    train = clean_rows(10, "train") + [("How do I unblock my PIN?", "pin_blocked")]
    test = clean_rows(3, "test") + [("how do I unblock my pin?", "pin_blocked")]
    report = check_folder(write_data(tmp_path / "data", train, test))

    [finding] = findings_of(report, "split_overlap")
    assert finding.severity == WARNING
    assert finding.count == 1
    assert finding.examples[0].startswith("train/test: ")


def test_long_texts_warning_real_tokenizer():
    count_tokens = tokenizer_counter(32)
    long_text = "my card payment was declined at the shop again " * 6
    splits = {
        "train": [Example(f"short text {i}", "ab"[i % 2]) for i in range(20)],
        "test": [Example(long_text, "a"), Example("short one", "b")],
    }
    report = run_data_checks(
        splits, min_examples_per_label=1, max_length=32, count_tokens=count_tokens
    )

    [finding] = findings_of(report, "long_texts")
    assert finding.severity == WARNING
    assert finding.count == 1
    tokens = count_tokens([long_text])[0]
    assert tokens > 32
    assert finding.examples[0].endswith(f"({tokens} tokens)")
    assert "teacher.max_length = 32" in finding.message


def test_examples_capped_at_five(tmp_path):
    rare = [(f"rare text {label} {i}", f"rare_{label}") for label in range(8) for i in range(2)]
    train = clean_rows(10, "train") + rare
    report = check_folder(
        write_data(tmp_path / "data", train, clean_rows(3, "test")), validation="carve"
    )

    [finding] = findings_of(report, "too_few_examples")
    assert finding.count == 8
    assert len(finding.examples) == 5
    assert "(and 3 more)" in finding.format()


def test_fatal_findings_listed_first(tmp_path):
    train = (
        clean_rows(10, "train")
        + [("dup", "card_arrival")] * 2
        + [("x y", "pin_blocked"), ("X  Y", "card_arrival")]
    )
    report = check_folder(write_data(tmp_path / "data", train, clean_rows(3, "test")))

    severities = [finding.severity for finding in report.findings]
    assert severities == sorted(severities, key=lambda severity: severity != FATAL)
    assert severities[0] == FATAL
    assert WARNING in severities


def test_normalize_text_forms():
    assert normalize_text("  Where IS\tmy  card ") == "where is my card"
    assert normalize_text("ｃａｒｄ") == "card"  # full-width letters under NFKC


def test_error_names_labels(tmp_path):
    test = clean_rows(3, "test") + [("I want a refund", "refund")]
    folder = write_data(tmp_path / "data", clean_rows(10, "train"), test, clean_rows(3, "val"))
    config = config_for(folder)
    train, validation, test_split = load_splits(config.data)

    with pytest.raises(DataCheckError) as caught:
        check_build_data(config, train, validation, test_split)
    message = str(caught.value)
    assert "1 fatal finding" in message
    assert "labels_not_in_train" in message
    assert "'refund' (test: 1)" in message
    assert "fix:" in message
    assert caught.value.report.fatal[0].check == "labels_not_in_train"


def test_report_in_build_data(tmp_path):
    train = clean_rows(12, "train") + [("How do I unblock my PIN?", "pin_blocked")] * 2
    folder = write_data(tmp_path / "data", train, clean_rows(3, "test"))
    config = config_for(folder)

    result = check_build_data(config, *load_splits(config.data))
    assert result["fatal"] == []
    assert [warning["check"] for warning in result["warnings"]] == ["repeated_texts"]
    assert result["sources"]["validation"].startswith("carved from train: 10% of each label")
    assert result["sources"]["train"].endswith("train.csv (csv)")


def test_build_stops_before_training(tmp_path):
    from export.build import build

    train = clean_rows(12, "train") + [
        ("where is my card", "card_arrival"),
        ("Where is my card", "exchange_rate"),
    ]
    folder = write_data(tmp_path / "data", train, clean_rows(3, "test"))
    out = tmp_path / "out"
    config = parse_config({"data": {"path": str(folder)}, "output": {"dir": str(out)}})

    with pytest.raises(DataCheckError, match="conflicting_labels.*'where is my card'"):
        build(config)
    assert list(out.iterdir()) == []


def test_command_exit_codes(tmp_path, capsys):
    clean = write_data(tmp_path / "clean", clean_rows(12, "train"), clean_rows(3, "test"))
    (tmp_path / "clean.toml").write_text(f'[data]\npath = "{clean}"\n', encoding="utf-8")
    test = clean_rows(3, "test") + [("I want a refund", "refund")]
    broken = write_data(tmp_path / "broken", clean_rows(10, "train"), test)
    (tmp_path / "broken.toml").write_text(f'[data]\npath = "{broken}"\n', encoding="utf-8")

    assert main(["--config", str(tmp_path / "clean.toml")]) == 0
    output = capsys.readouterr().out
    assert "data checks: 3 labels" in output
    assert "validation: carved from train" in output

    assert main(["--config", str(tmp_path / "broken.toml")]) == 2
    assert "fatal   labels_not_in_train" in capsys.readouterr().out


def test_command_config_error(tmp_path, capsys):
    (tmp_path / "bad.toml").write_text('[data]\npath = "x"\nformat = "xml"\n', encoding="utf-8")

    assert main(["--config", str(tmp_path / "bad.toml")]) == 2
    assert "'data.format'" in capsys.readouterr().err
