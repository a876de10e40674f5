"""A text classifier run by ONNX Runtime: tokenizer plus ONNX session, loaded from a package.

The model takes ``input_ids`` and ``attention_mask`` (int64, shape (batch, seq)) and returns
``logits`` (float32, shape (batch, num_labels)). Single queries are tokenized without padding;
batches are padded to their longest member.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import numpy as np
import onnxruntime as ort
from tokenizers import Tokenizer

from edge_runtime.errors import ModelError
from edge_runtime.package import ModelPackage, TrustPolicy, read_package

log = logging.getLogger(__name__)

DEFAULT_THREADS = 1


@dataclass(frozen=True)
class Prediction:
    """Raw model output for one text: logits (num_labels,) and the milliseconds spent."""

    logits: np.ndarray
    tokenize_ms: float
    inference_ms: float


class OnnxClassifier:
    """Tokenizer and ONNX Runtime session for one package's model, created from bytes in memory."""

    def __init__(self, package: ModelPackage, threads: int = DEFAULT_THREADS):
        manifest = package.manifest
        self.package = package
        self.labels = manifest.labels
        self.max_length = manifest.max_length

        try:
            self.tokenizer = Tokenizer.from_str(package.tokenizer_json)
        except Exception as exc:  # tokenizers raises a bare Exception for malformed JSON
            raise ModelError(f"{package.path}: cannot load tokenizer: {exc}") from exc
        self.tokenizer.no_padding()
        self.tokenizer.enable_truncation(max_length=self.max_length)

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        try:
            self.session = ort.InferenceSession(
                package.model_bytes, sess_options=options, providers=["CPUExecutionProvider"]
            )
        except Exception as exc:  # onnxruntime raises its own untyped errors
            raise ModelError(f"{package.path}: ONNX Runtime cannot load the model: {exc}") from exc

        session_inputs = [node.name for node in self.session.get_inputs()]
        if sorted(session_inputs) != sorted(manifest.input_names):
            raise ModelError(
                f"{package.path}: model inputs {session_inputs} differ from the manifest's "
                f"{list(manifest.input_names)}"
            )
        num_outputs = self.session.get_outputs()[0].shape[-1]
        if isinstance(num_outputs, int) and num_outputs != len(self.labels):
            raise ModelError(
                f"{package.path}: model returns {num_outputs} logits but the manifest lists "
                f"{len(self.labels)} labels"
            )
        self._output_name = manifest.output_names[0]
        log.info(
            "loaded %s version %s (%s, %d labels, %d thread(s))",
            manifest.name, manifest.version, manifest.precision, len(self.labels), threads,
        )

    @classmethod
    def from_file(cls, path: str, threads: int = DEFAULT_THREADS,
                  trust: TrustPolicy | None = None) -> OnnxClassifier:
        """Read a package (unverified unless ``trust`` is given) and load its model."""
        return cls(read_package(path, trust), threads=threads)

    def predict(self, text: str) -> Prediction:
        """Return the logits for one text, tokenized without padding."""
        start = time.perf_counter()
        encoding = self.tokenizer.encode(text)
        input_ids = np.asarray([encoding.ids], dtype=np.int64)  # (1, seq)
        attention_mask = np.asarray([encoding.attention_mask], dtype=np.int64)  # (1, seq)
        tokenized = time.perf_counter()
        logits = self._run(input_ids, attention_mask)[0]
        done = time.perf_counter()
        return Prediction(
            logits=logits,
            tokenize_ms=(tokenized - start) * 1000.0,
            inference_ms=(done - tokenized) * 1000.0,
        )

    def predict_batch(self, texts: list[str], batch_size: int = 64) -> np.ndarray:
        """Return logits (len(texts), num_labels) for many texts, padded per batch."""
        if not texts:
            return np.zeros((0, len(self.labels)), dtype=np.float32)
        chunks = []
        for first in range(0, len(texts), batch_size):
            encodings = self.tokenizer.encode_batch(texts[first:first + batch_size])
            longest = max(len(e.ids) for e in encodings)
            input_ids = np.zeros((len(encodings), longest), dtype=np.int64)  # (batch, seq)
            attention_mask = np.zeros((len(encodings), longest), dtype=np.int64)
            for row, encoding in enumerate(encodings):
                input_ids[row, : len(encoding.ids)] = encoding.ids
                attention_mask[row, : len(encoding.ids)] = encoding.attention_mask
            chunks.append(self._run(input_ids, attention_mask))
        return np.concatenate(chunks, axis=0)

    def _run(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        feeds = {"input_ids": input_ids, "attention_mask": attention_mask}
        try:
            (logits,) = self.session.run([self._output_name], feeds)
        except Exception as exc:
            raise ModelError(f"{self.package.path}: inference failed: {exc}") from exc
        return logits
