"""End-to-end builds on a CLINC150 subset: teacher, ONNX checks, student, int8, calibration and
packages. A second build distils a student against the packaged teacher, with extra examples
from an escalation log."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import pytest

from edge_runtime import EdgeRuntime
from edge_runtime.errors import ConfigError
from edge_runtime.package import read_package
from export.extra_train import (
    SKIP_IN_TEST,
    SKIP_IN_VALIDATION,
    SKIP_LOCAL_OFFLINE,
    SKIP_RECORD_DUPLICATE,
    SKIP_TRAIN_DUPLICATE,
    SKIP_UNKNOWN_LABEL,
)
from tests.conftest import (
    CLINC150_DIR,
    DEVICE_PUBLIC,
    MODELS_DIR,
    SIGNER_PRIVATE,
    TINY_CONFIG,
    demo_trust,
    require_clinc150,
)

TEACHER_PACKAGE = MODELS_DIR / "clinc150-teacher.edgepkg"

pytestmark = pytest.mark.slow


def test_onnx_checks_within_tolerance(tiny_build):
    stages = tiny_build.report["stages"]
    for role in ("teacher", "student"):
        check = stages[role]["onnx_check"]
        assert check["max_abs_diff"] <= check["tolerance"], role
        assert check["top1_agreement"] == 1.0, role


def test_teacher_accuracy_on_subset(tiny_build):
    figures = tiny_build.report["stages"]["teacher"]["test_int8"]
    assert figures["in_scope_accuracy"] >= 0.9


def test_student_accuracy_on_subset(tiny_build):
    figures = tiny_build.report["stages"]["student"]["test_int8"]
    assert figures["in_scope_accuracy"] >= 0.75


def test_int8_agreement_reported(tiny_build):
    agreement = tiny_build.report["stages"]["student"]["int8_fp32_agreement"]
    assert 0.9 <= agreement <= 1.0


def test_student_smaller_than_teacher(tiny_build):
    student = tiny_build.report["stages"]["student"]["parameters"]
    teacher = tiny_build.report["stages"]["teacher"]["parameters"]
    assert student < teacher


def test_gate_in_manifest(tiny_build):
    manifest = read_package(tiny_build.student_package, demo_trust()).manifest
    assert manifest.gate is not None
    assert manifest.gate.temperature > 0
    assert 0.0 <= manifest.gate.threshold <= 1.0
    assert manifest.gate.fitted_on["split"] == "validation"
    assert manifest.gate.fitted_on["local_disagreement"] <= 0.02
    assert len(manifest.labels) == 8


def test_teacher_package_has_no_gate(tiny_build):
    assert read_package(tiny_build.teacher_package, demo_trust()).manifest.gate is None


def test_reports_written(tiny_build):
    markdown = (tiny_build.dir / "build_report.md").read_text()
    assert "# Build report" in markdown
    assert (tiny_build.dir / "build_report.json").is_file()


def test_student_package_answers(tiny_build):
    with EdgeRuntime.load(tiny_build.student_package, trust=demo_trust()) as runtime:
        assert runtime.student_trusted
        assert runtime.answer("please set an alarm for 7 am tomorrow").label == "alarm"


def test_export_check_detects_drift(tiny_build, tmp_path):
    import torch

    from export.modeling import load_pretrained_classifier, load_tokenizer
    from export.onnx_export import ExportCheckError, check_export, export_onnx

    tokenizer = load_tokenizer(32)
    model = load_pretrained_classifier(3)
    texts = ["set an alarm", "what is the weather", "transfer money to my savings"]
    export_onnx(model, tmp_path / "model.onnx", texts, tokenizer)
    check = check_export(model, tmp_path / "model.onnx", tokenizer, texts, 1e-3, "probe")
    assert check.max_abs_diff <= 1e-3
    with torch.no_grad():
        model.classifier.bias.add_(torch.tensor([0.0, 0.5, 0.0]))
    with pytest.raises(ExportCheckError, match="tolerance"):
        check_export(model, tmp_path / "model.onnx", tokenizer, texts, 1e-3, "probe")


def test_bad_data_path_fails_early(tmp_path):
    from export.build import build
    from export.config import load_config

    config = load_config(TINY_CONFIG, {"data.path": str(tmp_path / "absent"),
                                       "output.dir": str(tmp_path / "out")})
    with pytest.raises((ConfigError, FileNotFoundError), match="absent"):
        build(config)
    assert not (tmp_path / "out" / "teacher-fp32.onnx").exists()


def test_unknown_subset_label_fails(tmp_path):
    from export.build import load_data
    from export.config import load_config
    from tests.conftest import CLINC150_DIR

    config = load_config(TINY_CONFIG, {"data.path": str(CLINC150_DIR),
                                       "data.labels": ["alarm", "no_such_intent"]})
    with pytest.raises(ConfigError, match="no_such_intent"):
        load_data(config)



# Escalation logs as extra training data, and a student built against a teacher package


@dataclass(frozen=True)
class PackageModeBuild:
    dir: Path
    report: dict
    val: list
    test: list
    used_texts: list[str]


# The escalation log written for the package-mode build: per tiny label, the first 3 train
# queries that the tiny build does not use (24 used records), then one record for each way a
# record is skipped.
EXTRA_PER_LABEL = 3
SKIPPED_RECORDS = {
    SKIP_LOCAL_OFFLINE: 1,
    SKIP_UNKNOWN_LABEL: 2,
    SKIP_IN_TEST: 1,
    SKIP_IN_VALIDATION: 1,
    SKIP_TRAIN_DUPLICATE: 1,
    SKIP_RECORD_DUPLICATE: 1,
}


def _unused_train_examples(train_used: list, val: list, test: list) -> list:
    """Per label, the first EXTRA_PER_LABEL train queries that are in none of the build's splits."""
    from edge_runtime.data import load_split
    from export.extra_train import normalize_text

    excluded = {normalize_text(e.text) for e in [*train_used, *val, *test]}
    labels = {e.label for e in train_used}
    picked: dict[str, list] = {label: [] for label in labels}
    for example in load_split(CLINC150_DIR, "train"):
        bucket = picked.get(example.label)
        key = normalize_text(example.text)
        if bucket is not None and len(bucket) < EXTRA_PER_LABEL and key not in excluded:
            bucket.append(example)
            excluded.add(key)
    return [example for label in sorted(picked) for example in picked[label]]


def _write_escalations(log_dir: Path, train: list, val: list, test: list) -> list[str]:
    """Write the fixture's escalation log; return the texts that should become examples."""
    from edge_runtime.escalation_log import EscalationLog

    used = _unused_train_examples(train, val, test)
    records = [(e.text, "teacher", e.label) for e in used]
    records += [
        ("what time is it in tokyo", "local-offline", None),
        ("pay my water bill", "teacher", "pay_bill"),
        ("when is my credit card bill due", "teacher", "bill_due"),
        (test[0].text, "teacher", test[0].label),
        (val[0].text, "teacher", val[0].label),
        ("  " + train[0].text.upper() + " ", "teacher", train[0].label),
        (used[0].text, "teacher", used[0].label),
    ]
    log_dir.mkdir(parents=True)
    with EscalationLog(log_dir) as escalations:
        for text, source, label in records:
            escalations.record(text, source=source, teacher_label=label, student_label="oos",
                               package_name="clinc150-tiny-student", package_version=1)
    return [e.text for e in used]


def _package_mode_config(out: Path, **overrides):
    from export.config import load_config

    return load_config(TINY_CONFIG, {
        "data.path": str(CLINC150_DIR), "output.dir": str(out), "output.models_dir": "",
        "package.signer_key": str(SIGNER_PRIVATE), "package.recipients": [str(DEVICE_PUBLIC)],
        "teacher.mode": "package", "teacher.package": str(TEACHER_PACKAGE), **overrides,
    })


@pytest.fixture(scope="module")
def package_mode_build(tmp_path_factory: pytest.TempPathFactory) -> PackageModeBuild:
    """The tiny build against models/clinc150-teacher.edgepkg, with an escalation log."""
    require_clinc150()
    pytest.importorskip("torch")
    from export.build import build, load_data

    work = tmp_path_factory.mktemp("package-mode-build")
    log_dir = work / "escalations"
    train, val, test = load_data(_package_mode_config(work / "out"))
    used_texts = _write_escalations(log_dir, train, val, test)
    config = _package_mode_config(work / "out", **{
        "data.extra_train": [str(log_dir)], "data.extra_train_weight": 2.0,
        "output.version": 2,
    })
    report = build(config)
    return PackageModeBuild(dir=work / "out", report=report, val=val, test=test,
                            used_texts=used_texts)


def test_extra_train_counts_reported(package_mode_build):
    extra = package_mode_build.report["data"]["extra_train"]

    assert extra["read"] == 8 * EXTRA_PER_LABEL + sum(SKIPPED_RECORDS.values())
    assert extra["used"] == 8 * EXTRA_PER_LABEL
    assert extra["labels"] == 8
    assert extra["weight"] == 2.0
    for reason, count in SKIPPED_RECORDS.items():
        assert extra["skipped"][reason] == count, reason
    assert extra["used_per_package"] == {"clinc150-tiny-student@1": 8 * EXTRA_PER_LABEL}


def test_extra_examples_distilled(package_mode_build):
    student = package_mode_build.report["stages"]["student"]
    examples = 320 + 8 * EXTRA_PER_LABEL

    assert student["examples"] == {"train": 320, "extra_train": 8 * EXTRA_PER_LABEL,
                                   "extra_train_weight": 2.0, "transfer": 0, "augmented": 0}
    assert student["distillation"]["steps"] == math.ceil(examples / 32) * 2


def test_package_teacher_reported(package_mode_build):
    teacher = package_mode_build.report["stages"]["teacher"]
    student = package_mode_build.report["stages"]["student"]

    assert teacher["mode"] == "package"
    assert teacher["name"] == "clinc150-teacher"
    assert teacher["labels_used"] == 8
    assert teacher["labels_in_package"] == 151
    assert teacher["signer_key_id"] is not None
    assert "training" not in teacher
    assert student["initialised_from"].startswith("pretrained ")
    assert "new head" in student["initialised_from"]


def test_package_mode_reuses_teacher(package_mode_build):
    out = package_mode_build.dir

    assert not (out / "teacher-fp32.onnx").exists()
    assert not (out / "clinc150-tiny-teacher.edgepkg").exists()
    assert package_mode_build.report["packages"]["teacher"]["reused"] is True
    assert (out / "clinc150-tiny-student.edgepkg").is_file()


def test_calibration_uses_onnx_teacher(package_mode_build):
    from edge_runtime.model import OnnxClassifier

    teacher = OnnxClassifier.from_file(str(TEACHER_PACKAGE), trust=demo_trust())
    labels = sorted({e.label for e in package_mode_build.val})
    columns = [teacher.labels.index(label) for label in labels]
    stages = package_mode_build.report["stages"]
    for split, figures in [(package_mode_build.val, stages["calibration"]["teacher_accuracy"]),
                           (package_mode_build.test, stages["teacher"]["test_int8"]["accuracy"])]:
        logits = teacher.predict_batch([e.text for e in split], batch_size=1)[:, columns]
        predicted = [labels[i] for i in logits.argmax(axis=1)]
        accuracy = sum(p == e.label for p, e in zip(predicted, split, strict=True)) / len(split)
        assert figures == pytest.approx(accuracy, abs=1e-12)


def test_package_mode_student_answers(package_mode_build):
    package = package_mode_build.dir / "clinc150-tiny-student.edgepkg"
    manifest = read_package(package, demo_trust()).manifest
    provenance = manifest.raw["provenance"]

    assert manifest.version == 2
    assert provenance["teacher"]["mode"] == "package"
    # models/clinc150-teacher.edgepkg is version 4, from the build of the version-4 student.
    assert provenance["teacher"]["package"] == "clinc150-teacher@4"
    assert provenance["data"]["extra_train"] == 8 * EXTRA_PER_LABEL
    with EdgeRuntime.load(package, trust=demo_trust()) as runtime:
        assert runtime.student_trusted
        assert runtime.answer("please set an alarm for 7 am tomorrow").label == "alarm"


def test_package_mode_markdown(package_mode_build):
    markdown = (package_mode_build.dir / "build_report.md").read_text()

    assert "Escalation logs (`data.extra_train`): 31 records read" in markdown
    assert "24 used as extra student examples" in markdown
    assert "not retrained" in markdown
    assert "with a new head" in markdown
    assert "| teacher int8 (package) |" in markdown


def test_val_skip_per_label():
    from export.build import load_data
    from export.config import load_config

    require_clinc150()
    base = load_config(TINY_CONFIG, {"data.path": str(CLINC150_DIR),
                                     "data.max_eval_per_label": 0})
    skipped = load_config(TINY_CONFIG, {"data.path": str(CLINC150_DIR),
                                        "data.max_eval_per_label": 0,
                                        "data.val_skip_per_label": 10})
    _, full_val, full_test = load_data(base)
    _, val, test = load_data(skipped)

    for label in ("alarm", "timer", "oos"):
        full = [e.text for e in full_val if e.label == label]
        kept = [e.text for e in val if e.label == label]
        assert kept == full[10:], label
    assert test == full_test


# Failures before any training


def _assert_nothing_trained(out: Path) -> None:
    assert not (out / "tokenizer.json").exists()
    assert not list(out.glob("*.onnx"))


def test_extra_train_missing_fails_early(tmp_path):
    from export.build import build

    config = _package_mode_config(tmp_path / "out",
                                  **{"data.extra_train": [str(tmp_path / "absent-log")]})
    with pytest.raises(ConfigError, match=r"data\.extra_train: .*absent-log not found"):
        build(config)
    _assert_nothing_trained(tmp_path / "out")


def test_extra_train_unreadable_fails_early(tmp_path):
    from export.build import build

    bogus = tmp_path / "escalations.sqlite3"
    bogus.write_bytes(b"not an escalation log " * 500)
    config = _package_mode_config(tmp_path / "out", **{
        "teacher.mode": "head", "teacher.package": "", "data.extra_train": [str(bogus)],
    })
    with pytest.raises(ConfigError, match=r"data\.extra_train: cannot read"):
        build(config)
    _assert_nothing_trained(tmp_path / "out")


def test_teacher_package_missing_fails(tmp_path):
    from export.build import build

    config = _package_mode_config(tmp_path / "out",
                                  **{"teacher.package": str(tmp_path / "absent.edgepkg")})
    with pytest.raises(ConfigError, match=r"teacher\.package: .*absent\.edgepkg not found"):
        build(config)
    _assert_nothing_trained(tmp_path / "out")


def test_teacher_package_other_signer_fails(tmp_path):
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    from export.build import build

    other = ec.generate_private_key(ec.SECP256R1()).public_key()
    key_path = tmp_path / "other-signer.pub.pem"
    key_path.write_bytes(other.public_bytes(serialization.Encoding.PEM,
                                            serialization.PublicFormat.SubjectPublicKeyInfo))
    config = _package_mode_config(tmp_path / "out",
                                  **{"teacher.package_signer_key": str(key_path)})
    with pytest.raises(ConfigError, match=r"teacher\.package: .* failed verification"):
        build(config)
    _assert_nothing_trained(tmp_path / "out")


def test_student_package_as_teacher_fails(tmp_path):
    from export.build import build

    config = _package_mode_config(tmp_path / "out", **{
        "teacher.package": str(MODELS_DIR / "clinc150-student.edgepkg"),
    })
    with pytest.raises(ConfigError, match=r"teacher\.package: .* is a student package"):
        build(config)
    _assert_nothing_trained(tmp_path / "out")


def test_teacher_package_lacking_label_fails(tmp_path):
    from export.build import build

    data = tmp_path / "data"
    data.mkdir()
    rows = "text,label\nset an alarm for six,alarm\nsing me a sea shanty,sea_shanty\n"
    for split in ("train", "val", "test"):
        (data / f"{split}.csv").write_text(rows, encoding="utf-8")
    # One example per label is enough to reach the teacher check; the data checks would
    # stop a real build with so few examples first.
    config = _package_mode_config(tmp_path / "out", **{"data.path": str(data),
                                                       "data.labels": [],
                                                       "data.min_examples_per_label": 1})
    with pytest.raises(ConfigError, match=r"teacher\.package: .*lacks 1 label.*sea_shanty"):
        build(config)
    _assert_nothing_trained(tmp_path / "out")
