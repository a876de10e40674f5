"""The build pipeline: data -> teacher -> ONNX -> int8 -> student distillation -> ONNX -> int8
-> calibration -> packages and a build report.

The student trains on the train split plus, with ``data.extra_train``, the teacher-labelled
queries of escalation logs (``export.extra_train``). With ``teacher.mode = "package"`` no
teacher is trained: the int8 teacher of ``teacher.package`` gives the soft targets and the
teacher labels of calibration (``export.teacher_package``), and the student starts from the
pretrained encoder's layers with a new head. With ``teacher.mode = "onnx"`` the fine-tuned
teacher of an earlier build is loaded from its ``teacher-fp32.onnx`` (``export.onnx_import``)
instead of trained again, and the build goes on as after fine-tuning.

Outputs in ``output.dir``:

- ``teacher-fp32.onnx``, ``teacher-int8.onnx``, ``student-fp32.onnx``, ``student-int8.onnx`` and
  ``tokenizer.json`` (inputs of the latency benchmark); package mode writes no teacher files;
- ``student-tokenizer.json``, with ``student.trim_vocabulary``: the trimmed tokenizer of
  ``student-int8.onnx``;
- ``<name>-student.edgepkg``: the int8 student with its calibrated gate, for devices;
- ``<name>-teacher.edgepkg``: the int8 teacher, served by the gateway (not in package mode);
- ``build_report.json`` and ``build_report.md``.

With ``output.models_dir`` set, the packages and the reports are also copied there.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import platform
import shutil
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import torch
from tokenizers import Tokenizer

from edge_runtime import encryption, signing
from edge_runtime.data import Example
from edge_runtime.errors import ConfigError, ModelError
from edge_runtime.metrics import accuracy_figures
from edge_runtime.package import write_package
from export.augment import augment_texts
from export.calibrate import calibrate
from export.config import BuildConfig, PackageConfig
from export.data_checks import check_build_data
from export.dataset import load_splits, normalize_text, out_of_scope_label
from export.extra_train import load_extra_train
from export.modeling import (
    PRETRAINED_NAME,
    SentenceClassifier,
    count_parameters,
    cut_student,
    factorize_word_embeddings,
    keep_token_rows,
    load_pretrained_classifier,
    load_tokenizer,
    narrow_feed_forward,
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
from export.onnx_import import load_onnx_weights
from export.report import write_reports
from export.teacher_package import PackageTeacher, load_package_teacher
from export.train import distil_student, predict_logits, train_teacher
from export.vocab import trimmed_tokenizer

log = logging.getLogger(__name__)

EXPORT_CHECK_TEXTS = 512
# The int8 student's tokenizer when student.trim_vocabulary is on; tokenizer.json stays the
# full one, which the teacher and student-fp32.onnx use.
STUDENT_TOKENIZER = "student-tokenizer.json"
GOLDEN_COUNT = 8
# Dynamic int8 quantization scales activations per batch, so an int8 model's logits depend on
# the other queries in its batch. On CLINC150 test the int8 teacher's top label differed for
# 2.5% of queries between batches of 128 and single queries. Devices and the gateway run one
# query at a time, so the int8 figures and the gate are computed that way too.
DEVICE_BATCH_SIZE = 1


def load_data(config: BuildConfig) -> tuple[list[Example], list[Example], list[Example]]:
    """Read the three splits (carving validation from train if ``[data]`` says so) and apply
    the filters of ``[data]``: labels, the validation examples skipped per label, then the
    per-label limits. ``export.data_checks`` checks the result."""
    data = config.data
    splits = list(load_splits(data))
    if data.labels:
        keep = set(data.labels)
        missing = keep - {e.label for e in splits[0]}
        if missing:
            raise ConfigError(f"data.labels names labels not in the train split: {sorted(missing)}")
        splits = [[e for e in split if e.label in keep] for split in splits]
    if data.val_skip_per_label:
        splits[1] = _skip_first_per_label(splits[1], data.val_skip_per_label)
    limits = [data.max_train_per_label, data.max_eval_per_label, data.max_eval_per_label]
    splits = [_first_per_label(split, limit) for split, limit in zip(splits, limits, strict=True)]
    train, val, test = splits

    for name, split in (("validation", val), ("test", test)):
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


def _skip_first_per_label(examples: list[Example], count: int) -> list[Example]:
    seen: Counter[str] = Counter()
    remaining = []
    for example in examples:
        seen[example.label] += 1
        if seen[example.label] > count:
            remaining.append(example)
    return remaining


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


@dataclass
class TeacherStage:
    """Outputs of the teacher stage that the student stage uses."""

    report: dict
    soft_targets: np.ndarray  # (student examples, num_labels) teacher logits
    val_logits: np.ndarray  # (validation, num_labels) logits of the int8 teacher
    test_logits: np.ndarray  # (test, num_labels) logits of the int8 teacher
    student: SentenceClassifier  # the student before distillation
    student_origin: str  # how the student was initialised, for the report
    int8_model: Path | None = None  # the int8 teacher ONNX file; None in package mode


def build(config: BuildConfig) -> dict:
    """Run the whole pipeline; returns the report that is also written to disk."""
    started = time.perf_counter()
    torch.manual_seed(config.seed)
    out = Path(config.output.dir)
    out.mkdir(parents=True, exist_ok=True)
    report: dict = {"config": config.to_dict(), "config_sha256": config.digest(), "stages": {}}

    # Data, including the escalation logs, so that a bad path fails before any training.
    train, val, test = load_data(config)
    report["data_checks"] = check_build_data(config, train, val, test)
    labels = sorted({e.label for e in train})
    index = {label: i for i, label in enumerate(labels)}
    extra = load_extra_train(config.data.extra_train, config.data.extra_train_weight, labels,
                             train, val, test)
    student_examples = train + extra.examples
    transfer_texts = load_transfer_texts(config, [*val, *test])
    # Variants of the training queries are learnt like the transfer sentences.
    augmented = augment_texts([e.text for e in train], config.student.augment_copies,
                              config.seed, [e.text for e in [*val, *test]])
    if augmented:
        log.info("augment: %d variants of the %d training queries", len(augmented), len(train))
    unlabelled = transfer_texts + augmented
    # Unlabelled texts get label -1: the student learns only the teacher's soft targets.
    student_texts = [e.text for e in student_examples] + unlabelled
    labelled = [index[e.label] for e in student_examples]
    student_labels = np.array(labelled + [-1] * len(unlabelled), dtype=np.int64)
    weights = np.concatenate([np.ones(len(train), dtype=np.float32),
                              np.full(len(extra.examples), config.data.extra_train_weight,
                                      dtype=np.float32),
                              np.ones(len(unlabelled), dtype=np.float32)])
    train_texts = [e.text for e in train]
    train_labels = np.array([index[e.label] for e in train], dtype=np.int64)
    val_texts, val_labels = [e.text for e in val], np.array([index[e.label] for e in val])
    test_texts, test_labels = [e.text for e in test], np.array([index[e.label] for e in test])
    report["data"] = {"path": config.data.path, "labels": len(labels), "train": len(train),
                      "validation": len(val), "test": len(test), "extra_train": extra.report,
                      "transfer": {"file": config.student.transfer_file,
                                   "sentences": len(transfer_texts)},
                      "augmented": len(augmented)}
    log.info("data: %d labels, %d train, %d validation, %d test, %d extra from escalation logs, "
             "%d transfer sentences, %d augmented variants", len(labels), len(train), len(val),
             len(test), len(extra.examples), len(transfer_texts),
             len(augmented))

    package_teacher = None
    if config.teacher.mode == "package":
        package_teacher = load_package_teacher(config.teacher, config.package, labels)

    tokenizer = load_tokenizer(config.teacher.max_length)
    tokenizer.save(str(out / "tokenizer.json"))
    tokenizer_bytes = (out / "tokenizer.json").read_bytes()
    check_texts = val_texts[:EXPORT_CHECK_TEXTS]

    # Teacher.
    stage = time.perf_counter()
    if package_teacher is None:
        teacher = _trained_teacher(config, out, tokenizer, labels, train_texts, train_labels,
                                   student_texts, val_texts, test_texts, test_labels)
    else:
        teacher = _packaged_teacher(config, package_teacher, labels, student_texts, val_texts,
                                    test_texts, test_labels)
        del package_teacher
    teacher.report["seconds"] = round(time.perf_counter() - stage, 1)
    report["stages"]["teacher"] = teacher.report
    log.info("teacher: test %s", teacher.report["test_int8"])

    # Student.
    stage = time.perf_counter()
    student = teacher.student
    embedding_kept = None
    if config.student.intermediate_size:
        narrow_feed_forward(student, config.student.intermediate_size)
        log.info("student: feed-forward blocks narrowed to %d neurons",
                 config.student.intermediate_size)
    if config.student.embedding_rank:
        embedding_kept = factorize_word_embeddings(student, config.student.embedding_rank)
        log.info("student: word embeddings at rank %d keep %.1f%% of the table's squared norm",
                 config.student.embedding_rank, 100 * embedding_kept)
    student_tokenizer, student_tokenizer_bytes, vocabulary = tokenizer, tokenizer_bytes, None
    if config.student.trim_vocabulary:
        # Trimmed before distillation, so the student learns with the tokenizer it ships with:
        # words outside the kept tokens split into kept pieces, in training as on the device.
        student_tokenizer, vocabulary = _trim_student_vocabulary(
            student, out, tokenizer_bytes.decode("utf-8"),
            [e.text for e in student_examples] + val_texts, config.student.special_tokens,
        )
        student_tokenizer_bytes = (out / STUDENT_TOKENIZER).read_bytes()
    student_training = distil_student(student, student_tokenizer, student_texts, student_labels,
                                      teacher.soft_targets, config.student, config.seed,
                                      weights=weights)
    student_test_logits = predict_logits(student, student_tokenizer, test_texts)
    export_onnx(student, out / "student-fp32.onnx", train_texts, student_tokenizer)
    student_check = check_export(student, out / "student-fp32.onnx", student_tokenizer,
                                 check_texts, config.checks.onnx_tolerance, "student")
    recipe = quantize_int8(out / "student-fp32.onnx", out / "student-int8.onnx",
                           config.quantization.weight_type, config.quantization.per_channel)
    student_int8_session = session_from_file(out / "student-int8.onnx")
    student_int8_test = onnx_logits(student_int8_session, student_tokenizer, test_texts,
                                   batch_size=DEVICE_BATCH_SIZE)
    student_int8_val = onnx_logits(student_int8_session, student_tokenizer, val_texts,
                                   batch_size=DEVICE_BATCH_SIZE)
    agreement = _agreement(student_int8_test, student_test_logits)
    report["stages"]["student"] = {
        "layers": list(config.student.layers), "initialised_from": teacher.student_origin,
        "intermediate_size": config.student.intermediate_size,
        "embedding_rank": config.student.embedding_rank,
        "embedding_norm_kept": embedding_kept,
        "vocabulary": vocabulary,
        "parameters": count_parameters(student),
        "examples": {"train": len(train), "extra_train": len(extra.examples),
                     "extra_train_weight": config.data.extra_train_weight,
                     "transfer": len(transfer_texts),
                     "augmented": len(augmented)},
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
    calibration = calibrate(student_int8_val, val_labels, teacher.val_logits.argmax(1),
                            config.calibration.max_disagreement, config.calibration.score)
    report["stages"]["calibration"] = {"temperature": calibration.temperature,
                                       "threshold": calibration.threshold, **calibration.figures}
    report["stages"]["cascade_preview_test"] = _cascade_preview(
        student_int8_test, teacher.test_logits, test_labels, labels,
        calibration.temperature, calibration.threshold, calibration.score,
    )
    log.info("calibration: T=%.3f, %s threshold %.4f; test preview %s", calibration.temperature,
             calibration.score, calibration.threshold, report["stages"]["cascade_preview_test"])

    # Packages.
    provenance = {
        "config_sha256": config.digest(),
        "data": {"path": config.data.path, "train": len(train), "validation": len(val),
                 "test": len(test), "extra_train": len(extra.examples),
                 "out_of_scope_label": out_of_scope_label(config.data)},
        "teacher": _teacher_provenance(config, teacher.report),
        "builder": {"python": platform.python_version(), "torch": torch.__version__,
                    "onnxruntime": ort.__version__, "machine": platform.machine()},
    }
    golden = _golden(student_int8_val, val_texts, labels)
    signer_key, recipients = load_package_keys(config.package)
    encrypted = ["model.onnx"] + (["tokenizer.json"] if config.package.encrypt_tokenizer else [])
    gate = {"temperature": calibration.temperature, "threshold": calibration.threshold,
            "score": calibration.score,
            "fitted_on": calibration.figures}
    student_package = write_package(
        out / f"{config.output.name}-student.edgepkg",
        _manifest(config, "student", labels, "int8", recipe, provenance, gate, golden),
        {"model.onnx": (out / "student-int8.onnx").read_bytes(),
         "tokenizer.json": student_tokenizer_bytes},
        signer_key=signer_key, recipients=recipients, encrypt_members=encrypted,
    )
    report["packages"] = {
        "student": {"path": str(student_package), "size_bytes": _size(student_package),
                    "signed": signer_key is not None, "encrypted_for": len(recipients)},
    }
    copied = [student_package]
    if teacher.int8_model is None:
        # Package mode reuses teacher.package, so the build writes no teacher package.
        report["packages"]["teacher"] = {"path": config.teacher.package,
                                         "size_bytes": teacher.report["size_bytes"],
                                         "reused": True}
    else:
        teacher_package = write_package(
            out / f"{config.output.name}-teacher.edgepkg",
            _manifest(config, "teacher", labels, "int8", recipe, provenance, None,
                      _golden(teacher.val_logits, val_texts, labels)),
            {"model.onnx": teacher.int8_model.read_bytes(), "tokenizer.json": tokenizer_bytes},
            signer_key=signer_key,
        )
        report["packages"]["teacher"] = {"path": str(teacher_package),
                                         "size_bytes": _size(teacher_package),
                                         "signed": signer_key is not None, "encrypted_for": 0}
        copied.append(teacher_package)
    report["seconds"] = round(time.perf_counter() - started, 1)
    write_reports(report, out)

    if config.output.models_dir:
        models = Path(config.output.models_dir)
        models.mkdir(parents=True, exist_ok=True)
        for path in [*copied, out / "build_report.json", out / "build_report.md"]:
            shutil.copy2(path, models / path.name)
        log.info("copied packages and reports to %s", models)
    return report


def load_transfer_texts(config: BuildConfig, held_out: list[Example]) -> list[str]:
    """Read the lines of ``student.transfer_file`` (up to ``student.transfer_limit``) and return
    them stripped, without empty lines, repeats, or sentences of the validation or test split."""
    path = config.student.transfer_file
    if not path:
        return []
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"student.transfer_file {path}: cannot read it as UTF-8 text ({exc}); "
                          "give a text file with one sentence per line") from None
    if config.student.transfer_limit:
        lines = lines[:config.student.transfer_limit]
    held_out_texts = {normalize_text(e.text) for e in held_out}
    texts, seen = [], set()
    for line in lines:
        text = line.strip()
        key = normalize_text(text)
        if text and key not in seen and key not in held_out_texts:
            seen.add(key)
            texts.append(text)
    if not texts:
        raise ConfigError(f"student.transfer_file {path} has no usable sentence; give a text "
                          "file with one sentence per line, or set it to \"\"")
    log.info("transfer: %d sentences from %s (%d lines read)", len(texts), path, len(lines))
    return texts


def _trim_student_vocabulary(student: SentenceClassifier, out: Path, tokenizer_json: str,
                             corpus: list[str], special_tokens: bool = True,
                             ) -> tuple[Tokenizer, dict]:
    """Keep the student's embedding rows for the tokens of ``corpus`` plus the coverage
    tokens, write the trimmed tokenizer to ``out``, and return it with the figures. Without
    ``special_tokens`` the tokenizer adds no [CLS] and [SEP] around a text."""
    trimmed_json, selection = trimmed_tokenizer(tokenizer_json, corpus)
    if not special_tokens:
        settings = json.loads(trimmed_json)
        settings["post_processor"] = None
        trimmed_json = json.dumps(settings, ensure_ascii=False)
    keep_token_rows(student, selection.kept_ids)
    (out / STUDENT_TOKENIZER).write_text(trimmed_json, encoding="utf-8")
    log.info("student vocabulary: kept %d of %d tokens (%d from %d corpus texts, %d more for "
             "coverage)", selection.size, selection.original_size, selection.from_corpus,
             selection.corpus_texts, selection.for_coverage)
    figures = {"kept": selection.size, "original": selection.original_size,
               "from_corpus": selection.from_corpus, "for_coverage": selection.for_coverage,
               "corpus_texts": selection.corpus_texts, "special_tokens": special_tokens}
    return Tokenizer.from_str(trimmed_json), figures


def _trained_teacher(config: BuildConfig, out: Path, tokenizer: Tokenizer, labels: list[str],
                     train_texts: list[str], train_labels: np.ndarray,
                     student_texts: list[str], val_texts: list[str], test_texts: list[str],
                     test_labels: np.ndarray) -> TeacherStage:
    """Train the teacher ("finetune" or "head" mode) or load it ("onnx" mode), export, check
    and quantize it, and cut the student from its layers."""
    check_texts = val_texts[:EXPORT_CHECK_TEXTS]
    teacher = load_pretrained_classifier(len(labels))
    if config.teacher.mode == "onnx":
        tensors = load_onnx_weights(teacher, config.teacher.onnx)
        teacher.eval()
        teacher_training = {"loaded_from": config.teacher.onnx, "tensors": tensors}
        log.info("teacher: loaded %d tensors from %s", tensors, config.teacher.onnx)
    else:
        teacher_training = train_teacher(teacher, tokenizer, train_texts, train_labels,
                                          config.teacher, config.seed)
    teacher_test_logits = predict_logits(teacher, tokenizer, test_texts, description="teacher test")
    export_onnx(teacher, out / "teacher-fp32.onnx", train_texts, tokenizer)
    teacher_check = check_export(teacher, out / "teacher-fp32.onnx", tokenizer, check_texts,
                                 config.checks.onnx_tolerance, "teacher")
    quantize_int8(out / "teacher-fp32.onnx", out / "teacher-int8.onnx",
                  config.quantization.weight_type, config.quantization.per_channel)
    teacher_int8_session = session_from_file(out / "teacher-int8.onnx")
    teacher_int8_test = onnx_logits(teacher_int8_session, tokenizer, test_texts,
                                   batch_size=DEVICE_BATCH_SIZE)
    teacher_int8_val = onnx_logits(teacher_int8_session, tokenizer, val_texts,
                                   batch_size=DEVICE_BATCH_SIZE)
    report = {
        "model": PRETRAINED_NAME, "mode": config.teacher.mode,
        "parameters": count_parameters(teacher), "training": teacher_training,
        "onnx_check": teacher_check.__dict__,
        "test_fp32": _figures(teacher_test_logits, test_labels, labels),
        "test_int8": _figures(teacher_int8_test, test_labels, labels),
        "int8_fp32_agreement": _agreement(teacher_int8_test, teacher_test_logits),
        "size_bytes": {"fp32": _size(out / "teacher-fp32.onnx"),
                       "int8": _size(out / "teacher-int8.onnx")},
    }
    soft_targets = predict_logits(teacher, tokenizer, student_texts, description="soft targets")
    student = cut_student(teacher, config.student.layers)
    return TeacherStage(
        report=report, soft_targets=soft_targets, val_logits=teacher_int8_val,
        test_logits=teacher_int8_test, student=student,
        student_origin=f"teacher layers {list(config.student.layers)} and its head",
        int8_model=out / "teacher-int8.onnx",
    )


def _packaged_teacher(config: BuildConfig, teacher: PackageTeacher, labels: list[str],
                      student_texts: list[str], val_texts: list[str], test_texts: list[str],
                      test_labels: np.ndarray) -> TeacherStage:
    """Compute the int8 ONNX teacher's logits from ``teacher.package`` ("package" mode) and
    start the student from the pretrained encoder, because there is no fine-tuned PyTorch
    teacher to cut it from."""
    test_logits = teacher.logits(test_texts, description="teacher test")
    val_logits = teacher.logits(val_texts, description="teacher validation")
    soft_targets = teacher.logits(student_texts, description="soft targets")
    provenance = teacher.classifier.package.manifest.raw.get("provenance") or {}
    report = {
        "model": (provenance.get("teacher") or {}).get("model", "unknown"),
        "mode": "package",
        **teacher.report,
        "test_int8": _figures(test_logits, test_labels, labels),
    }
    pretrained = load_pretrained_classifier(len(labels))
    student = cut_student(pretrained, config.student.layers)
    del pretrained
    origin = (f"pretrained {PRETRAINED_NAME} layers {list(config.student.layers)} with a new "
              "head (teacher.mode is 'package', so there is no fine-tuned teacher to cut from)")
    return TeacherStage(report=report, soft_targets=soft_targets, val_logits=val_logits,
                        test_logits=test_logits, student=student, student_origin=origin)


def _teacher_provenance(config: BuildConfig, teacher_report: dict) -> dict:
    provenance = {"model": teacher_report["model"], "mode": config.teacher.mode}
    if config.teacher.mode == "onnx":
        provenance["onnx"] = config.teacher.onnx
    if config.teacher.mode == "package":
        provenance["package"] = f"{teacher_report['name']}@{teacher_report['version']}"
        provenance["signer_key_id"] = teacher_report["signer_key_id"]
    return provenance


def _figures(logits: np.ndarray, expected: np.ndarray, labels: list[str]) -> dict:
    predicted = [labels[i] for i in logits.argmax(1)]
    return accuracy_figures(predicted, [labels[i] for i in expected])


def _agreement(a: np.ndarray, b: np.ndarray) -> float:
    return float((a.argmax(1) == b.argmax(1)).mean())


def _size(path: Path) -> int:
    return path.stat().st_size


def _cascade_preview(student_logits: np.ndarray, teacher_logits: np.ndarray,
                     expected: np.ndarray, labels: list[str], temperature: float,
                     threshold: float, score: str) -> dict:
    """Cascade figures on test computed from the int8 models' logits; ``edge-runtime eval``
    measures the same through the runtime and the gateway."""
    from edge_runtime.gate import gate_scores

    confidence = gate_scores(student_logits, temperature, score)
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
