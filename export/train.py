"""Training steps: the teacher (fine-tune or frozen-encoder head) and the distilled student."""

from __future__ import annotations

import logging
import math
import random

import numpy as np
import torch
import torch.nn.functional as F
from tokenizers import Tokenizer

from export.config import StudentConfig, TeacherConfig
from export.modeling import SentenceClassifier, encode_batch
from export.progress import StageProgress

log = logging.getLogger(__name__)


def predict_logits(
    model: SentenceClassifier, tokenizer: Tokenizer, texts: list[str], batch_size: int = 128,
    description: str | None = None,
) -> np.ndarray:
    """Logits (len(texts), num_labels) in input order; texts are batched by length for speed."""
    model.eval()
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    logits = np.zeros((len(texts), model.classifier.out_features), dtype=np.float32)
    batches = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    with torch.inference_mode(), StageProgress(description or "predict", len(batches),
                                               visible=description is not None) as bar:
        for batch in batches:
            input_ids, attention_mask = encode_batch(tokenizer, [texts[i] for i in batch])
            logits[batch] = model(input_ids, attention_mask).numpy()
            bar.advance()
    return logits


def _smoothed(previous: float, current: float) -> float:
    """Exponential moving average of the training loss, for the progress display."""
    return current if math.isnan(previous) else 0.9 * previous + 0.1 * current


def _linear_schedule(optimizer: torch.optim.Optimizer, total_steps: int, warmup: float = 0.06):
    warmup_steps = max(1, int(total_steps * warmup))

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup_steps))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def _batches(n: int, batch_size: int, rng: random.Random) -> list[list[int]]:
    indices = list(range(n))
    rng.shuffle(indices)
    return [indices[i:i + batch_size] for i in range(0, n, batch_size)]


def _optimizer(model: SentenceClassifier, lr: float, head_lr: float, weight_decay: float):
    head = list(model.classifier.parameters())
    head_ids = {id(p) for p in head}
    body = [p for p in model.parameters() if id(p) not in head_ids]
    return torch.optim.AdamW(
        [{"params": body, "lr": lr}, {"params": head, "lr": head_lr}], weight_decay=weight_decay
    )


def train_teacher(
    model: SentenceClassifier,
    tokenizer: Tokenizer,
    texts: list[str],
    labels: np.ndarray,
    config: TeacherConfig,
    seed: int,
) -> dict[str, float]:
    """Train the teacher in place; returns figures for the build report."""
    if config.mode == "head":
        return _train_head(model, tokenizer, texts, labels, seed)

    rng = random.Random(seed)
    torch.manual_seed(seed)
    steps_per_epoch = math.ceil(len(texts) / config.batch_size)
    optimizer = _optimizer(model, config.learning_rate, config.head_learning_rate,
                           config.weight_decay)
    scheduler = _linear_schedule(optimizer, steps_per_epoch * config.epochs)
    targets = torch.from_numpy(labels)
    loss_value = float("nan")
    with StageProgress("teacher fine-tune", steps_per_epoch * config.epochs) as bar:
        for epoch in range(config.epochs):
            model.train()
            for batch in _batches(len(texts), config.batch_size, rng):
                input_ids, attention_mask = encode_batch(tokenizer, [texts[i] for i in batch])
                loss = F.cross_entropy(model(input_ids, attention_mask), targets[batch])
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                scheduler.step()
                loss_value = _smoothed(loss_value, loss.item())
                bar.advance(status=f"epoch {epoch + 1} loss {loss_value:.3f}")
    model.eval()
    return {"final_loss": loss_value, "steps": steps_per_epoch * config.epochs}


def _train_head(
    model: SentenceClassifier, tokenizer: Tokenizer, texts: list[str], labels: np.ndarray, seed: int
) -> dict[str, float]:
    """Logistic regression on frozen mean-pooled embeddings, trained full-batch with Adam."""
    torch.manual_seed(seed)
    model.eval()
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    embeddings = torch.zeros(len(texts), model.classifier.in_features)
    batches = [order[i:i + 128] for i in range(0, len(order), 128)]
    with torch.inference_mode(), StageProgress("teacher embeddings", len(batches)) as bar:
        for batch in batches:
            input_ids, attention_mask = encode_batch(tokenizer, [texts[i] for i in batch])
            embeddings[batch] = model.embed(input_ids, attention_mask)
            bar.advance()
    targets = torch.from_numpy(labels)
    optimizer = torch.optim.Adam(model.classifier.parameters(), lr=1e-2, weight_decay=1e-4)
    for _ in range(300):
        loss = F.cross_entropy(model.classifier(embeddings), targets)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return {"final_loss": loss.item(), "steps": 300}


def distillation_loss(
    logits: torch.Tensor, soft_targets: torch.Tensor, targets: torch.Tensor, temperature: float,
    alpha: float,
) -> torch.Tensor:
    """Per-example loss (batch,): alpha * KL(soft_targets || softmax(logits / T)) * T^2 plus
    (1 - alpha) * cross-entropy with ``targets``; an example whose target is -1 (unlabelled)
    gets the KL term alone."""
    soft = F.kl_div(
        F.log_softmax(logits / temperature, dim=-1), soft_targets, reduction="none"
    ).sum(dim=-1) * temperature**2  # (batch,)
    hard = F.cross_entropy(logits, targets.clamp(min=0), reduction="none")  # (batch,)
    return torch.where(targets >= 0, alpha * soft + (1.0 - alpha) * hard, soft)


def distil_student(
    student: SentenceClassifier,
    tokenizer: Tokenizer,
    texts: list[str],
    labels: np.ndarray,
    teacher_logits: np.ndarray,
    config: StudentConfig,
    seed: int,
    weights: np.ndarray | None = None,
) -> dict[str, float]:
    """Distil in place: alpha * KL(soft teacher || soft student) * T^2 + (1 - alpha) * CE.

    A label of -1 marks an unlabelled (transfer) example: its loss is the KL term alone, at
    full weight. ``weights`` (len(texts),) scales each example's loss, and None gives every
    example weight 1.
    A batch's loss is the weighted sum divided by the batch size, so weight 2 counts an example
    about as much as two copies of it.
    """
    rng = random.Random(seed + 1)
    torch.manual_seed(seed + 1)
    temperature = config.temperature
    soft_targets = torch.softmax(torch.from_numpy(teacher_logits) / temperature, dim=-1)
    targets = torch.from_numpy(labels)
    if weights is None:
        weights = np.ones(len(texts), dtype=np.float32)
    example_weights = torch.from_numpy(np.asarray(weights, dtype=np.float32))  # (len(texts),)
    steps_per_epoch = math.ceil(len(texts) / config.batch_size)
    # With equal rates the two parameter groups update exactly as one group would.
    optimizer = _optimizer(student, config.learning_rate,
                           config.head_learning_rate or config.learning_rate, config.weight_decay)
    scheduler = _linear_schedule(optimizer, steps_per_epoch * config.epochs)
    loss_value = float("nan")
    with StageProgress("student distillation", steps_per_epoch * config.epochs) as bar:
        for epoch in range(config.epochs):
            student.train()
            for batch in _batches(len(texts), config.batch_size, rng):
                input_ids, attention_mask = encode_batch(tokenizer, [texts[i] for i in batch])
                logits = student(input_ids, attention_mask)  # (batch, num_labels)
                per_example = distillation_loss(logits, soft_targets[batch], targets[batch],
                                                temperature, config.alpha)
                loss = (example_weights[batch] * per_example).sum() / len(batch)
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                scheduler.step()
                loss_value = _smoothed(loss_value, loss.item())
                bar.advance(status=f"epoch {epoch + 1} loss {loss_value:.3f}")
    student.eval()
    return {"final_loss": loss_value, "steps": steps_per_epoch * config.epochs}
