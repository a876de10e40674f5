"""The build pipeline: data -> teacher -> ONNX -> int8 -> student distillation -> ONNX -> int8
-> calibration -> packages and a build report.

Outputs in ``output.dir``:

- ``teacher-fp32.onnx``, ``teacher-int8.onnx``, ``student-fp32.onnx``, ``student-int8.onnx`` and
  ``tokenizer.json`` (inputs of the latency benchmark);
- ``<name>-student.edgepkg``: the int8 student with its calibrated gate, for devices;
- ``<name>-teacher.edgepkg``: the int8 teacher, served by the gateway;
- ``build_report.json`` and ``build_report.md``.

With ``output.models_dir`` set, the two packages and the reports are also copied there.
"""

from __future__ import annotations

import datetime as dt
import logging
import platform
import shutil
import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import torch

from edge_runtime import encryption, signing
from edge_runtime.data import Example, load_split
from edge_runtime.errors import ConfigError, ModelError
from edge_runtime.metrics import accuracy_figures
from edge_runtime.package import write_package
from export.calibrate import calibrate
from export.config import BuildConfig, PackageConfig
from export.modeling import (
    PRETRAINED_NAME,
    count_parameters,
    cut_student,
    load_pretrained_classifier,
    load_tokenizer,
)
from export.onnx_export import (
    INPUT_NAMES,
    OUTPUT_NAMES,
    check_export,
    export_onnx,
    onnx_logits,
    quantize_int8,
    session_from_file,
)
from export.report import write_reports
from export.train import distil_student, predict_logits, train_teacher

log = logging.getLogger(__name__)

EXPORT_CHECK_TEXTS = 512
GOLDEN_COUNT = 8


def load_data(config: BuildConfig) -> tuple[list[Example], list[Example], list[Example]]:
    """Read the three splits and apply the quick-build filters of ``[data]``."""
    data = config.data
    splits = [load_split(data.path, name) for name in
              (data.train_split, data.val_split, data.test_split)]
    if data.labels:
        keep = set(data.labels)
        missing = keep - {e.label for e in splits[0]}
        if missing:
            raise ConfigError(f"data.labels names labels not in the train split: {sorted(missing)}")
        splits = [[e for e in split if e.label in keep] for split in splits]
    limits = [data.max_train_per_label, data.max_eval_per_label, data.max_eval_per_label]
    splits = [_first_per_label(split, limit) for split, limit in zip(splits, limits, strict=True)]
    train, val, test = splits

    train_labels = {e.label for e in train}
    for name, split in (("validation", val), ("test", test)):
        unknown = sorted({e.label for e in split} - train_labels)
        if unknown:
            raise ConfigError(
                f"the {name} split has labels that train lacks: {unknown[:5]}; every label needs "
                "training examples"
            )
        if not split:
            raise ConfigError(f"the {name} split is empty after filtering; check [data]")
    return train, val, test


def _first_per_label(examples: list[Example], limit: int) -> list[Example]:
    if limit <= 0:
        return examples
    seen: Counter[str] = Counter()
    kept = []
    for example in examples:
        if seen[example.label] < limit:
            seen[example.label] += 1
            kept.append(example)
    return kept


def load_package_keys(package: PackageConfig) -> tuple[Any, list[Any]]:
    """Load the signer's private key and the recipients' public keys named in ``[package]``."""
    signer_key = None
    if package.signer_key:
        try:
            pem = Path(package.signer_key).read_bytes()
        except OSError as exc:
            raise ConfigError(f"package.signer_key: cannot read {package.signer_key}: {exc}; "
                              "generate one with `edge-runtime keys generate`") from None
        signer_key = signing.load_private_key_pem(pem)
    recipients = [encryption.load_public_key(path) for path in package.recipients]
    return signer_key, recipients


def _manifest(config: BuildConfig, role: str, labels: list[str], precision: str,
              quantization: dict | None, provenance: dict, gate: dict | None,
              golden: list[dict]) -> dict:
    created = dt.datetime.now(dt.timezone.utc)
    expires = None
    if config.package.expires_days:
        expires = created + dt.timedelta(days=config.package.expires_days)
    return {
        "name": f"{config.output.name}-{role}",
        "version": config.output.version,
        "created_at": created.isoformat(timespec="seconds"),
        "expires_at": expires.isoformat(timespec="seconds") if expires else None,
        "task": "text-classification",
        "labels": labels,
        "model": {
            "member": "model.onnx",
            "inputs": list(INPUT_NAMES),
            "outputs": list(OUTPUT_NAMES),
            "max_length": config.teacher.max_length,
            "precision": precision,
            "quantization": quantization,
            "role": role,
        },
        "tokenizer": {"member": "tokenizer.json", "padding": "none for single queries",
                      "truncation": config.teacher.max_length},
        "gate": gate,
        "golden": golden,
        "provenance": provenance,
    }


def build(config: BuildConfig) -> dict:
    """Run the whole pipeline; returns the report that is also written to disk."""
    started = time.perf_counter()
    torch.manual_seed(config.seed)
    out = Path(config.output.dir)
    out.mkdir(parents=True, exist_ok=True)
    report: dict = {"config": config.to_dict(), "config_sha256": config.digest(), "stages": {}}

    # Data.
    train, val, test = load_data(config)
    labels = sorted({e.label for e in train})
    index = {label: i for i, label in enumerate(labels)}
    train_texts = [e.text for e in train]
    train_labels = np.array([index[e.label] for e in train], dtype=np.int64)
    val_texts, val_labels = [e.text for e in val], np.array([index[e.label] for e in val])
    test_texts, test_labels = [e.text for e in test], np.array([index[e.label] for e in test])
    report["data"] = {"path": config.data.path, "labels": len(labels), "train": len(train),
                      "validation": len(val), "test": len(test)}
    log.info("data: %d labels, %d train, %d validation, %d test",
             len(labels), len(train), len(val), len(test))

    tokenizer = load_tokenizer(config.teacher.max_length)
    tokenizer.save(str(out / "tokenizer.json"))
    tokenizer_bytes = (out / "tokenizer.json").read_bytes()
    check_texts = val_texts[:EXPORT_CHECK_TEXTS]

    # Teacher.
    stage = time.perf_counter()
    teacher = load_pretrained_classifier(len(labels))
    teacher_training = train_teacher(teacher, tokenizer, train_texts, train_labels,
                                      config.teacher, config.seed)
    teacher_test_logits = predict_logits(teacher, tokenizer, test_texts, description="teacher test")
    export_onnx(teacher, out / "teacher-fp32.onnx", train_texts, tokenizer)
    teacher_check = check_export(teacher, out / "teacher-fp32.onnx", tokenizer, check_texts,
                                 config.checks.onnx_tolerance, "teacher")
    recipe = quantize_int8(out / "teacher-fp32.onnx", out / "teacher-int8.onnx",
                           config.quantization.weight_type, config.quantization.per_channel)
    teacher_int8_session = session_from_file(out / "teacher-int8.onnx")
    teacher_int8_test = onnx_logits(teacher_int8_session, tokenizer, test_texts)
    teacher_int8_val = onnx_logits(teacher_int8_session, tokenizer, val_texts)
    report["stages"]["teacher"] = {
        "model": PRETRAINED_NAME, "mode": config.teacher.mode,
        "parameters": count_parameters(teacher), "training": teacher_training,
        "onnx_check": teacher_check.__dict__,
        "test_fp32": _figures(teacher_test_logits, test_labels, labels),
        "test_int8": _figures(teacher_int8_test, test_labels, labels),
        "int8_fp32_agreement": _agreement(teacher_int8_test, teacher_test_logits),
        "size_bytes": {"fp32": _size(out / "teacher-fp32.onnx"),
                       "int8": _size(out / "teacher-int8.onnx")},
        "seconds": round(time.perf_counter() - stage, 1),
    }
    log.info("teacher: test %s", report["stages"]["teacher"]["test_int8"])

    # Student.
    stage = time.perf_counter()
    soft_targets = predict_logits(teacher, tokenizer, train_texts, description="soft targets")
    student = cut_student(teacher, config.student.layers)
    del teacher
    student_training = distil_student(student, tokenizer, train_texts, train_labels,
                                      soft_targets, config.student, config.seed)
    student_test_logits = predict_logits(student, tokenizer, test_texts)
    export_onnx(student, out / "student-fp32.onnx", train_texts, tokenizer)
    student_check = check_export(student, out / "student-fp32.onnx", tokenizer, check_texts,
                                 config.checks.onnx_tolerance, "student")
    quantize_int8(out / "student-fp32.onnx", out / "student-int8.onnx",
                  config.quantization.weight_type, config.quantization.per_channel)
    student_int8_session = session_from_file(out / "student-int8.onnx")
    student_int8_test = onnx_logits(student_int8_session, tokenizer, test_texts)
    student_int8_val = onnx_logits(student_int8_session, tokenizer, val_texts)
    agreement = _agreement(student_int8_test, student_test_logits)
    report["stages"]["student"] = {
        "layers": list(config.student.layers), "parameters": count_parameters(student),
        "distillation": {"temperature": config.student.temperature, "alpha": config.student.alpha,
                         **student_training},
        "onnx_check": student_check.__dict__,
        "test_fp32": _figures(student_test_logits, test_labels, labels),
        "test_int8": _figures(student_int8_test, test_labels, labels),
        "int8_fp32_agreement": agreement,
        "size_bytes": {"fp32": _size(out / "student-fp32.onnx"),
                       "int8": _size(out / "student-int8.onnx")},
        "seconds": round(time.perf_counter() - stage, 1),
    }
    log.info("student: test %s, int8/fp32 agreement %.4f",
             report["stages"]["student"]["test_int8"], agreement)
    if agreement < config.checks.min_int8_agreement:
        raise ModelError(
            f"int8 student agrees with its fp32 model on {agreement:.4f} of the test split; the "
            f"minimum is {config.checks.min_int8_agreement} (checks.min_int8_agreement)"
        )

    # Calibration and gate, fitted on validation with the shipped int8 models.
    calibration = calibrate(student_int8_val, val_labels, teacher_int8_val.argmax(1),
                            config.calibration.max_disagreement)
    report["stages"]["calibration"] = {"temperature": calibration.temperature,
                                       "threshold": calibration.threshold, **calibration.figures}
    report["stages"]["cascade_preview_test"] = _cascade_preview(
        student_int8_test, teacher_int8_test, test_labels, labels,
        calibration.temperature, calibration.threshold,
    )
    log.info("calibration: T=%.3f threshold=%.4f; test preview %s", calibration.temperature,
             calibration.threshold, report["stages"]["cascade_preview_test"])

    # Packages.
    provenance = {
        "config_sha256": config.digest(),
        "data": {"path": config.data.path, "train": len(train), "validation": len(val),
                 "test": len(test)},
        "teacher": {"model": PRETRAINED_NAME, "mode": config.teacher.mode},
        "builder": {"python": platform.python_version(), "torch": torch.__version__,
                    "onnxruntime": ort.__version__, "machine": platform.machine()},
    }
    golden = _golden(student_int8_val, val_texts, labels)
    signer_key, recipients = load_package_keys(config.package)
    encrypted = ["model.onnx"] + (["tokenizer.json"] if config.package.encrypt_tokenizer else [])
    gate = {"temperature": calibration.temperature, "threshold": calibration.threshold,
            "score": "max softmax(logits / temperature); local when score >= threshold",
            "fitted_on": calibration.figures}
    student_package = write_package(
        out / f"{config.output.name}-student.edgepkg",
        _manifest(config, "student", labels, "int8", recipe, provenance, gate, golden),
        {"model.onnx": (out / "student-int8.onnx").read_bytes(), "tokenizer.json": tokenizer_bytes},
        signer_key=signer_key, recipients=recipients, encrypt_members=encrypted,
    )
    teacher_package = write_package(
        out / f"{config.output.name}-teacher.edgepkg",
        _manifest(config, "teacher", labels, "int8", recipe, provenance, None,
                  _golden(teacher_int8_val, val_texts, labels)),
        {"model.onnx": (out / "teacher-int8.onnx").read_bytes(), "tokenizer.json": tokenizer_bytes},
        signer_key=signer_key,
    )
    report["packages"] = {
        "student": {"path": str(student_package), "size_bytes": _size(student_package),
                    "signed": signer_key is not None, "encrypted_for": len(recipients)},
        "teacher": {"path": str(teacher_package), "size_bytes": _size(teacher_package),
                    "signed": signer_key is not None, "encrypted_for": 0},
    }
    report["seconds"] = round(time.perf_counter() - started, 1)
    write_reports(report, out)

    if config.output.models_dir:
        models = Path(config.output.models_dir)
        models.mkdir(parents=True, exist_ok=True)
        for path in (student_package, teacher_package, out / "build_report.json",
                     out / "build_report.md"):
            shutil.copy2(path, models / path.name)
        log.info("copied packages and reports to %s", models)
    return report


def _figures(logits: np.ndarray, expected: np.ndarray, labels: list[str]) -> dict:
    predicted = [labels[i] for i in logits.argmax(1)]
    return accuracy_figures(predicted, [labels[i] for i in expected])


def _agreement(a: np.ndarray, b: np.ndarray) -> float:
    return float((a.argmax(1) == b.argmax(1)).mean())


def _size(path: Path) -> int:
    return path.stat().st_size


def _cascade_preview(student_logits: np.ndarray, teacher_logits: np.ndarray,
                     expected: np.ndarray, labels: list[str], temperature: float,
                     threshold: float) -> dict:
    """Cascade figures on test computed from batched logits; ``edge-runtime eval`` measures the
    same through the runtime and the gateway."""
    from edge_runtime.gate import softmax

    confidence = softmax(student_logits, temperature).max(axis=1)
    local = (confidence >= threshold) & (threshold < 1.0)
    predicted = np.where(local, student_logits.argmax(1), teacher_logits.argmax(1))
    figures = _figures(np.eye(len(labels))[predicted], expected, labels)
    figures["local_fraction"] = float(local.mean())
    return figures


def _golden(logits: np.ndarray, texts: list[str], labels: list[str]) -> list[dict]:
    """A few validation texts with the label the shipped model gives them, chosen among the
    most confident so that a device's kernels should reproduce them exactly."""
    margin = np.sort(logits, axis=1)
    gap = margin[:, -1] - margin[:, -2] if logits.shape[1] > 1 else margin[:, -1]
    picks = np.argsort(-gap)[:GOLDEN_COUNT]
    return [{"text": texts[i], "label": labels[int(logits[i].argmax())]} for i in sorted(picks)]
