"""The confidence gate that decides between answering locally and escalating to the teacher.

Score: the student's calibrated top-1 probability, ``max(softmax(logits / temperature))``, a
number in [0, 1] where higher means more confident. The gate answers locally when
``score >= threshold`` and the threshold is below 1.0. A threshold of 1.0 turns local answers
off, which calibration picks when no threshold meets its target. A missing or invalid score
(None, NaN, infinite, outside [0, 1]) always escalates, because the teacher is the safe path.
"""

from __future__ import annotations

import math
import numbers

import numpy as np

from edge_runtime._value import FrozenValue
from edge_runtime.package import GateSettings


def softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """Softmax over the last axis of ``logits / temperature``, computed stably."""
    scaled = np.asarray(logits, dtype=np.float64) / temperature
    scaled = scaled - scaled.max(axis=-1, keepdims=True)
    exp = np.exp(scaled)
    return exp / exp.sum(axis=-1, keepdims=True)


class GateDecision(FrozenValue):
    """Whether to answer locally, the calibrated score and the top-1 label index (both None
    when the logits are unusable)."""

    __slots__ = ("local", "score", "label_index")
    local: bool
    score: float | None
    label_index: int | None

    def __init__(self, local: bool, score: float | None, label_index: int | None):
        self._init(local=local, score=score, label_index=label_index)


class ConfidenceGate:
    """Temperature-scaled top-1 probability compared with a fixed threshold."""

    def __init__(self, settings: GateSettings):
        self.temperature = settings.temperature
        self.threshold = settings.threshold

    def score(self, logits: np.ndarray) -> float | None:
        """Return the calibrated top-1 probability, or None if the logits are unusable."""
        logits = np.asarray(logits)
        if logits.ndim != 1 or logits.size == 0 or not np.all(np.isfinite(logits)):
            return None
        return float(softmax(logits, self.temperature).max())

    def accepts(self, score: float | None) -> bool:
        """True when ``score`` is a valid probability at or above the threshold."""
        if score is None or isinstance(score, bool) or not isinstance(score, numbers.Real):
            return False
        score = float(score)
        if math.isnan(score) or not 0.0 <= score <= 1.0:
            return False
        return self.threshold < 1.0 and score >= self.threshold

    def decide(self, logits: np.ndarray) -> GateDecision:
        score = self.score(logits)
        index = int(np.argmax(logits)) if score is not None else None
        return GateDecision(local=self.accepts(score), score=score, label_index=index)
