"""End-to-end build on a CLINC150 subset: teacher, ONNX checks, student, int8, calibration and
packages."""

from __future__ import annotations

import pytest

from edge_runtime import EdgeRuntime
from edge_runtime.errors import ConfigError
from edge_runtime.package import read_package
from tests.conftest import TINY_CONFIG, demo_trust

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

