"""Tests for edge_runtime.gate: the stable softmax and the confidence gate's decisions."""

from __future__ import annotations

import math

import numpy as np
import pytest

from edge_runtime.gate import ConfidenceGate, gate_scores, softmax
from edge_runtime.package import GateSettings


def make_gate(threshold: float = 0.7, temperature: float = 1.0,
              score: str = "max_probability") -> ConfidenceGate:
    return ConfidenceGate(GateSettings(temperature=temperature, threshold=threshold, score=score))


# softmax


def test_softmax_rows_sum_to_one():
    logits = np.random.default_rng(0).normal(scale=4.0, size=(20, 7))

    probabilities = softmax(logits)

    np.testing.assert_allclose(probabilities.sum(axis=1), np.ones(20), rtol=0, atol=1e-12)
    assert probabilities.shape == (20, 7)


def test_softmax_known_values():
    # exp(0) : exp(log 3) = 1 : 3.
    probabilities = softmax(np.array([0.0, math.log(3.0)]))

    np.testing.assert_allclose(probabilities, [0.25, 0.75], rtol=0, atol=1e-12)


def test_softmax_large_logits_finite():
    probabilities = softmax(np.array([1000.0, 999.0, 0.0]))

    assert np.all(np.isfinite(probabilities))
    np.testing.assert_allclose(probabilities, softmax(np.array([1.0, 0.0, -999.0])), atol=1e-12)


def test_softmax_equal_large_logits():
    probabilities = softmax(np.array([[1000.0, 1000.0], [-1000.0, -1000.0]]))

    np.testing.assert_array_equal(probabilities, [[0.5, 0.5], [0.5, 0.5]])


def test_softmax_shift_invariant():
    logits = np.array([[0.3, -1.2, 2.5], [4.0, 4.0, -3.0]])

    np.testing.assert_allclose(softmax(logits + 50.0), softmax(logits), atol=1e-12)


def test_softmax_temperature_divides_logits():
    logits = np.array([3.0, 1.0, -2.0])

    np.testing.assert_allclose(softmax(logits, 2.0), softmax(logits / 2.0), atol=1e-12)


def test_softmax_high_temperature_lowers_top():
    logits = np.array([2.0, 1.0, 0.0])

    top_plain = softmax(logits, 1.0).max()
    top_warm = softmax(logits, 2.0).max()
    top_cold = softmax(logits, 0.5).max()

    assert top_warm < top_plain
    assert top_cold > top_plain


def test_softmax_integer_input():
    probabilities = softmax(np.array([1, 1, 1, 1]))

    np.testing.assert_allclose(probabilities, [0.25] * 4, atol=1e-12)


# ConfidenceGate.score


def test_score_known_value():
    gate = make_gate()

    assert gate.score(np.array([0.0, math.log(3.0)])) == pytest.approx(0.75, abs=1e-12)


def test_score_uses_temperature():
    # Dividing [0, 2 log 3] by 2 gives [0, log 3], so the top probability is 0.75.
    gate = make_gate(temperature=2.0)

    assert gate.score(np.array([0.0, 2.0 * math.log(3.0)])) == pytest.approx(0.75, abs=1e-12)


def test_score_returns_python_float():
    score = make_gate().score(np.array([1.0, 2.0], dtype=np.float32))

    assert type(score) is float


@pytest.mark.parametrize(
    "logits",
    [
        np.array([[1.0, 2.0]]),
        np.array([]),
        np.array(3.0),
        np.array([1.0, np.nan]),
        np.array([1.0, np.inf]),
        np.array([-np.inf, 1.0]),
    ],
    ids=["2-D", "empty", "scalar", "nan", "inf", "minus-inf"],
)
def test_score_unusable_logits_none(logits: np.ndarray):
    assert make_gate().score(logits) is None


# ConfidenceGate.accepts


@pytest.mark.parametrize(
    "score",
    [None, math.nan, math.inf, -math.inf, -0.1, 1.0000001, 2.0, "0.9"],
    ids=["none", "nan", "inf", "minus-inf", "negative", "just-above-one", "two", "string"],
)
def test_accepts_invalid_score_false(score):
    gate = make_gate(threshold=0.0)

    assert gate.accepts(score) is False


def test_accepts_exactly_at_threshold():
    assert make_gate(threshold=0.7).accepts(0.7) is True


def test_accepts_just_below_threshold():
    below = math.nextafter(0.7, 0.0)

    assert make_gate(threshold=0.7).accepts(below) is False


def test_accepts_above_threshold():
    assert make_gate(threshold=0.7).accepts(0.95) is True


def test_threshold_one_disables_local():
    assert make_gate(threshold=1.0).accepts(1.0) is False


def test_accepts_integer_score():
    assert make_gate(threshold=0.5).accepts(1) is True


def test_accepts_numpy_float64():
    # NOTE: the result is numpy.bool_ here, not bool, so only its truth value is checked.
    assert make_gate(threshold=0.5).accepts(np.float64(0.6))
    assert not make_gate(threshold=0.5).accepts(np.float64(0.4))


def test_accepts_numpy_float32():
    assert make_gate(threshold=0.5).accepts(np.float32(0.9)) is True


# ConfidenceGate.decide


def test_decide_confident_logits_local():
    decision = make_gate(threshold=0.7).decide(np.array([0.0, 5.0, 1.0]))

    assert decision.local is True
    assert decision.label_index == 1
    assert decision.score == pytest.approx(float(softmax(np.array([0.0, 5.0, 1.0])).max()))


def test_decide_uncertain_logits_escalate():
    decision = make_gate(threshold=0.7).decide(np.array([1.0, 1.1, 0.9]))

    assert decision.local is False
    assert decision.label_index == 1
    assert decision.score is not None
    assert decision.score < 0.7


def test_decide_score_equal_threshold_local():
    # Two equal logits give a top probability of exactly 0.5.
    decision = make_gate(threshold=0.5).decide(np.array([2.0, 2.0]))

    assert decision.score == 0.5
    assert decision.local is True
    assert decision.label_index == 0


def test_decide_temperature_changes_outcome():
    logits = np.array([0.0, 2.0])

    assert make_gate(threshold=0.8, temperature=1.0).decide(logits).local is True
    assert make_gate(threshold=0.8, temperature=4.0).decide(logits).local is False


def test_decide_nan_logits_escalate():
    decision = make_gate(threshold=0.0).decide(np.array([3.0, np.nan, 1.0]))

    assert decision.local is False
    assert decision.score is None
    assert decision.label_index is None


def test_decide_two_dimensional_escalates():
    decision = make_gate(threshold=0.0).decide(np.array([[0.0, 9.0], [9.0, 0.0]]))

    assert decision.local is False
    assert decision.score is None
    assert decision.label_index is None


def test_decide_empty_logits_escalate():
    decision = make_gate(threshold=0.0).decide(np.array([]))

    assert decision.local is False
    assert decision.score is None
    assert decision.label_index is None


def test_decide_accepts_python_list():
    decision = make_gate(threshold=0.5).decide([0.0, 0.0, 6.0])

    assert decision.local is True
    assert decision.label_index == 2


# logit_margin


def test_logit_margin_known_value():
    # Logits [0, log 3, 0]: the top label against the runner-up is 3 : 1, so 0.75.
    gate = make_gate(score="logit_margin")

    assert gate.score(np.array([0.0, math.log(3.0), 0.0])) == pytest.approx(0.75, abs=1e-12)


def test_logit_margin_equals_top_two_share():
    logits = np.random.default_rng(7).normal(0.0, 3.0, size=(50, 6))
    probabilities = np.sort(softmax(logits, 1.7), axis=1)
    expected = probabilities[:, -1] / (probabilities[:, -1] + probabilities[:, -2])

    scores = gate_scores(logits, 1.7, "logit_margin")

    np.testing.assert_allclose(scores, expected, rtol=1e-12)


def test_logit_margin_ignores_spread_of_rest():
    # Top-1 probability 0.25, but no other label comes close to the top one.
    logits = np.array([3.0] + [0.0] * 60)
    top1 = make_gate(threshold=0.9).decide(logits)
    margin = make_gate(threshold=0.9, score="logit_margin").decide(logits)

    assert top1.score == pytest.approx(math.exp(3.0) / (math.exp(3.0) + 60.0), abs=1e-12)
    assert top1.local is False
    assert margin.score == pytest.approx(1.0 / (1.0 + math.exp(-3.0)), abs=1e-12)
    assert margin.local is True


def test_logit_margin_tie_is_half():
    score = make_gate(score="logit_margin").score(np.array([2.0, 2.0, -1.0]))

    assert score == pytest.approx(0.5, abs=1e-12)


def test_logit_margin_single_label_certain():
    assert make_gate(score="logit_margin").score(np.array([0.3])) == 1.0


def test_gate_scores_unknown_kind():
    with pytest.raises(ValueError, match="gate score 'entropy' is unknown"):
        gate_scores(np.zeros((2, 3)), 1.0, "entropy")
