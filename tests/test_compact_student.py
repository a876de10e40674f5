"""Builds that make the student smaller or skip the teacher's training: a trimmed vocabulary,
a factorized word embedding table, narrower feed-forward blocks and a transfer set
(student.trim_vocabulary, embedding_rank, intermediate_size, transfer_file), and a teacher
loaded from an earlier build's ONNX file (teacher.mode = "onnx")."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from edge_runtime import EdgeRuntime
from edge_runtime.errors import ConfigError
from edge_runtime.package import read_package
from export.config import parse_config
from tests.conftest import (
    CLINC150_DIR,
    DEVICE_PUBLIC,
    SIGNER_PRIVATE,
    TINY_CONFIG,
    demo_trust,
    require_clinc150,
)

pytestmark = pytest.mark.slow


def tiny_config(out: Path, **overrides):
    from export.config import load_config

    return load_config(TINY_CONFIG, {
        "data.path": str(CLINC150_DIR), "output.dir": str(out), "output.models_dir": "",
        "package.signer_key": str(SIGNER_PRIVATE), "package.recipients": [str(DEVICE_PUBLIC)],
        **overrides,
    })


@pytest.fixture(scope="module")
def compact_build(tiny_build, tmp_path_factory):
    """The tiny build again, with its teacher loaded from the first tiny build's ONNX file, a
    rank-64 word embedding table, a trimmed vocabulary without [CLS] and [SEP], one
    augmented variant per training query and the logit-margin gate score."""
    require_clinc150()
    pytest.importorskip("torch")
    from export.build import build

    out = tmp_path_factory.mktemp("compact-build")
    transfer = out / "transfer.txt"
    transfer.write_text("\n".join(TRANSFER_SENTENCES) + "\n", encoding="utf-8")
    config = tiny_config(out, **{
        "teacher.mode": "onnx", "teacher.onnx": str(tiny_build.dir / "teacher-fp32.onnx"),
        "student.embedding_rank": 64, "student.trim_vocabulary": True,
        "student.intermediate_size": 256, "student.transfer_file": str(transfer),
        "student.augment_copies": 1, "student.special_tokens": False,
        "calibration.score": "logit_margin",
    })
    return out, build(config)


# Unlabelled sentences for the transfer set; the repeat is dropped, so 4 are used.
TRANSFER_SENTENCES = [
    "the castle was rebuilt after the fire of 1624",
    "she recorded three albums with the orchestra",
    "The castle was rebuilt after the fire of 1624",
    "the river is navigable for most of its length",
    "zoologists counted eleven nesting pairs",
]


def test_transfer_sentences_used(compact_build):
    _, report = compact_build

    assert report["data"]["transfer"]["sentences"] == 4
    assert report["stages"]["student"]["examples"]["transfer"] == 4


def test_augmented_variants_used(compact_build):
    _, report = compact_build
    train = report["data"]["train"]

    assert 0 < report["data"]["augmented"] <= train
    assert report["stages"]["student"]["examples"]["augmented"] == report["data"]["augmented"]


def test_student_tokenizer_without_special_tokens(compact_build):
    from tokenizers import Tokenizer

    out, report = compact_build
    settings = json.loads((out / "student-tokenizer.json").read_text())
    tokens = Tokenizer.from_file(str(out / "student-tokenizer.json")).encode("set an alarm").tokens

    assert settings["post_processor"] is None
    assert tokens == ["set", "an", "alarm"]
    assert report["stages"]["student"]["vocabulary"]["special_tokens"] is False


def test_special_tokens_off_needs_trimmed_vocabulary():
    with pytest.raises(ConfigError, match="'student.special_tokens'"):
        parse_config({"data": {"path": "data"}, "student": {"special_tokens": False}})


def test_feed_forward_narrowed(compact_build):
    import onnx
    from onnx import numpy_helper

    out, report = compact_build
    model = onnx.load(str(out / "student-int8.onnx"))
    shapes = [tuple(numpy_helper.to_array(i).shape) for i in model.graph.initializer]

    # The two MatMul weights of the feed-forward block, (in, out).
    assert (384, 256) in shapes
    assert (256, 384) in shapes
    assert not any(1536 in shape for shape in shapes)
    assert report["stages"]["student"]["intermediate_size"] == 256


def test_onnx_teacher_matches_its_source(tiny_build, compact_build):
    _, report = compact_build
    source = tiny_build.report["stages"]["teacher"]
    loaded = report["stages"]["teacher"]

    assert loaded["test_fp32"] == source["test_fp32"]
    assert loaded["training"]["loaded_from"].endswith("teacher-fp32.onnx")
    assert loaded["mode"] == "onnx"


def test_vocabulary_trim_reported(compact_build):
    _, report = compact_build
    vocabulary = report["stages"]["student"]["vocabulary"]

    assert vocabulary["original"] == 30522
    assert 1000 < vocabulary["kept"] < 5000
    assert vocabulary["kept"] == vocabulary["from_corpus"] + vocabulary["for_coverage"]


def test_package_holds_trimmed_tokenizer(compact_build):
    out, report = compact_build
    vocabulary = report["stages"]["student"]["vocabulary"]
    package = read_package(out / "clinc150-tiny-student.edgepkg", demo_trust())

    tokens = json.loads(package.tokenizer_json)["model"]["vocab"]
    assert len(tokens) == vocabulary["kept"]
    assert package.tokenizer_json == (out / "student-tokenizer.json").read_text()


def test_embedding_table_is_factorized(compact_build):
    import onnx
    from onnx import numpy_helper

    out, report = compact_build
    kept = report["stages"]["student"]["vocabulary"]["kept"]
    model = onnx.load(str(out / "student-int8.onnx"))
    shapes = [tuple(numpy_helper.to_array(i).shape) for i in model.graph.initializer]

    assert (kept, 64) in shapes
    assert not any(len(shape) == 2 and shape[0] == kept and shape[1] == 384 for shape in shapes)
    assert report["stages"]["student"]["embedding_rank"] == 64
    assert 0.0 < report["stages"]["student"]["embedding_norm_kept"] < 1.0


def test_compact_student_answers(compact_build):
    out, report = compact_build

    with EdgeRuntime.load(out / "clinc150-tiny-student.edgepkg", trust=demo_trust()) as runtime:
        answer = runtime.answer("please set an alarm for 7 am tomorrow")

    assert answer.label == "alarm"
    assert report["stages"]["student"]["test_int8"]["in_scope_accuracy"] >= 0.75


def test_logit_margin_gate_packaged(compact_build):
    out, report = compact_build
    package = read_package(out / "clinc150-tiny-student.edgepkg", demo_trust())
    calibration = report["stages"]["calibration"]

    assert package.manifest.raw["schema_version"] == 3
    assert package.manifest.gate.score == "logit_margin"
    assert package.manifest.gate.threshold == calibration["threshold"]
    assert calibration["score"] == "logit_margin"
    # The threshold is one of the validation scores p1 / (p1 + p2), which are at least 0.5, or 1.
    assert 0.5 <= calibration["threshold"] <= 1.0


def test_compact_student_is_smaller(tiny_build, compact_build):
    out, report = compact_build
    full = tiny_build.report["packages"]["student"]["size_bytes"]
    compact = report["packages"]["student"]["size_bytes"]

    assert compact < full / 2
    assert np.isclose(compact, (out / "clinc150-tiny-student.edgepkg").stat().st_size)


def test_embedding_rank_beyond_width_rejected():
    with pytest.raises(ConfigError, match="'student.embedding_rank'"):
        parse_config({"data": {"path": "data"}, "student": {"embedding_rank": 384}})


def test_negative_embedding_rank_rejected():
    with pytest.raises(ConfigError, match="'student.embedding_rank'"):
        parse_config({"data": {"path": "data"}, "student": {"embedding_rank": -1}})
