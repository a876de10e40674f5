"""Typed build configuration, read from TOML and validated before any training starts.

A config has the sections ``[data]``, ``[teacher]``, ``[student]``, ``[calibration]``,
``[quantization]``, ``[checks]``, ``[package]`` and ``[output]``; every key has a default except
``data.path``. Unknown keys and wrong types raise ``ConfigError`` naming the key.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edge_runtime.data import DATA_FORMATS
from edge_runtime.errors import ConfigError
from edge_runtime.package import MAX_PROBABILITY, SCORE_KINDS

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib


@dataclass(frozen=True)
class DataConfig:
    path: str = ""  # folder with data_full.json, <split>.csv or <split>.jsonl
    train_split: str = "train"
    val_split: str = "val"
    test_split: str = "test"
    # Keep only the first N examples of each label in train (0 keeps all); for quick builds.
    max_train_per_label: int = 0
    max_eval_per_label: int = 0
    # Keep only these labels (empty keeps all); for quick builds.
    labels: tuple[str, ...] = ()
    # Skip the first N examples of each label in the validation split (0 skips none). The
    # skipped queries can then serve as simulated device traffic whose escalations train the
    # next student, while the gate is calibrated only on queries no student trained on.
    val_skip_per_label: int = 0
    # Escalation logs (SQLite files, or folders holding escalations.sqlite3 and its archives)
    # whose teacher-labelled records become extra student training examples.
    extra_train: tuple[str, ...] = ()
    # Loss weight of each extra example; the examples of the train split have weight 1.
    extra_train_weight: float = 1.0
    # Format of the split files (DATA_FORMATS): "auto" picks it from the file name suffix,
    # "clinc150" reads data_full.json, "csv" needs a header row, "jsonl" one object a line.
    format: str = "auto"
    # Split files, relative to path. Empty: data_full.json, <split>.csv or <split>.jsonl in
    # path, with the split names train_split, val_split and test_split.
    train_file: str = ""
    validation_file: str = ""
    test_file: str = ""
    # Column (CSV) or key (JSON Lines) of the query text and of its label.
    text_field: str = "text"
    label_field: str = "label"
    # Where the validation split comes from (VALIDATION_SOURCES): "auto" reads a validation
    # file if one is named or found and otherwise carves one from train, "file" requires a
    # file, "carve" always carves validation_fraction of each label from train.
    validation: str = "auto"
    validation_fraction: float = 0.1
    split_seed: int = 0  # seed of the carve; independent of the training seed
    # Label of the out-of-scope queries, if the data has them; CLINC150 files always use "oos".
    out_of_scope_label: str = ""
    # A label with fewer train examples (after the carve) stops the build.
    min_examples_per_label: int = 10


@dataclass(frozen=True)
class TeacherConfig:
    # "finetune" trains encoder and head, and "head" trains a linear head on the frozen
    # encoder. "package" trains nothing and uses the int8 ONNX teacher of teacher.package.
    # "onnx" trains nothing either: it loads the fine-tuned teacher of an earlier build from
    # teacher.onnx (its teacher-fp32.onnx) and continues as "finetune" would after training.
    mode: str = "finetune"
    # The fp32 teacher read in "onnx" mode, for example build/clinc150/teacher-fp32.onnx.
    onnx: str = ""
    # The teacher package read in "package" mode, for example models/clinc150-teacher.edgepkg.
    package: str = ""
    # Public key (PEM) that must have signed teacher.package; empty trusts the public half of
    # package.signer_key.
    package_signer_key: str = ""
    epochs: int = 3
    batch_size: int = 32
    learning_rate: float = 5e-5
    head_learning_rate: float = 1e-3
    weight_decay: float = 0.01
    max_length: int = 64  # tokens


@dataclass(frozen=True)
class StudentConfig:
    # Indices of the teacher's encoder layers copied into the student, in order.
    layers: tuple[int, ...] = (0, 5)
    epochs: int = 3
    batch_size: int = 32
    learning_rate: float = 1e-4
    # Learning rate of the classification head; 0 uses learning_rate. A head that starts
    # untrained (teacher.mode = "package") learns faster with a higher rate.
    head_learning_rate: float = 0.0
    weight_decay: float = 0.01
    temperature: float = 2.0  # distillation temperature of the soft targets
    # Loss = alpha * KL(teacher || student at temperature) * temperature^2 + (1 - alpha) * CE.
    alpha: float = 0.5
    # 0 keeps the word embedding table at the encoder's width (384). A rank r in 1..383
    # stores it as a (vocabulary, r) table and an (r, 384) projection, initialised from the
    # truncated SVD of the teacher's table and distilled with the rest of the student.
    embedding_rank: int = 0
    # Keep only the tokens of the train, extra and validation texts (plus the pieces every
    # text needs to tokenize) in the student and its tokenizer (export.vocab). The trim comes
    # before distillation, so the student trains with the tokenizer it ships with.
    trim_vocabulary: bool = False
    # A text file of unlabelled sentences, one per line, that the student also learns from:
    # the teacher labels each with soft targets and the student matches them (the KL term
    # only). Sentences of the validation or test split are dropped. "" uses none.
    transfer_file: str = ""
    # How many lines of transfer_file to use, from the top; 0 uses all.
    transfer_limit: int = 0
    # Width of each student layer's feed-forward block; 0 keeps the teacher's 1536. A smaller
    # width keeps the neurons whose input and output weights have the largest norms.
    intermediate_size: int = 0
    # Word-level variants of each training query (words deleted or replaced, or a run of
    # words kept) that the student also learns the teacher's soft targets on (export.augment).
    # 0 makes none.
    augment_copies: int = 0
    # false: the student's tokenizer adds no [CLS] and [SEP] around a query, so a single query
    # runs on about two tokens fewer. Needs trim_vocabulary, which gives the student a
    # tokenizer of its own.
    special_tokens: bool = True


@dataclass(frozen=True)
class CalibrationConfig:
    # Target: at most this fraction of local answers on the validation split may disagree
    # with the teacher.
    max_disagreement: float = 0.02
    # Gate score (edge_runtime.gate): "max_probability", the calibrated top-1 probability, or
    # "logit_margin", p1 / (p1 + p2) of the two most probable labels. A package with
    # "logit_margin" needs an edge-runtime that reads package schema version 3.
    score: str = MAX_PROBABILITY


@dataclass(frozen=True)
class QuantizationConfig:
    weight_type: str = "qint8"  # "qint8" or "quint8"
    # Per-channel scales keep the 2-layer CLINC150 student at 98.3% top-1 agreement with fp32
    # on test, against 95.8% with one scale per tensor (MatMul and Gather quantized).
    per_channel: bool = True


@dataclass(frozen=True)
class ChecksConfig:
    # Max absolute logit difference allowed between PyTorch and the fp32 ONNX export.
    onnx_tolerance: float = 1e-4
    # Minimum top-1 agreement of the int8 student with its fp32 model on the test split.
    min_int8_agreement: float = 0.98


@dataclass(frozen=True)
class PackageConfig:
    # ECDSA P-256 private key (PEM) that signs both packages; empty leaves them unsigned.
    signer_key: str = "models/keys/demo-signer.key.pem"
    # Device public keys (PEM) the student's content key is wrapped for; empty: not encrypted.
    recipients: tuple[str, ...] = ("models/keys/demo-device.pub.pem",)
    # Also encrypt tokenizer.json (the vocabulary is public for all-MiniLM-L6-v2).
    encrypt_tokenizer: bool = False
    # Days until the packages expire; 0 sets no expiry.
    expires_days: int = 0


@dataclass(frozen=True)
class OutputConfig:
    # Empty: build/<name>.
    dir: str = ""
    # Package name prefix. Empty: the name of the data folder (of data.path), such as "banking77".
    name: str = ""
    version: int = 1
    # Copy the student package and the int8 teacher package here (empty: do not copy).
    models_dir: str = ""


@dataclass(frozen=True)
class BuildConfig:
    data: DataConfig
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    student: StudentConfig = field(default_factory=StudentConfig)
    calibration: CalibrationConfig = field(default_factory=CalibrationConfig)
    quantization: QuantizationConfig = field(default_factory=QuantizationConfig)
    checks: ChecksConfig = field(default_factory=ChecksConfig)
    package: PackageConfig = field(default_factory=PackageConfig)
    output: OutputConfig = field(default_factory=OutputConfig)
    seed: int = 0

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def digest(self) -> str:
        """SHA-256 of the canonical JSON form, recorded in the package provenance."""
        canonical = json.dumps(self.to_dict(), sort_keys=True).encode("utf-8")
        return hashlib.sha256(canonical).hexdigest()


TEACHER_MODES = ("finetune", "head", "package", "onnx")
VALIDATION_SOURCES = ("auto", "file", "carve")

_SECTIONS = {
    "data": DataConfig,
    "teacher": TeacherConfig,
    "student": StudentConfig,
    "calibration": CalibrationConfig,
    "quantization": QuantizationConfig,
    "checks": ChecksConfig,
    "package": PackageConfig,
    "output": OutputConfig,
}


def load_config(path: str | Path, overrides: dict[str, Any] | None = None) -> BuildConfig:
    """Read a TOML config; relative ``data.path``, ``data.extra_train``, ``teacher.package`` and
    ``output`` paths resolve against the current working directory. ``overrides`` maps dotted
    keys (``"student.epochs"``) to values."""
    path = Path(path)
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except IsADirectoryError:
        raise ConfigError(f"config path {path} is a folder; pass a TOML file") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text ({exc}); save the config as UTF-8") from None
    except OSError as exc:
        raise ConfigError(f"cannot read config {path}: {exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: invalid TOML: {exc}") from None
    for dotted, value in (overrides or {}).items():
        section, _, key = dotted.partition(".")
        if not key:
            raw[section] = value
            continue
        table = raw.setdefault(section, {})
        if not isinstance(table, dict):
            raise ConfigError(
                f"override {dotted!r}: {section!r} is not a table, so it has no key {key!r}"
            )
        table[key] = value
    return parse_config(raw, source=str(path))


def parse_config(raw: dict[str, Any], source: str = "config") -> BuildConfig:
    unknown = sorted(set(raw) - set(_SECTIONS) - {"seed"})
    if unknown:
        raise ConfigError(
            f"{source}: unknown section(s) {unknown}; expected {sorted(_SECTIONS)} or 'seed'"
        )
    sections = {}
    for name, cls in _SECTIONS.items():
        table = raw.get(name, {})
        if not isinstance(table, dict):
            raise ConfigError(f"{source}: [{name}] must be a table")
        sections[name] = _build_section(cls, table, f"{source} [{name}]", name)
    seed = raw.get("seed", 0)
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise ConfigError(f"{source}: 'seed' must be an integer, got {seed!r}")
    config = BuildConfig(**sections, seed=seed)
    config = _with_output_defaults(config)
    _validate(config, source)
    return config


def _with_output_defaults(config: BuildConfig) -> BuildConfig:
    """Fill an empty output.name from the data folder's name and an empty output.dir with
    build/<name>, so that a new data set does not need an [output] section."""
    name = config.output.name
    if not name:
        data_path = Path(config.data.path.rstrip("/\\") or ".")
        folder = data_path.parent if data_path.suffix else data_path
        if folder.name in ("", ".", ".."):
            folder = folder.resolve()
        name = re.sub(r"[^A-Za-z0-9._-]+", "-", folder.name).strip("-.") or "model"
    output = dataclasses.replace(config.output, name=name,
                                 dir=config.output.dir or f"build/{name}")
    return dataclasses.replace(config, output=output)


# String keys that take one of a few names, for the messages of both checks.
_CHOICES = {
    "calibration.score": SCORE_KINDS,
    "quantization.weight_type": ("qint8", "quint8"),
}


def _choices_text(key: str) -> str:
    return " or ".join(repr(choice) for choice in _CHOICES[key])


def _build_section(cls: type, table: dict[str, Any], where: str, prefix: str) -> Any:
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(table) - set(fields))
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {unknown}; expected some of {sorted(fields)}")
    values = {}
    for name, value in table.items():
        default = fields[name].default
        key = f"{prefix}.{name}"
        if isinstance(default, bool):
            ok = isinstance(value, bool)
        elif isinstance(default, float):
            ok = isinstance(value, (int, float)) and not isinstance(value, bool)
            value = float(value) if ok else value
        elif isinstance(default, int):
            ok = isinstance(value, int) and not isinstance(value, bool)
        elif isinstance(default, tuple):
            # Tuple fields hold layer indices (int), label names or key paths (str).
            item_type = int if name == "layers" else str
            ok = isinstance(value, list) and all(
                isinstance(item, item_type) and not isinstance(item, bool) for item in value
            )
            value = tuple(value) if ok else value
        else:
            ok = isinstance(value, type(default))
        if not ok:
            expected = type(default).__name__
            if isinstance(default, tuple):
                expected = "a list of integers" if name == "layers" else "a list of strings"
            if key in _CHOICES:
                expected = f"a string, {_choices_text(key)}"
            raise ConfigError(f"{where}: key {key!r} is {value!r}; expected {expected}")
        values[name] = value
    return cls(**values)


def _validate(config: BuildConfig, source: str) -> None:
    def fail(key: str, value: Any, expected: str) -> None:
        raise ConfigError(f"{source}: key {key!r} is {value!r}; expected {expected}")

    if not config.data.path:
        fail("data.path", config.data.path, "the folder of a data set")
    _validate_extra_train(config.data, fail)
    _validate_data_files(config.data, fail)
    _validate_teacher(config.teacher, config.package, fail)
    if config.data.val_skip_per_label < 0:
        fail("data.val_skip_per_label", config.data.val_skip_per_label,
             "0 (skip none) or a positive integer")
    for key, value in [
        ("teacher.epochs", config.teacher.epochs),
        ("teacher.batch_size", config.teacher.batch_size),
        ("student.epochs", config.student.epochs),
        ("student.batch_size", config.student.batch_size),
        ("output.version", config.output.version),
    ]:
        if value < 1:
            fail(key, value, "an integer of at least 1")
    if not 8 <= config.teacher.max_length <= 512:
        fail("teacher.max_length", config.teacher.max_length, "8 to 512 tokens")
    layers = config.student.layers
    if not layers or not all(isinstance(i, int) and 0 <= i < 6 for i in layers):
        fail("student.layers", list(layers), "a non-empty list of teacher layer indices 0-5")
    if not 0 <= config.student.embedding_rank < 384:
        fail("student.embedding_rank", config.student.embedding_rank,
             "0 (the full width of 384) or a rank from 1 to 383, for example 192")
    if not 0 <= config.student.intermediate_size < 1536:
        fail("student.intermediate_size", config.student.intermediate_size,
             "0 (the teacher's 1536) or a width from 1 to 1535, for example 768")
    if config.student.transfer_limit < 0:
        fail("student.transfer_limit", config.student.transfer_limit, "0 (all lines) or more")
    if not config.student.special_tokens and not config.student.trim_vocabulary:
        fail("student.special_tokens", config.student.special_tokens,
             "true, or set student.trim_vocabulary = true so the student has its own tokenizer")
    if not 0 <= config.student.augment_copies <= 20:
        fail("student.augment_copies", config.student.augment_copies,
             "0 (none) or a number of variants per training query from 1 to 20")
    if config.student.transfer_file and not Path(config.student.transfer_file).is_file():
        fail("student.transfer_file", config.student.transfer_file,
             "a text file with one sentence per line, or \"\" for none")
    if not 0.0 <= config.student.alpha <= 1.0:
        fail("student.alpha", config.student.alpha, "a number in [0, 1]")
    for key, value in [
        ("teacher.learning_rate", config.teacher.learning_rate),
        ("teacher.head_learning_rate", config.teacher.head_learning_rate),
        ("student.learning_rate", config.student.learning_rate),
        ("student.temperature", config.student.temperature),
        ("checks.onnx_tolerance", config.checks.onnx_tolerance),
    ]:
        if not 0.0 < value < math.inf:
            fail(key, value, "a positive finite number")
    for key, value in [
        ("teacher.weight_decay", config.teacher.weight_decay),
        ("student.weight_decay", config.student.weight_decay),
        ("student.head_learning_rate", config.student.head_learning_rate),
    ]:
        if not 0.0 <= value < math.inf:
            fail(key, value, "a non-negative finite number")
    if not 0.0 < config.calibration.max_disagreement < 1.0:
        fail("calibration.max_disagreement", config.calibration.max_disagreement,
             "a fraction in (0, 1), for example 0.02")
    if config.calibration.score not in _CHOICES["calibration.score"]:
        fail("calibration.score", config.calibration.score, _choices_text("calibration.score"))
    if config.package.expires_days < 0:
        fail("package.expires_days", config.package.expires_days, "0 (no expiry) or more days")
    if config.quantization.weight_type not in _CHOICES["quantization.weight_type"]:
        fail("quantization.weight_type", config.quantization.weight_type,
             _choices_text("quantization.weight_type"))
    if not 0.0 <= config.checks.min_int8_agreement <= 1.0:
        fail("checks.min_int8_agreement", config.checks.min_int8_agreement, "a fraction in [0, 1]")


def _validate_extra_train(data: DataConfig, fail: Any) -> None:
    """Check the form of the extra_train keys; build() reads the logs before any training."""
    for path in data.extra_train:
        if not path.strip():
            fail("data.extra_train", list(data.extra_train),
                 "paths of escalation log files or folders, none empty")
    duplicates = sorted({path for path in data.extra_train if data.extra_train.count(path) > 1})
    if duplicates:
        fail("data.extra_train", list(data.extra_train),
             f"each path once; {duplicates} is listed more than once")
    if not 0.0 < data.extra_train_weight < math.inf:
        fail("data.extra_train_weight", data.extra_train_weight, "a positive finite number")


def _validate_data_files(data: DataConfig, fail: Any) -> None:
    """Check the format, split and field keys of [data]; export.dataset checks that the files
    exist when the build reads them."""
    if data.format not in DATA_FORMATS:
        fail("data.format", data.format, "one of " + ", ".join(map(repr, DATA_FORMATS)))
    if data.validation not in VALIDATION_SOURCES:
        fail("data.validation", data.validation,
             "one of " + ", ".join(map(repr, VALIDATION_SOURCES)))
    if not 0.0 < data.validation_fraction <= 0.5:
        fail("data.validation_fraction", data.validation_fraction,
             "a fraction above 0 and at most 0.5, for example 0.1")
    if data.min_examples_per_label < 1:
        fail("data.min_examples_per_label", data.min_examples_per_label, "an integer of at least 1")
    for key in ("train_split", "val_split", "test_split"):
        name = getattr(data, key)
        if not name.strip() or "/" in name or "\\" in name or name in (".", ".."):
            fail(f"data.{key}", name, "a split name such as 'train', without slashes")
    files = {key: getattr(data, key) for key in ("train_file", "validation_file", "test_file")}
    for key, value in files.items():
        if value and not value.strip():
            fail(f"data.{key}", value, "a file path relative to data.path, or no value")
    if data.format == "clinc150":
        for key, value in files.items():
            if value:
                fail(f"data.{key}", value,
                     "no value, because a CLINC150 data_full.json holds every split: set "
                     "data.path to the file or its folder and choose splits with data.train_split, "
                     "data.val_split and data.test_split")
        if data.out_of_scope_label not in ("", "oos"):
            fail("data.out_of_scope_label", data.out_of_scope_label,
                 "'oos' or no value, because CLINC150 labels its out-of-scope queries 'oos'")
    if data.format == "auto":
        for key, value in files.items():
            if value and Path(value).suffix.lower() not in (".csv", ".jsonl"):
                fail("data.format", data.format,
                     f"'csv' or 'jsonl', because data.{key} {value!r} does not end in .csv or "
                     ".jsonl, so its format cannot be told from its name")
    for key in ("text_field", "label_field"):
        if not getattr(data, key).strip():
            fail(f"data.{key}", getattr(data, key), "the name of a CSV column or JSON key")
    if data.text_field == data.label_field:
        fail("data.label_field", data.label_field,
             f"a field other than data.text_field ({data.text_field!r})")
    if data.validation == "carve" and data.validation_file:
        fail("data.validation_file", data.validation_file,
             "no value, because data.validation is 'carve'; set data.validation = 'file' to "
             "read this file instead")


def _validate_teacher(teacher: TeacherConfig, package: PackageConfig, fail: Any) -> None:
    if teacher.mode not in TEACHER_MODES:
        fail("teacher.mode", teacher.mode, "'finetune', 'head', 'package' or 'onnx'")
    if teacher.mode == "onnx" and not teacher.onnx:
        fail("teacher.onnx", teacher.onnx,
             "the path of an earlier build's teacher-fp32.onnx, because teacher.mode is 'onnx'")
    if teacher.mode != "onnx" and teacher.onnx:
        fail("teacher.onnx", teacher.onnx,
             f"no value, because teacher.mode is {teacher.mode!r}; set teacher.mode = 'onnx' "
             "to start from that file")
    if teacher.mode == "package":
        if not teacher.package:
            fail("teacher.package", teacher.package,
                 "the path of a teacher package, because teacher.mode is 'package'")
        if not teacher.package_signer_key and not package.signer_key:
            fail("teacher.package_signer_key", teacher.package_signer_key,
                 "the public key that signed teacher.package, because package.signer_key is "
                 "empty too")
        return
    for key, value in [("teacher.package", teacher.package),
                       ("teacher.package_signer_key", teacher.package_signer_key)]:
        if value:
            fail(key, value, f"no value, because teacher.mode is {teacher.mode!r}; set "
                             "teacher.mode = 'package' to use a teacher package")


def parse_override(item: str) -> tuple[str, object]:
    """Split ``KEY=VALUE``; the value is read as a TOML value, else kept as a string."""
    key, separator, text = item.partition("=")
    if not separator or not key:
        raise ConfigError(
            f"--set {item!r}: expected KEY=VALUE, for example student.epochs=4"
        )
    try:
        value = tomllib.loads(f"value = {text}")["value"]
    except tomllib.TOMLDecodeError:
        value = text
    return key.strip(), value
