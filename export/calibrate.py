"""Confidence calibration (temperature scaling) and the choice of the local-answer threshold.

Both are fitted on the validation split, never on test:

1. Temperature T minimises the negative log-likelihood of the true labels under
   softmax(logits / T) (Guo et al., "On Calibration of Modern Neural Networks", 2017).
2. The threshold is the lowest gate score (``edge_runtime.gate.gate_scores`` of the
   temperature-scaled logits: the top-1 probability or the logit margin) at which the local
   answers, taken from the most confident down, still disagree with the teacher on at most
   ``max_disagreement`` of them. Lower thresholds answer more queries locally.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from edge_runtime.errors import ConfigError
from edge_runtime.gate import MAX_PROBABILITY, gate_scores, softmax


@dataclass(frozen=True)
class Calibration:
    temperature: float
    threshold: float
    score: str
    figures: dict


def negative_log_likelihood(logits: np.ndarray, labels: np.ndarray, temperature: float) -> float:
    probabilities = softmax(logits, temperature)
    picked = probabilities[np.arange(len(labels)), labels]
    return float(-np.log(np.clip(picked, 1e-12, None)).mean())


def expected_calibration_error(
    confidence: np.ndarray, correct: np.ndarray, bins: int = 15
) -> float:
    """ECE with equal-width confidence bins: sum over bins of |accuracy - confidence| * share."""
    edges = np.linspace(0.0, 1.0, bins + 1)
    total = 0.0
    for low, high in zip(edges[:-1], edges[1:], strict=True):
        in_bin = (confidence > low) & (confidence <= high)
        if in_bin.any():
            total += abs(correct[in_bin].mean() - confidence[in_bin].mean()) * in_bin.mean()
    return float(total)


def fit_temperature(logits: np.ndarray, labels: np.ndarray) -> float:
    """Golden-section search of log T in [log 0.05, log 20]; the NLL is unimodal in T."""
    low, high = np.log(0.05), np.log(20.0)
    ratio = (np.sqrt(5.0) - 1.0) / 2.0
    a = high - ratio * (high - low)
    b = low + ratio * (high - low)
    f_a = negative_log_likelihood(logits, labels, float(np.exp(a)))
    f_b = negative_log_likelihood(logits, labels, float(np.exp(b)))
    for _ in range(60):
        if f_a < f_b:
            high, b, f_b = b, a, f_a
            a = high - ratio * (high - low)
            f_a = negative_log_likelihood(logits, labels, float(np.exp(a)))
        else:
            low, a, f_a = a, b, f_b
            b = low + ratio * (high - low)
            f_b = negative_log_likelihood(logits, labels, float(np.exp(b)))
    return float(np.exp((low + high) / 2.0))


def choose_threshold(confidence: np.ndarray, agrees: np.ndarray, max_disagreement: float,
                     over: str = "local") -> float:
    """Lowest confidence whose local set (confidence >= it) disagrees on at most
    ``max_disagreement`` of its members. Returns 1.0, which the gate reads as "never answer
    locally", when no such set exists or the only one needs a confidence of exactly 1.0.

    With ``over="all"`` the local set's disagreements are counted as a share of all queries
    instead, which bounds how far the cascade's agreement with the teacher can fall.
    """
    if over not in ("local", "all"):
        raise ConfigError(f"over is {over!r}; expected 'local' or 'all'")
    order = np.argsort(-confidence, kind="stable")
    sorted_confidence = confidence[order]
    disagreements = np.cumsum(~agrees[order])
    counts = np.arange(1, len(order) + 1) if over == "local" else np.full(len(order), len(order))
    rate = disagreements / counts
    best = None
    for k in range(len(order)):
        # A threshold can only cut between distinct confidence values.
        if k + 1 < len(order) and sorted_confidence[k + 1] == sorted_confidence[k]:
            continue
        if rate[k] <= max_disagreement:
            best = k
    if best is None:
        return 1.0
    return min(1.0, float(sorted_confidence[best]))


def calibrate(
    student_logits: np.ndarray,
    labels: np.ndarray,
    teacher_predictions: np.ndarray,
    max_disagreement: float,
    score: str = MAX_PROBABILITY,
) -> Calibration:
    """Fit the temperature and the threshold of gate score ``score`` on validation logits;
    return them with figures."""
    temperature = fit_temperature(student_logits, labels)
    raw = softmax(student_logits, 1.0)
    probability = softmax(student_logits, temperature).max(axis=1)
    confidence = gate_scores(student_logits, temperature, score)
    predictions = student_logits.argmax(axis=1)
    correct = predictions == labels
    agrees = predictions == teacher_predictions

    threshold = choose_threshold(confidence, agrees, max_disagreement)
    local = (confidence >= threshold) & (threshold < 1.0)
    local_count = int(local.sum())
    figures = {
        "split": "validation",
        "n": int(len(labels)),
        "target": f"at most {max_disagreement:.1%} of local answers disagree with the teacher",
        "max_disagreement": max_disagreement,
        "score": score,
        "nll_before": negative_log_likelihood(student_logits, labels, 1.0),
        "nll_after": negative_log_likelihood(student_logits, labels, temperature),
        "ece_before": expected_calibration_error(raw.max(axis=1), correct),
        "ece_after": expected_calibration_error(probability, correct),
        "local_fraction": local_count / len(labels),
        "local_disagreement": float((~agrees[local]).mean()) if local_count else 0.0,
        "local_accuracy": float(correct[local].mean()) if local_count else 0.0,
        "student_accuracy": float(correct.mean()),
        "teacher_accuracy": float((teacher_predictions == labels).mean()),
        "cascade_accuracy": float(np.where(local, correct, teacher_predictions == labels).mean()),
    }
    return Calibration(temperature=temperature, threshold=threshold, score=score,
                       figures=figures)
