"""Loaders for labelled intent data: CLINC150, Banking77 and plain CSV or JSON Lines files.

Every loader returns a list of ``Example`` in file order. Texts and labels are stripped of
surrounding whitespace, and an empty text or label is an error. Files are decoded as UTF-8,
with or without a byte order mark.

A malformed file raises ``DataFormatError`` with the file, the 1-based line and the field.
The line is None only where no single line is at fault: an empty CSV file or a missing
CLINC150 split key. The module uses only the standard library, so that it runs on devices
without numpy or pandas.
"""

from __future__ import annotations

import codecs
import csv
import io
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edge_runtime.errors import ConfigError, DataFormatError

StrPath = str | os.PathLike[str]

OOS_LABEL = "oos"
"""Label of the out-of-scope queries in CLINC150."""

CLINC150_FILE = "data_full.json"
CLINC150_SPLITS = ("train", "val", "test")

_JSON_WHITESPACE = " \t\n\r"


@dataclass(frozen=True)
class Example:
    """One labelled query."""

    text: str
    label: str


# ---------------------------------------------------------------------------------------------
# Shared helpers


def _read_utf8(path: StrPath) -> str:
    """Read a whole file as UTF-8, dropping a leading byte order mark.

    Raises DataFormatError with the line of the first byte that is not valid UTF-8.
    """
    data = Path(path).read_bytes()
    if data.startswith(codecs.BOM_UTF8):
        data = data[len(codecs.BOM_UTF8) :]
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        line = data.count(b"\n", 0, err.start) + 1
        raise DataFormatError(
            path, line, None, f"invalid UTF-8 byte {data[err.start]:#04x}. Save the file as UTF-8"
        ) from err


def _describe_json_type(value: object) -> str:
    """Return the JSON type of a decoded value with its article, such as "an array"."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    return "an object"


def _clean_text(
    path: StrPath, line: int | None, field: str, value: str, record_name: str
) -> str:
    """Strip a text value and raise DataFormatError if nothing is left."""
    text = value.strip()
    if not text:
        raise DataFormatError(path, line, field, f"empty text in {record_name}")
    return text


def _clean_label(
    path: StrPath, line: int | None, field: str, value: str, record_name: str
) -> str:
    """Strip a label value and raise DataFormatError if nothing is left."""
    label = value.strip()
    if not label:
        raise DataFormatError(path, line, field, f"empty label in {record_name}")
    return label


# ---------------------------------------------------------------------------------------------
# CLINC150


def _skip_json_whitespace(text: str, pos: int) -> int:
    while pos < len(text) and text[pos] in _JSON_WHITESPACE:
        pos += 1
    return pos


def _line_at(text: str, offset: int) -> int:
    """Return the 1-based line number of a character offset."""
    return text.count("\n", 0, offset) + 1


def _find_member_offsets(text: str) -> dict[str, tuple[int, list[int]]]:
    """Map each key of a top-level JSON object to the offsets of its value and its items.

    The item list is empty unless the value is an array. ``text`` must already have been
    parsed by ``json.loads`` as an object, so this walk does no error checking. When a key
    repeats, the last one wins, as in ``json.loads``.
    """
    decoder = json.JSONDecoder()
    members: dict[str, tuple[int, list[int]]] = {}
    pos = _skip_json_whitespace(text, 0) + 1  # past "{"
    pos = _skip_json_whitespace(text, pos)
    if text[pos] == "}":
        return members

    while True:
        key, pos = decoder.raw_decode(text, pos)
        pos = _skip_json_whitespace(text, pos) + 1  # past ":"
        value_offset = _skip_json_whitespace(text, pos)
        item_offsets: list[int] = []

        if text[value_offset] == "[":
            pos = _skip_json_whitespace(text, value_offset + 1)
            while text[pos] != "]":
                item_offsets.append(pos)
                _, pos = decoder.raw_decode(text, pos)
                pos = _skip_json_whitespace(text, pos)
                if text[pos] == ",":
                    pos = _skip_json_whitespace(text, pos + 1)
            pos += 1  # past "]"
        else:
            _, pos = decoder.raw_decode(text, value_offset)

        members[key] = (value_offset, item_offsets)
        pos = _skip_json_whitespace(text, pos)
        if text[pos] == "}":
            return members
        pos = _skip_json_whitespace(text, pos + 1)  # past ","


class _Clinc150File:
    """A decoded data_full.json with the line lookups that its error messages need."""

    def __init__(self, path: Path):
        self.path = path
        self.text = _read_utf8(path)
        try:
            self.data = json.loads(self.text)
        except json.JSONDecodeError as err:
            raise DataFormatError(
                path, err.lineno, None, f"invalid JSON: {err.msg} (column {err.colno})"
            ) from err
        # Record offsets are found only when an error needs them, because the scan parses
        # the file a second time.
        self._members: dict[str, tuple[int, list[int]]] | None = None

        if not isinstance(self.data, dict):
            line = _line_at(self.text, _skip_json_whitespace(self.text, 0))
            raise DataFormatError(
                path,
                line,
                None,
                f"expected a JSON object with the keys train, val, test, oos_train, oos_val "
                f"and oos_test, found {_describe_json_type(self.data)}",
            )

    def _member_offsets(self) -> dict[str, tuple[int, list[int]]]:
        if self._members is None:
            self._members = _find_member_offsets(self.text)
        return self._members

    def value_line(self, key: str) -> int:
        value_offset, _ = self._member_offsets()[key]
        return _line_at(self.text, value_offset)

    def record_line(self, key: str, index: int) -> int:
        _, item_offsets = self._member_offsets()[key]
        return _line_at(self.text, item_offsets[index])

    def load_pairs(self, key: str) -> list[Example]:
        """Validate the [text, intent] pairs under ``key`` and return them as examples.

        Records under an ``oos_`` key must carry the intent OOS_LABEL, and records under
        any other key must not.
        """
        if key not in self.data:
            raise DataFormatError(
                self.path,
                None,
                key,
                f"missing key {key!r} (the file has the keys {sorted(self.data)})",
            )
        records = self.data[key]
        if not isinstance(records, list):
            raise DataFormatError(
                self.path,
                self.value_line(key),
                key,
                f"expected an array of [text, intent] pairs, found {_describe_json_type(records)}",
            )

        out_of_scope = key.startswith("oos_")
        examples = []
        for index, record in enumerate(records):
            examples.append(self._pair_to_example(key, index, record, out_of_scope))
        return examples

    def _pair_to_example(
        self, key: str, index: int, record: object, out_of_scope: bool
    ) -> Example:
        record_name = f"record {key}[{index}]"

        if not isinstance(record, list) or len(record) != 2:
            found = (
                f"an array of {len(record)} items"
                if isinstance(record, list)
                else _describe_json_type(record)
            )
            raise DataFormatError(
                self.path,
                self.record_line(key, index),
                f"{key}[{index}]",
                f"expected a [text, intent] pair of 2 strings, found {found}",
            )

        raw_text, raw_intent = record
        if not isinstance(raw_text, str):
            raise DataFormatError(
                self.path,
                self.record_line(key, index),
                "text",
                f"expected a string in {record_name}, found {_describe_json_type(raw_text)}",
            )
        if not isinstance(raw_intent, str):
            raise DataFormatError(
                self.path,
                self.record_line(key, index),
                "intent",
                f"expected a string in {record_name}, found {_describe_json_type(raw_intent)}",
            )

        text = raw_text.strip()
        if not text:
            raise DataFormatError(
                self.path, self.record_line(key, index), "text", f"empty text in {record_name}"
            )
        intent = raw_intent.strip()
        if not intent:
            raise DataFormatError(
                self.path, self.record_line(key, index), "intent", f"empty intent in {record_name}"
            )

        if out_of_scope and intent != OOS_LABEL:
            raise DataFormatError(
                self.path,
                self.record_line(key, index),
                "intent",
                f"out-of-scope {record_name} has the intent {intent!r}, expected {OOS_LABEL!r}",
            )
        if not out_of_scope and intent == OOS_LABEL:
            raise DataFormatError(
                self.path,
                self.record_line(key, index),
                "intent",
                f"in-scope {record_name} has the out-of-scope intent {OOS_LABEL!r}. "
                f"Move it to oos_{key}",
            )
        return Example(text, intent)


def load_clinc150(path: StrPath, split: str, include_oos: bool = True) -> list[Example]:
    """Load one split of CLINC150 from ``data_full.json`` or the folder that contains it.

    Returns the in-scope pairs of ``split`` ("train", "val" or "test") in file order,
    followed by the ``oos_<split>`` pairs, which are labelled OOS_LABEL, unless
    ``include_oos`` is False.

    Raises ValueError for an unknown split, FileNotFoundError if the file is missing and
    DataFormatError if it is malformed. A bad record is reported at the line where it
    starts, with the field "text", "intent" or, for a record that is not a pair of two
    strings, "<key>[<index>]".
    """
    if split not in CLINC150_SPLITS:
        raise ConfigError(
            f"unknown CLINC150 split {split!r}, expected one of {', '.join(CLINC150_SPLITS)}"
        )
    file_path = Path(path)
    if file_path.is_dir():
        file_path = file_path / CLINC150_FILE

    clinc = _Clinc150File(file_path)
    examples = clinc.load_pairs(split)
    if include_oos:
        examples += clinc.load_pairs(f"oos_{split}")
    return examples


# ---------------------------------------------------------------------------------------------
# CSV


def _csv_reader(text: str) -> Any:
    """Create a csv.reader over decoded file text."""
    # newline="" keeps line breaks inside quoted fields, and strict=True rejects stray
    # quotes instead of guessing where a field ends.
    return csv.reader(io.StringIO(text, newline=""), strict=True)


def _parse_csv_header(path: StrPath, rows: Any) -> list[str]:
    """Read the header row, with the column names stripped of surrounding whitespace."""
    try:
        header = next(rows, None)
    except csv.Error as err:
        raise DataFormatError(path, rows.line_num, None, f"invalid CSV header: {err}") from err
    if header is None:
        raise DataFormatError(
            path, None, None, "empty file, expected a header row such as text,label"
        )
    return [name.strip() for name in header]


def _find_column(path: StrPath, header: list[str], column: str) -> int:
    """Return the index of ``column`` in ``header``.

    Raises DataFormatError at line 1 if the column is missing or appears more than once.
    """
    count = header.count(column)
    if count == 0:
        raise DataFormatError(path, 1, column, f"missing column {column!r} in the header {header}")
    if count > 1:
        raise DataFormatError(
            path, 1, column, f"column {column!r} appears {count} times in the header {header}"
        )
    return header.index(column)


def _read_csv_examples(
    path: StrPath, text: str, text_field: str, label_field: str
) -> list[Example]:
    rows = _csv_reader(text)
    header = _parse_csv_header(path, rows)
    text_index = _find_column(path, header, text_field)
    label_index = _find_column(path, header, label_field)

    examples = []
    while True:
        # rows.line_num is the line where the previous row ended, and a quoted field may span
        # lines, so the next row starts on the line after it.
        line = rows.line_num + 1
        try:
            row = next(rows, None)
        except csv.Error as err:
            raise DataFormatError(path, line, None, f"invalid CSV: {err}") from err
        if row is None:
            return examples
        if not row:
            continue  # blank line

        if len(row) != len(header):
            raise DataFormatError(
                path,
                line,
                None,
                f"expected {len(header)} fields as in the header {header}, found {len(row)}",
            )
        record_name = f"row at line {line}"
        example_text = _clean_text(path, line, text_field, row[text_index], record_name)
        label = _clean_label(path, line, label_field, row[label_index], record_name)
        examples.append(Example(example_text, label))


def load_csv(path: StrPath, text_field: str = "text", label_field: str = "label") -> list[Example]:
    """Load a CSV file with a header row, such as ``text,label``.

    For Banking77 pass ``label_field="category"``. Other columns are ignored, blank lines
    are skipped and a quoted field may span lines. Raises DataFormatError for a missing
    column, a row whose number of fields differs from the header, or an empty text or label.
    """
    return _read_csv_examples(path, _read_utf8(path), text_field, label_field)


# ---------------------------------------------------------------------------------------------
# JSON Lines


def load_jsonl(
    path: StrPath, text_field: str = "text", label_field: str = "label"
) -> list[Example]:
    """Load a JSON Lines file with one object per line, such as ``{"text": ..., "label": ...}``.

    Blank lines are skipped and other keys are ignored. Raises DataFormatError for invalid
    JSON, a line that is not an object, a missing or non-string field, or an empty text or
    label.
    """
    text = _read_utf8(path)
    examples = []
    for line_number, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise DataFormatError(
                path, line_number, None, f"invalid JSON: {err.msg} (column {err.colno})"
            ) from err
        if not isinstance(record, dict):
            raise DataFormatError(
                path,
                line_number,
                None,
                f"expected a JSON object, found {_describe_json_type(record)}",
            )

        values = []
        for field in (text_field, label_field):
            if field not in record:
                raise DataFormatError(
                    path,
                    line_number,
                    field,
                    f"missing field (the object has the keys {sorted(record)})",
                )
            value = record[field]
            if not isinstance(value, str):
                raise DataFormatError(
                    path,
                    line_number,
                    field,
                    f"expected a string, found {_describe_json_type(value)}",
                )
            values.append(value)

        record_name = f"object at line {line_number}"
        example_text = _clean_text(path, line_number, text_field, values[0], record_name)
        label = _clean_label(path, line_number, label_field, values[1], record_name)
        examples.append(Example(example_text, label))
    return examples


# ---------------------------------------------------------------------------------------------
# Format detection


def load_split(data_dir: StrPath, split: str) -> list[Example]:
    """Load one split from a data folder, choosing the loader from the files it contains.

    The first of these that exists is used:

    1. ``data_full.json``: CLINC150 through ``load_clinc150``, with out-of-scope pairs.
    2. ``<split>.csv``: the label column is "category" (Banking77) if the header has one,
       else "label". The text column is "text".
    3. ``<split>.jsonl``: ``load_jsonl`` with the fields "text" and "label".

    Raises FileNotFoundError, naming the folder, the split and the files looked for, when
    none exists. That is a missing file rather than a malformed one, so it is not a
    DataFormatError. Malformed files raise DataFormatError as in the loaders above.
    """
    if not split or split in (".", "..") or "/" in split or os.sep in split:
        raise ConfigError(
            f"invalid split name {split!r}, expected a file name stem such as 'train'"
        )
    folder = Path(data_dir)
    if not folder.is_dir():
        raise FileNotFoundError(f"data folder {str(folder)!r} not found or not a directory")

    clinc_path = folder / CLINC150_FILE
    if clinc_path.is_file():
        return load_clinc150(clinc_path, split)

    csv_path = folder / f"{split}.csv"
    if csv_path.is_file():
        return _load_csv_detecting_label(csv_path, "text")

    jsonl_path = folder / f"{split}.jsonl"
    if jsonl_path.is_file():
        return load_jsonl(jsonl_path)

    looked_for = ", ".join(path.name for path in (clinc_path, csv_path, jsonl_path))
    raise FileNotFoundError(
        f"no data for split {split!r} in {str(folder)!r}: looked for {looked_for}"
    )


def _load_csv_detecting_label(csv_path: Path, text_field: str) -> list[Example]:
    """Load a CSV file whose label column is "category" (Banking77) if the header has one,
    else "label"."""
    text = _read_utf8(csv_path)
    header = _parse_csv_header(csv_path, _csv_reader(text))
    if "category" in header:
        label_field = "category"
    elif "label" in header:
        label_field = "label"
    else:
        raise DataFormatError(
            csv_path,
            1,
            "label",
            f"missing label column 'category' or 'label' in the header {header}",
        )
    return _read_csv_examples(csv_path, text, text_field, label_field)


DATA_FORMATS = ("auto", "clinc150", "csv", "jsonl")
"""Formats that ``load_examples`` reads; "auto" picks one from the file names."""

_FORMAT_SUFFIXES = {".json": "clinc150", ".csv": "csv", ".jsonl": "jsonl"}


def load_examples(
    path: StrPath,
    split: str = "test",
    data_format: str = "auto",
    text_field: str | None = None,
    label_field: str | None = None,
) -> list[Example]:
    """Load one split from a data folder or a single data file.

    A folder holds ``data_full.json`` (CLINC150) or one ``<split>.csv`` or ``<split>.jsonl``
    file per split. With ``data_format`` "auto" and no field named, a folder is read exactly
    as ``load_split`` reads it. A file is read whole, except a CLINC150 file, of which the
    ``split`` key is read. "auto" picks the format from the suffix: .json is CLINC150, .csv
    and .jsonl as named.

    ``text_field`` defaults to "text". ``label_field`` defaults to "label", or for CSV to
    "category" when the header has that column. Raises ConfigError for an unknown format,
    FileNotFoundError for a missing file and DataFormatError for a malformed one.
    """
    if data_format not in DATA_FORMATS:
        raise ConfigError(
            f"unknown data format {data_format!r}, expected one of {', '.join(DATA_FORMATS)}"
        )
    source = Path(path)
    if source.is_dir():
        if data_format == "auto" and text_field is None and label_field is None:
            return load_split(source, split)
        if data_format == "auto":
            data_format = _folder_format(source, split)
        names = {"clinc150": CLINC150_FILE, "csv": f"{split}.csv", "jsonl": f"{split}.jsonl"}
        source = source / names[data_format]
    if not source.is_file():
        raise FileNotFoundError(f"data file {str(source)!r} not found")
    if data_format == "auto":
        data_format = _FORMAT_SUFFIXES.get(source.suffix.lower(), "")
        if not data_format:
            raise ConfigError(
                f"cannot tell the format of {str(source)!r} from its suffix; name the format "
                f"(one of clinc150, csv, jsonl)"
            )

    if data_format == "clinc150":
        return load_clinc150(source, split)
    text_field = text_field or "text"
    if data_format == "jsonl":
        return load_jsonl(source, text_field, label_field or "label")
    if label_field is None:
        return _load_csv_detecting_label(source, text_field)
    return load_csv(source, text_field, label_field)


def _folder_format(folder: Path, split: str) -> str:
    """Return the format of the first of data_full.json, <split>.csv and <split>.jsonl that
    exists in ``folder``."""
    for name, data_format in (
        (CLINC150_FILE, "clinc150"),
        (f"{split}.csv", "csv"),
        (f"{split}.jsonl", "jsonl"),
    ):
        if (folder / name).is_file():
            return data_format
    raise FileNotFoundError(
        f"no data for split {split!r} in {str(folder)!r}: looked for {CLINC150_FILE}, "
        f"{split}.csv, {split}.jsonl"
    )
