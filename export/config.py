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
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edge_runtime.errors import ConfigError

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


@dataclass(frozen=True)
class TeacherConfig:
    # "finetune" trains encoder and head, and "head" trains a linear head on the frozen
    # encoder. "package" trains nothing and uses the int8 ONNX teacher of teacher.package.
    mode: str = "finetune"
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


@dataclass(frozen=True)
class CalibrationConfig:
    # Target: at most this fraction of local answers on the validation split may disagree
    # with the teacher.
    max_disagreement: float = 0.02


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
    dir: str = "build/clinc150"
    name: str = "clinc150"
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


TEACHER_MODES = ("finetune", "head", "package")

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
    _validate(config, source)
    return config


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
            raise ConfigError(f"{where}: key {key!r} is {value!r}; expected {expected}")
        values[name] = value
    return cls(**values)


def _validate(config: BuildConfig, source: str) -> None:
    def fail(key: str, value: Any, expected: str) -> None:
        raise ConfigError(f"{source}: key {key!r} is {value!r}; expected {expected}")

    if not config.data.path:
        fail("data.path", config.data.path, "the folder of a data set")
    _validate_extra_train(config.data, fail)
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
    if config.package.expires_days < 0:
        fail("package.expires_days", config.package.expires_days, "0 (no expiry) or more days")
    if config.quantization.weight_type not in ("qint8", "quint8"):
        fail("quantization.weight_type", config.quantization.weight_type, "'qint8' or 'quint8'")
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


def _validate_teacher(teacher: TeacherConfig, package: PackageConfig, fail: Any) -> None:
    if teacher.mode not in TEACHER_MODES:
        fail("teacher.mode", teacher.mode, "'finetune', 'head' or 'package'")
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
