"""Opt-in log of escalated queries and the teacher's answers, kept as training data for the
next student.

``EscalationLog.record()`` redacts the query with ``edge_runtime.redaction`` and commits one
row to a SQLite database in WAL mode, one transaction per record. Only the redacted text and
the number of values of each kind that were replaced are stored, never the original values.

Files: the current database is ``path`` (``escalations.sqlite3`` when ``path`` is a
directory). When it grows past ``max_bytes`` it is checkpointed, closed and renamed to a
numbered archive, ``escalations.000001.sqlite3``, ``escalations.000002.sqlite3`` and so on,
and a new current file is started. Only the newest ``keep_files`` archives are kept. Record
ids keep increasing across files, so ``read_all(path)`` returns every row in the order it was
written.

Storage failures (disk full, I/O errors) do not raise from ``record()``: the record is dropped,
counted in ``records_dropped`` and logged, and ``record()`` returns None. Rows committed before
stay intact, because SQLite rolls the failed transaction back. Invalid arguments raise
``ConfigError``. A file with an unknown schema raises ``UnknownSchemaVersionError``.

One process at a time may write to a log. A second writer gets an ``EscalationLogError``.
"""

from __future__ import annotations

import fcntl
import json
import logging
import math
import numbers
import os
import re
import sqlite3
import threading
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from edge_runtime.errors import ConfigError, EdgeRuntimeError
from edge_runtime.redaction import redact

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1
DEFAULT_FILE_NAME = "escalations.sqlite3"
# With SQLite 3.40, a record with a 57-character query took about 280 bytes, and one with a
# 2,000-character query a 4 KiB page. So a 16 MiB file fits about 60,000 short or 4,000
# maximal queries, and the defaults use at most about 80 MiB, plus up to about 4 MiB of WAL
# (SQLite checkpoints it every 1,000 pages).
DEFAULT_MAX_BYTES = 16 * 1024 * 1024
DEFAULT_KEEP_FILES = 4
# An empty log takes 3 pages of 4 KiB, so a smaller cap would rotate after a handful of records.
MIN_MAX_BYTES = 64 * 1024
# The same limit as runtime.MAX_TEXT_CHARS, because longer text is never escalated. It is
# repeated here so that reading a log does not import ONNX Runtime, and a test checks that the
# two agree.
MAX_TEXT_CHARS = 2_000
MAX_FIELD_CHARS = 256  # labels, package name, teacher model version and request id
SQLITE_MAX_INTEGER = 2**63 - 1
# The two sources of an escalated answer, as in runtime.SOURCE_TEACHER and
# runtime.SOURCE_LOCAL_OFFLINE.
SOURCE_TEACHER = "teacher"
SOURCE_LOCAL_OFFLINE = "local-offline"
ESCALATION_SOURCES = (SOURCE_TEACHER, SOURCE_LOCAL_OFFLINE)
# NORMAL is the default. In WAL mode, a commit has reached the operating system once record()
# returns, so a killed or crashed process loses nothing committed. A power cut or kernel
# crash can lose the commits made since the last checkpoint, but leaves the file consistent. FULL
# also survives a power cut, at the cost of one fsync of the WAL per record, which wears flash
# storage on devices that escalate often.
SYNCHRONOUS_MODES = ("NORMAL", "FULL")
# Only the first drop after a successful write, then every DROP_LOG_INTERVAL-th, is logged.
DROP_LOG_INTERVAL = 1000

_COLUMNS = (
    "id",
    "created_at",
    "source",
    "text",
    "teacher_label",
    "student_label",
    "student_score",
    "package_name",
    "package_version",
    "teacher_model_version",
    "teacher_request_id",
    "redactions",
)
_SCHEMA = """
CREATE TABLE escalations (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    created_at TEXT NOT NULL,
    source TEXT NOT NULL,
    text TEXT NOT NULL,
    teacher_label TEXT,
    student_label TEXT,
    student_score REAL,
    package_name TEXT NOT NULL,
    package_version INTEGER NOT NULL,
    teacher_model_version TEXT,
    teacher_request_id TEXT,
    redactions TEXT NOT NULL
)
"""
_INSERT = (
    f"INSERT INTO escalations ({', '.join(_COLUMNS[1:])}) "
    f"VALUES ({', '.join('?' * (len(_COLUMNS) - 1))})"
)


class EscalationLogError(EdgeRuntimeError):
    """The escalation log cannot be opened, read or rotated, or was used after close()."""


class UnknownSchemaVersionError(EscalationLogError):
    """A log file carries a schema version (``PRAGMA user_version``) that this code cannot read."""

    def __init__(self, path: str | Path, version: int):
        self.path = str(path)
        self.version = version
        super().__init__(
            f"{self.path} has escalation log schema version {version}; this edge_runtime reads "
            f"version {SCHEMA_VERSION}. Read it with the edge_runtime release that wrote it, or "
            "move the file away to start a new log"
        )


@dataclass(frozen=True)
class EscalationRecord:
    """One logged escalation, as read back from a log file. ``created_at`` is an ISO 8601 UTC
    time, and ``redactions`` maps each kind in ``redaction.KINDS`` to the number replaced."""

    id: int
    created_at: str
    source: str
    text: str
    teacher_label: str | None
    student_label: str | None
    student_score: float | None
    package_name: str
    package_version: int
    teacher_model_version: str | None
    teacher_request_id: str | None
    redactions: dict[str, int]


class EscalationLog:
    """A size-capped, rotated SQLite log of escalations. It is thread-safe, with one connection
    behind a lock. Use it as a context manager, or call ``close()``."""

    def __init__(
        self,
        path: str | Path,
        max_bytes: int = DEFAULT_MAX_BYTES,
        keep_files: int = DEFAULT_KEEP_FILES,
        synchronous: str = "NORMAL",
        redact_long_numbers: bool = True,
    ):
        _check_int("max_bytes", max_bytes, minimum=MIN_MAX_BYTES)
        _check_int("keep_files", keep_files, minimum=0)
        if synchronous not in SYNCHRONOUS_MODES:
            raise ConfigError(
                f"synchronous must be one of {', '.join(SYNCHRONOUS_MODES)}, got {synchronous!r}"
            )
        self.path = resolve_log_path(path)
        self.max_bytes = max_bytes
        self.keep_files = keep_files
        self.synchronous = synchronous
        self.redact_long_numbers = bool(redact_long_numbers)
        self._lock = threading.Lock()
        self._connection: sqlite3.Connection | None = None
        self._closed = False
        self._records_written = 0
        self._records_dropped = 0
        self._drops_in_a_row = 0
        self._rotation_postponed = False

        self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        self._lock_fd = _lock_for_writing(self.path)
        try:
            self._connection = self._open_current()
        except BaseException:
            os.close(self._lock_fd)
            raise

    def __repr__(self) -> str:
        return (
            f"EscalationLog(path={str(self.path)!r}, max_bytes={self.max_bytes}, "
            f"keep_files={self.keep_files})"
        )

    @property
    def records_written(self) -> int:
        """Records committed by this instance."""
        return self._records_written

    @property
    def records_dropped(self) -> int:
        """Records this instance could not store because of a storage error."""
        return self._records_dropped

    def files(self) -> list[Path]:
        """Return the archives, oldest first, then the current file."""
        return log_files(self.path)

    def record(
        self,
        text: str,
        *,
        source: str,
        teacher_label: str | None,
        student_label: str | None,
        package_name: str,
        package_version: int,
        student_score: float | None = None,
        teacher_model_version: str | None = None,
        teacher_request_id: str | None = None,
    ) -> int | None:
        """Redact ``text``, commit one escalation and return its id. Return None when a storage
        error, such as a full disk, dropped the record.

        Once an id is returned the row is committed, so a process kill cannot lose it (see
        ``SYNCHRONOUS_MODES`` for a power cut). ``source`` is ``"teacher"`` (then
        ``teacher_label`` is required) or ``"local-offline"``. Raises ``ConfigError`` for an
        invalid argument and ``EscalationLogError`` after ``close()``.
        """
        _check_text(text)
        if source not in ESCALATION_SOURCES:
            raise ConfigError(
                f"source must be one of {', '.join(ESCALATION_SOURCES)} (an escalated answer), "
                f"got {source!r}"
            )
        _check_str("teacher_label", teacher_label, required=source == SOURCE_TEACHER)
        _check_str("student_label", student_label, required=False)
        _check_str("package_name", package_name, required=True)
        _check_int("package_version", package_version, minimum=0)
        _check_str("teacher_model_version", teacher_model_version, required=False)
        _check_str("teacher_request_id", teacher_request_id, required=False)
        score = _check_score(student_score)

        redaction = redact(text, redact_long_numbers=self.redact_long_numbers)
        created_at = datetime.now(timezone.utc).isoformat(timespec="microseconds")
        row = (
            created_at.replace("+00:00", "Z"),
            source,
            redaction.text,
            teacher_label,
            student_label,
            score,
            package_name,
            package_version,
            teacher_model_version,
            teacher_request_id,
            json.dumps(redaction.counts, sort_keys=True),
        )
        with self._lock:
            if self._closed:
                raise EscalationLogError(
                    f"escalation log {self.path} is closed; create a new EscalationLog to record"
                )
            try:
                if self._connection is None:
                    self._connection = self._open_current()
                record_id = _insert(self._connection, row)
            except (sqlite3.DatabaseError, OSError, EscalationLogError) as exc:
                self._count_drop(exc)
                return None
            self._count_success()
            self._rotate_if_full()
            return record_id

    def close(self) -> None:
        """Checkpoint and close the current file. Calling it again does nothing."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            try:
                if self._connection is not None:
                    self._connection.close()
            finally:
                self._connection = None
                os.close(self._lock_fd)

    def __enter__(self) -> EscalationLog:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # Writing

    def _count_success(self) -> None:
        self._records_written += 1
        if self._drops_in_a_row:
            log.info(
                "escalation log %s stores records again after dropping %d",
                self.path,
                self._drops_in_a_row,
            )
            self._drops_in_a_row = 0

    def _count_drop(self, exc: Exception) -> None:
        self._records_dropped += 1
        self._drops_in_a_row += 1
        if self._drops_in_a_row == 1 or self._drops_in_a_row % DROP_LOG_INTERVAL == 0:
            log.error(
                "escalation log %s dropped a record (%d in a row, %d in total): %s; "
                "free disk space or check the file",
                self.path,
                self._drops_in_a_row,
                self._records_dropped,
                exc,
            )

    def _open_current(self, last_id: int | None = None) -> sqlite3.Connection:
        """Open or create the current file. A new file continues the ids after ``last_id``, or
        after the newest archive's when ``last_id`` is None."""
        try:
            if not self.path.exists():
                # Created here with mode 0600 because SQLite gives the -wal and -shm files the
                # permissions of the database file.
                os.close(os.open(self.path, os.O_CREAT | os.O_WRONLY, 0o600))
            connection = _connect(self.path)
        except (OSError, sqlite3.Error) as exc:
            raise EscalationLogError(f"cannot create escalation log {self.path}: {exc}") from exc
        try:
            # The version is checked before anything is written, so that a file of another
            # version is left exactly as it was.
            version = _read_schema_version(connection, self.path)
            mode = connection.execute("PRAGMA journal_mode=WAL").fetchone()[0]
            if mode != "wal":
                raise EscalationLogError(
                    f"{self.path}: SQLite could not switch to WAL mode (journal_mode is {mode}); "
                    "put the log on a local file system"
                )
            connection.execute(f"PRAGMA synchronous={self.synchronous}")
            if version == 0:
                if last_id is None:
                    last_id = _newest_archived_id(self.path)
                _create_schema(connection, last_id)
        except sqlite3.DatabaseError as exc:
            connection.close()
            raise EscalationLogError(f"cannot open escalation log {self.path}: {exc}") from exc
        except BaseException:
            connection.close()
            raise
        return connection

    # Rotation

    def _rotate_if_full(self) -> None:
        connection = self._connection
        try:
            # page_count includes pages that are still only in the WAL.
            page_count = connection.execute("PRAGMA page_count").fetchone()[0]
            page_size = connection.execute("PRAGMA page_size").fetchone()[0]
            if page_count * page_size <= self.max_bytes:
                return
            self._rotate()
        except (sqlite3.DatabaseError, OSError, EscalationLogError) as exc:
            # The record that triggered the rotation is committed, so record() still returns
            # its id. The next record() reopens the current file and tries again.
            log.error(
                "escalation log %s could not be rotated, retrying after the next record: %s",
                self.path,
                exc,
            )

    def _rotate(self) -> None:
        """Close the current file, rename it to the next archive, delete the oldest archives
        beyond ``keep_files`` and start a new current file."""
        connection = self._connection
        busy, _, _ = connection.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
        if busy:
            self._postpone_rotation("a reader holds a snapshot of it")
            return
        last_id = connection.execute(
            "SELECT seq FROM sqlite_sequence WHERE name = 'escalations'"
        ).fetchone()[0]
        connection.close()
        self._connection = None

        # The last connection to close deletes the -wal and -shm files. If they remain, another
        # connection has the file open, and a new file with the same name would share its -shm.
        wal, shm = _sidecar(self.path, "-wal"), _sidecar(self.path, "-shm")
        if wal.exists() or shm.exists():
            self._connection = self._open_current()
            self._postpone_rotation("another connection has it open")
            return
        archive = _archive_path(self.path, _next_archive_number(self.path))
        os.replace(self.path, archive)
        _fsync_directory(self.path.parent)
        log.info(
            "escalation log %s is over %d bytes; archived it as %s",
            self.path,
            self.max_bytes,
            archive.name,
        )
        self._rotation_postponed = False
        self._connection = self._open_current(last_id=last_id)
        self._delete_old_archives()

    def _postpone_rotation(self, reason: str) -> None:
        if not self._rotation_postponed:
            log.warning(
                "escalation log %s is over %d bytes but was not rotated because %s; "
                "retrying after each record",
                self.path,
                self.max_bytes,
                reason,
            )
        self._rotation_postponed = True

    def _delete_old_archives(self) -> None:
        archives = _archives(self.path)
        excess = len(archives) - self.keep_files
        for archive in archives[: max(excess, 0)]:
            archive.unlink()
            # Another program, such as the sqlite3 shell, may have left these beside it.
            for suffix in ("-wal", "-shm"):
                _sidecar(archive, suffix).unlink(missing_ok=True)
            log.info(
                "deleted escalation log archive %s (keep_files=%d)", archive.name, self.keep_files
            )


# Reading


def resolve_log_path(path: str | Path) -> Path:
    """Return the current log file for ``path``: the path itself, or ``DEFAULT_FILE_NAME``
    inside it when it is a directory."""
    path = Path(path)
    if path.is_dir():
        return path / DEFAULT_FILE_NAME
    return path


def log_files(path: str | Path) -> list[Path]:
    """Return the archives of the log at ``path`` (a file, or a directory holding
    ``DEFAULT_FILE_NAME``), oldest first, then the current file if it exists."""
    current = resolve_log_path(path)
    files = _archives(current)
    if current.exists():
        files.append(current)
    return files


def iter_records(paths: Iterable[str | Path]) -> Iterator[EscalationRecord]:
    """Yield the records of each file in ``paths``, in the order given, each file's rows by id.

    Files are opened read-only. Raises ``UnknownSchemaVersionError`` for a file with another
    schema version and ``EscalationLogError`` for a file that is not an escalation log.
    """
    for path in paths:
        yield from _read_file(Path(path))


def read_all(path: str | Path) -> list[EscalationRecord]:
    """Return every record of the log at ``path`` (a file, or a directory holding
    ``DEFAULT_FILE_NAME``): the archives, oldest first, then the current file.

    NOTE: a rotation that runs while this reads can move the current file's rows into an
    archive that was not listed, so read while the writer is stopped, or read only the archives.
    """
    return list(iter_records(log_files(path)))


def _read_file(path: Path) -> Iterator[EscalationRecord]:
    if not path.is_file():
        raise EscalationLogError(f"escalation log file {path} not found")
    # Archives are never written again. A file with a -wal beside it may have a live writer,
    # or a killed one whose last commits are still only in the WAL.
    immutable = (
        _ARCHIVE_NAME.fullmatch(path.name) is not None and not _sidecar(path, "-wal").exists()
    )
    connection = _connect_read_only(path, immutable)
    try:
        try:
            if _read_schema_version(connection, path) == 0:
                # The writer was killed before it committed the schema, so there are no rows.
                return
            rows = connection.execute(f"SELECT {', '.join(_COLUMNS)} FROM escalations ORDER BY id")
            for row in rows:
                yield _to_record(row)
        except sqlite3.DatabaseError as exc:
            raise EscalationLogError(f"cannot read escalation log {path}: {exc}") from exc
    finally:
        connection.close()


# Archives are named <stem>.<number of at least 6 digits><suffix>, for example
# escalations.000012.sqlite3.
_ARCHIVE_NAME = re.compile(r".+\.\d{6,}(\.[^.]*)?")


def _to_record(row: tuple) -> EscalationRecord:
    values = dict(zip(_COLUMNS, row, strict=True))
    values["redactions"] = json.loads(values["redactions"])
    return EscalationRecord(**values)


# SQLite helpers


def _connect(path: Path) -> sqlite3.Connection:
    # isolation_level=None: transactions are opened and committed explicitly in _insert.
    return sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=5.0)


def _read_schema_version(connection: sqlite3.Connection, path: Path) -> int:
    """Return the file's schema version: 0 for a new, empty file, else SCHEMA_VERSION.

    Raises ``UnknownSchemaVersionError`` for another version and ``EscalationLogError`` for a
    file that has tables but no version, which another program wrote.
    """
    try:
        version = connection.execute("PRAGMA user_version").fetchone()[0]
        table_count = connection.execute("SELECT count(*) FROM sqlite_master").fetchone()[0]
    except sqlite3.DatabaseError as exc:
        raise EscalationLogError(
            f"{path} is not a readable SQLite database ({exc}); move it away to start a new log"
        ) from exc
    if version == 0 and table_count:
        raise EscalationLogError(
            f"{path} is a SQLite database without an escalation log schema version; it was not "
            "written by EscalationLog, so move it away or choose another path"
        )
    if version not in (0, SCHEMA_VERSION):
        raise UnknownSchemaVersionError(path, version)
    return version


def _create_schema(connection: sqlite3.Connection, last_id: int) -> None:
    """Create the table and set the schema version in one transaction, and seed the
    AUTOINCREMENT counter so that the new file's ids continue after ``last_id``."""
    connection.execute("BEGIN IMMEDIATE")
    try:
        connection.execute(_SCHEMA)
        if last_id:
            connection.execute(
                "INSERT INTO sqlite_sequence (name, seq) VALUES ('escalations', ?)", (last_id,)
            )
        connection.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
        connection.execute("COMMIT")
    except BaseException:
        if connection.in_transaction:
            connection.execute("ROLLBACK")
        raise


def _insert(connection: sqlite3.Connection, row: tuple) -> int:
    connection.execute("BEGIN IMMEDIATE")
    try:
        record_id = connection.execute(_INSERT, row).lastrowid
        connection.execute("COMMIT")
    except BaseException:
        # SQLite may already have rolled back after an I/O error or a full disk.
        if connection.in_transaction:
            try:
                connection.execute("ROLLBACK")
            except sqlite3.Error as exc:
                log.warning("rollback after a failed escalation log write failed: %s", exc)
        raise
    return record_id


def _newest_archived_id(current: Path) -> int:
    """Return the highest id in the newest archive of ``current``, or 0 without archives."""
    archives = _archives(current)
    if not archives:
        return 0
    newest = archives[-1]
    connection = _connect_read_only(newest, immutable=True)
    try:
        if _read_schema_version(connection, newest) == 0:
            return 0
        return connection.execute("SELECT coalesce(max(id), 0) FROM escalations").fetchone()[0]
    finally:
        connection.close()


# Files


def _archive_path(current: Path, number: int) -> Path:
    """Return the archive name for ``number``: escalations.000012.sqlite3 for
    escalations.sqlite3 and 12."""
    return current.with_name(f"{current.stem}.{number:06d}{current.suffix}")


def _numbered_archives(current: Path) -> list[tuple[int, Path]]:
    """Return the archives of ``current`` with their numbers, oldest (lowest number) first."""
    pattern = re.compile(re.escape(current.stem) + r"\.(\d{6,})" + re.escape(current.suffix))
    try:
        entries = list(current.parent.iterdir())
    except FileNotFoundError:
        return []
    numbered = []
    for entry in entries:
        match = pattern.fullmatch(entry.name)
        if match:
            numbered.append((int(match.group(1)), entry))
    return sorted(numbered)


def _archives(current: Path) -> list[Path]:
    return [path for _, path in _numbered_archives(current)]


def _next_archive_number(current: Path) -> int:
    numbered = _numbered_archives(current)
    return numbered[-1][0] + 1 if numbered else 1


def _connect_read_only(path: Path, immutable: bool) -> sqlite3.Connection:
    # With immutable=1, for files that no process writes any more, SQLite takes no locks and
    # creates no -wal or -shm file. mode=ro also reads the WAL of a live or killed writer.
    uri = path.resolve().as_uri() + ("?immutable=1" if immutable else "?mode=ro")
    try:
        return sqlite3.connect(uri, uri=True)
    except sqlite3.Error as exc:
        raise EscalationLogError(f"cannot open escalation log {path}: {exc}") from exc


def _sidecar(path: Path, suffix: str) -> Path:
    return path.with_name(path.name + suffix)


def _fsync_directory(directory: Path) -> None:
    descriptor = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def _lock_for_writing(path: Path) -> int:
    """Take an exclusive advisory lock on ``<path>.lock`` and return its descriptor. The
    kernel releases the lock when the process exits, even when it is killed."""
    lock_path = _sidecar(path, ".lock")
    descriptor = os.open(lock_path, os.O_CREAT | os.O_RDWR, 0o600)
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(descriptor)
        raise EscalationLogError(
            f"escalation log {path} is already open for writing ({lock_path} is locked); "
            "use one EscalationLog per file and process"
        ) from None
    return descriptor


# Argument checks


def _check_text(text: object) -> None:
    if not isinstance(text, str):
        raise ConfigError(f"text must be a str, got {type(text).__name__}")
    if not text.strip():
        raise ConfigError("text is empty; pass the escalated query")
    if len(text) > MAX_TEXT_CHARS:
        raise ConfigError(f"text has {len(text)} characters; the limit is {MAX_TEXT_CHARS}")
    _check_encodable("text", text)


def _check_str(name: str, value: object, required: bool) -> None:
    if value is None:
        if required:
            raise ConfigError(f"{name} is missing; pass a non-empty str")
        return
    if not isinstance(value, str):
        raise ConfigError(f"{name} must be a str or None, got {type(value).__name__}")
    if required and not value.strip():
        raise ConfigError(f"{name} is empty; pass a non-empty str")
    if len(value) > MAX_FIELD_CHARS:
        raise ConfigError(f"{name} has {len(value)} characters; the limit is {MAX_FIELD_CHARS}")
    _check_encodable(name, value)


def _check_encodable(name: str, value: str) -> None:
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ConfigError(
            f"{name} is not valid Unicode ({exc.reason} at position {exc.start}); pass UTF-8 text"
        ) from None


def _check_int(name: str, value: object, minimum: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool):
        raise ConfigError(f"{name} must be an int, got {type(value).__name__}")
    if value < minimum:
        raise ConfigError(f"{name} is {value}; it must be at least {minimum}")
    if value > SQLITE_MAX_INTEGER:
        raise ConfigError(f"{name} is {value}; it must be at most {SQLITE_MAX_INTEGER}")


def _check_score(score: object) -> float | None:
    if score is None:
        return None
    if not isinstance(score, numbers.Real) or isinstance(score, bool):
        raise ConfigError(f"student_score must be a float or None, got {type(score).__name__}")
    value = float(score)
    if not math.isfinite(value) or not 0.0 <= value <= 1.0:
        raise ConfigError(f"student_score is {value}; it must be a probability from 0 to 1")
    return value
