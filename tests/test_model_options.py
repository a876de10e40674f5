"""OnnxClassifier's session options (threads, graph optimization, execution providers) and its
batch API, on the bundled CLINC150 student and on a small fp32 model built here."""

from __future__ import annotations

import logging

import numpy as np
import onnxruntime as ort
import pytest

from edge_runtime.data import load_split
from edge_runtime.errors import ConfigError
from edge_runtime.model import CPU_PROVIDER, OnnxClassifier, resolve_providers
from edge_runtime.package import read_package, write_package
from tests.conftest import CLINC150_DIR, MODELS_DIR, demo_trust, require_clinc150

STUDENT_PACKAGE = MODELS_DIR / "clinc150-student.edgepkg"


@pytest.fixture(scope="module")
def student_package():
    return read_package(STUDENT_PACKAGE, demo_trust())


@pytest.fixture(scope="module")
def student(student_package):
    return OnnxClassifier(student_package)


@pytest.fixture(scope="module")
def clinc150_queries() -> list[str]:
    """200 CLINC150 test queries spread over the split (every 27th), in file order."""
    require_clinc150()
    return [example.text for example in load_split(CLINC150_DIR, "test")[::27]][:200]


def missing_provider() -> str:
    """Return a provider in onnxruntime's list of all providers that this build lacks."""
    missing = sorted(set(ort.get_all_providers()) - set(ort.get_available_providers()))
    if not missing:
        pytest.skip("this onnxruntime build has every provider it knows")
    return missing[0]


# Option validation


@pytest.mark.parametrize("value", [0, -1, 1.5, "2", True, None])
def test_threads_invalid(student_package, value):
    with pytest.raises(ConfigError) as error:
        OnnxClassifier(student_package, threads=value)
    assert repr(value) in str(error.value)
    assert "at least 1" in str(error.value)


@pytest.mark.parametrize("value", [0, -3, 2.0, "1"])
def test_inter_op_threads_invalid(student_package, value):
    with pytest.raises(ConfigError) as error:
        OnnxClassifier(student_package, inter_op_threads=value)
    assert "inter_op_threads" in str(error.value)
    assert repr(value) in str(error.value)


@pytest.mark.parametrize("value", ["fast", "ALL", "", None, 99])
def test_graph_optimization_invalid(student_package, value):
    with pytest.raises(ConfigError) as error:
        OnnxClassifier(student_package, graph_optimization=value)
    message = str(error.value)
    assert repr(value) in message
    assert "disable, basic, extended, all" in message


@pytest.mark.parametrize(
    "value",
    [
        "CPUExecutionProvider",
        b"CPUExecutionProvider",
        7,
        [""],
        [None],
        [("CPUExecutionProvider", {})],
    ],
)
def test_providers_invalid(student_package, value):
    with pytest.raises(ConfigError) as error:
        OnnxClassifier(student_package, providers=value)
    assert CPU_PROVIDER in str(error.value)


def test_positional_threads_still_work(student_package):
    classifier = OnnxClassifier(student_package, 2)
    options = classifier.session.get_session_options()
    assert classifier.threads == 2
    assert options.intra_op_num_threads == 2


def test_default_session_options(student):
    options = student.session.get_session_options()
    assert options.intra_op_num_threads == 1
    assert options.inter_op_num_threads == 1
    assert options.execution_mode == ort.ExecutionMode.ORT_SEQUENTIAL
    assert options.graph_optimization_level == ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    assert student.providers == (CPU_PROVIDER,)


def test_inter_op_threads_run_parallel(student_package):
    classifier = OnnxClassifier(student_package, inter_op_threads=2)
    options = classifier.session.get_session_options()
    assert options.inter_op_num_threads == 2
    assert options.execution_mode == ort.ExecutionMode.ORT_PARALLEL


# Below "extended" the int8 MatMuls run unfused: up to 0.097 logits from the fused levels on
# 200 CLINC150 test queries on an AVX-512 VNNI Xeon (same top labels), under 1e-3 on AVX2.
@pytest.mark.parametrize(
    "name, level, tolerance",
    [
        ("disable", ort.GraphOptimizationLevel.ORT_DISABLE_ALL, 0.2),
        ("basic", ort.GraphOptimizationLevel.ORT_ENABLE_BASIC, 0.2),
        ("extended", ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED, 1e-3),
        ("all", ort.GraphOptimizationLevel.ORT_ENABLE_ALL, 1e-3),
    ],
)
def test_graph_optimization_levels_agree(student_package, student, name, level, tolerance):
    classifier = OnnxClassifier(student_package, graph_optimization=name)
    texts = [
        "set an alarm for 6:30 am",
        "transfer 200 dollars to savings",
        "how do you say thank you in japanese",
        "who won the world cup in 1998",
    ]
    assert classifier.session.get_session_options().graph_optimization_level == level
    for text in texts:
        logits = classifier.predict(text).logits
        reference = student.predict(text).logits
        assert int(logits.argmax()) == int(reference.argmax()), text
        np.testing.assert_allclose(logits, reference, atol=tolerance)


def test_from_file_passes_session_options():
    classifier = OnnxClassifier.from_file(
        str(STUDENT_PACKAGE), threads=2, trust=demo_trust(), graph_optimization="basic"
    )
    options = classifier.session.get_session_options()
    assert options.intra_op_num_threads == 2
    assert options.graph_optimization_level == ort.GraphOptimizationLevel.ORT_ENABLE_BASIC


# Execution providers


def test_resolve_providers_default():
    assert resolve_providers(None) == [CPU_PROVIDER]


def test_resolve_providers_empty_list_gets_cpu():
    assert resolve_providers([]) == [CPU_PROVIDER]


def test_resolve_providers_keeps_cpu_once():
    assert resolve_providers([CPU_PROVIDER, CPU_PROVIDER]) == [CPU_PROVIDER]


def test_resolve_providers_keeps_available_order():
    others = [name for name in ort.get_available_providers() if name != CPU_PROVIDER]
    if not others:
        pytest.skip("this onnxruntime build has no provider besides the CPU")
    assert resolve_providers([others[0]]) == [others[0], CPU_PROVIDER]
    assert resolve_providers([CPU_PROVIDER, others[0]]) == [CPU_PROVIDER, others[0]]


def test_missing_provider_dropped_with_one_warning(student_package, caplog):
    missing = missing_provider()
    with caplog.at_level(logging.WARNING, logger="edge_runtime.model"):
        classifier = OnnxClassifier(
            student_package, providers=[missing, "NoSuchExecutionProvider", CPU_PROVIDER]
        )
    warnings = [record for record in caplog.records if record.levelno == logging.WARNING]
    assert len(warnings) == 1
    message = warnings[0].getMessage()
    assert missing in message
    assert "NoSuchExecutionProvider (unknown to onnxruntime, check the spelling)" in message
    for available in ort.get_available_providers():
        assert available in message
    assert classifier.providers == (CPU_PROVIDER,)


def test_missing_provider_falls_back_to_cpu(student_package, student, caplog):
    with caplog.at_level(logging.WARNING, logger="edge_runtime.model"):
        classifier = OnnxClassifier(student_package, providers=[missing_provider()])
    assert classifier.providers == (CPU_PROVIDER,)
    text = "what is my current bank balance"
    np.testing.assert_array_equal(classifier.predict(text).logits, student.predict(text).logits)


def test_available_providers_no_warning(caplog):
    with caplog.at_level(logging.WARNING, logger="edge_runtime.model"):
        resolve_providers([CPU_PROVIDER])
    assert caplog.records == []


# Batch API on the int8 student


def test_batch_size_one_equals_predict(student, clinc150_queries):
    texts = clinc150_queries[:24]
    batch = student.predict_batch(texts, batch_size=1)
    single = np.stack([student.predict(text).logits for text in texts])
    assert batch.shape == (len(texts), len(student.labels))
    np.testing.assert_array_equal(batch, single)


def test_batch_row_order_follows_texts(student, clinc150_queries):
    texts = clinc150_queries[:16]
    order = np.random.default_rng(7).permutation(len(texts))
    batch = student.predict_batch(texts, batch_size=16)
    shuffled = student.predict_batch([texts[index] for index in order], batch_size=16)
    np.testing.assert_allclose(shuffled, batch[order], atol=1e-5)


def test_int8_padded_batch_close_to_single(student, clinc150_queries):
    # Dynamic int8 quantization takes one activation scale per batch tensor, so padded batch
    # logits differ from single-query logits by far more than float rounding (about 0.7 at
    # most on these queries on a 2-vCPU AMD EPYC VM). A mask or padding bug moves them by
    # about 5, and changes about one top label in ten.
    batch = student.predict_batch(clinc150_queries, batch_size=32)
    single = np.stack([student.predict(text).logits for text in clinc150_queries])
    agreement = float((batch.argmax(axis=1) == single.argmax(axis=1)).mean())
    assert agreement >= 0.97
    assert float(np.abs(batch - single).max()) < 2.0


def test_batch_empty_list(student):
    logits = student.predict_batch([])
    assert logits.shape == (0, len(student.labels))


@pytest.mark.parametrize("texts", ["one string", [b"bytes"], ["ok", 3]])
def test_batch_invalid_texts(student, texts):
    with pytest.raises(ConfigError):
        student.predict_batch(texts)


@pytest.mark.parametrize("batch_size", [0, -1, 2.5])
def test_batch_invalid_batch_size(student, batch_size):
    with pytest.raises(ConfigError) as error:
        student.predict_batch(["hello"], batch_size=batch_size)
    assert "batch_size" in str(error.value)


# Batch API on an fp32 model


def build_fp32_attention_model(vocab_size: int, num_labels: int, seed: int = 0) -> bytes:
    """Return an fp32 ONNX classifier with one masked self-attention layer and masked mean
    pooling over ``input_ids`` and ``attention_mask``, with random weights."""
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    width = 16

    def weight(name, *shape):
        return numpy_helper.from_array(rng.normal(0.0, 0.5, shape).astype(np.float32), name)

    initializers = [
        weight("embedding", vocab_size, width),
        weight("w_query", width, width),
        weight("w_key", width, width),
        weight("w_value", width, width),
        weight("w_out", width, num_labels),
        weight("b_out", num_labels),
        numpy_helper.from_array(np.array(1.0 / np.sqrt(width), np.float32), "scale"),
        numpy_helper.from_array(np.array(1.0, np.float32), "one"),
        numpy_helper.from_array(np.array(1e9, np.float32), "large"),
        numpy_helper.from_array(np.array([1], np.int64), "axis_1"),
        numpy_helper.from_array(np.array([-1], np.int64), "axis_last"),
    ]
    node = helper.make_node
    nodes = [
        node("Gather", ["embedding", "input_ids"], ["x"]),  # (batch, seq, width)
        node("MatMul", ["x", "w_query"], ["q"]),
        node("MatMul", ["x", "w_key"], ["k"]),
        node("MatMul", ["x", "w_value"], ["v"]),
        node("Transpose", ["k"], ["k_t"], perm=[0, 2, 1]),
        node("MatMul", ["q", "k_t"], ["raw_scores"]),  # (batch, seq, seq)
        node("Mul", ["raw_scores", "scale"], ["scores"]),
        node("Cast", ["attention_mask"], ["mask"], to=TensorProto.FLOAT),  # (batch, seq)
        node("Unsqueeze", ["mask", "axis_1"], ["key_mask"]),  # (batch, 1, seq)
        node("Sub", ["key_mask", "one"], ["mask_offset"]),
        node("Mul", ["mask_offset", "large"], ["mask_bias"]),  # 0 or -1e9
        node("Add", ["scores", "mask_bias"], ["masked_scores"]),
        node("Softmax", ["masked_scores"], ["attention"], axis=-1),
        node("MatMul", ["attention", "v"], ["context"]),
        node("Add", ["context", "x"], ["residual"]),
        node("Tanh", ["residual"], ["hidden"]),
        node("Unsqueeze", ["mask", "axis_last"], ["token_mask"]),  # (batch, seq, 1)
        node("Mul", ["hidden", "token_mask"], ["masked_hidden"]),
        node("ReduceSum", ["masked_hidden", "axis_1"], ["summed"], keepdims=0),
        node("ReduceSum", ["token_mask", "axis_1"], ["counts"], keepdims=0),
        node("Div", ["summed", "counts"], ["pooled"]),  # (batch, width)
        node("MatMul", ["pooled", "w_out"], ["projected"]),
        node("Add", ["projected", "b_out"], ["logits"]),
    ]
    graph = helper.make_graph(
        nodes,
        "masked-attention-classifier",
        [
            helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "seq"]),
            helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch", "seq"]),
        ],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", num_labels])],
        initializer=initializers,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model.SerializeToString()


@pytest.fixture(scope="module")
def fp32_classifier(student_package, tmp_path_factory):
    """An fp32 model with the student's tokenizer and labels, in an unsigned package."""
    tokenizer_member = student_package.manifest.tokenizer_member
    tokenizer_json = student_package.members[tokenizer_member]
    vocab_size = OnnxClassifier(student_package).tokenizer.get_vocab_size()
    labels = student_package.manifest.labels
    manifest = {
        key: value
        for key, value in student_package.manifest.raw.items()
        if key not in ("schema_version", "members", "encryption", "golden")
    }
    manifest["model"] = dict(manifest["model"], precision="fp32")
    path = write_package(
        tmp_path_factory.mktemp("fp32") / "fp32-attention.edgepkg",
        manifest,
        {
            "model.onnx": build_fp32_attention_model(vocab_size, len(labels)),
            tokenizer_member: tokenizer_json,
        },
    )
    return OnnxClassifier(read_package(path))


def test_fp32_padded_batch_equals_single(fp32_classifier, clinc150_queries):
    texts = clinc150_queries[:40]
    lengths = {len(fp32_classifier.tokenizer.encode(text).ids) for text in texts}
    assert len(lengths) > 3  # the batches really are padded
    batch = fp32_classifier.predict_batch(texts, batch_size=16)
    single = np.stack([fp32_classifier.predict(text).logits for text in texts])
    np.testing.assert_allclose(batch, single, atol=1e-4, rtol=0)


def test_fp32_unmasked_padding_differs(fp32_classifier, clinc150_queries):
    # The model above must be sensitive to padding, or the test before it proves nothing.
    texts = clinc150_queries[:16]
    encodings = fp32_classifier.tokenizer.encode_batch(texts)
    longest = max(len(encoding.ids) for encoding in encodings)
    input_ids = np.zeros((len(texts), longest), dtype=np.int64)
    for row, encoding in enumerate(encodings):
        input_ids[row, : len(encoding.ids)] = encoding.ids
    unmasked = fp32_classifier.session.run(
        ["logits"], {"input_ids": input_ids, "attention_mask": np.ones_like(input_ids)}
    )[0]
    single = np.stack([fp32_classifier.predict(text).logits for text in texts])
    assert float(np.abs(unmasked - single).max()) > 1e-2
