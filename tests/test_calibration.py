"""Temperature scaling, NLL and ECE on synthetic logits with known answers (NumPy only)."""

from __future__ import annotations

import numpy as np
import pytest

from catdog.calibration import (
    MAX_TEMPERATURE,
    calibration_summary,
    expected_calibration_error,
    fit_temperature,
    negative_log_likelihood,
    softmax,
)


def _sample(true_temperature: float, n: int = 20_000, classes: int = 3, seed: int = 0):
    """Logits and labels drawn from softmax(logits / true_temperature): T = true_temperature is calibrated."""
    rng = np.random.default_rng(seed)
    logits = rng.normal(0, 4, size=(n, classes))
    probabilities = softmax(logits, true_temperature)
    labels = (rng.random((n, 1)) > probabilities.cumsum(axis=1)).sum(axis=1)  # one categorical draw per row
    return logits, labels


@pytest.mark.parametrize("true_temperature", [0.5, 1.0, 2.5])
def test_fit_recovers_the_temperature_that_generated_the_labels(true_temperature):
    logits, labels = _sample(true_temperature)
    assert fit_temperature(logits, labels) == pytest.approx(true_temperature, rel=0.08)


def test_scaling_an_overconfident_model_lowers_nll_and_ece():
    logits, labels = _sample(2.5)  # raw logits are 2.5x too sharp
    summary = calibration_summary(logits, labels, fit_temperature(logits, labels))
    assert summary["after"]["nll"] < summary["before"]["nll"]
    assert summary["after"]["ece"] < 0.03 < summary["before"]["ece"]
    # the predicted class never changes
    assert (softmax(logits, summary["temperature"]).argmax(1) == logits.argmax(1)).all()


def test_ece_of_calibrated_probabilities_is_small_and_of_wrong_certainty_is_large():
    logits, labels = _sample(1.0)
    assert expected_calibration_error(softmax(logits), labels) < 0.05
    always_sure_and_wrong = np.eye(3)[(labels + 1) % 3]
    assert expected_calibration_error(always_sure_and_wrong, labels) == pytest.approx(1.0)


def test_nll_matches_a_direct_computation_and_separable_data_hits_the_bound():
    logits = np.array([[2.0, 0.0], [0.0, 3.0]])
    labels = np.array([0, 1])
    direct = -np.mean(np.log(softmax(logits)[[0, 1], labels]))
    assert negative_log_likelihood(logits, labels) == pytest.approx(direct)
    wrong = np.array([1, 0])
    assert fit_temperature(logits, wrong) == pytest.approx(MAX_TEMPERATURE, rel=1e-3)  # flatten a wrong model
