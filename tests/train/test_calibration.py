"""Temperature scaling, NLL and ECE on synthetic logits with known answers (NumPy only)."""

from __future__ import annotations

import numpy as np
import pytest

from catdog.train.calibration import (
    MAX_TEMPERATURE,
    MIN_ROWS_PER_HALF,
    MIN_TEMPERATURE,
    calibrate,
    calibration_summary,
    expected_calibration_error,
    fit_half,
    fit_temperature,
    negative_log_likelihood,
    softmax,
)
from catdog.io.labelled import split_fraction


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


def _paths(n: int) -> list[str]:
    return [f"{('cats', 'dogs')[i % 2]}/img_{i:05d}.jpg" for i in range(n)]


def test_a_temperature_fitted_on_one_sample_lowers_nll_and_ece_on_another():
    logits, labels = _sample(2.5, seed=0)  # raw logits are 2.5x too sharp
    unseen_logits, unseen_labels = _sample(2.5, seed=1)
    summary = calibration_summary(unseen_logits, unseen_labels, fit_temperature(logits, labels))
    assert summary["after"]["nll"] < summary["before"]["nll"]
    assert summary["after"]["ece"] < 0.03 < summary["before"]["ece"]
    # the predicted class never changes
    assert (softmax(unseen_logits, summary["temperature"]).argmax(1) == unseen_logits.argmax(1)).all()


def test_halves_are_disjoint_cover_every_row_and_keep_their_side_when_files_are_added():
    paths = _paths(2000)
    fit = fit_half(paths, seed=123)
    assert fit.dtype == bool and fit.shape == (2000,)  # one side per row: disjoint, and together all rows
    assert 0.45 < fit.mean() < 0.55
    assert (fit_half(paths + _paths(3000)[2000:], seed=123)[:2000] == fit).all()  # stable when files are added
    assert (fit_half(paths[::-1], seed=123) == fit[::-1]).all()  # a row's side does not depend on the order
    assert (fit_half(paths, seed=124) != fit).mean() > 0.4  # another seed, other halves
    # independent of the train/validation hash: validation is not just one end of the calibration hash
    train_val = np.array([split_fraction(p, 123) < 0.5 for p in paths])
    assert 0.4 < (train_val == fit).mean() < 0.6


def test_calibrate_fits_on_the_fit_half_and_reports_only_on_the_held_out_half():
    logits, labels = _sample(2.5, n=4000)
    paths = _paths(4000)
    temperature, summary = calibrate(logits, labels, paths, seed=7)
    fit = fit_half(paths, 7)
    assert summary["fitted"] is True
    assert summary["rows"] == {"validation": 4000, "fit": int(fit.sum()), "report": int((~fit).sum())}
    assert summary["temperature"] == temperature == pytest.approx(fit_temperature(logits[fit], labels[fit]))
    assert temperature == pytest.approx(2.5, rel=0.15)
    held_out = calibration_summary(logits[~fit], labels[~fit], temperature)
    assert summary["before"] == held_out["before"] and summary["after"] == held_out["after"]
    in_sample = calibration_summary(logits[fit], labels[fit], temperature)
    assert summary["after"]["nll"] != in_sample["after"]["nll"]
    # the overconfident model is better calibrated on rows the fit never saw
    assert summary["after"]["nll"] < summary["before"]["nll"] - 0.05
    assert summary["after"]["ece"] < summary["before"]["ece"]
    assert "sha256('calibration:7:<relative path>')" in summary["split"]


def test_a_validation_set_too_small_to_split_is_not_calibrated_in_sample():
    n = 2 * MIN_ROWS_PER_HALF - 2  # one half is necessarily below the minimum
    logits, labels = _sample(2.5, n=n)
    temperature, summary = calibrate(logits, labels, _paths(n), seed=0)
    assert temperature == 1.0 and summary["temperature"] == 1.0
    assert summary["fitted"] is False and summary["after"] is None
    assert summary["rows"]["validation"] == n and summary["rows"]["fit"] + summary["rows"]["report"] == n
    assert "not fitted" in summary["note"] and str(MIN_ROWS_PER_HALF) in summary["note"]
    assert summary["before"]["nll"] == pytest.approx(negative_log_likelihood(logits, labels))


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


def test_a_fit_half_without_mistakes_is_not_fitted_to_zero_one_probabilities():
    paths = [f"cats/{i:03d}.jpg" for i in range(80)]
    labels = np.array([i % 2 for i in range(80)])
    logits = np.where(np.eye(2)[labels] > 0, 3.0, -3.0)  # every row right: separable
    temperature, summary = calibrate(logits, labels, paths, seed=1)
    assert temperature == 1.0 and summary["fitted"] is False and "no misclassified row" in summary["note"]
    fit = fit_half(paths, 1)  # one mistake in the fit half: a fit is possible again
    wrong = int(np.flatnonzero(fit)[0])
    logits[wrong] = -logits[wrong]
    temperature, summary = calibrate(logits, labels, paths, seed=1)
    assert summary["fitted"] is True and temperature > MIN_TEMPERATURE
