"""Tests for export.calibrate: temperature scaling, ECE and the choice of the gate threshold.

All data is synthetic and drawn from seeded numpy generators, so every test is deterministic.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from edge_runtime.gate import gate_scores, softmax
from export.calibrate import (
    calibrate,
    choose_threshold,
    expected_calibration_error,
    fit_temperature,
    negative_log_likelihood,
)


def sample_labels(logits: np.ndarray, temperature: float, rng: np.random.Generator) -> np.ndarray:
    """Draw one label per row from softmax(logits / temperature) by inverse-CDF sampling."""
    probabilities = softmax(logits, temperature)
    cumulative = probabilities.cumsum(axis=1)
    uniform = rng.random((len(logits), 1))
    labels = (cumulative < uniform).sum(axis=1)
    # Rounding can leave the last cumulative value just below a uniform draw.
    return np.minimum(labels, logits.shape[1] - 1)


def synthetic_validation(seed: int = 1, n: int = 2000, classes: int = 5):
    """Return student logits, true labels and teacher predictions for a calibrate() run.

    The student's true-class logit gets a random boost of 0 to 6, so about 80% of its answers
    are right, and the teacher differs from the true label on about 2% of rows.
    """
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, classes, n)
    logits = rng.normal(size=(n, classes))
    logits[np.arange(n), labels] += rng.uniform(0.0, 6.0, n)
    teacher = labels.copy()
    flipped = rng.random(n) < 0.02
    teacher[flipped] = rng.integers(0, classes, int(flipped.sum()))
    return logits, labels, teacher


# negative_log_likelihood


def test_nll_uniform_logits():
    logits = np.zeros((6, 4))
    labels = np.array([0, 1, 2, 3, 0, 1])

    assert negative_log_likelihood(logits, labels, 1.0) == pytest.approx(math.log(4.0))


def test_nll_known_value():
    logits = np.array([[0.0, math.log(3.0)]])

    assert negative_log_likelihood(logits, np.array([1]), 1.0) == pytest.approx(-math.log(0.75))
    assert negative_log_likelihood(logits, np.array([0]), 1.0) == pytest.approx(-math.log(0.25))


def test_nll_clips_zero_probability():
    logits = np.array([[0.0, 1000.0]])

    assert negative_log_likelihood(logits, np.array([0]), 1.0) == pytest.approx(-math.log(1e-12))


# expected_calibration_error


def test_ece_calibrated_bin_zero():
    confidence = np.array([0.5, 0.5, 0.5, 0.5])
    correct = np.array([True, False, True, False])

    assert expected_calibration_error(confidence, correct) == pytest.approx(0.0, abs=1e-12)


def test_ece_overconfident_single_bin():
    confidence = np.full(4, 0.9)
    correct = np.array([True, True, False, False])

    assert expected_calibration_error(confidence, correct) == pytest.approx(0.4)


def test_ece_two_bins_weighted():
    # Bin of 0.25: accuracy 0, gap 0.25. Bin of 0.95: accuracy 1, gap 0.05. Each has half.
    confidence = np.array([0.25, 0.25, 0.95, 0.95])
    correct = np.array([False, False, True, True])

    assert expected_calibration_error(confidence, correct) == pytest.approx(0.15)


def test_ece_single_bin_pools_all():
    confidence = np.array([0.25, 0.95])
    correct = np.array([False, True])

    assert expected_calibration_error(confidence, correct, bins=1) == pytest.approx(0.1)


# fit_temperature


@pytest.mark.parametrize("true_temperature", [2.0, 0.5, 1.0])
def test_fit_temperature_recovers_known(true_temperature: float):
    rng = np.random.default_rng(20240601)
    logits = rng.normal(scale=3.0, size=(20_000, 10))
    labels = sample_labels(logits, true_temperature, rng)

    fitted = fit_temperature(logits, labels)

    assert abs(fitted - true_temperature) < 0.15


def test_fit_temperature_minimises_nll():
    rng = np.random.default_rng(7)
    logits = rng.normal(scale=3.0, size=(5_000, 6))
    labels = sample_labels(logits, 1.7, rng)

    fitted = fit_temperature(logits, labels)
    best = negative_log_likelihood(logits, labels, fitted)

    assert best <= negative_log_likelihood(logits, labels, fitted * 1.1)
    assert best <= negative_log_likelihood(logits, labels, fitted / 1.1)


def test_fit_temperature_lower_bound():
    # Labels that always match the argmax push T towards 0, so the search stops at 0.05.
    logits = np.random.default_rng(3).normal(size=(500, 4))

    assert fit_temperature(logits, logits.argmax(axis=1)) == pytest.approx(0.05, rel=1e-6)


def test_fit_temperature_upper_bound():
    # Labels that always match the argmin push T towards infinity, so the search stops at 20.
    logits = np.random.default_rng(3).normal(size=(500, 4))

    assert fit_temperature(logits, logits.argmin(axis=1)) == pytest.approx(20.0, rel=1e-6)


# choose_threshold


def test_choose_threshold_basic():
    confidence = np.array([0.9, 0.8, 0.7, 0.6])
    agrees = np.array([True, True, False, True])

    # Disagreement rates of the top 1..4 answers: 0, 0, 1/3, 1/4.
    assert choose_threshold(confidence, agrees, 0.25) == 0.6
    assert choose_threshold(confidence, agrees, 0.2) == 0.8


def test_choose_threshold_zero_target():
    confidence = np.array([0.9, 0.8, 0.7])
    agrees = np.array([True, True, False])

    assert choose_threshold(confidence, agrees, 0.0) == 0.8


def test_choose_threshold_all_agree():
    confidence = np.array([0.9, 0.4, 0.65])
    agrees = np.ones(3, dtype=bool)

    assert choose_threshold(confidence, agrees, 0.0) == 0.4


def test_choose_threshold_ties_not_split():
    # A cut after the first 0.8 would give a rate of 0, but a threshold of 0.8 takes both
    # 0.8 answers, whose rate is 1/3.
    confidence = np.array([0.9, 0.8, 0.8])
    agrees = np.array([True, True, False])

    assert choose_threshold(confidence, agrees, 0.3) == 0.9
    assert choose_threshold(confidence, agrees, 0.4) == 0.8


def test_choose_threshold_tie_order_irrelevant():
    confidence = np.array([0.8, 0.9, 0.8])
    agrees = np.array([False, True, True])

    assert choose_threshold(confidence, agrees, 0.3) == 0.9


def test_choose_threshold_all_disagree():
    confidence = np.array([0.95, 0.6, 0.3])
    agrees = np.zeros(3, dtype=bool)

    assert choose_threshold(confidence, agrees, 0.02) == 1.0


def test_choose_threshold_top_disagrees():
    # The top answer alone has a rate of 1, and no longer prefix gets under 0.4.
    confidence = np.array([0.9, 0.8])
    agrees = np.array([False, True])

    assert choose_threshold(confidence, agrees, 0.4) == 1.0


def test_choose_threshold_lowest_after_violation():
    # Rates of the top 1..4 answers: 0, 1/2, 1/3, 1/4. The lowest threshold within 0.3 wins.
    confidence = np.array([0.6, 0.9, 0.7, 0.8])
    agrees = np.array([True, True, True, False])

    assert choose_threshold(confidence, agrees, 0.3) == 0.6


def test_choose_threshold_returns_float():
    threshold = choose_threshold(np.array([0.9, 0.7]), np.array([True, True]), 0.0)

    assert type(threshold) is float


def test_choose_threshold_order_independent():
    rng = np.random.default_rng(11)
    confidence = rng.uniform(0.2, 1.0, 300).round(2)
    agrees = rng.random(300) < 0.9
    permutation = rng.permutation(300)

    expected = choose_threshold(confidence, agrees, 0.05)

    assert choose_threshold(confidence[permutation], agrees[permutation], 0.05) == expected


def test_choose_threshold_meets_target():
    rng = np.random.default_rng(12)
    confidence = rng.uniform(0.2, 1.0, 300).round(2)
    agrees = rng.random(300) < confidence
    threshold = choose_threshold(confidence, agrees, 0.05)

    local = confidence >= threshold

    assert local.any()
    assert (~agrees[local]).mean() <= 0.05


# calibrate


@pytest.fixture(scope="module")
def validation():
    return synthetic_validation()


@pytest.fixture(scope="module")
def calibration(validation):
    logits, labels, teacher = validation
    return calibrate(logits, labels, teacher, max_disagreement=0.05)


def test_calibrate_local_disagreement_within_target(calibration):
    assert calibration.figures["local_disagreement"] <= 0.05


def test_calibrate_local_fraction_recount(validation, calibration):
    logits, _, _ = validation
    confidence = softmax(logits, calibration.temperature).max(axis=1)
    local_fraction = float((confidence >= calibration.threshold).mean())

    assert calibration.figures["local_fraction"] == local_fraction
    assert local_fraction > 0.3


def test_calibrate_local_disagreement_recount(validation, calibration):
    logits, _, teacher = validation
    confidence = softmax(logits, calibration.temperature).max(axis=1)
    local = confidence >= calibration.threshold
    disagree = logits.argmax(axis=1) != teacher

    assert calibration.figures["local_disagreement"] == pytest.approx(disagree[local].mean())


def test_calibrate_accuracy_figures(validation, calibration):
    logits, labels, teacher = validation
    predictions = logits.argmax(axis=1)
    local = softmax(logits, calibration.temperature).max(axis=1) >= calibration.threshold
    cascade = np.where(local, predictions, teacher)

    figures = calibration.figures
    assert figures["student_accuracy"] == pytest.approx((predictions == labels).mean())
    assert figures["teacher_accuracy"] == pytest.approx((teacher == labels).mean())
    assert figures["local_accuracy"] == pytest.approx((predictions[local] == labels[local]).mean())
    assert figures["cascade_accuracy"] == pytest.approx((cascade == labels).mean())


def test_calibrate_threshold_matches_choice(validation, calibration):
    logits, _, teacher = validation
    confidence = softmax(logits, calibration.temperature).max(axis=1)
    agrees = logits.argmax(axis=1) == teacher

    assert calibration.threshold == choose_threshold(confidence, agrees, 0.05)


def test_calibrate_temperature_matches_fit(validation, calibration):
    logits, labels, _ = validation

    assert calibration.temperature == fit_temperature(logits, labels)


def test_calibrate_nll_not_worse(validation, calibration):
    logits, labels, _ = validation
    figures = calibration.figures

    assert figures["nll_before"] == pytest.approx(negative_log_likelihood(logits, labels, 1.0))
    assert figures["nll_after"] <= figures["nll_before"]


def test_calibrate_ece_improves(calibration):
    # The raw student is under-confident here (the fitted T is about 0.71), so scaling
    # lowers its ECE.
    assert calibration.temperature < 1.0
    assert calibration.figures["ece_after"] < calibration.figures["ece_before"]


def test_calibrate_figure_metadata(calibration):
    figures = calibration.figures

    assert figures["split"] == "validation"
    assert figures["n"] == 2000
    assert figures["max_disagreement"] == 0.05
    assert figures["score"] == "max_probability"
    assert figures["target"] == "at most 5.0% of local answers disagree with the teacher"


def test_calibrate_logit_margin_threshold(validation):
    logits, labels, teacher = validation
    result = calibrate(logits, labels, teacher, max_disagreement=0.05, score="logit_margin")
    margin = gate_scores(logits, result.temperature, "logit_margin")
    local = margin >= result.threshold
    agrees = logits.argmax(axis=1) == teacher

    assert result.score == "logit_margin"
    assert result.figures["score"] == "logit_margin"
    assert result.threshold == choose_threshold(margin, agrees, 0.05)
    assert 0.5 <= result.threshold < 1.0
    assert result.figures["local_fraction"] == float(local.mean())
    assert result.figures["local_disagreement"] == pytest.approx((~agrees[local]).mean())


def test_calibrate_no_local_answers():
    # The student always disagrees with the teacher, so nothing may be answered locally. The
    # student is right on only half the rows, so the fitted T stays well inside (0.05, 20).
    logits = np.array([[2.0, 0.0, 0.0], [0.0, 3.0, 0.0], [0.0, 0.0, 1.0], [1.5, 0.0, 0.0]])
    labels = np.array([0, 2, 2, 1])
    teacher = np.array([1, 2, 0, 2])

    result = calibrate(logits, labels, teacher, max_disagreement=0.02)

    assert result.threshold == 1.0
    assert result.figures["local_fraction"] == 0.0
    assert result.figures["local_disagreement"] == 0.0
    assert result.figures["local_accuracy"] == 0.0
    assert result.figures["student_accuracy"] == 0.5
    assert result.figures["cascade_accuracy"] == 0.25


def test_calibrate_saturated_confidence_escalates():
    # The student is right on every row, so the fitted T is the lower bound 0.05. Divided by
    # 0.05, the first two rows have logit gaps of 40 and 60, so their top probabilities round
    # to exactly 1.0 and they stay local.
    logits = np.array([[2.0, 0.0, 0.0], [0.0, 3.0, 0.0], [0.0, 0.0, 1.0], [1.5, 0.0, 0.0]])
    labels = np.array([0, 1, 2, 0])
    teacher = np.array([1, 2, 0, 2])

    result = calibrate(logits, labels, teacher, max_disagreement=0.02)

    assert result.figures["local_disagreement"] <= 0.02
