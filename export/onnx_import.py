"""Recover a fine-tuned PyTorch classifier from an fp32 ONNX file that ``export_onnx`` wrote.

The teacher's fine-tuning is the longest stage of a build (about 23 minutes on 2 cores for
CLINC150). A build that only changes the student can start from an earlier build's
``teacher-fp32.onnx`` instead (``teacher.mode = "onnx"``), and a student sweep can cut
students of any depth from it.

torch.onnx keeps the state-dict names of biases, LayerNorm parameters, embeddings and the
head, but stores each Linear weight transposed under a generated name (``onnx::MatMul_903``)
as the second input of a MatMul whose output the Linear's bias is then added to. So a weight
is found through that Add: ``<prefix>.bias`` names the weight ``<prefix>.weight``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from edge_runtime.errors import ModelError
from export.modeling import SentenceClassifier


class OnnxImportError(ModelError):
    """The ONNX file lacks a weight of the classifier, or contains weights it does not have."""


def onnx_state_dict(path: str | Path) -> dict[str, np.ndarray]:
    """Return state-dict names mapped to arrays for every weight in the ONNX file ``path``."""
    import onnx
    from onnx import numpy_helper

    path = Path(path)
    if not path.is_file():
        raise OnnxImportError(f"{path}: no such ONNX file; give the teacher-fp32.onnx of a build")
    try:
        model = onnx.load(str(path))
    except Exception as exc:  # onnx raises DecodeError and others for a damaged file
        raise OnnxImportError(f"{path}: not a readable ONNX model ({exc})") from exc
    graph = model.graph
    arrays = {init.name: numpy_helper.to_array(init) for init in graph.initializer}
    consumers: dict[str, list] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)

    state: dict[str, np.ndarray] = {}
    for name, array in arrays.items():
        if not name.startswith("onnx::"):
            state[name] = array
    for node in graph.node:
        if node.op_type != "MatMul" or node.input[1] not in arrays:
            continue
        weight = arrays[node.input[1]]
        adds = [n for n in consumers.get(node.output[0], []) if n.op_type == "Add"]
        biases = [i for add in adds for i in add.input if i.endswith(".bias") and i in arrays]
        if len(biases) != 1:
            raise OnnxImportError(
                f"{path}: MatMul {node.name or node.output[0]} has no single bias after it; the "
                "file was not written by export_onnx"
            )
        state[biases[0][: -len(".bias")] + ".weight"] = np.ascontiguousarray(weight.T)
    return state


def load_onnx_weights(model: SentenceClassifier, path: str | Path) -> int:
    """Copy the weights in the ONNX file ``path`` into ``model``; return how many tensors.

    Every parameter of ``model`` must be in the file with the same shape, and the file may
    hold no other weight, so a file of another architecture or label count fails here.
    """
    recovered = onnx_state_dict(path)
    expected = model.state_dict()
    # BERT registers position_ids and token_type_ids as buffers, which the graph folds away,
    # and its pooler is unused: the classifier mean-pools the last hidden states.
    unused = {name for name, _ in model.named_buffers()}
    unused |= {name for name in expected if name.startswith("encoder.pooler.")}
    missing = sorted(set(expected) - set(recovered) - unused)
    unexpected = sorted(set(recovered) - set(expected))
    if missing or unexpected:
        raise OnnxImportError(
            f"{path}: the weights do not match the classifier: missing {missing[:4]} "
            f"({len(missing)}), unexpected {unexpected[:4]} ({len(unexpected)}); give an fp32 "
            "ONNX file of the same architecture and label count"
        )
    for name, array in recovered.items():
        if tuple(array.shape) != tuple(expected[name].shape):
            raise OnnxImportError(
                f"{path}: {name} has shape {tuple(array.shape)}, the classifier expects "
                f"{tuple(expected[name].shape)}; was the file built for another label count?"
            )
    tensors = {name: torch.from_numpy(np.array(array)) for name, array in recovered.items()}
    model.load_state_dict(tensors, strict=False)
    return len(tensors)
