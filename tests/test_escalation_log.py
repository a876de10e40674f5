"""The escalation log: round trips, redaction before write, rotation, schema versions, storage
errors, and writers killed with SIGKILL."""

from __future__ import annotations

import logging
import os
import signal
import sqlite3
import stat
import subprocess
import sys
import threading
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pytest

from edge_runtime.errors import ConfigError
from edge_runtime.escalation_log import (
    DEFAULT_FILE_NAME,
    MIN_MAX_BYTES,
    SCHEMA_VERSION,
    EscalationLog,
    EscalationLogError,
    UnknownSchemaVersionError,
    iter_records,
    log_files,
    read_all,
)
from tests.conftest import ROOT

PAGE_SIZE = 4096
EMAIL = "jane.doe+bank@example.com"
CARD = "4111 1111 1111 1111"
IBAN = "DE89 3704 0044 0532 0130 00"
PHONE = "+44 20 7946 0958"
SECRET_TEXT = f"I am {EMAIL}, my card is {CARD}, IBAN {IBAN}, call {PHONE}"
FIELDS = {
    "source": "teacher",
    "teacher_label": "transfer",
    "student_label": "balance",
    "package_name": "clinc150-student",
    "package_version": 3,
}

# A writer that prints each id after record() returns. argv: log path, max_bytes, keep_files,
# and where to kill itself: "none" (the parent kills it), or "before-rename" / "after-rename"
# of the first rotation, by wrapping os.replace.
WRITER_SCRIPT = r"""
import os, signal, sys
from edge_runtime.escalation_log import EscalationLog

path, max_bytes, keep_files, kill_at = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
if kill_at != "none":
    real_replace = os.replace

    def replace_then_kill(source, destination):
        if kill_at == "after-rename":
            real_replace(source, destination)
        os.kill(os.getpid(), signal.SIGKILL)

    os.replace = replace_then_kill

log = EscalationLog(path, max_bytes=max_bytes, keep_files=keep_files)
index = 0
while True:
    index += 1
    text = f"query {index}: I am jane.doe+bank@example.com, card 4111 1111 1111 1111 " + "x" * 300
    record_id = log.record(text, source="teacher", teacher_label="transfer",
                           student_label="balance", package_name="clinc150-student",
                           package_version=3, student_score=0.4)
    print(record_id, flush=True)
"""

# A writer that fills the file size limit (RLIMIT_FSIZE), as a full disk would, then lifts it.
# Prints "id <n>" per stored record, "dropped" per dropped one, then the two counters.
FULL_DISK_SCRIPT = r"""
import os, resource, signal, sys
from edge_runtime.escalation_log import EscalationLog

# Past the limit, write() fails with EFBIG instead of the process getting SIGXFSZ.
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
path = sys.argv[1]
fields = dict(source="teacher", teacher_label="transfer", student_label="balance",
              package_name="clinc150-student", package_version=3)
log = EscalationLog(path)
for index in range(5):
    print("id", log.record(f"before the limit {index}", **fields), flush=True)

sizes = [os.path.getsize(path + suffix) for suffix in ("", "-wal")]
resource.setrlimit(resource.RLIMIT_FSIZE, (max(sizes) + 16384, resource.RLIM_INFINITY))
drops = 0
for index in range(10_000):
    record_id = log.record(f"at the limit {index} " + "y" * 1500, **fields)
    if record_id is None:
        drops += 1
        print("dropped", flush=True)
        if drops == 3:
            break
    else:
        print("id", record_id, flush=True)

resource.setrlimit(resource.RLIMIT_FSIZE, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
for index in range(3):
    print("id", log.record(f"after the limit {index}", **fields), flush=True)
print("counters", log.records_written, log.records_dropped, flush=True)
log.close()
"""


def child_env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT)}


def start_child(script: str, *args: object) -> subprocess.Popen:
    child = subprocess.Popen(
        [sys.executable, "-c", script, *map(str, args)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=child_env(),
        cwd=ROOT,
    )
    # Only guards against a hung child. No assertion depends on this time.
    watchdog = threading.Timer(120.0, child.kill)
    watchdog.daemon = True
    watchdog.start()
    child.watchdog = watchdog
    return child


def finish_child(child: subprocess.Popen) -> tuple[list[str], str]:
    """Wait for the child and return its complete stdout lines and its stderr."""
    stdout, stderr = child.communicate()
    child.watchdog.cancel()
    return [line for line in stdout.splitlines(keepends=True) if line.endswith("\n")], stderr


def integrity_of(path: Path) -> str:
    connection = sqlite3.connect(path)
    try:
        return connection.execute("PRAGMA integrity_check").fetchone()[0]
    finally:
        connection.close()


def raw_bytes(directory: Path) -> dict[str, bytes]:
    """Return the bytes of every file in ``directory``, including -wal and -shm files."""
    return {entry.name: entry.read_bytes() for entry in directory.iterdir() if entry.is_file()}


def write_until_archive(log: EscalationLog, archive_number: int, text: str) -> list[int]:
    """Record ``text`` until the archive with ``archive_number`` exists, and return the ids."""
    ids = []
    archive = log.path.with_name(f"escalations.{archive_number:06d}.sqlite3")
    while not archive.exists():
        ids.append(log.record(text, **FIELDS))
        assert len(ids) < 10_000, "the log never rotated"
    return ids


# Round trips


def test_record_round_trip(tmp_path):
    before = datetime.now(timezone.utc)
    with EscalationLog(tmp_path) as log:
        first = log.record(
            "transfer 200 dollars to savings",
            student_score=np.float32(0.375),
            teacher_model_version="clinc150-teacher@3",
            teacher_request_id="req-0001",
            **FIELDS,
        )
        second = log.record(
            "mail jane@example.com",
            source="local-offline",
            teacher_label=None,
            student_label=None,
            package_name="clinc150-student",
            package_version=4,
        )
        written = log.records_written
    after = datetime.now(timezone.utc)

    records = read_all(tmp_path)

    assert (first, second) == (1, 2)
    assert written == 2
    assert [record.id for record in records] == [1, 2]
    teacher_record, offline_record = records
    assert teacher_record.text == "transfer 200 dollars to savings"
    assert teacher_record.source == "teacher"
    assert teacher_record.teacher_label == "transfer"
    assert teacher_record.student_label == "balance"
    assert teacher_record.student_score == 0.375
    assert teacher_record.package_name == "clinc150-student"
    assert teacher_record.package_version == 3
    assert teacher_record.teacher_model_version == "clinc150-teacher@3"
    assert teacher_record.teacher_request_id == "req-0001"
    assert teacher_record.redactions == {"email": 0, "iban": 0, "card": 0, "number": 0, "phone": 0}
    assert offline_record.text == "mail [EMAIL]"
    assert offline_record.source == "local-offline"
    assert offline_record.teacher_label is None
    assert offline_record.student_label is None
    assert offline_record.student_score is None
    assert offline_record.package_version == 4
    assert offline_record.teacher_model_version is None
    assert offline_record.redactions["email"] == 1
    for record in records:
        assert record.created_at.endswith("Z")
        created = datetime.fromisoformat(record.created_at.replace("Z", "+00:00"))
        assert before <= created <= after


def test_directory_and_file_paths_agree(tmp_path):
    with EscalationLog(tmp_path) as log:
        log.record("first query", **FIELDS)
        assert log.path == tmp_path / DEFAULT_FILE_NAME

    from_directory = read_all(tmp_path)
    from_file = read_all(tmp_path / DEFAULT_FILE_NAME)
    from_iterator = list(iter_records([tmp_path / DEFAULT_FILE_NAME]))

    assert len(from_directory) == 1
    assert from_file == from_directory
    assert from_iterator == from_directory


def test_ids_continue_after_reopen(tmp_path):
    with EscalationLog(tmp_path) as log:
        ids = [log.record(f"query {index}", **FIELDS) for index in range(3)]
    with EscalationLog(tmp_path) as log:
        ids.append(log.record("after reopening", **FIELDS))

    assert ids == [1, 2, 3, 4]
    assert [record.id for record in read_all(tmp_path)] == [1, 2, 3, 4]


def test_read_while_writer_open(tmp_path):
    with EscalationLog(tmp_path) as log:
        log.record("first query", **FIELDS)
        log.record("second query", **FIELDS)

        records = read_all(tmp_path)

        assert [record.text for record in records] == ["first query", "second query"]


def test_files_are_private(tmp_path):
    with EscalationLog(tmp_path / "logs") as log:
        log.record("first query", **FIELDS)
        wal = Path(f"{log.path}-wal")

        assert stat.S_IMODE(log.path.stat().st_mode) == 0o600
        assert stat.S_IMODE(wal.stat().st_mode) == 0o600
        assert stat.S_IMODE(log.path.parent.stat().st_mode) == 0o700


def test_wal_mode_set_in_file(tmp_path):
    with EscalationLog(tmp_path) as log:
        log.record("first query", **FIELDS)
        connection = sqlite3.connect(log.path)
        journal_mode = connection.execute("PRAGMA journal_mode").fetchone()[0]
        user_version = connection.execute("PRAGMA user_version").fetchone()[0]
        connection.close()

    assert journal_mode == "wal"
    assert user_version == SCHEMA_VERSION


# Redaction before write


def test_raw_files_hold_no_personal_data(tmp_path):
    secrets = [EMAIL, CARD, CARD.replace(" ", ""), IBAN, IBAN.replace(" ", ""), PHONE, "7946 0958"]
    with EscalationLog(tmp_path) as log:
        log.record(SECRET_TEXT, **FIELDS)
        log.record(SECRET_TEXT.upper(), **FIELDS)
        wal = Path(f"{log.path}-wal")
        assert wal.stat().st_size > 0
        files_open = raw_bytes(tmp_path)
    files_closed = raw_bytes(tmp_path)

    # The redacted text must be in the WAL, which shows that the bytes searched are the
    # bytes written.
    assert b"I am [EMAIL], my card is [CARD], IBAN [IBAN], call [PHONE]" in files_open[wal.name]
    for files in (files_open, files_closed):
        for name, content in files.items():
            for secret in secrets:
                for variant in (secret, secret.upper()):
                    assert variant.encode() not in content, f"{variant!r} found in {name}"


def test_redaction_counts_stored(tmp_path):
    with EscalationLog(tmp_path) as log:
        log.record(SECRET_TEXT, **FIELDS)

    (record,) = read_all(tmp_path)

    assert record.text == "I am [EMAIL], my card is [CARD], IBAN [IBAN], call [PHONE]"
    assert record.redactions == {"email": 1, "iban": 1, "card": 1, "number": 0, "phone": 1}


def test_long_numbers_kept_when_disabled(tmp_path):
    text = "declined 4111111111111112 and 5111111111111112"
    with EscalationLog(tmp_path / "default") as log:
        log.record(text, **FIELDS)
    with EscalationLog(tmp_path / "kept", redact_long_numbers=False) as log:
        log.record(text, **FIELDS)

    (redacted,) = read_all(tmp_path / "default")
    (kept,) = read_all(tmp_path / "kept")

    assert redacted.text == "declined [NUMBER] and [NUMBER]"
    assert redacted.redactions["number"] == 2
    assert kept.text == text
    assert kept.redactions["number"] == 0


# Rotation


def test_rotation_keeps_newest_archives(tmp_path):
    text = "rotate me " * 150
    with EscalationLog(tmp_path, max_bytes=MIN_MAX_BYTES, keep_files=2) as log:
        ids = write_until_archive(log, 5, text)
        ids.append(log.record("after the fifth rotation", **FIELDS))
        files = log.files()

    records = read_all(tmp_path)
    read_ids = [record.id for record in records]

    assert [path.name for path in files] == [
        "escalations.000004.sqlite3",
        "escalations.000005.sqlite3",
        DEFAULT_FILE_NAME,
    ]
    assert ids == list(range(1, len(ids) + 1))
    assert read_ids == ids[-len(read_ids) :]
    assert read_ids[0] > 1
    assert records[-1].text == "after the fifth rotation"
    for archive in files[:2]:
        size = archive.stat().st_size
        # Rotated after the first commit past the cap, which adds at most a few pages.
        assert MIN_MAX_BYTES < size <= MIN_MAX_BYTES + 3 * PAGE_SIZE
        assert not Path(f"{archive}-wal").exists()
        assert integrity_of(archive) == "ok"


def test_rotation_with_no_archives_kept(tmp_path):
    with EscalationLog(tmp_path, max_bytes=MIN_MAX_BYTES, keep_files=0) as log:
        ids = []
        # Rotating deletes the archive at once, so count rotations by the first id in the file.
        while not read_all(tmp_path) or read_all(tmp_path)[0].id == 1:
            ids.append(log.record("rotate me " * 150, **FIELDS))
            assert len(ids) < 1000, "the first id in the current file never changed"
        ids.append(log.record("after rotating", **FIELDS))
        files = log.files()

    read_ids = [record.id for record in read_all(tmp_path)]

    assert files == [tmp_path / DEFAULT_FILE_NAME]
    assert read_ids == ids[-len(read_ids) :]
    assert ids == list(range(1, len(ids) + 1))


def test_new_file_continues_archive_ids(tmp_path):
    with EscalationLog(tmp_path, max_bytes=MIN_MAX_BYTES, keep_files=3) as log:
        ids = write_until_archive(log, 1, "rotate me " * 150)
        current = log.path
    current.unlink()

    with EscalationLog(tmp_path, max_bytes=MIN_MAX_BYTES, keep_files=3) as log:
        next_id = log.record("in a new current file", **FIELDS)

    archived_ids = [record.id for record in iter_records([tmp_path / "escalations.000001.sqlite3"])]
    assert next_id == archived_ids[-1] + 1
    assert next_id > ids[-1] - 1


def test_rotation_waits_for_open_reader(tmp_path, caplog):
    text = "rotate me " * 150
    with EscalationLog(tmp_path, max_bytes=MIN_MAX_BYTES, keep_files=3) as log:
        log.record(text, **FIELDS)
        reader = sqlite3.connect(f"{log.path.as_uri()}?mode=ro", uri=True)
        reader.execute("SELECT count(*) FROM escalations").fetchone()
        with caplog.at_level(logging.WARNING, logger="edge_runtime.escalation_log"):
            # Past the cap by two pages: the log has tried to rotate at least once.
            for _ in range(1000):
                if reader.execute("PRAGMA page_count").fetchone()[0] * PAGE_SIZE > (
                    MIN_MAX_BYTES + 2 * PAGE_SIZE
                ):
                    break
                log.record(text, **FIELDS)
        archives_while_open = [path.name for path in log.files()[:-1]]
        reader.close()
        log.record("after the reader closed", **FIELDS)
        archives_after = [path.name for path in log.files()[:-1]]

    assert archives_while_open == []
    assert "another connection has it open" in caplog.text
    assert archives_after == ["escalations.000001.sqlite3"]
    assert [record.id for record in read_all(tmp_path)] == list(
        range(1, len(read_all(tmp_path)) + 1)
    )


# Schema versions and foreign files


def make_database(path: Path, user_version: int) -> None:
    connection = sqlite3.connect(path)
    connection.execute("CREATE TABLE escalations (id INTEGER PRIMARY KEY, text TEXT)")
    connection.execute(f"PRAGMA user_version = {user_version}")
    connection.commit()
    connection.close()


def test_unknown_schema_version_rejected(tmp_path):
    path = tmp_path / DEFAULT_FILE_NAME
    make_database(path, user_version=99)
    before = path.read_bytes()

    with pytest.raises(UnknownSchemaVersionError) as opening:
        EscalationLog(path)
    with pytest.raises(UnknownSchemaVersionError) as reading:
        read_all(path)

    for error in (opening.value, reading.value):
        assert error.path == str(path)
        assert error.version == 99
        assert str(path) in str(error)
        assert "version 99" in str(error)
    assert path.read_bytes() == before


def test_unknown_archive_version_named(tmp_path):
    with EscalationLog(tmp_path) as log:
        log.record("current file", **FIELDS)
    archive = tmp_path / "escalations.000001.sqlite3"
    make_database(archive, user_version=2)

    with pytest.raises(UnknownSchemaVersionError) as reading:
        read_all(tmp_path)

    assert reading.value.path == str(archive)
    assert reading.value.version == 2


def test_foreign_database_rejected(tmp_path):
    path = tmp_path / "other.sqlite3"
    make_database(path, user_version=0)

    with pytest.raises(EscalationLogError, match="without an escalation log schema version"):
        EscalationLog(path)


def test_non_database_file_rejected(tmp_path):
    path = tmp_path / "notes.sqlite3"
    path.write_bytes(b"these are not SQLite pages\n" * 200)

    with pytest.raises(EscalationLogError, match="not a readable SQLite database"):
        EscalationLog(path)
    with pytest.raises(EscalationLogError, match="not a readable SQLite database"):
        read_all(path)


def test_missing_file_rejected_by_reader(tmp_path):
    with pytest.raises(EscalationLogError, match="not found"):
        list(iter_records([tmp_path / "missing.sqlite3"]))


# Arguments and lifecycle


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"text": b"bytes"}, "text must be a str, got bytes"),
        ({"text": None}, "text must be a str, got NoneType"),
        ({"text": "   "}, "text is empty"),
        ({"text": "x" * 2001}, "text has 2001 characters; the limit is 2000"),
        ({"text": "bad \ud800 surrogate"}, "text is not valid Unicode"),
        ({"source": "local"}, "source must be one of teacher, local-offline"),
        ({"teacher_label": None}, "teacher_label is missing"),
        ({"teacher_label": ""}, "teacher_label is empty"),
        ({"teacher_label": 7}, "teacher_label must be a str or None, got int"),
        ({"student_label": "x" * 257}, "student_label has 257 characters"),
        ({"package_name": None}, "package_name is missing"),
        ({"package_version": "3"}, "package_version must be an int, got str"),
        ({"package_version": True}, "package_version must be an int, got bool"),
        ({"package_version": -1}, "package_version is -1; it must be at least 0"),
        ({"package_version": 2**63}, "it must be at most"),
        ({"student_score": float("nan")}, "student_score is nan"),
        ({"student_score": 1.5}, "student_score is 1.5"),
        ({"student_score": "0.5"}, "student_score must be a float or None, got str"),
        ({"student_score": True}, "student_score must be a float or None, got bool"),
        ({"teacher_request_id": b"id"}, "teacher_request_id must be a str or None"),
    ],
)
def test_invalid_record_rejected(tmp_path, changes, message):
    arguments = {"text": "a valid query", **FIELDS, **changes}
    with EscalationLog(tmp_path) as log:
        with pytest.raises(ConfigError, match=message):
            log.record(**arguments)

    assert read_all(tmp_path) == []


def test_text_at_limit_accepted(tmp_path):
    with EscalationLog(tmp_path) as log:
        record_id = log.record("x" * 2000, **FIELDS)

    assert record_id == 1
    assert len(read_all(tmp_path)[0].text) == 2000


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ({"max_bytes": 1000}, f"max_bytes is 1000; it must be at least {MIN_MAX_BYTES}"),
        ({"max_bytes": 1.5e6}, "max_bytes must be an int, got float"),
        ({"keep_files": -1}, "keep_files is -1; it must be at least 0"),
        ({"synchronous": "OFF"}, "synchronous must be one of NORMAL, FULL, got 'OFF'"),
    ],
)
def test_invalid_settings_rejected(tmp_path, arguments, message):
    with pytest.raises(ConfigError, match=message):
        EscalationLog(tmp_path, **arguments)

    assert list(tmp_path.iterdir()) == []


def test_full_synchronous_mode_applied(tmp_path):
    with EscalationLog(tmp_path, synchronous="FULL") as log:
        log.record("a query", **FIELDS)
        synchronous = log._connection.execute("PRAGMA synchronous").fetchone()[0]

    assert synchronous == 2  # FULL


def test_record_after_close_rejected(tmp_path):
    log = EscalationLog(tmp_path)
    log.close()
    log.close()

    with pytest.raises(EscalationLogError, match="is closed"):
        log.record("a query", **FIELDS)


def test_second_writer_rejected(tmp_path):
    first = EscalationLog(tmp_path)
    try:
        with pytest.raises(EscalationLogError, match="already open for writing"):
            EscalationLog(tmp_path)
    finally:
        first.close()

    with EscalationLog(tmp_path) as second:
        assert second.record("a query", **FIELDS) == 1


def test_concurrent_records_from_threads(tmp_path):
    results: list[int | None] = []
    results_lock = threading.Lock()

    def write(log: EscalationLog, thread_index: int) -> None:
        for index in range(50):
            record_id = log.record(f"thread {thread_index} query {index} " + "z" * 900, **FIELDS)
            with results_lock:
                results.append(record_id)

    with EscalationLog(tmp_path, max_bytes=MIN_MAX_BYTES, keep_files=100) as log:
        threads = [threading.Thread(target=write, args=(log, index)) for index in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        files = log.files()

    records = read_all(tmp_path)

    assert sorted(results) == list(range(1, 201))
    assert [record.id for record in records] == list(range(1, 201))
    assert len(files) > 2  # the threads also ran through rotations
    for path in files:
        assert integrity_of(path) == "ok"


def test_escalation_constants_match_runtime():
    from edge_runtime import escalation_log, runtime

    assert escalation_log.MAX_TEXT_CHARS == runtime.MAX_TEXT_CHARS
    assert escalation_log.SOURCE_TEACHER == runtime.SOURCE_TEACHER
    assert escalation_log.SOURCE_LOCAL_OFFLINE == runtime.SOURCE_LOCAL_OFFLINE


# Storage errors


def test_full_database_drops_record(tmp_path, caplog):
    with EscalationLog(tmp_path) as log:
        committed_ids = [log.record(f"kept {index}", **FIELDS) for index in range(3)]
        # SQLite raises SQLITE_FULL ("database or disk is full") when the file would need more
        # pages than max_page_count, the same error as a full disk.
        connection = log._connection
        pages = connection.execute("PRAGMA page_count").fetchone()[0]
        connection.execute(f"PRAGMA max_page_count = {pages}")
        with caplog.at_level(logging.ERROR, logger="edge_runtime.escalation_log"):
            # 6,000 bytes of UTF-8 do not fit in the free space of the existing pages.
            dropped = [log.record("€" * 2000, **FIELDS) for _ in range(2)]
        counters_when_full = (log.records_written, log.records_dropped)
        records_when_full = read_all(tmp_path)

        connection.execute(f"PRAGMA max_page_count = {pages + 1000}")
        after = log.record("stored again", **FIELDS)

    assert committed_ids == [1, 2, 3]
    assert dropped == [None, None]
    assert counters_when_full == (3, 2)
    assert "database or disk is full" in caplog.text
    assert "dropped a record (1 in a row, 1 in total)" in caplog.text
    assert [record.text for record in records_when_full] == ["kept 0", "kept 1", "kept 2"]
    assert after == 4
    assert [record.id for record in read_all(tmp_path)] == [1, 2, 3, 4]
    assert integrity_of(tmp_path / DEFAULT_FILE_NAME) == "ok"


def test_file_size_limit_drops_and_recovers(tmp_path):
    path = tmp_path / DEFAULT_FILE_NAME
    child = start_child(FULL_DISK_SCRIPT, path)
    lines, stderr = finish_child(child)

    assert child.returncode == 0, stderr
    reported = [int(line.split()[1]) for line in lines if line.startswith("id ")]
    drops = [line for line in lines if line.startswith("dropped")]
    counters = [line.split()[1:] for line in lines if line.startswith("counters")]
    records = read_all(path)

    assert len(drops) == 3
    assert counters == [[str(len(reported)), "3"]]
    assert [record.id for record in records] == reported
    assert reported == list(range(1, len(reported) + 1))
    assert records[-1].text == "after the limit 2"
    assert integrity_of(path) == "ok"


# Writers killed with SIGKILL


@pytest.mark.parametrize("kill_after", [5, 50, 500])
def test_sigkill_keeps_committed_records(tmp_path, kill_after):
    path = tmp_path / DEFAULT_FILE_NAME
    child = start_child(WRITER_SCRIPT, path, MIN_MAX_BYTES, 100, "none")
    seen = []
    while len(seen) < kill_after:
        line = child.stdout.readline()
        assert line, f"the writer exited early: {child.stderr.read()}"
        seen.append(int(line))
    child.send_signal(signal.SIGKILL)
    rest, _ = finish_child(child)
    reported = seen + [int(line) for line in rest]

    files = log_files(path)
    integrity = {file.name: integrity_of(file) for file in files}
    stored_ids = [record.id for record in read_all(path)]

    assert child.returncode == -signal.SIGKILL
    assert integrity == dict.fromkeys(integrity, "ok")
    assert set(reported) <= set(stored_ids)
    # Rows committed but not yet reported may follow; nothing may be missing before them.
    assert stored_ids == list(range(1, len(stored_ids) + 1))
    for name, content in raw_bytes(tmp_path).items():
        assert b"jane.doe+bank@example.com" not in content, name
        assert b"4111 1111 1111 1111" not in content, name

    with EscalationLog(path, max_bytes=MIN_MAX_BYTES, keep_files=100) as log:
        assert log.record("after the kill", **FIELDS) == stored_ids[-1] + 1


@pytest.mark.parametrize("kill_at", ["before-rename", "after-rename"])
def test_sigkill_during_rotation(tmp_path, kill_at):
    path = tmp_path / DEFAULT_FILE_NAME
    child = start_child(WRITER_SCRIPT, path, MIN_MAX_BYTES, 100, kill_at)
    lines, stderr = finish_child(child)
    reported = [int(line) for line in lines]

    archive = tmp_path / "escalations.000001.sqlite3"
    records = read_all(path)
    stored_ids = [record.id for record in records]

    assert child.returncode == -signal.SIGKILL, stderr
    # The record that triggered the rotation was committed before record() could return.
    assert stored_ids == list(range(1, len(reported) + 2))
    if kill_at == "before-rename":
        assert log_files(path) == [path]
    else:
        assert log_files(path) == [archive]
    for file in log_files(path):
        assert integrity_of(file) == "ok"

    with EscalationLog(path, max_bytes=MIN_MAX_BYTES, keep_files=100) as log:
        next_id = log.record("after the kill", **FIELDS)
        files = log.files()

    assert next_id == len(reported) + 2
    # Before the rename, the file was still over the cap, so the next record rotated it.
    assert files == [archive, path]
    assert [record.id for record in read_all(path)] == list(range(1, next_id + 1))
