"""The default packages shipped in models/, as a fresh clone uses them."""

from __future__ import annotations

import pytest

from edge_runtime import SOURCE_LOCAL, EdgeRuntime
from edge_runtime.data import OOS_LABEL
from edge_runtime.model import OnnxClassifier
from edge_runtime.package import read_package
from tests.conftest import MODELS_DIR, demo_trust

STUDENT = MODELS_DIR / "clinc150-student.edgepkg"
TEACHER = MODELS_DIR / "clinc150-teacher.edgepkg"

# Unambiguous CLINC150-style requests and the intent each belongs to.
CLEAR_QUERIES = {
    "set an alarm for 6 am tomorrow": "alarm",
    "what is the weather going to be like in chicago today": "weather",
    "how do you say good morning in french": "translate",
    "transfer fifty dollars from my checking to my savings account": "transfer",
}


@pytest.mark.parametrize("path", [STUDENT, TEACHER], ids=["student", "teacher"])
def test_package_reads(path):
    manifest = read_package(path, demo_trust()).manifest
    assert len(manifest.labels) == 151
    assert OOS_LABEL in manifest.labels
    assert manifest.precision == "int8"


def test_student_gate_fitted_on_validation():
    gate = read_package(STUDENT, demo_trust()).manifest.gate
    assert gate is not None
    assert gate.fitted_on["split"] == "validation"
    assert gate.fitted_on["local_disagreement"] <= gate.fitted_on["max_disagreement"]


def test_student_passes_golden_inputs():
    with EdgeRuntime.load(STUDENT, trust=demo_trust()) as runtime:
        assert runtime.golden_failures == []


@pytest.mark.parametrize(("text", "label"), sorted(CLEAR_QUERIES.items()))
def test_student_answers_clear_query(text, label):
    with EdgeRuntime.load(STUDENT, trust=demo_trust()) as runtime:
        answer = runtime.answer(text)
    assert answer.label == label
    assert answer.source == SOURCE_LOCAL


@pytest.mark.parametrize(("text", "label"), sorted(CLEAR_QUERIES.items()))
def test_teacher_answers_clear_query(text, label):
    teacher = OnnxClassifier.from_file(str(TEACHER), trust=demo_trust())
    logits = teacher.predict(text).logits
    assert teacher.labels[int(logits.argmax())] == label


def test_student_smaller_than_teacher():
    # Most of both is the int8 token embedding table (30,522 x 384), which the student keeps
    # whole, so the student package is smaller but not by its share of layers.
    assert STUDENT.stat().st_size < 0.8 * TEACHER.stat().st_size
