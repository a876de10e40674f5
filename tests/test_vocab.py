"""Vocabulary trimming (export.vocab): token selection, tokenizer and ONNX table remapping on
small hand-built cases, and the whole command on the tiny CLINC150 student."""

from __future__ import annotations

import json

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")

from onnx import TensorProto, helper, numpy_helper  # noqa: E402
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors  # noqa: E402

from edge_runtime.data import load_split  # noqa: E402
from edge_runtime.model import OnnxClassifier  # noqa: E402
from edge_runtime.package import read_package  # noqa: E402
from export.__main__ import main as export_main  # noqa: E402
from export.vocab import (  # noqa: E402
    VocabularyTrimError,
    compare_models,
    compare_tokenization,
    select_vocabulary,
    trim_model,
    trim_tokenizer,
    trim_vocabulary,
)
from tests.conftest import (  # noqa: E402
    CLI_TRUST,
    CLINC150_DIR,
    DEVICE_PUBLIC,
    SIGNER_PRIVATE,
    demo_trust,
)

# A small WordPiece vocabulary: "jazz" is a whole token, but "j" and "z" have no piece of
# their own, so a trimmed vocabulary without "jazz" cannot split it.
TOKENS = [
    "[PAD]",
    "[UNK]",
    "[CLS]",
    "[SEP]",
    "play",
    "music",
    "mus",
    "##ic",
    "the",
    "jazz",
    "p",
    "l",
    "a",
    "y",
    "m",
    "u",
    "s",
    "i",
    "c",
    "t",
    "h",
    "e",
    "##p",
    "##l",
    "##a",
    "##y",
    "##m",
    "##u",
    "##s",
    "##i",
    "##c",
    "##t",
    "##h",
    "##e",
]


def small_tokenizer_json() -> str:
    tokenizer = Tokenizer(
        models.WordPiece({token: i for i, token in enumerate(TOKENS)}, unk_token="[UNK]")
    )
    tokenizer.normalizer = normalizers.BertNormalizer(lowercase=True)
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tokenizer.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", 2), ("[SEP]", 3)],
    )
    tokenizer.add_special_tokens(["[PAD]", "[UNK]", "[CLS]", "[SEP]"])
    return tokenizer.to_str()


def test_selection_keeps_corpus_specials_and_characters():
    selection = select_vocabulary(small_tokenizer_json(), ["Play music"])
    kept = {TOKENS[i] for i in selection.kept_ids}

    assert {"play", "music"} <= kept
    assert {"[PAD]", "[UNK]", "[CLS]", "[SEP]"} <= kept
    assert {"p", "e", "##c", "##h"} <= kept
    assert not {"mus", "##ic", "the", "jazz"} & kept
    assert list(selection.kept_ids) == sorted(selection.kept_ids)
    assert selection.from_corpus == 4  # [CLS], play, music, [SEP]
    assert selection.size == len(TOKENS) - 4
    assert selection.for_coverage == selection.size - selection.from_corpus


def test_tokenizer_round_trip_for_kept_words():
    full_json = small_tokenizer_json()
    selection = select_vocabulary(full_json, ["Play music"])
    trimmed_json = trim_tokenizer(full_json, selection.kept_ids)
    full, trimmed = Tokenizer.from_str(full_json), Tokenizer.from_str(trimmed_json)

    encoding = trimmed.encode("play music")
    assert encoding.tokens == ["[CLS]", "play", "music", "[SEP]"]
    mapped = [int(selection.kept_ids[i]) for i in encoding.ids]
    assert mapped == full.encode("play music").ids
    assert trimmed.get_vocab_size() == selection.size
    assert json.loads(trimmed_json)["post_processor"]["special_tokens"]["[SEP]"]["ids"] == [
        trimmed.token_to_id("[SEP]")
    ]


def test_dropped_words_split_into_pieces():
    full_json = small_tokenizer_json()
    selection = select_vocabulary(full_json, ["Play music"])
    trimmed = Tokenizer.from_str(trim_tokenizer(full_json, selection.kept_ids))
    full = Tokenizer.from_str(full_json)

    assert full.encode("the", add_special_tokens=False).tokens == ["the"]
    assert trimmed.encode("the", add_special_tokens=False).tokens == ["t", "##h", "##e"]
    # "jazz" has no character pieces in the original vocabulary, so trimming loses it.
    assert full.encode("jazz", add_special_tokens=False).tokens == ["jazz"]
    assert trimmed.encode("jazz", add_special_tokens=False).tokens == ["[UNK]"]


def test_compare_tokenization_counts_changes():
    full_json = small_tokenizer_json()
    selection = select_vocabulary(full_json, ["Play music"])
    trimmed_json = trim_tokenizer(full_json, selection.kept_ids)

    result = compare_tokenization(
        full_json,
        trimmed_json,
        selection.kept_ids,
        ["play music", "play the music", "jazz", "music"],
    )

    assert result["unchanged"].tolist() == [True, False, False, True]
    assert result["changed"] == 2
    assert result["changed_with_more_unknown"] == 1


def test_trim_tokenizer_rejects_dropped_special_token():
    full_json = small_tokenizer_json()
    kept = np.array([0, 1, 3, 4], dtype=np.int64)  # drops [CLS]
    with pytest.raises(VocabularyTrimError, match=r"\[CLS\]"):
        trim_tokenizer(full_json, kept)


VOCAB_ROWS, WIDTH = 12, 4


def embedding_model(kind: str) -> bytes:
    """A graph that sums the embeddings of its ids, with the table stored as ``kind``:
    ``float``, ``per_tensor`` (uint8 rows gathered, then dequantized, as onnxruntime's dynamic
    quantization writes it) or ``per_row`` (dequantized with one scale per row, then gathered)."""
    rng = np.random.default_rng(0)
    nodes, initializers = [], [numpy_helper.from_array(np.array([1], dtype=np.int64), "axes")]
    if kind == "float":
        table = rng.normal(size=(VOCAB_ROWS, WIDTH)).astype(np.float32)
        initializers.append(numpy_helper.from_array(table, "table"))
        nodes.append(helper.make_node("Gather", ["table", "input_ids"], ["embedded"]))
    elif kind == "per_tensor":
        table = rng.integers(0, 255, size=(VOCAB_ROWS, WIDTH), dtype=np.uint8)
        initializers += [
            numpy_helper.from_array(table, "table_quantized"),
            numpy_helper.from_array(np.array(0.05, dtype=np.float32), "scale"),
            numpy_helper.from_array(np.array(128, dtype=np.uint8), "zero_point"),
        ]
        nodes += [
            helper.make_node("Gather", ["table_quantized", "input_ids"], ["gathered"]),
            helper.make_node("DequantizeLinear", ["gathered", "scale", "zero_point"], ["embedded"]),
        ]
    elif kind == "per_row":
        table = rng.integers(-127, 127, size=(VOCAB_ROWS, WIDTH), dtype=np.int8)
        scale = rng.uniform(0.01, 0.1, size=VOCAB_ROWS).astype(np.float32)
        zero_point = rng.integers(-5, 5, size=VOCAB_ROWS, dtype=np.int8)
        initializers += [
            numpy_helper.from_array(table, "table_quantized"),
            numpy_helper.from_array(scale, "scale"),
            numpy_helper.from_array(zero_point, "zero_point"),
        ]
        nodes += [
            helper.make_node(
                "DequantizeLinear", ["table_quantized", "scale", "zero_point"], ["table"], axis=0
            ),
            helper.make_node("Gather", ["table", "input_ids"], ["embedded"]),
        ]
    nodes += [
        helper.make_node("ReduceSum", ["embedded", "axes"], ["logits"], keepdims=0),
        helper.make_node("Shape", ["input_ids"], ["ids_shape"]),
    ]
    graph = helper.make_graph(
        nodes,
        "embedding",
        [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "sequence"])],
        [
            helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", WIDTH]),
            helper.make_tensor_value_info("ids_shape", TensorProto.INT64, [2]),
        ],
        initializer=initializers,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model.SerializeToString()


def run_model(model_bytes: bytes, ids: np.ndarray) -> np.ndarray:
    import onnxruntime as ort

    session = ort.InferenceSession(model_bytes, providers=["CPUExecutionProvider"])
    return session.run(["logits"], {"input_ids": ids})[0]


@pytest.mark.parametrize("kind", ["float", "per_tensor", "per_row"])
def test_trim_model_keeps_outputs(kind):
    full = embedding_model(kind)
    kept = np.array([0, 3, 5, 7, 11], dtype=np.int64)
    new_id = {int(old): new for new, old in enumerate(kept)}
    original_ids = np.array([[0, 3, 7, 11], [5, 5, 0, 3]], dtype=np.int64)
    trimmed_ids = np.vectorize(new_id.get)(original_ids).astype(np.int64)

    trimmed, remapped = trim_model(full, kept)

    np.testing.assert_array_equal(run_model(trimmed, trimmed_ids), run_model(full, original_ids))
    tables = {init.name: init for init in onnx.load_from_string(trimmed).graph.initializer}
    for name in remapped:
        assert tables[name].dims[0] == len(kept), name
    if kind == "per_tensor":
        assert set(remapped) == {"table_quantized"}
    if kind == "per_row":
        assert set(remapped) == {"table_quantized", "scale", "zero_point"}


def test_trim_model_rejects_value_dependent_use():
    model = onnx.load_from_string(embedding_model("float"))
    model.graph.node.append(helper.make_node("Cast", ["input_ids"], ["ids_float"], to=1))
    model.graph.output.append(
        helper.make_tensor_value_info("ids_float", TensorProto.FLOAT, ["batch", "sequence"])
    )
    with pytest.raises(VocabularyTrimError, match="Cast"):
        trim_model(model.SerializeToString(), np.array([0, 1], dtype=np.int64))


def test_trim_model_rejects_shared_table():
    model = onnx.load_from_string(embedding_model("float"))
    model.graph.node.append(helper.make_node("Identity", ["table"], ["table_copy"]))
    model.graph.output.append(
        helper.make_tensor_value_info("table_copy", TensorProto.FLOAT, [VOCAB_ROWS, WIDTH])
    )
    with pytest.raises(VocabularyTrimError, match="also feeds Identity"):
        trim_model(model.SerializeToString(), np.array([0, 1], dtype=np.int64))


# ---------------------------------------------------------------------------------------------
# The tiny CLINC150 student

TINY_LABELS = {
    "oos",
    "translate",
    "transfer",
    "timer",
    "weather",
    "balance",
    "book_flight",
    "alarm",
}


def tiny_split(split: str, per_label: int) -> list:
    """The first ``per_label`` examples of each tiny-build label, as the tiny build reads them."""
    counts: dict[str, int] = {}
    examples = []
    for example in load_split(CLINC150_DIR, split):
        if example.label in TINY_LABELS and counts.get(example.label, 0) < per_label:
            counts[example.label] = counts.get(example.label, 0) + 1
            examples.append(example)
    return examples


@pytest.fixture(scope="module")
def tiny_trimmed(tiny_build):
    package = read_package(tiny_build.student_package, demo_trust())
    corpus = [example.text for example in tiny_split("train", 40)]
    return package, trim_vocabulary(package, corpus)


@pytest.mark.slow
def test_tiny_logits_identical_for_kept_tokens(tiny_trimmed):
    package, trimmed = tiny_trimmed
    test = tiny_split("test", 20)
    texts = [example.text for example in test]

    tokenization = compare_tokenization(
        package.tokenizer_json, trimmed.tokenizer_json, trimmed.selection.kept_ids, texts
    )
    unchanged = tokenization["unchanged"]
    assert 0 < unchanged.sum() < len(texts)

    trimmed_package = package.replace(
        members={
            **package.members,
            "model.onnx": trimmed.model_bytes,
            "tokenizer.json": trimmed.tokenizer_json.encode("utf-8"),
        }
    )
    figures = compare_models(
        OnnxClassifier(package),
        OnnxClassifier(trimmed_package),
        texts,
        [example.label for example in test],
        unchanged,
    )
    assert figures["logits_max_abs_diff_unchanged"] == 0.0
    assert len(trimmed.model_bytes) < len(package.model_bytes)


@pytest.mark.slow
def test_tiny_unseen_words_become_pieces(tiny_trimmed):
    package, trimmed = tiny_trimmed
    full = Tokenizer.from_str(package.tokenizer_json)
    after = Tokenizer.from_str(trimmed.tokenizer_json)
    kept = set(trimmed.selection.kept_ids.tolist())

    for word in ("photosynthesis", "xylophone", "kilimanjaro"):
        original = full.encode(word, add_special_tokens=False)
        assert "[UNK]" not in original.tokens, word
        assert not set(original.ids) <= kept, f"{word} keeps all its tokens"
        pieces = after.encode(word, add_special_tokens=False).tokens
        assert "[UNK]" not in pieces, word
        assert len(pieces) > len(original.tokens), word
        assert "".join(piece.removeprefix("##") for piece in pieces) == word


@pytest.mark.slow
def test_trim_vocab_command_writes_verified_package(tiny_build, tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    for split, per_label in (("train", 40), ("val", 5), ("test", 10)):
        with open(data / f"{split}.jsonl", "w", encoding="utf-8") as handle:
            for example in tiny_split(split, per_label):
                handle.write(json.dumps({"text": example.text, "label": example.label}) + "\n")
    out = tmp_path / "trimmed.edgepkg"

    code = export_main(
        [
            "trim-vocab",
            "--package",
            str(tiny_build.student_package),
            "--out",
            str(out),
            "--data",
            str(data),
            "--signer-private-key",
            str(SIGNER_PRIVATE),
            "--recipient",
            str(DEVICE_PUBLIC),
            *CLI_TRUST,
        ]
    )

    assert code == 0
    source = read_package(tiny_build.student_package, demo_trust())
    trimmed = read_package(out, demo_trust())
    assert trimmed.signer_key_id == source.signer_key_id
    assert trimmed.manifest.version == source.manifest.version + 1
    assert trimmed.manifest.labels == source.manifest.labels
    assert sorted(trimmed.manifest.raw["encryption"]["members"]) == ["model.onnx"]
    report = json.loads(out.with_suffix(".report.json").read_text())
    assert report["check"]["logits_max_abs_diff_unchanged"] == 0.0
    assert report["check"]["texts"] == 80
    assert report["output"]["vocabulary_size"] == report["tokens"]["kept"]
    assert report["output"]["package_bytes"] < report["source"]["package_bytes"]
    assert report["output"]["package_bytes"] == out.stat().st_size
    assert out.with_suffix(".report.md").is_file()
    trimming = trimmed.manifest.raw["provenance"]["vocabulary_trimming"]
    assert trimming["tokens"]["kept"] == report["tokens"]["kept"]


@pytest.mark.slow
def test_trim_vocab_command_rejects_input_as_output(tiny_build, capsys):
    package = str(tiny_build.student_package)
    code = export_main(["trim-vocab", "--package", package, "--out", package, *CLI_TRUST])
    assert code == 2
    assert "is the input package" in capsys.readouterr().err


@pytest.mark.slow
def test_trim_vocab_command_rejects_unreadable_output(tiny_build, tmp_path, capsys):
    from edge_runtime.keys import generate_keys

    _, other_device = generate_keys(tmp_path, "other-device", "device")
    out = tmp_path / "trimmed.edgepkg"

    code = export_main(
        [
            "trim-vocab",
            "--package",
            str(tiny_build.student_package),
            "--out",
            str(out),
            "--data",
            str(CLINC150_DIR),
            "--signer-private-key",
            str(SIGNER_PRIVATE),
            "--recipient",
            str(other_device),
            *CLI_TRUST,
        ]
    )

    assert code == 2
    assert "is not among the --recipient keys" in capsys.readouterr().err
    assert not out.exists()
