"""Vocabulary trimming of a built student, without retraining.

A student package keeps the full WordPiece vocabulary of its pretrained encoder (30,522 tokens
for all-MiniLM-L6-v2), and the word-embedding table is most of the model's bytes. Trimming
keeps the tokens the domain uses and drops the other rows:

- every token id that the package's tokenizer produces on the corpus texts (by default the
  CLINC150 train and validation splits, plus the manifest's golden inputs);
- every added token (the special tokens ``[PAD]``, ``[UNK]``, ``[CLS]``, ``[SEP]``, ``[MASK]``);
- every single-character token and every continuation token of one character (``##a``), so
  that a word the corpus never showed is still split into pieces. It becomes ``[UNK]`` only
  where some character of it has no piece in the original vocabulary either.

Kept tokens keep their order, so new id ``i`` is original id ``kept_ids[i]``. The tokenizer's
vocabulary and the rows of every table that ``input_ids`` indexes are remapped together. The
graph is otherwise unchanged, so for a text whose original tokens are all kept, the trimmed
model on the trimmed ids computes exactly what the full model computed on the original ids.

WordPiece matches greedily, longest piece first, and dropping a token never makes a kept
piece longer than before. So a word whose original pieces are all kept tokenizes the same way
after trimming, and a word with a dropped piece is split into other, shorter pieces.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import platform
import time
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from edge_runtime import encryption, signing
from edge_runtime.data import load_split
from edge_runtime.errors import ConfigError, ModelError
from edge_runtime.metrics import accuracy_figures
from edge_runtime.package import ModelPackage, TrustPolicy, read_package, write_package

log = logging.getLogger(__name__)

IDS_INPUT = "input_ids"
# Consumers of input_ids whose output depends only on the tensor's shape, not on its values.
SHAPE_ONLY_OPS = ("Shape", "Size")
DEFAULT_DATA = "../shared/data/clinc150"
DEFAULT_SPLITS = ("train", "val")
DEFAULT_TEST_SPLIT = "test"


class VocabularyTrimError(ModelError):
    """A model or tokenizer cannot be trimmed, or the trimmed package fails its check."""


# ---------------------------------------------------------------------------------------------
# Selecting the tokens to keep


@dataclass(frozen=True)
class VocabularySelection:
    """The tokens a trimmed vocabulary keeps.

    ``kept_ids`` (kept,) int64, ascending: the original id of each new id.
    ``from_corpus``: distinct ids the corpus produced. ``for_coverage``: ids kept only because
    they are added tokens or one-character pieces.
    """

    kept_ids: np.ndarray
    original_size: int
    from_corpus: int
    for_coverage: int
    corpus_texts: int

    @property
    def size(self) -> int:
        return len(self.kept_ids)


def _wordpiece_model(tokenizer: dict[str, Any]) -> dict[str, Any]:
    model = tokenizer.get("model")
    if not isinstance(model, dict) or model.get("type") != "WordPiece":
        kind = model.get("type") if isinstance(model, dict) else type(model).__name__
        raise VocabularyTrimError(
            f"tokenizer model is {kind!r}; vocabulary trimming supports only WordPiece "
            "tokenizers (BERT family)"
        )
    vocab = model.get("vocab")
    if not isinstance(vocab, dict) or not vocab:
        raise VocabularyTrimError("tokenizer.json has no WordPiece 'vocab' object")
    ids = sorted(vocab.values())
    if ids != list(range(len(ids))):
        raise VocabularyTrimError(
            f"WordPiece vocab ids are not 0..{len(ids) - 1} without gaps; cannot remap them"
        )
    return model


def _original_size(tokenizer: dict[str, Any]) -> int:
    model = _wordpiece_model(tokenizer)
    added = [token["id"] for token in tokenizer.get("added_tokens") or []]
    return max([len(model["vocab"]) - 1, *added]) + 1


def coverage_token_ids(tokenizer_json: str) -> set[int]:
    """Return the ids kept whatever the corpus: added tokens, the unknown token, and every
    token of one character with or without the continuation prefix."""
    tokenizer = json.loads(tokenizer_json)
    model = _wordpiece_model(tokenizer)
    vocab: dict[str, int] = model["vocab"]
    prefix = model.get("continuing_subword_prefix") or "##"
    ids = {token["id"] for token in tokenizer.get("added_tokens") or []}
    unknown = model.get("unk_token")
    if unknown not in vocab:
        raise VocabularyTrimError(f"the unknown token {unknown!r} is not in the WordPiece vocab")
    ids.add(vocab[unknown])
    for token, token_id in vocab.items():
        if len(token) == 1 or (token.startswith(prefix) and len(token) == len(prefix) + 1):
            ids.add(token_id)
    return ids


def corpus_token_ids(tokenizer_json: str, texts: Iterable[str], batch_size: int = 1024) -> set[int]:
    """Return every token id the tokenizer produces on ``texts``, without truncation."""
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_str(tokenizer_json)
    tokenizer.no_truncation()
    tokenizer.no_padding()
    texts = list(texts)
    ids: set[int] = set()
    for first in range(0, len(texts), batch_size):
        for encoding in tokenizer.encode_batch(texts[first : first + batch_size]):
            ids.update(encoding.ids)
    return ids


def select_vocabulary(tokenizer_json: str, texts: Sequence[str]) -> VocabularySelection:
    """Choose the tokens to keep: those the corpus ``texts`` use, plus the coverage tokens."""
    tokenizer = json.loads(tokenizer_json)
    original_size = _original_size(tokenizer)
    from_corpus = corpus_token_ids(tokenizer_json, texts)
    coverage = coverage_token_ids(tokenizer_json)
    kept = np.array(sorted(from_corpus | coverage), dtype=np.int64)
    return VocabularySelection(
        kept_ids=kept,
        original_size=original_size,
        from_corpus=len(from_corpus),
        for_coverage=len(coverage - from_corpus),
        corpus_texts=len(texts),
    )


# ---------------------------------------------------------------------------------------------
# Tokenizer


def trim_tokenizer(tokenizer_json: str, kept_ids: np.ndarray) -> str:
    """Return the tokenizer JSON with only ``kept_ids``, renumbered 0..len(kept_ids)-1 in order.

    Added tokens, the post-processor's special token ids and the padding id are remapped too.
    Every added token must be among ``kept_ids``.
    """
    tokenizer = json.loads(tokenizer_json)
    model = _wordpiece_model(tokenizer)
    new_id = {int(old): new for new, old in enumerate(kept_ids)}

    def remap(old: int, what: str) -> int:
        if old not in new_id:
            raise VocabularyTrimError(f"{what} has id {old}, which the trimmed vocabulary drops")
        return new_id[old]

    model["vocab"] = {
        token: new_id[old]
        for token, old in sorted(model["vocab"].items(), key=lambda item: item[1])
        if old in new_id
    }
    for token in tokenizer.get("added_tokens") or []:
        token["id"] = remap(token["id"], f"added token {token.get('content')!r}")
    if tokenizer.get("post_processor") is not None:
        _remap_post_processor(tokenizer["post_processor"], remap)
    padding = tokenizer.get("padding")
    if isinstance(padding, dict) and "pad_id" in padding:
        padding["pad_id"] = remap(padding["pad_id"], f"padding token {padding.get('pad_token')!r}")
    return json.dumps(tokenizer, ensure_ascii=False)


def _remap_post_processor(processor: dict[str, Any], remap: Any) -> None:
    kind = processor.get("type")
    if kind == "TemplateProcessing":
        for name, special in (processor.get("special_tokens") or {}).items():
            special["ids"] = [
                remap(old, f"post-processor token {name!r}") for old in special["ids"]
            ]
    elif kind in ("BertProcessing", "RobertaProcessing"):
        for key in ("sep", "cls"):
            token, old = processor[key]
            processor[key] = [token, remap(old, f"post-processor token {token!r}")]
    elif kind == "Sequence":
        for child in processor.get("processors") or []:
            _remap_post_processor(child, remap)
    elif kind != "ByteLevel":
        raise VocabularyTrimError(
            f"tokenizer post-processor {kind!r} is not supported by vocabulary trimming; "
            "supported: TemplateProcessing, BertProcessing, RobertaProcessing, ByteLevel, Sequence"
        )


def check_tokenizer_remap(full_json: str, trimmed_json: str, kept_ids: np.ndarray) -> None:
    """Raise VocabularyTrimError unless new id ``i`` of the trimmed tokenizer is the token of
    original id ``kept_ids[i]`` for every ``i``."""
    from tokenizers import Tokenizer

    full = Tokenizer.from_str(full_json)
    trimmed = Tokenizer.from_str(trimmed_json)
    if trimmed.get_vocab_size() != len(kept_ids):
        raise VocabularyTrimError(
            f"trimmed tokenizer has {trimmed.get_vocab_size()} tokens; expected {len(kept_ids)}"
        )
    for new, old in enumerate(kept_ids):
        if trimmed.id_to_token(new) != full.id_to_token(int(old)):
            raise VocabularyTrimError(
                f"trimmed id {new} is {trimmed.id_to_token(new)!r} but original id {old} is "
                f"{full.id_to_token(int(old))!r}"
            )


# ---------------------------------------------------------------------------------------------
# ONNX model


@dataclass
class _GraphIndex:
    initializers: dict[str, Any]
    producers: dict[str, Any]
    consumers: dict[str, list[Any]] = field(default_factory=lambda: defaultdict(list))


def _index_graph(graph: Any) -> _GraphIndex:
    index = _GraphIndex(initializers={init.name: init for init in graph.initializer}, producers={})
    for node in graph.node:
        for name in node.output:
            index.producers[name] = node
        for name in node.input:
            if name:
                index.consumers[name].append(node)
    return index


def _attribute(node: Any, name: str, default: Any) -> Any:
    from onnx import helper

    for attribute in node.attribute:
        if attribute.name == name:
            return helper.get_attribute_value(attribute)
    return default


def _describe(node: Any) -> str:
    return f"{node.op_type} node {node.name or '(unnamed)'!r}"


def _vocabulary_tables(graph: Any, index: _GraphIndex) -> dict[str, str]:
    """Find the initializers whose rows are token ids; returns name -> how it is used.

    Every consumer of ``input_ids`` must be a shape-only operator or a Gather (axis 0) that
    indexes an initializer, or the output of a DequantizeLinear of one, with the ids.
    Anything else makes the graph depend on id values, which trimming would change.
    """
    if IDS_INPUT not in {graph_input.name for graph_input in graph.input}:
        raise VocabularyTrimError(f"the model has no graph input {IDS_INPUT!r}")
    tables: dict[str, str] = {}
    gathers = []
    for node in index.consumers[IDS_INPUT]:
        if node.op_type in SHAPE_ONLY_OPS and node.domain in ("", "ai.onnx"):
            continue
        if (
            node.op_type == "Gather"
            and node.domain in ("", "ai.onnx")
            and node.input[1] == IDS_INPUT
            and node.input[0] != IDS_INPUT
            and _attribute(node, "axis", 0) == 0
        ):
            gathers.append(node)
            continue
        raise VocabularyTrimError(
            f"{IDS_INPUT} feeds {_describe(node)}, whose output depends on the id values; "
            "trimming supports only Gather (axis 0) and Shape consumers of the ids"
        )
    if not gathers:
        raise VocabularyTrimError(f"no Gather node indexes a table with {IDS_INPUT}")

    for gather in gathers:
        data = gather.input[0]
        if data in index.initializers:
            tables[data] = f"rows gathered by {_describe(gather)}"
            continue
        producer = index.producers.get(data)
        if producer is None or producer.op_type != "DequantizeLinear":
            raise VocabularyTrimError(
                f"{_describe(gather)} gathers {data!r}, which is neither an initializer nor a "
                "DequantizeLinear of one"
            )
        tables.update(_dequantized_tables(producer, index))
    _check_exclusive_use(tables, gathers, index)
    return tables


def _dequantized_tables(dequantize: Any, index: _GraphIndex) -> dict[str, str]:
    """Return the initializers of a DequantizeLinear over the whole table whose rows must be
    remapped: the quantized table, and the scale and zero point when they are per row."""
    quantized = dequantize.input[0]
    if quantized not in index.initializers:
        raise VocabularyTrimError(
            f"{_describe(dequantize)} dequantizes {quantized!r}, which is not an initializer"
        )
    if _attribute(dequantize, "block_size", 0):
        raise VocabularyTrimError(
            f"{_describe(dequantize)} uses blocked quantization, which "
            "vocabulary trimming does not support"
        )
    rank = len(index.initializers[quantized].dims)
    axis = _attribute(dequantize, "axis", 1)
    axis = axis + rank if axis < 0 else axis
    tables = {quantized: f"quantized rows dequantized by {_describe(dequantize)}"}
    for name in dequantize.input[1:]:
        if not name:
            continue
        if name not in index.initializers:
            raise VocabularyTrimError(
                f"{_describe(dequantize)} takes {name!r}, which is not an initializer"
            )
        dims = list(index.initializers[name].dims)
        if len(dims) == 1 and dims[0] > 1 and axis == 0:
            tables[name] = f"per-row quantization parameter of {_describe(dequantize)}"
    return tables


def _check_exclusive_use(tables: dict[str, str], gathers: list[Any], index: _GraphIndex) -> None:
    """Raise unless every remapped initializer feeds only the id lookup, so that no other part
    of the graph (a tied output projection, for example) reads the shorter table."""
    allowed = {id(node) for node in gathers}
    for gather in gathers:
        producer = index.producers.get(gather.input[0])
        if producer is not None:
            allowed.add(id(producer))
            others = [node for node in index.consumers[gather.input[0]] if id(node) not in allowed]
            if others:
                raise VocabularyTrimError(
                    f"the dequantized table {gather.input[0]!r} also feeds {_describe(others[0])}"
                )
    for name in tables:
        others = [node for node in index.consumers[name] if id(node) not in allowed]
        if others:
            raise VocabularyTrimError(
                f"initializer {name!r} is indexed by token id but also feeds "
                f"{_describe(others[0])}; trimming it would change that node"
            )


def trim_model(model_bytes: bytes, kept_ids: np.ndarray) -> tuple[bytes, dict[str, str]]:
    """Keep only the rows ``kept_ids`` of every table indexed by ``input_ids``.

    Returns the serialized model and the remapped initializers (name -> how it is used).
    Raises VocabularyTrimError when the graph uses the ids in any other way.
    """
    import onnx
    from onnx import numpy_helper

    model = onnx.load_from_string(model_bytes)
    graph = model.graph
    index = _index_graph(graph)
    tables = _vocabulary_tables(graph, index)
    listed_inputs = {graph_input.name: graph_input for graph_input in graph.input}
    for name in tables:
        initializer = index.initializers[name]
        rows = numpy_helper.to_array(initializer)
        if rows.shape[0] <= int(kept_ids[-1]):
            raise VocabularyTrimError(
                f"initializer {name!r} has {rows.shape[0]} rows, but the tokenizer has id "
                f"{int(kept_ids[-1])}; the tokenizer does not belong to this model"
            )
        initializer.CopyFrom(numpy_helper.from_array(np.ascontiguousarray(rows[kept_ids]), name))
        if name in listed_inputs:  # models of IR version 3 list initializers as inputs too
            dims = listed_inputs[name].type.tensor_type.shape.dim
            if dims:
                dims[0].ClearField("dim_param")
                dims[0].dim_value = len(kept_ids)
    onnx.checker.check_model(model)
    return model.SerializeToString(), tables


# ---------------------------------------------------------------------------------------------
# Package


@dataclass(frozen=True)
class TrimmedVocabulary:
    """A trimmed model and tokenizer, with the selection behind them."""

    model_bytes: bytes
    tokenizer_json: str
    selection: VocabularySelection
    remapped: dict[str, str]


def trimmed_tokenizer(
    tokenizer_json: str, corpus_texts: Sequence[str]
) -> tuple[str, VocabularySelection]:
    """Trim the tokenizer to the tokens of ``corpus_texts`` plus the coverage tokens, check its
    remap, and return it with the selection behind it."""
    selection = select_vocabulary(tokenizer_json, corpus_texts)
    trimmed_json = trim_tokenizer(tokenizer_json, selection.kept_ids)
    check_tokenizer_remap(tokenizer_json, trimmed_json, selection.kept_ids)
    return trimmed_json, selection


def trim_model_and_tokenizer(
    model_bytes: bytes, tokenizer_json: str, corpus_texts: Sequence[str]
) -> TrimmedVocabulary:
    """Trim an ONNX model and its tokenizer to the tokens of ``corpus_texts`` plus the
    coverage tokens, and check the tokenizer remap."""
    trimmed_json, selection = trimmed_tokenizer(tokenizer_json, corpus_texts)
    trimmed_bytes, remapped = trim_model(model_bytes, selection.kept_ids)
    log.info(
        "kept %d of %d tokens (%d from %d corpus texts, %d more for coverage); remapped %s",
        selection.size,
        selection.original_size,
        selection.from_corpus,
        selection.corpus_texts,
        selection.for_coverage,
        ", ".join(remapped),
    )
    return TrimmedVocabulary(
        model_bytes=trimmed_bytes,
        tokenizer_json=trimmed_json,
        selection=selection,
        remapped=remapped,
    )


def trim_vocabulary(package: ModelPackage, corpus_texts: Sequence[str]) -> TrimmedVocabulary:
    """Trim a read package's model and tokenizer to the tokens of ``corpus_texts`` and of the
    manifest's golden inputs, plus the coverage tokens."""
    golden = [
        item["text"]
        for item in package.manifest.raw.get("golden") or []
        if isinstance(item, dict) and isinstance(item.get("text"), str)
    ]
    return trim_model_and_tokenizer(
        package.model_bytes, package.tokenizer_json, [*corpus_texts, *golden]
    )


def write_trimmed_package(
    package: ModelPackage,
    trimmed: TrimmedVocabulary,
    target: str | Path,
    *,
    version: int,
    signer_key: Any,
    recipients: Sequence[Any],
    corpus: list[dict[str, Any]],
) -> Path:
    """Write the trimmed model and tokenizer as a new package version.

    The manifest is the source's with a new ``version`` and ``created_at`` and a
    ``provenance.vocabulary_trimming`` entry. The members that were encrypted in the source
    are encrypted again, for ``recipients``.
    """
    manifest = {
        key: value
        for key, value in package.manifest.raw.items()
        if key not in ("schema_version", "members", "encryption")
    }
    manifest = json.loads(json.dumps(manifest))  # a deep copy, so the source stays as read
    manifest["version"] = version
    manifest["created_at"] = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
    selection = trimmed.selection
    manifest.setdefault("provenance", {})["vocabulary_trimming"] = {
        "source": f"{package.manifest.name}@{package.manifest.version}",
        "source_model_sha256": _sha256(package.model_bytes),
        "tokens": {
            "original": selection.original_size,
            "kept": selection.size,
            "from_corpus": selection.from_corpus,
            "for_coverage": selection.for_coverage,
        },
        "corpus": corpus,
        "remapped_initializers": sorted(trimmed.remapped),
    }
    section = package.manifest.raw.get("encryption") or {}
    encrypted = sorted(section.get("members") or {}) or [package.manifest.model_member]
    members = dict(package.members)
    members[package.manifest.model_member] = trimmed.model_bytes
    members[package.manifest.tokenizer_member] = trimmed.tokenizer_json.encode("utf-8")
    return write_package(
        target,
        manifest,
        members,
        signer_key=signer_key,
        recipients=recipients,
        encrypt_members=encrypted,
    )


def _sha256(data: bytes) -> str:
    import hashlib

    return hashlib.sha256(data).hexdigest()


# ---------------------------------------------------------------------------------------------
# Check


def compare_tokenization(
    full_json: str, trimmed_json: str, kept_ids: np.ndarray, texts: Sequence[str]
) -> dict[str, Any]:
    """Tokenize ``texts`` with both tokenizers, without truncation.

    A text is unchanged when all its original ids are kept. Its trimmed ids, mapped back
    through ``kept_ids``, must then equal the original ids, else VocabularyTrimError.
    Returns ``unchanged`` (a boolean mask over ``texts``) and counts.
    """
    from tokenizers import Tokenizer

    full = Tokenizer.from_str(full_json)
    trimmed = Tokenizer.from_str(trimmed_json)
    for tokenizer in (full, trimmed):
        tokenizer.no_truncation()
        tokenizer.no_padding()
    kept = np.zeros(full.get_vocab_size(), dtype=bool)  # (original vocabulary,)
    kept[kept_ids] = True
    unknown_full = full.token_to_id(_unknown_token(full_json))
    unknown_trimmed = trimmed.token_to_id(_unknown_token(trimmed_json))

    texts = list(texts)
    unchanged = np.zeros(len(texts), dtype=bool)
    more_unknown = 0
    for row, (original, after) in enumerate(
        zip(full.encode_batch(texts), trimmed.encode_batch(texts), strict=True)
    ):
        original_ids = np.asarray(original.ids, dtype=np.int64)
        mapped = kept_ids[np.asarray(after.ids, dtype=np.int64)]
        if kept[original_ids].all():
            if not np.array_equal(mapped, original_ids):
                raise VocabularyTrimError(
                    f"text {row} {texts[row]!r:.80} keeps all its tokens but tokenizes "
                    f"differently after trimming: {original.tokens} -> {after.tokens}"
                )
            unchanged[row] = True
        elif after.ids.count(unknown_trimmed) > original.ids.count(unknown_full):
            more_unknown += 1
    return {
        "unchanged": unchanged,
        "texts": len(texts),
        "changed": int((~unchanged).sum()),
        "changed_with_more_unknown": more_unknown,
    }


def _unknown_token(tokenizer_json: str) -> str:
    return json.loads(tokenizer_json)["model"]["unk_token"]


def logits_one_by_one(classifier: Any, texts: Sequence[str]) -> np.ndarray:
    """Return (len(texts), labels) logits, one query per session call as on a device."""
    return classifier.predict_batch(list(texts), batch_size=1)


def compare_models(
    full: Any, trimmed: Any, texts: Sequence[str], labels: Sequence[str], unchanged: np.ndarray
) -> dict[str, Any]:
    """Run both classifiers on ``texts`` and return logits differences and accuracies.

    ``full`` and ``trimmed`` are ``edge_runtime.model.OnnxClassifier`` objects;
    ``unchanged`` marks the texts whose tokens are all kept.
    """
    full_logits = logits_one_by_one(full, texts)
    trimmed_logits = logits_one_by_one(trimmed, texts)
    difference = np.abs(full_logits - trimmed_logits).max(axis=1)  # (texts,)
    changed = ~unchanged
    full_top = full_logits.argmax(axis=1)
    trimmed_top = trimmed_logits.argmax(axis=1)
    return {
        "logits_max_abs_diff_unchanged": float(difference[unchanged].max())
        if unchanged.any()
        else None,
        "logits_max_abs_diff_changed": float(difference[changed].max()) if changed.any() else None,
        "top1_agreement_changed": float((full_top[changed] == trimmed_top[changed]).mean())
        if changed.any()
        else None,
        "accuracy_before": accuracy_figures([full.labels[i] for i in full_top], list(labels)),
        "accuracy_after": accuracy_figures([trimmed.labels[i] for i in trimmed_top], list(labels)),
    }


# ---------------------------------------------------------------------------------------------
# Command: python -m export trim-vocab


def add_arguments(parser: Any) -> None:
    """Add the options of ``python -m export trim-vocab`` to an argparse parser."""
    from edge_runtime.package_cli import add_trust_options

    parser.add_argument("--package", required=True, help="student package to trim")
    parser.add_argument("--out", required=True, help="trimmed package to write")
    parser.add_argument(
        "--data",
        default=DEFAULT_DATA,
        help="labelled data folder whose splits form the corpus and the check "
        "(default: %(default)s)",
    )
    parser.add_argument(
        "--split",
        action="append",
        dest="splits",
        metavar="NAME",
        help="corpus split of --data; repeat for several (default: train and val)",
    )
    parser.add_argument(
        "--corpus",
        action="append",
        default=[],
        metavar="FILE",
        help="UTF-8 text file, one text per line, added to the corpus; repeat for several",
    )
    parser.add_argument(
        "--test-split",
        default=DEFAULT_TEST_SPLIT,
        help="split of --data for the check and the accuracies (default: %(default)s)",
    )
    parser.add_argument(
        "--version",
        type=int,
        help="version of the trimmed package (default: the input's version + 1)",
    )
    parser.add_argument(
        "--report",
        metavar="PATH",
        help="JSON report to write, with a Markdown copy beside it (default: "
        "the --out path with the suffix .report.json)",
    )
    parser.add_argument(
        "--signer-private-key",
        metavar="PEM",
        help="ECDSA P-256 private key that signs the trimmed package (default: "
        "the demo key models/keys/demo-signer.key.pem)",
    )
    parser.add_argument(
        "--recipient",
        action="append",
        default=[],
        metavar="PEM",
        help="device public key to encrypt for; repeat for each device (default: "
        "the demo key models/keys/demo-device.pub.pem)",
    )
    add_trust_options(parser)


def read_corpus_file(path: str | Path) -> list[str]:
    """Return the non-empty lines of a UTF-8 text file, stripped."""
    try:
        text = Path(path).read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"corpus file {path}: cannot read it as UTF-8 text: {exc}") from None
    return [line.strip() for line in text.splitlines() if line.strip()]


def _output_keys(args: Any) -> tuple[Any, list[Any]]:
    from edge_runtime import keys

    signer_path = args.signer_private_key or str(keys.DEMO_SIGNER_PRIVATE)
    recipient_paths = args.recipient or [str(keys.DEMO_DEVICE_PUBLIC)]
    if not args.signer_private_key or not args.recipient:
        log.warning(
            "signing or encrypting the trimmed package with the demo keys in %s, which "
            "are public; pass --signer-private-key and --recipient for real packages",
            keys.DEMO_KEYS_DIR,
        )
    try:
        signer = signing.load_private_key_pem(Path(signer_path).read_bytes())
    except OSError as exc:
        raise ConfigError(f"--signer-private-key: cannot read {signer_path}: {exc}") from None
    recipients = [encryption.load_public_key(path) for path in recipient_paths]
    return signer, recipients


def _check_recipients(package: ModelPackage, recipients: Sequence[Any]) -> list[str]:
    section = package.manifest.raw.get("encryption") or {}
    before = sorted(
        wrap.get("recipient_key_id", wrap.get("type", "?"))
        for wrap in section.get("recipients") or []
    )
    after = sorted(encryption.device_key_id(key) for key in recipients)
    if before != after:
        log.warning(
            "the input package was encrypted for %s, the trimmed one is encrypted for %s; "
            "pass one --recipient per device of the input",
            ", ".join(before) or "nobody",
            ", ".join(after),
        )
    return after


def run_trim_vocab(args: Any) -> dict[str, Any]:
    """Trim a package's vocabulary, write the new package and its report, and return the
    report. ``args`` are the parsed options of ``add_arguments``."""
    from edge_runtime.package_cli import trust_from_args

    started = time.perf_counter()
    source_path, target = Path(args.package), Path(args.out)
    if target.exists() and target.resolve() == source_path.resolve():
        raise ConfigError(
            f"--out {target} is the input package; write the trimmed package to another path"
        )
    # Trimming is a build step, so reading the input records nothing in the rollback state.
    trust = trust_from_args(args).replace(rollback=None)
    source = read_package(source_path, trust)
    version = source.manifest.version + 1 if args.version is None else args.version
    if version < 0:
        raise ConfigError(f"--version {version} is negative; expected 0 or more")
    signer, recipients = _output_keys(args)
    recipient_ids = _check_recipients(source, recipients)
    _check_readable(trust, recipients)

    splits = args.splits or list(DEFAULT_SPLITS)
    corpus: list[dict[str, Any]] = []
    texts: list[str] = []
    for split in splits:
        split_texts = [example.text for example in load_split(args.data, split)]
        corpus.append({"source": f"{args.data} split {split}", "texts": len(split_texts)})
        texts += split_texts
    for path in args.corpus:
        file_texts = read_corpus_file(path)
        corpus.append({"source": str(path), "texts": len(file_texts)})
        texts += file_texts
    golden = len(source.manifest.raw.get("golden") or [])
    corpus.append({"source": "manifest golden inputs", "texts": golden})

    trimmed = trim_vocabulary(source, texts)
    written = write_trimmed_package(
        source,
        trimmed,
        target,
        version=version,
        signer_key=signer,
        recipients=recipients,
        corpus=corpus,
    )
    try:
        check = _check_written(source, trimmed, written, trust, signer, recipients, args)
    except BaseException:
        written.unlink(missing_ok=True)  # a package that failed its check is not left behind
        raise

    report = {
        "command": "python -m export trim-vocab",
        "machine": {
            "machine": platform.machine(),
            "processor": platform.processor() or None,
            "python": platform.python_version(),
        },
        "source": _package_figures(source_path, source),
        "output": {
            **_package_figures(written, check.pop("package")),
            "signer_key_id": signing.key_id(signer.public_key()),
            "recipient_key_ids": recipient_ids,
        },
        "version_rule": "input version + 1 unless --version is given: the trimmed package "
        "answers differently on texts with dropped tokens, so it is a new release",
        "tokens": {
            "original": trimmed.selection.original_size,
            "kept": trimmed.selection.size,
            "from_corpus": trimmed.selection.from_corpus,
            "for_coverage": trimmed.selection.for_coverage,
        },
        "corpus": corpus,
        "remapped_initializers": trimmed.remapped,
        "check": check,
        "seconds": round(time.perf_counter() - started, 1),
    }
    report_path = Path(args.report) if args.report else target.with_suffix(".report.json")
    report_path.parent.mkdir(parents=True, exist_ok=True)
    report_path.write_text(json.dumps(report, indent=2, sort_keys=True) + "\n")
    report_path.with_suffix(".md").write_text(render_markdown(report))
    report["report_path"] = str(report_path)
    return report


def _check_readable(trust: TrustPolicy, recipients: Sequence[Any]) -> None:
    """Raise ConfigError unless the device key that decrypts the input also decrypts the
    output, which the check after writing needs."""
    if trust.device_key is None:
        raise ConfigError(
            "trim-vocab needs a --device-key (a passphrase is not enough), because it decrypts "
            "the trimmed package again to check it"
        )
    device_key_id = encryption.device_key_id(trust.device_key)
    if device_key_id not in {encryption.device_key_id(key) for key in recipients}:
        raise ConfigError(
            f"the --device-key (key id {device_key_id}) is not among the --recipient keys, so "
            "the trimmed package could not be decrypted to check it; add its public key as a "
            "--recipient"
        )


def _check_written(
    source: ModelPackage,
    trimmed: TrimmedVocabulary,
    written: Path,
    trust: TrustPolicy,
    signer: Any,
    recipients: Sequence[Any],
    args: Any,
) -> dict[str, Any]:
    """Read the written package back with the new signer's key and check it against the
    source on the test split. Returns the check figures and, under ``package``, the package
    as read."""
    from edge_runtime.bench import check_golden
    from edge_runtime.model import OnnxClassifier

    readback = read_package(written, trust.replace(trusted_keys=(signer.public_key(),)))
    for member, data in (
        (source.manifest.model_member, trimmed.model_bytes),
        (source.manifest.tokenizer_member, trimmed.tokenizer_json.encode("utf-8")),
    ):
        if readback.members[member] != data:
            raise VocabularyTrimError(
                f"{written}: member {member!r} read back differs from what was written"
            )

    test = load_split(args.data, args.test_split)
    texts, labels = [example.text for example in test], [example.label for example in test]
    tokenization = compare_tokenization(
        source.tokenizer_json, trimmed.tokenizer_json, trimmed.selection.kept_ids, texts
    )
    unchanged = tokenization.pop("unchanged")
    full_classifier = OnnxClassifier(source)
    trimmed_classifier = OnnxClassifier(readback)
    models = compare_models(full_classifier, trimmed_classifier, texts, labels, unchanged)
    golden_count, golden_failures = check_golden(trimmed_classifier)
    if golden_failures:
        raise VocabularyTrimError(
            f"{written}: the trimmed model fails {len(golden_failures)} "
            f"golden input(s): {golden_failures[0]}"
        )
    return {
        "split": f"{args.data} split {args.test_split}",
        **tokenization,
        **models,
        "golden_checked": golden_count,
        "verdicts": list(readback.verdicts),
        "package": readback,
    }


def _package_figures(path: Path, package: ModelPackage) -> dict[str, Any]:
    from tokenizers import Tokenizer

    return {
        "path": str(path),
        "name": package.manifest.name,
        "version": package.manifest.version,
        "package_bytes": path.stat().st_size,
        "model_bytes": len(package.model_bytes),
        "tokenizer_bytes": len(package.members[package.manifest.tokenizer_member]),
        "vocabulary_size": Tokenizer.from_str(package.tokenizer_json).get_vocab_size(),
    }


def render_markdown(report: dict[str, Any]) -> str:
    """Return the report of ``run_trim_vocab`` as a short Markdown page."""
    source, output, check = report["source"], report["output"], report["check"]

    def percent(value: float | None) -> str:
        return "n/a" if value is None else f"{value * 100:.2f}%"

    def megabytes(size: int) -> str:
        return f"{size / 1e6:.2f} MB"

    before, after = check["accuracy_before"], check["accuracy_after"]
    lines = [
        f"# Vocabulary trimming: {source['name']} {source['version']} -> {output['version']}",
        "",
        f"Command: `{report['command']}`, {report['seconds']} s on {report['machine']['machine']}.",
        "",
        "| | before | after |",
        "| --- | --- | --- |",
        f"| tokens | {source['vocabulary_size']:,} | {output['vocabulary_size']:,} |",
        f"| model (ONNX plaintext) | {megabytes(source['model_bytes'])} | "
        f"{megabytes(output['model_bytes'])} |",
        f"| tokenizer.json | {megabytes(source['tokenizer_bytes'])} | "
        f"{megabytes(output['tokenizer_bytes'])} |",
        f"| package file | {megabytes(source['package_bytes'])} | "
        f"{megabytes(output['package_bytes'])} |",
        f"| accuracy on the test split | {percent(before['accuracy'])} | "
        f"{percent(after['accuracy'])} |",
        f"| in-scope accuracy | {percent(before['in_scope_accuracy'])} | "
        f"{percent(after['in_scope_accuracy'])} |",
        f"| out-of-scope recall | {percent(before['oos_recall'])} | "
        f"{percent(after['oos_recall'])} |",
        "",
        f"Kept tokens: {report['tokens']['from_corpus']:,} from the corpus and "
        f"{report['tokens']['for_coverage']:,} more added tokens and one-character pieces.",
        "",
        "Corpus: "
        + "; ".join(f"{item['source']} ({item['texts']:,} texts)" for item in report["corpus"])
        + ".",
        "",
        f"Check on {check['split']} ({check['texts']:,} queries): {check['changed']:,} queries "
        f"contain a dropped token ({check['changed_with_more_unknown']:,} of them get more "
        "[UNK] tokens than before). On the others, the trimmed tokenizer gives the same tokens "
        f"and the logits differ by at most {check['logits_max_abs_diff_unchanged']}. On the "
        f"changed queries the logits differ by up to {check['logits_max_abs_diff_changed']} "
        f"and the top label agrees on {percent(check['top1_agreement_changed'])}.",
        "",
    ]
    return "\n".join(lines)
