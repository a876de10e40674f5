"""Student-shaping steps of the build, on a small random encoder: a narrower feed-forward
block, embedding rows kept for a trimmed tokenizer, the distillation loss of unlabelled
(transfer) sentences, and reading the transfer file."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from edge_runtime.data import Example
from edge_runtime.errors import ConfigError
from export.config import parse_config

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from export.modeling import (  # noqa: E402
    SentenceClassifier,
    factorize_word_embeddings,
    keep_token_rows,
    narrow_feed_forward,
)
from export.train import distillation_loss  # noqa: E402


def small_classifier(seed: int = 0) -> SentenceClassifier:
    torch.manual_seed(seed)
    config = transformers.BertConfig(
        vocab_size=40, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=12, max_position_embeddings=32,
    )
    model = SentenceClassifier(transformers.BertModel(config), num_labels=3)
    return model.eval()


def inputs(ids: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    input_ids = torch.tensor(ids, dtype=torch.int64)
    return input_ids, torch.ones_like(input_ids)


def test_narrowing_equals_zeroed_neurons():
    model = small_classifier()
    reference = small_classifier()
    batch = inputs([[1, 5, 7, 2], [1, 9, 3, 2]])

    narrow_feed_forward(model, 5)

    # The same model with the dropped neurons' output weights zeroed gives the same logits.
    for layer in reference.encoder.encoder.layer:
        expand, shrink = layer.intermediate.dense, layer.output.dense
        importance = expand.weight.norm(dim=1) * shrink.weight.norm(dim=0)
        dropped = importance.argsort()[:7]
        with torch.no_grad():
            shrink.weight[:, dropped] = 0.0
    with torch.inference_mode():
        np.testing.assert_allclose(model(*batch).numpy(), reference(*batch).numpy(), atol=1e-5)
    for layer in model.encoder.encoder.layer:
        assert tuple(layer.intermediate.dense.weight.shape) == (5, 16)
        assert tuple(layer.output.dense.weight.shape) == (16, 5)

    assert model.encoder.config.intermediate_size == 5


def test_narrowing_to_full_width_is_identity():
    model = small_classifier()
    reference = small_classifier()
    batch = inputs([[1, 4, 2]])

    narrow_feed_forward(model, 12)

    with torch.inference_mode():
        np.testing.assert_allclose(model(*batch).numpy(), reference(*batch).numpy(), atol=1e-6)


def test_narrowing_beyond_width_rejected():
    with pytest.raises(ValueError, match="width is 13"):
        narrow_feed_forward(small_classifier(), 13)


@pytest.mark.parametrize("rank", [0, 4])
def test_kept_rows_read_remapped_ids(rank):
    model = small_classifier()
    if rank:
        factorize_word_embeddings(model, rank)
    full_ids = [[1, 17, 30, 2], [1, 5, 2, 0]]
    kept_ids = np.array([0, 1, 2, 5, 17, 30])
    new_id = {int(old): new for new, old in enumerate(kept_ids)}
    with torch.inference_mode():
        expected = model(*inputs(full_ids)).numpy()

    keep_token_rows(model, kept_ids)

    remapped = [[new_id[i] for i in row] for row in full_ids]
    with torch.inference_mode():
        np.testing.assert_allclose(model(*inputs(remapped)).numpy(), expected, atol=1e-6)
    assert model.encoder.config.vocab_size == 6


def test_unlabelled_loss_is_kl_only():
    logits = torch.tensor([[2.0, 0.5, -1.0], [0.1, 0.2, 0.3]])
    soft_targets = torch.tensor([[0.7, 0.2, 0.1], [0.2, 0.3, 0.5]])
    temperature, alpha = 2.0, 0.25

    loss = distillation_loss(logits, soft_targets, torch.tensor([0, -1]), temperature, alpha)

    log_student = torch.log_softmax(logits / temperature, dim=-1)
    kl = (soft_targets * (soft_targets.log() - log_student)).sum(dim=-1) * temperature**2
    cross_entropy = -torch.log_softmax(logits[0], dim=-1)[0]
    labelled = alpha * kl[0] + (1 - alpha) * cross_entropy
    assert loss[0].item() == pytest.approx(labelled.item())
    assert loss[1].item() == pytest.approx(kl[1].item())


def transfer_config(tmp_path: Path, lines: list[str], limit: int = 0):
    path = tmp_path / "sentences.txt"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    student = {"transfer_file": str(path), "transfer_limit": limit}
    return parse_config({"data": {"path": "data"}, "student": student})


def test_transfer_texts_filtered(tmp_path):
    from export.build import load_transfer_texts

    config = transfer_config(tmp_path, [
        "the river floods every spring", "", "  The River  floods every spring ",
        "what is my account balance", "a bridge was built in 1890",
    ])
    held_out = [Example("What is my account balance", "balance")]

    assert load_transfer_texts(config, held_out) == [
        "the river floods every spring", "a bridge was built in 1890",
    ]


def test_transfer_limit_reads_first_lines(tmp_path):
    from export.build import load_transfer_texts

    config = transfer_config(tmp_path, ["one line", "two lines", "three lines"], limit=2)

    assert load_transfer_texts(config, []) == ["one line", "two lines"]


def test_empty_transfer_file_rejected(tmp_path):
    from export.build import load_transfer_texts

    config = transfer_config(tmp_path, ["", "   "])

    with pytest.raises(ConfigError, match="student.transfer_file .* no usable sentence"):
        load_transfer_texts(config, [])


def test_missing_transfer_file_rejected(tmp_path):
    missing = tmp_path / "nowhere.txt"
    with pytest.raises(ConfigError, match="'student.transfer_file'"):
        parse_config({"data": {"path": "data"}, "student": {"transfer_file": str(missing)}})


@pytest.mark.parametrize("width", [-1, 1536])
def test_intermediate_size_out_of_range_rejected(width):
    with pytest.raises(ConfigError, match="'student.intermediate_size'"):
        parse_config({"data": {"path": "data"}, "student": {"intermediate_size": width}})
