"""Extra student training examples read from escalation logs.

A deployed student escalates the queries it is unsure of, and the runtime's opt-in escalation
log (``edge_runtime.escalation_log``) keeps each one with the teacher's label. Those records
are the examples the next student most needs. A record becomes a training example, with the
teacher's label as its hard label, when all of these hold:

- its source is ``teacher``, so it has a teacher label (``local-offline`` records have none);
- the label is in the build's label set;
- its text is not in the test split, because the report's test figures would then include
  training data;
- its text is not in the validation split, because the gate is calibrated there, and a student
  is more confident on queries it trained on than on new ones;
- its text is neither a text of the train split nor the text of an earlier record.

Texts are compared case-folded with runs of whitespace collapsed. The log stores queries after
redaction, so split texts are also compared in their redacted forms.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from edge_runtime.data import Example
from edge_runtime.errors import ConfigError
from edge_runtime.escalation_log import (
    SOURCE_TEACHER,
    EscalationLogError,
    EscalationRecord,
    iter_records,
    log_files,
)
from edge_runtime.redaction import redact

log = logging.getLogger(__name__)

# Skip reasons, in the order the checks run. The report lists each one, with 0 when unused.
SKIP_LOCAL_OFFLINE = "local-offline (no teacher answer)"
SKIP_NO_TEACHER_LABEL = "no teacher label"
SKIP_UNKNOWN_LABEL = "label not in the build's label set"
SKIP_IN_TEST = "text in the test split"
SKIP_IN_VALIDATION = "text in the validation split"
SKIP_TRAIN_DUPLICATE = "duplicate of a train text"
SKIP_RECORD_DUPLICATE = "duplicate of an earlier record"
SKIP_REASONS = (
    SKIP_LOCAL_OFFLINE,
    SKIP_NO_TEACHER_LABEL,
    SKIP_UNKNOWN_LABEL,
    SKIP_IN_TEST,
    SKIP_IN_VALIDATION,
    SKIP_TRAIN_DUPLICATE,
    SKIP_RECORD_DUPLICATE,
)


@dataclass(frozen=True)
class ExtraTrain:
    """The examples taken from the logs, in log order, and the figures for the build report."""

    examples: list[Example] = field(default_factory=list)
    report: dict = field(default_factory=dict)


def find_log_files(paths: Iterable[str]) -> list[Path]:
    """Return the SQLite files of every log named in ``data.extra_train``: for each entry, its
    archives oldest first, then its current file. Raises ``ConfigError`` naming the key for a
    path that does not exist or contains no log."""
    files: list[Path] = []
    for entry in paths:
        path = Path(entry)
        if not path.exists():
            raise ConfigError(
                f"data.extra_train: {entry} not found; list escalation log files or the folders "
                "that hold them (relative paths start at the current folder)"
            )
        found = log_files(path)
        if not found:
            raise ConfigError(
                f"data.extra_train: {entry} contains no escalation log (no escalations.sqlite3 or "
                "numbered archive of it); list the folder the runtime's EscalationLog wrote to"
            )
        files.extend(found)
    return files


def read_records(files: list[Path]) -> list[EscalationRecord]:
    """Read every record of ``files``; an unreadable file raises ``ConfigError`` naming
    ``data.extra_train`` and the file."""
    records: list[EscalationRecord] = []
    for path in files:
        try:
            records.extend(iter_records([path]))
        except EscalationLogError as exc:
            # UnknownSchemaVersionError is a subclass, so a newer log format lands here too.
            raise ConfigError(f"data.extra_train: cannot read {path}: {exc}") from exc
    return records


def normalize_text(text: str) -> str:
    """Return ``text`` case-folded, with runs of whitespace collapsed to one space."""
    return " ".join(text.casefold().split())


def split_keys(examples: Iterable[Example]) -> set[str]:
    """Return the normalized texts of ``examples`` in the forms a log can hold them: as they
    are, redacted, and redacted with long numbers kept."""
    keys: set[str] = set()
    for example in examples:
        keys.add(normalize_text(example.text))
        keys.add(normalize_text(redact(example.text).text))
        keys.add(normalize_text(redact(example.text, redact_long_numbers=False).text))
    return keys


def select_examples(
    records: Iterable[EscalationRecord],
    labels: Iterable[str],
    train: list[Example],
    val: list[Example],
    test: list[Example],
) -> tuple[list[Example], Counter[str], Counter[str]]:
    """Apply the checks of the module docstring to ``records`` in order. Returns the examples,
    the count of skipped records per reason and the count of used records per package
    (``name@version``)."""
    label_set = set(labels)
    test_keys, val_keys, train_keys = split_keys(test), split_keys(val), split_keys(train)
    seen: set[str] = set()
    examples: list[Example] = []
    skipped: Counter[str] = Counter({reason: 0 for reason in SKIP_REASONS})
    packages: Counter[str] = Counter()
    for record in records:
        key = normalize_text(record.text)
        if record.source != SOURCE_TEACHER:
            reason = SKIP_LOCAL_OFFLINE
        elif not record.teacher_label:
            reason = SKIP_NO_TEACHER_LABEL
        elif record.teacher_label not in label_set:
            reason = SKIP_UNKNOWN_LABEL
        elif key in test_keys:
            reason = SKIP_IN_TEST
        elif key in val_keys:
            reason = SKIP_IN_VALIDATION
        elif key in train_keys:
            reason = SKIP_TRAIN_DUPLICATE
        elif key in seen:
            reason = SKIP_RECORD_DUPLICATE
        else:
            reason = None
        if reason is not None:
            skipped[reason] += 1
            continue
        seen.add(key)
        examples.append(Example(text=record.text, label=record.teacher_label))
        packages[f"{record.package_name}@{record.package_version}"] += 1
    return examples, skipped, packages


def load_extra_train(
    paths: Iterable[str],
    weight: float,
    labels: Iterable[str],
    train: list[Example],
    val: list[Example],
    test: list[Example],
) -> ExtraTrain:
    """Read the logs at ``paths`` (``data.extra_train``) and return the usable records as
    examples with the figures for the build report. Without paths, returns no examples."""
    paths = list(paths)
    if not paths:
        return ExtraTrain(report={"paths": [], "read": 0, "used": 0})
    files = find_log_files(paths)
    records = read_records(files)
    examples, skipped, packages = select_examples(records, labels, train, val, test)
    report = {
        "paths": paths,
        "files": [str(path) for path in files],
        "read": len(records),
        "used": len(examples),
        "skipped": dict(skipped),
        "weight": weight,
        "labels": len({example.label for example in examples}),
        "used_per_package": dict(sorted(packages.items())),
    }
    log.info(
        "extra_train: read %d escalation records from %d file(s), used %d, skipped %s",
        len(records),
        len(files),
        len(examples),
        {reason: count for reason, count in skipped.items() if count},
    )
    return ExtraTrain(examples=examples, report=report)
