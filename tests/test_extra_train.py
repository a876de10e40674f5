"""export.extra_train: which escalation-log records become student training examples, and the
errors for logs that cannot be read. The logs are written with the real EscalationLog."""

from __future__ import annotations

from pathlib import Path

import pytest

from edge_runtime.data import Example
from edge_runtime.errors import ConfigError
from edge_runtime.escalation_log import EscalationLog
from export.extra_train import (
    SKIP_IN_TEST,
    SKIP_IN_VALIDATION,
    SKIP_LOCAL_OFFLINE,
    SKIP_REASONS,
    SKIP_RECORD_DUPLICATE,
    SKIP_TRAIN_DUPLICATE,
    SKIP_UNKNOWN_LABEL,
    load_extra_train,
    normalize_text,
)

LABELS = ["alarm", "timer", "weather"]
TRAIN = [
    Example("set an alarm for 6 am", "alarm"),
    Example("start a timer for ten minutes", "timer"),
    Example("is it going to rain today", "weather"),
]
VAL = [Example("call me back at +44 20 7946 0958 about my alarm", "alarm")]
TEST = [Example("how cold is it outside", "weather")]
PACKAGE = {"package_name": "clinc150-student", "package_version": 1}


def write_log(folder: Path, records: list[tuple[str, str, str | None]]) -> Path:
    """Write ``(text, source, teacher_label)`` records to an escalation log in ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    with EscalationLog(folder) as escalations:
        for text, source, teacher_label in records:
            escalations.record(
                text, source=source, teacher_label=teacher_label, student_label="alarm", **PACKAGE
            )
    return folder


def load(paths: list[Path], weight: float = 1.0):
    return load_extra_train([str(p) for p in paths], weight, LABELS, TRAIN, VAL, TEST)


def test_teacher_records_become_examples(tmp_path: Path):
    log_dir = write_log(
        tmp_path / "log",
        [
            ("wake me up at seven tomorrow", "teacher", "alarm"),
            ("will it snow this weekend", "teacher", "weather"),
        ],
    )

    extra = load([log_dir], weight=2.0)

    assert extra.examples == [
        Example("wake me up at seven tomorrow", "alarm"),
        Example("will it snow this weekend", "weather"),
    ]
    assert extra.report["read"] == 2
    assert extra.report["used"] == 2
    assert extra.report["weight"] == 2.0
    assert extra.report["labels"] == 2
    assert extra.report["used_per_package"] == {"clinc150-student@1": 2}
    assert set(extra.report["skipped"]) == set(SKIP_REASONS)
    assert sum(extra.report["skipped"].values()) == 0


def test_each_skip_reason_counted(tmp_path: Path):
    log_dir = write_log(
        tmp_path / "log",
        [
            ("what is the weather in paris", "local-offline", None),
            ("pay my electricity bill", "teacher", "pay_bill"),
            ("How cold is it   OUTSIDE", "teacher", "weather"),
            ("Set an alarm for 6 AM", "teacher", "alarm"),
            ("remind me in an hour", "teacher", "timer"),
            ("remind me in an hour", "teacher", "alarm"),
        ],
    )

    extra = load([log_dir])

    skipped = extra.report["skipped"]
    assert skipped[SKIP_LOCAL_OFFLINE] == 1
    assert skipped[SKIP_UNKNOWN_LABEL] == 1
    assert skipped[SKIP_IN_TEST] == 1
    assert skipped[SKIP_TRAIN_DUPLICATE] == 1
    assert skipped[SKIP_RECORD_DUPLICATE] == 1
    assert extra.report["read"] == 6
    assert extra.report["used"] == 1
    assert extra.examples == [Example("remind me in an hour", "timer")]


def test_redacted_validation_text_matched(tmp_path: Path):
    # The log stores "[PHONE]" in place of the number, and the check still finds the text.
    log_dir = write_log(tmp_path / "log", [(VAL[0].text, "teacher", "alarm")])

    extra = load([log_dir])

    assert extra.report["skipped"][SKIP_IN_VALIDATION] == 1
    assert extra.examples == []


def test_logs_read_in_listed_order(tmp_path: Path):
    first = write_log(tmp_path / "first", [("wake me at five", "teacher", "alarm")])
    second = write_log(tmp_path / "second", [("wake me at five", "teacher", "timer")])

    extra = load([second, first])

    assert extra.examples == [Example("wake me at five", "timer")]
    assert extra.report["skipped"][SKIP_RECORD_DUPLICATE] == 1
    assert extra.report["files"] == [
        str(second / "escalations.sqlite3"),
        str(first / "escalations.sqlite3"),
    ]


def test_log_file_path_accepted(tmp_path: Path):
    log_dir = write_log(tmp_path / "log", [("wake me at five", "teacher", "alarm")])

    extra = load([log_dir / "escalations.sqlite3"])

    assert extra.report["used"] == 1


def test_rotated_archives_included(tmp_path: Path):
    log_dir = tmp_path / "log"
    log_dir.mkdir()
    with EscalationLog(log_dir, max_bytes=64 * 1024) as escalations:
        for i in range(600):
            escalations.record(
                f"wake me at {i} past five " + "please " * 20,
                source="teacher",
                teacher_label="alarm",
                student_label=None,
                **PACKAGE,
            )
        archived = len(escalations.files()) - 1

    extra = load([log_dir])

    assert archived >= 1
    assert len(extra.report["files"]) == archived + 1
    assert extra.report["read"] == 600
    assert extra.report["used"] == 600


def test_no_paths_no_examples():
    extra = load_extra_train([], 1.0, LABELS, TRAIN, VAL, TEST)

    assert extra.examples == []
    assert extra.report == {"paths": [], "read": 0, "used": 0}


def test_missing_path_names_key(tmp_path: Path):
    with pytest.raises(ConfigError, match=r"data\.extra_train: .*absent.* not found"):
        load([tmp_path / "absent"])


def test_folder_without_log_names_key(tmp_path: Path):
    (tmp_path / "empty").mkdir()

    with pytest.raises(ConfigError, match=r"data\.extra_train: .*empty contains no escalation log"):
        load([tmp_path / "empty"])


def test_file_not_sqlite_names_key(tmp_path: Path):
    bogus = tmp_path / "escalations.sqlite3"
    bogus.write_bytes(b"this is not a database, just some text " * 200)

    with pytest.raises(ConfigError, match=r"data\.extra_train: cannot read .*escalations"):
        load([bogus])


def test_newer_schema_names_key(tmp_path: Path):
    import sqlite3

    log_dir = write_log(tmp_path / "log", [("wake me at five", "teacher", "alarm")])
    with sqlite3.connect(log_dir / "escalations.sqlite3") as connection:
        connection.execute("PRAGMA user_version = 99")

    with pytest.raises(ConfigError, match=r"data\.extra_train: cannot read .*99"):
        load([log_dir])


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("Set  an\tAlarm ", "set an alarm"),
        ("STRASSE", "strasse"),
        ("Straße", "strasse"),
    ],
)
def test_normalize_text(text: str, expected: str):
    assert normalize_text(text) == expected
