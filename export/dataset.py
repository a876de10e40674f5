"""Read the train, validation and test splits that the ``[data]`` section of a build config
names.

``data.path`` is a folder, or a CLINC150 ``data_full.json`` file. Each split is read from the
file its ``*_file`` key names, relative to that folder, or else from the file that the split
name and the format give: ``data_full.json`` (CLINC150, one key a split), ``<split>.csv`` or
``<split>.jsonl``. Without a validation file the validation split is carved from train:
``validation_fraction`` of each label's texts, drawn with ``split_seed``. A missing file or a
field that the files lack raises ``ConfigError`` naming the key to change, before any training
starts.
"""

from __future__ import annotations

import math
import random
import unicodedata
from dataclasses import dataclass
from pathlib import Path

from edge_runtime.data import (
    CLINC150_FILE,
    OOS_LABEL,
    Example,
    load_clinc150,
    load_csv,
    load_jsonl,
)
from edge_runtime.errors import ConfigError, DataFormatError
from export.config import DataConfig

_SUFFIX_FORMATS = {".csv": "csv", ".jsonl": "jsonl"}


@dataclass(frozen=True)
class SplitSource:
    """The file that one split is read from."""

    path: Path
    data_format: str  # "clinc150", "csv" or "jsonl"
    split: str  # the key read from a CLINC150 file; the split name otherwise
    key: str  # the config key to change when the file is wrong, such as "data.train_file"

    def describe(self) -> str:
        if self.data_format == "clinc150":
            return f"{self.path} (clinc150, key {self.split!r})"
        return f"{self.path} ({self.data_format})"


@dataclass(frozen=True)
class SplitSources:
    """The source file of each split; ``validation`` is None when it is carved from train."""

    train: SplitSource
    validation: SplitSource | None
    test: SplitSource

    def describe(self, data: DataConfig) -> dict[str, str]:
        if self.validation is None:
            validation = (
                f"carved from train: {data.validation_fraction:.0%} of each label, "
                f"split_seed {data.split_seed}"
            )
        else:
            validation = self.validation.describe()
        return {
            "train": self.train.describe(),
            "validation": validation,
            "test": self.test.describe(),
        }


def resolve_sources(data: DataConfig) -> SplitSources:
    """Find the file of each split; raises ConfigError naming the key when one is missing."""
    root = Path(data.path)
    if not root.exists():
        raise ConfigError(
            f"data.path: folder {str(root)!r} not found (relative paths start at the current "
            f"folder, {Path.cwd()}); set data.path to the folder that contains the data files"
        )
    clinc150 = _clinc150_file(root, data)
    if root.is_file() and clinc150 is None:
        raise ConfigError(
            f"data.path: {str(root)!r} is a file; set data.path to the folder that contains the "
            "data files and name them with data.train_file, data.validation_file and "
            "data.test_file"
        )

    train = _source(root, clinc150, data, data.train_file, data.train_split, "data.train_file")
    test = _source(root, clinc150, data, data.test_file, data.test_split, "data.test_file")
    validation = None
    if data.validation != "carve":
        validation = _source(
            root,
            clinc150,
            data,
            data.validation_file,
            data.val_split,
            "data.validation_file",
            required=data.validation == "file",
        )
    if clinc150 is not None and data.out_of_scope_label not in ("", OOS_LABEL):
        raise ConfigError(
            f"data.out_of_scope_label is {data.out_of_scope_label!r}, but {clinc150} is a "
            f"CLINC150 file, which labels its out-of-scope queries {OOS_LABEL!r}; set it to "
            f"{OOS_LABEL!r} or leave it out"
        )
    return SplitSources(train=train, validation=validation, test=test)


def out_of_scope_label(data: DataConfig) -> str:
    """Return the label of the out-of-scope queries: "oos" for CLINC150 files, else
    ``data.out_of_scope_label``, which is empty when the data has no such queries."""
    root = Path(data.path)
    if _clinc150_file(root, data) is not None:
        return OOS_LABEL
    return data.out_of_scope_label


def _clinc150_file(root: Path, data: DataConfig) -> Path | None:
    """Return the CLINC150 file that the config reads, or None when it reads other files."""
    if data.format not in ("auto", "clinc150"):
        return None
    if root.is_file():
        return root if data.format == "clinc150" or root.suffix.lower() == ".json" else None
    candidate = root / CLINC150_FILE
    if candidate.is_file():
        return candidate
    if data.format == "clinc150":
        raise ConfigError(
            f"data.path: {str(root)!r} has no {CLINC150_FILE}, but data.format is 'clinc150'; "
            "set data.path to the CLINC150 folder or file, or set data.format to the format "
            "of the files there"
        )
    return None


def _source(
    root: Path,
    clinc150: Path | None,
    data: DataConfig,
    file: str,
    split: str,
    key: str,
    required: bool = True,
) -> SplitSource | None:
    if file:
        path = root / file
        if not path.is_file():
            raise ConfigError(
                f"{key}: file {str(path)!r} not found; the path is relative to data.path "
                f"({str(root)!r})"
            )
        data_format = data.format
        if data_format == "auto":
            data_format = _SUFFIX_FORMATS[path.suffix.lower()]
        return SplitSource(path=path, data_format=data_format, split=split, key=key)

    if clinc150 is not None:
        return SplitSource(path=clinc150, data_format="clinc150", split=split, key=key)
    formats = ["csv", "jsonl"] if data.format == "auto" else [data.format]
    candidates = [(root / f"{split}.{data_format}", data_format) for data_format in formats]
    for path, data_format in candidates:
        if path.is_file():
            return SplitSource(path=path, data_format=data_format, split=split, key=key)
    if not required:
        return None
    split_key = {
        "data.train_file": "data.train_split",
        "data.test_file": "data.test_split",
        "data.validation_file": "data.val_split",
    }[key]
    looked_for = " or ".join(repr(path.name) for path, _ in candidates)
    raise ConfigError(
        f"{key}: no file for split {split!r} in {str(root)!r} (looked for {looked_for}); name "
        f"the file with {key}, or rename it after {split_key}"
    )


def read_split(source: SplitSource, data: DataConfig) -> list[Example]:
    """Read one split file. A column or key that the file lacks raises ConfigError naming
    data.text_field or data.label_field; other format problems raise DataFormatError."""
    try:
        if source.data_format == "clinc150":
            return load_clinc150(source.path, source.split)
        if source.data_format == "csv":
            return load_csv(source.path, data.text_field, data.label_field)
        return load_jsonl(source.path, data.text_field, data.label_field)
    except DataFormatError as err:
        # Only a field missing from the CSV header or the first JSON object points at the
        # config. A field missing further down is one malformed record.
        missing_field = (
            err.line == 1
            and err.field in (data.text_field, data.label_field)
            and err.problem.startswith("missing")
        )
        if source.data_format == "clinc150" or not missing_field:
            raise
        key = "data.text_field" if err.field == data.text_field else "data.label_field"
        content = "query text" if key == "data.text_field" else "label"
        raise ConfigError(
            f"{key} is {err.field!r}, but {err}; set {key} to the name of the "
            f"{'column' if source.data_format == 'csv' else 'key'} that contains the {content}"
        ) from err


def normalize_text(text: str) -> str:
    """Return the form in which two texts count as the same: NFKC, case-folded, with runs of
    whitespace collapsed to one space. The uncased tokenizer gives such variants the same
    tokens."""
    return " ".join(unicodedata.normalize("NFKC", text).casefold().split())


def carve_validation(
    examples: list[Example], fraction: float, seed: int
) -> tuple[list[Example], list[Example]]:
    """Split ``examples`` into train and validation, stratified by label.

    Each label with at least 2 distinct texts gives ``round(count * fraction)`` of them, at
    least 1 and at most count - 1, drawn at random with ``seed``. A label with one text keeps
    it in train. Every copy of a chosen text moves to validation. So repeated texts do not
    straddle the two parts, and a text with two labels stays in one split, where the data
    checks find it. Both parts keep the input order.
    """
    texts_of_label: dict[str, list[str]] = {}
    for example in examples:
        texts = texts_of_label.setdefault(example.label, [])
        key = normalize_text(example.text)
        if key not in texts:
            texts.append(key)
    rng = random.Random(seed)
    chosen: set[str] = set()
    for label in sorted(texts_of_label):
        texts = texts_of_label[label]
        if len(texts) < 2:
            continue
        count = min(max(math.floor(len(texts) * fraction + 0.5), 1), len(texts) - 1)
        chosen.update(rng.sample(texts, count))
    train = [example for example in examples if normalize_text(example.text) not in chosen]
    validation = [example for example in examples if normalize_text(example.text) in chosen]
    return train, validation


def load_splits(data: DataConfig) -> tuple[list[Example], list[Example], list[Example]]:
    """Read train, validation and test as ``[data]`` names them, carving validation from
    train when there is no validation file."""
    sources = resolve_sources(data)
    train = read_split(sources.train, data)
    test = read_split(sources.test, data)
    if sources.validation is None:
        train, validation = carve_validation(train, data.validation_fraction, data.split_seed)
    else:
        validation = read_split(sources.validation, data)
    return train, validation, test
