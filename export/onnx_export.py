"""ONNX export checked against PyTorch, and int8 dynamic quantization."""

from __future__ import annotations

import logging
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
from onnxruntime.quantization import QuantType, quantize_dynamic
from tokenizers import Tokenizer

from edge_runtime.errors import ModelError
from export.modeling import SentenceClassifier, encode_batch

log = logging.getLogger(__name__)

INPUT_NAMES = ("input_ids", "attention_mask")
OUTPUT_NAMES = ("logits",)
OPSET = 17


class ExportCheckError(ModelError):
    """The exported graph's outputs differ from PyTorch's beyond the tolerance."""


@dataclass(frozen=True)
class ExportCheck:
    max_abs_diff: float
    tolerance: float
    texts: int
    top1_agreement: float


def export_onnx(model: SentenceClassifier, path: Path, sample_texts: list[str],
                tokenizer: Tokenizer) -> Path:
    """Export to one self-contained ONNX file (no external data) with dynamic batch and sequence."""
    model.eval()
    input_ids, attention_mask = encode_batch(tokenizer, sample_texts[:2])
    dynamic_axes = {name: {0: "batch", 1: "sequence"} for name in INPUT_NAMES}
    dynamic_axes["logits"] = {0: "batch"}
    path.parent.mkdir(parents=True, exist_ok=True)
    # The TorchScript exporter warns that it is legacy and that Python conditions in the
    # attention mask code are traced as constants. Both are expected here: the check below
    # compares the graph with PyTorch on texts of many lengths.
    with torch.inference_mode(), warnings.catch_warnings():
        warnings.simplefilter("ignore", category=torch.jit.TracerWarning)
        warnings.simplefilter("ignore", category=DeprecationWarning)
        warnings.filterwarnings("ignore", message=".*aten::index.*")
        torch.onnx.export(
            model,
            (input_ids, attention_mask),
            str(path),
            input_names=list(INPUT_NAMES),
            output_names=list(OUTPUT_NAMES),
            dynamic_axes=dynamic_axes,
            opset_version=OPSET,
            dynamo=False,
            external_data=False,
        )
    return path


def session_from_file(path: Path, threads: int = 2) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    return ort.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])


def onnx_logits(session: ort.InferenceSession, tokenizer: Tokenizer, texts: list[str],
                batch_size: int = 128) -> np.ndarray:
    chunks = []
    for first in range(0, len(texts), batch_size):
        input_ids, attention_mask = encode_batch(tokenizer, texts[first:first + batch_size])
        feeds = {"input_ids": input_ids.numpy(), "attention_mask": attention_mask.numpy()}
        chunks.append(session.run(["logits"], feeds)[0])
    return np.concatenate(chunks, axis=0)


def check_export(model: SentenceClassifier, path: Path, tokenizer: Tokenizer, texts: list[str],
                 tolerance: float, name: str) -> ExportCheck:
    """Run PyTorch and the exported graph on ``texts``; raise if the max absolute logit
    difference exceeds ``tolerance``."""
    model.eval()
    with torch.inference_mode():
        reference = np.concatenate([
            model(*encode_batch(tokenizer, texts[i:i + 128])).numpy()
            for i in range(0, len(texts), 128)
        ])
    exported = onnx_logits(session_from_file(path), tokenizer, texts)
    max_diff = float(np.abs(reference - exported).max())
    agreement = float((reference.argmax(1) == exported.argmax(1)).mean())
    log.info("%s ONNX vs PyTorch on %d texts: max |logit diff| %.2e (tolerance %.0e), "
             "top-1 agreement %.4f", name, len(texts), max_diff, tolerance, agreement)
    if not max_diff <= tolerance:
        raise ExportCheckError(
            f"{name}: ONNX logits differ from PyTorch by up to {max_diff:.3e} on {len(texts)} "
            f"texts; the tolerance is {tolerance:.0e} (checks.onnx_tolerance)"
        )
    return ExportCheck(max_abs_diff=max_diff, tolerance=tolerance, texts=len(texts),
                       top1_agreement=agreement)


def quantize_int8(source: Path, target: Path, weight_type: str, per_channel: bool) -> dict:
    """Dynamic int8 quantization of MatMul/Gemm weights; activations quantized at run time.
    Returns the recipe recorded in the manifest."""
    quant_type = {"qint8": QuantType.QInt8, "quint8": QuantType.QUInt8}[weight_type]
    with tempfile.TemporaryDirectory() as scratch:
        # quantize_dynamic writes helper files beside its output, so build in a scratch folder.
        scratch_model = Path(scratch) / target.name
        quantize_dynamic(
            str(source), str(scratch_model),
            weight_type=quant_type, per_channel=per_channel,
            op_types_to_quantize=["MatMul", "Gemm", "Gather"],
        )
        target.write_bytes(scratch_model.read_bytes())
    return {
        "method": "onnxruntime dynamic quantization",
        "weight_type": weight_type,
        "per_channel": per_channel,
        "operators": ["MatMul", "Gemm", "Gather"],
        "activations": "uint8, quantized per call",
    }
