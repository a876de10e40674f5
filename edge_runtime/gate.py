"""The confidence gate that decides between answering locally and escalating to the teacher.

Scores, both computed from the temperature-scaled logits ``z / T`` and higher when more
confident:

- ``max_probability``: the calibrated top-1 probability, ``max(softmax(z / T))``, in [0, 1].
- ``logit_margin``: ``sigmoid((z1 - z2) / T)`` for the two largest logits, which equals
  ``p1 / (p1 + p2)``, the calibrated probability of the top label against the runner-up, in
  [0.5, 1]. Unlike the top-1 probability it does not fall when the rest of the probability is
  spread over many labels, only when a second label comes close.

The gate answers locally when ``score >= threshold`` and the threshold is below 1.0. A
threshold of 1.0 turns local answers off, which calibration picks when no threshold meets its
target. A missing or invalid score (None, NaN, infinite, outside [0, 1]) always escalates,
because the teacher is the safe path.
"""

from __future__ import annotations

import math
import numbers

import numpy as np

from edge_runtime._value import FrozenValue
from edge_runtime.package import LOGIT_MARGIN, MAX_PROBABILITY, SCORE_KINDS, GateSettings


def softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """Softmax over the last axis of ``logits / temperature``, computed stably."""
    scaled = np.asarray(logits, dtype=np.float64) / temperature
    scaled = scaled - scaled.max(axis=-1, keepdims=True)
    exp = np.exp(scaled)
    return exp / exp.sum(axis=-1, keepdims=True)


def gate_scores(logits: np.ndarray, temperature: float, kind: str) -> np.ndarray:
    """Compute the gate score of each row of ``logits``, whose last axis indexes the labels.

    Raises ValueError for a ``kind`` outside SCORE_KINDS.
    """
    if kind == MAX_PROBABILITY:
        return softmax(logits, temperature).max(axis=-1)
    if kind == LOGIT_MARGIN:
        scaled = np.asarray(logits, dtype=np.float64) / temperature
        if scaled.shape[-1] < 2:
            # One label has no runner-up: the score is certain.
            return np.ones(scaled.shape[:-1])
        top_two = np.partition(scaled, -2, axis=-1)[..., -2:]
        margin = top_two[..., 1] - top_two[..., 0]
        return 1.0 / (1.0 + np.exp(-margin))
    raise ValueError(f"gate score {kind!r} is unknown; expected one of {list(SCORE_KINDS)}")


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
    """A calibrated score of the logits (``settings.score``) compared with a fixed threshold."""

    def __init__(self, settings: GateSettings):
        self.temperature = settings.temperature
        self.threshold = settings.threshold
        self.kind = settings.score

    def score(self, logits: np.ndarray) -> float | None:
        """Return the gate score of one query's logits, or None if the logits are unusable."""
        logits = np.asarray(logits)
        if logits.ndim != 1 or logits.size == 0 or not np.all(np.isfinite(logits)):
            return None
        return float(gate_scores(logits, self.temperature, self.kind))

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
