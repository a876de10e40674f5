"""Recovering a classifier's weights from its fp32 ONNX export (export.onnx_import), and the
"onnx" teacher mode of the build config."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("onnx")

from edge_runtime.errors import ConfigError  # noqa: E402
from export.config import parse_config  # noqa: E402
from export.modeling import (  # noqa: E402
    cut_student,
    load_pretrained_classifier,
    load_tokenizer,
)
from export.onnx_export import export_onnx, onnx_logits, session_from_file  # noqa: E402
from export.onnx_import import OnnxImportError, load_onnx_weights, onnx_state_dict  # noqa: E402
from export.train import predict_logits  # noqa: E402

TEXTS = ["set an alarm for 7 am", "what is my balance", "play some jazz", "hi", "thanks a lot"]


@pytest.fixture(scope="module")
def pretrained():
    """The pretrained encoder with a 5-label head, loaded once for the module."""
    return load_pretrained_classifier(5)


@pytest.fixture(scope="module")
def exported(tmp_path_factory, pretrained):
    """A 1-layer classifier with 5 labels, its weights changed from the pretrained ones, and
    its ONNX export."""
    torch.manual_seed(3)
    model = cut_student(pretrained, (0,))
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.01 * torch.randn_like(parameter))
    model.eval()
    tokenizer = load_tokenizer(64)
    path = tmp_path_factory.mktemp("onnx") / "model.onnx"
    export_onnx(model, path, TEXTS, tokenizer)
    return model, tokenizer, path


def fresh_model(pretrained, num_labels: int = 5, layers: tuple[int, ...] = (0,)):
    """A copy of ``pretrained`` cut to ``layers``, with a new random head of ``num_labels``."""
    torch.manual_seed(11)
    model = cut_student(pretrained, layers)
    model.classifier = torch.nn.Linear(model.classifier.in_features, num_labels)
    return model


def test_recovered_weights_equal_the_exported_ones(exported, pretrained):
    model, _, path = exported
    target = fresh_model(pretrained)

    load_onnx_weights(target, path)

    source = model.state_dict()
    for name, tensor in target.state_dict().items():
        if name.startswith("encoder.pooler.") or name.endswith(("position_ids", "token_type_ids")):
            continue
        assert torch.equal(tensor, source[name]), name


def test_recovered_model_matches_the_onnx_logits(exported, pretrained):
    _, tokenizer, path = exported
    target = fresh_model(pretrained)
    before = predict_logits(target, tokenizer, TEXTS)

    count = load_onnx_weights(target, path)

    after = predict_logits(target, tokenizer, TEXTS)
    reference = onnx_logits(session_from_file(path), tokenizer, TEXTS)
    assert count == len(onnx_state_dict(path))
    assert np.abs(after - reference).max() < 1e-4
    assert np.abs(before - reference).max() > 1e-2


def test_linear_weights_are_transposed_back(exported):
    model, _, path = exported

    state = onnx_state_dict(path)

    query = "encoder.encoder.layer.0.attention.self.query.weight"
    intermediate = "encoder.encoder.layer.0.intermediate.dense.weight"
    assert state[intermediate].shape == (1536, 384)
    assert np.array_equal(state[query], model.state_dict()[query].numpy())


def test_other_label_count_is_refused(exported, pretrained):
    _, _, path = exported

    with pytest.raises(OnnxImportError, match=r"classifier\.weight has shape \(5, 384\)"):
        load_onnx_weights(fresh_model(pretrained, num_labels=7), path)


def test_other_depth_is_refused(exported, pretrained):
    _, _, path = exported
    deeper = fresh_model(pretrained, layers=(0, 1))

    with pytest.raises(OnnxImportError, match=r"missing \['encoder\.encoder\.layer\.1"):
        load_onnx_weights(deeper, path)


def test_missing_and_damaged_files_are_refused(tmp_path):
    with pytest.raises(OnnxImportError, match="no such ONNX file"):
        onnx_state_dict(tmp_path / "absent.onnx")
    damaged = tmp_path / "damaged.onnx"
    damaged.write_bytes(b"\x08\x07not a protobuf model")
    with pytest.raises(OnnxImportError, match="not a readable ONNX model"):
        onnx_state_dict(damaged)


def test_onnx_mode_needs_a_path():
    with pytest.raises(ConfigError, match="'teacher.onnx'"):
        parse_config({"data": {"path": "data"}, "teacher": {"mode": "onnx"}})


def test_onnx_path_needs_onnx_mode():
    with pytest.raises(ConfigError, match="'teacher.onnx'"):
        parse_config({"data": {"path": "data"}, "teacher": {"onnx": "build/x/teacher-fp32.onnx"}})


def test_onnx_mode_is_read():
    config = parse_config({"data": {"path": "data"},
                           "teacher": {"mode": "onnx", "onnx": "build/x/teacher-fp32.onnx"}})

    assert config.teacher.mode == "onnx"
    assert config.teacher.onnx == "build/x/teacher-fp32.onnx"
