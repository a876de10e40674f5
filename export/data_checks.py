"""Checks of the train, validation and test splits, run before any training.

Each check returns findings. A fatal finding stops the build with ``DataCheckError``, because
such data cannot give a sound model or honest figures. The fatal findings are an empty text, a
text with two labels in one split, a label with too few train examples, a label of validation
or test that train lacks, and an out-of-scope label that train lacks. Warnings are reported and
the build goes on: repeated texts, texts without letters or digits, labels missing from
validation or test, texts shared between splits, and texts longer than the max length.

Texts are compared in the form of ``export.dataset.normalize_text``: Unicode NFKC, case
folded, whitespace collapsed, because the uncased tokenizer gives such variants the same
tokens.

Run the checks alone with ``python -m export.data_checks --config FILE``.
"""

from __future__ import annotations

import argparse
import logging
import sys
import unicodedata
from collections import Counter, defaultdict
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

from edge_runtime.data import Example
from edge_runtime.errors import EdgeRuntimeError
from export.config import BuildConfig
from export.dataset import normalize_text, out_of_scope_label, resolve_sources

log = logging.getLogger(__name__)

FATAL = "fatal"
WARNING = "warning"
EXAMPLES_SHOWN = 5  # examples quoted in each finding
TEXT_SHOWN = 80  # characters of a quoted text

CHECKS = (
    "empty_texts",
    "texts_without_letters",
    "conflicting_labels",
    "repeated_texts",
    "too_few_examples",
    "labels_not_in_train",
    "labels_missing_from_split",
    "out_of_scope_label",
    "split_label_conflicts",
    "split_overlap",
    "long_texts",
)
"""Names of the checks, in report order."""

Splits = dict[str, Sequence[Example]]  # split name -> examples; "train" must be present


class DataCheckError(EdgeRuntimeError, ValueError):
    """The data failed at least one fatal check; the message lists each fatal finding."""

    def __init__(self, report: DataCheckReport):
        self.report = report
        findings = "\n".join(finding.format() for finding in report.fatal)
        super().__init__(
            f"data checks failed with {len(report.fatal)} fatal finding(s); fix the data or "
            f"the [data] keys named below, then build again:\n{findings}"
        )


@dataclass(frozen=True)
class Finding:
    """One problem found in the data."""

    check: str  # one of CHECKS
    severity: str  # FATAL or WARNING
    message: str  # what was found, with the count
    count: int  # texts or labels affected
    examples: tuple[str, ...]  # up to EXAMPLES_SHOWN of them, quoted
    fix: str  # what to change

    def format(self) -> str:
        quoted = "; ".join(self.examples)
        more = (
            f" (and {self.count - len(self.examples)} more)"
            if self.count > len(self.examples)
            else ""
        )
        return (
            f"  {self.severity:<7} {self.check}: {self.message}: {quoted}{more}\n"
            f"          fix: {self.fix}"
        )


@dataclass(frozen=True)
class DataCheckReport:
    """The findings of every check over a set of splits."""

    findings: tuple[Finding, ...]
    split_sizes: dict[str, int]
    labels: int  # distinct labels in train

    @property
    def fatal(self) -> list[Finding]:
        return [finding for finding in self.findings if finding.severity == FATAL]

    @property
    def warnings(self) -> list[Finding]:
        return [finding for finding in self.findings if finding.severity == WARNING]

    def format(self) -> str:
        sizes = ", ".join(f"{name} {size}" for name, size in self.split_sizes.items())
        lines = [
            f"data checks: {self.labels} labels; {sizes} queries; "
            f"{len(self.fatal)} fatal, {len(self.warnings)} warning(s)"
        ]
        lines += [finding.format() for finding in self.findings]
        found = {finding.check for finding in self.findings}
        passed = [check for check in CHECKS if check not in found]
        if passed:
            lines.append(f"  passed: {', '.join(passed)}")
        return "\n".join(lines)

    def to_dict(self) -> dict:
        return {
            "split_sizes": self.split_sizes,
            "labels": self.labels,
            "fatal": [asdict(finding) for finding in self.fatal],
            "warnings": [asdict(finding) for finding in self.warnings],
        }


def _quote(text: str) -> str:
    shown = text if len(text) <= TEXT_SHOWN else text[: TEXT_SHOWN - 3] + "..."
    return repr(shown)


def _finding(
    check: str, severity: str, message: str, items: Sequence[str], fix: str
) -> list[Finding]:
    """Return one finding over ``items`` (quoted descriptions), or none when it is empty."""
    if not items:
        return []
    return [
        Finding(
            check=check,
            severity=severity,
            message=message,
            count=len(items),
            examples=tuple(items[:EXAMPLES_SHOWN]),
            fix=fix,
        )
    ]


def _is_invisible(character: str) -> bool:
    # Separators (Z*), control (Cc) and format (Cf) characters such as U+200B carry no text.
    category = unicodedata.category(character)
    return category[0] == "Z" or category in ("Cc", "Cf") or character.isspace()


def check_empty_texts(splits: Splits) -> list[Finding]:
    """Fatal: texts with nothing but whitespace and invisible characters. Warning: texts with
    no letter or digit, such as "???", which carry no intent a model can learn."""
    empty, no_letters = [], []
    for name, examples in splits.items():
        for example in examples:
            visible = [c for c in example.text if not _is_invisible(c)]
            if not visible:
                empty.append(f"{name}: {_quote(example.text)} ({example.label})")
            elif not any(c.isalnum() for c in visible):
                no_letters.append(f"{name}: {_quote(example.text)} ({example.label})")
    return [
        *_finding(
            "empty_texts",
            FATAL,
            f"{len(empty)} text(s) are empty or invisible",
            empty,
            "remove these rows or give them their text",
        ),
        *_finding(
            "texts_without_letters",
            WARNING,
            f"{len(no_letters)} text(s) have no letter or digit",
            no_letters,
            "check that the text field is the query column; remove rows that hold no query",
        ),
    ]


def check_duplicates(splits: Splits) -> list[Finding]:
    """Fatal: a text with more than one label within a split. Warning: a text repeated with
    the same label within a split, which weighs again in training and counts again in the
    figures."""
    conflicting, repeated = [], []
    repeated_copies = 0
    for name, examples in splits.items():
        labels: dict[str, Counter[str]] = defaultdict(Counter)
        first_text: dict[str, str] = {}
        for example in examples:
            key = normalize_text(example.text)
            labels[key][example.label] += 1
            first_text.setdefault(key, example.text)
        for key, counts in labels.items():
            text = _quote(first_text[key])
            if len(counts) > 1:
                conflicting.append(f"{name}: {text} ({', '.join(sorted(counts))})")
            elif sum(counts.values()) > 1:
                copies = sum(counts.values())
                repeated_copies += copies - 1
                repeated.append(f"{name}: {text} ({copies} times)")
    return [
        *_finding(
            "conflicting_labels",
            FATAL,
            f"{len(conflicting)} text(s) have more than one label within a split",
            conflicting,
            "give each text the one right label and remove the other rows",
        ),
        *_finding(
            "repeated_texts",
            WARNING,
            f"{len(repeated)} text(s) appear more than once with the same label "
            f"({repeated_copies} extra copies)",
            repeated,
            "remove the extra copies unless the repetition is intended",
        ),
    ]


def check_label_counts(train: Sequence[Example], minimum: int) -> list[Finding]:
    """Fatal: fewer than 2 labels, or a label with fewer than ``minimum`` train examples."""
    counts = Counter(example.label for example in train)
    if len(counts) < 2:
        return _finding(
            "too_few_examples",
            FATAL,
            f"train has {len(counts)} label(s); a classifier needs at least 2",
            [repr(label) for label in counts] or ["(no examples)"],
            "check data.label_field and the train file",
        )
    rare = sorted((count, label) for label, count in counts.items() if count < minimum)
    return _finding(
        "too_few_examples",
        FATAL,
        f"{len(rare)} label(s) have fewer than {minimum} train examples",
        [f"{label!r} ({count})" for count, label in rare],
        "add examples of these labels, merge each into a related label, or lower "
        "data.min_examples_per_label",
    )


def check_label_coverage(splits: Splits) -> list[Finding]:
    """Fatal: labels in another split that train lacks, because no model can predict them.
    Warning: train labels that another split lacks, so that the gate is calibrated without
    them (validation) or they are not measured (test)."""
    train_labels = Counter(example.label for example in splits["train"])
    unknown, missing = [], []
    for name, examples in splits.items():
        if name == "train":
            continue
        counts = Counter(example.label for example in examples)
        unknown += [
            f"{label!r} ({name}: {count})"
            for label, count in sorted(counts.items())
            if label not in train_labels
        ]
        missing += [
            f"{label!r} (not in {name})" for label in sorted(train_labels) if label not in counts
        ]
    return [
        *_finding(
            "labels_not_in_train",
            FATAL,
            f"{len(unknown)} label(s) appear in validation or test but not in train",
            unknown,
            "add train examples of these labels, or remove their rows from the other split",
        ),
        *_finding(
            "labels_missing_from_split",
            WARNING,
            f"{len(missing)} train label(s) are missing from validation or test",
            missing,
            "add examples of these labels to that split, or carve validation "
            "from train (data.validation = 'carve')",
        ),
    ]


def check_out_of_scope_label(train: Sequence[Example], label: str) -> list[Finding]:
    """Fatal: ``data.out_of_scope_label`` is set but no train example carries it."""
    if not label or any(example.label == label for example in train):
        return []
    return _finding(
        "out_of_scope_label",
        FATAL,
        "data.out_of_scope_label names a label that train does not have",
        [repr(label)],
        "set data.out_of_scope_label to the label of the out-of-scope queries, or "
        "leave it out if the data has none",
    )


def check_split_overlap(splits: Splits) -> list[Finding]:
    """Warning: texts in more than one split. A text of test that is also in train measures
    memory rather than generalisation; one with a different label is a labelling error."""
    texts: dict[str, dict[str, tuple[str, str]]] = {}
    for name, examples in splits.items():
        texts[name] = {normalize_text(e.text): (e.text, e.label) for e in examples}
    shared, conflicting = [], []
    names = list(splits)
    for i, first in enumerate(names):
        for second in names[i + 1 :]:
            for key in sorted(texts[first].keys() & texts[second].keys()):
                text, label = texts[first][key]
                other_label = texts[second][key][1]
                if label == other_label:
                    shared.append(f"{first}/{second}: {_quote(text)} ({label})")
                else:
                    conflicting.append(
                        f"{first}/{second}: {_quote(text)} ({label} in {first}, "
                        f"{other_label} in {second})"
                    )
    return [
        *_finding(
            "split_label_conflicts",
            WARNING,
            f"{len(conflicting)} text(s) appear in two splits with different labels",
            conflicting,
            "give each text one label in every split",
        ),
        *_finding(
            "split_overlap",
            WARNING,
            f"{len(shared)} text(s) appear in two splits with the same label",
            shared,
            "remove them from validation or test, so those splits measure queries the "
            "model has not seen",
        ),
    ]


def check_long_texts(
    splits: Splits, count_tokens: Callable[[list[str]], list[int]], max_length: int
) -> list[Finding]:
    """Warning: texts longer than ``max_length`` tokens, of which the model reads only the
    first ``max_length``."""
    long_texts, total = [], 0
    for name, examples in splits.items():
        counts = count_tokens([example.text for example in examples])
        total += len(counts)
        long_texts += [
            (tokens, name, example)
            for tokens, example in zip(counts, examples, strict=True)
            if tokens > max_length
        ]
    long_texts.sort(key=lambda item: -item[0])
    items = [
        f"{name}: {_quote(example.text)} ({tokens} tokens)" for tokens, name, example in long_texts
    ]
    share = len(items) / total if total else 0.0
    return _finding(
        "long_texts",
        WARNING,
        f"{len(items)} text(s) ({share:.1%}) are longer than teacher.max_length = "
        f"{max_length} tokens and will be truncated",
        items,
        "raise teacher.max_length (at most 512; training time grows with it), or accept that "
        "the model reads only the first tokens",
    )


def run_data_checks(
    splits: Splits,
    *,
    min_examples_per_label: int,
    max_length: int,
    count_tokens: Callable[[list[str]], list[int]],
    out_of_scope_label: str = "",
) -> DataCheckReport:
    """Run every check over ``splits`` and return the report; raises nothing."""
    if "train" not in splits:
        raise ValueError(f"splits must include 'train', got {sorted(splits)}")
    train = splits["train"]
    findings = [
        *check_empty_texts(splits),
        *check_duplicates(splits),
        *check_label_counts(train, min_examples_per_label),
        *check_label_coverage(splits),
        *check_out_of_scope_label(train, out_of_scope_label),
        *check_split_overlap(splits),
        *check_long_texts(splits, count_tokens, max_length),
    ]
    findings.sort(key=lambda finding: (finding.severity != FATAL, CHECKS.index(finding.check)))
    return DataCheckReport(
        findings=tuple(findings),
        split_sizes={name: len(examples) for name, examples in splits.items()},
        labels=len({example.label for example in train}),
    )


def tokenizer_counter(max_length: int) -> Callable[[list[str]], list[int]]:
    """Return a function that counts the tokens, special tokens included, that the build's
    tokenizer gives each text before truncation."""
    from export.modeling import load_tokenizer

    tokenizer = load_tokenizer(max_length)
    tokenizer.no_truncation()

    def count_tokens(texts: list[str]) -> list[int]:
        return [len(encoding.ids) for encoding in tokenizer.encode_batch(texts)]

    return count_tokens


def check_splits(
    config: BuildConfig,
    train: Sequence[Example],
    validation: Sequence[Example],
    test: Sequence[Example],
) -> DataCheckReport:
    """Run every check on a build's splits with the limits of its config."""
    return run_data_checks(
        {"train": train, "validation": validation, "test": test},
        min_examples_per_label=config.data.min_examples_per_label,
        max_length=config.teacher.max_length,
        count_tokens=tokenizer_counter(config.teacher.max_length),
        out_of_scope_label=out_of_scope_label(config.data),
    )


def check_build_data(
    config: BuildConfig,
    train: Sequence[Example],
    validation: Sequence[Example],
    test: Sequence[Example],
) -> dict:
    """Run the checks on a build's splits, log the report and return it as a dict for the
    build report, with the file each split was read from.

    Raises DataCheckError when a check is fatal.
    """
    report = check_splits(config, train, validation, test)
    if report.findings:
        log.warning("%s", report.format())
    else:
        log.info("%s", report.format())
    if report.fatal:
        raise DataCheckError(report)
    result = report.to_dict()
    result["sources"] = resolve_sources(config.data).describe(config.data)
    return result


def main(argv: list[str] | None = None) -> int:
    """``python -m export.data_checks --config FILE``: read the data as the build would, print
    the report and return 0, or 2 when a check is fatal or the config is invalid."""
    parser = argparse.ArgumentParser(
        prog="python -m export.data_checks",
        description="Check the data of a build config without training anything.",
    )
    parser.add_argument("--config", required=True, help="TOML build config")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")

    from export.build import load_data
    from export.config import load_config

    try:
        config = load_config(args.config)
        sources = resolve_sources(config.data).describe(config.data)
        train, validation, test = load_data(config)
        report = check_splits(config, train, validation, test)
    except EdgeRuntimeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for name, source in sources.items():
        print(f"{name}: {source}")
    print(report.format())
    return 2 if report.fatal else 0


if __name__ == "__main__":
    sys.exit(main())
