"""Metrics against hand-computed cases and brute-force definitions (pure numpy, no Ray, no TF)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from catdog.analyse import metrics as M


def _one_hot(labels, num_classes):
    return np.eye(num_classes)[np.asarray(labels)]


def test_confusion_and_per_class_scores_by_hand():
    y_true = [0, 0, 1, 1, 2]
    y_pred = [0, 1, 1, 1, 0]
    confusion = M.confusion_matrix(y_true, y_pred, 3)
    assert confusion.tolist() == [[1, 1, 0], [0, 2, 0], [1, 0, 0]]
    scores = M.per_class_scores(confusion)
    np.testing.assert_allclose(scores["precision"], [1 / 2, 2 / 3, 0.0])
    np.testing.assert_allclose(scores["recall"], [1 / 2, 1.0, 0.0])
    np.testing.assert_allclose(scores["f1"], [0.5, 0.8, 0.0])
    assert scores["support"].tolist() == [2, 2, 1]
    assert M.accuracy(y_true, y_pred) == pytest.approx(3 / 5)


def test_roc_and_pr_auc_by_hand():
    # The classic 4-point example: 3 of the 4 positive/negative pairs are ranked right.
    y_true = np.array([0, 0, 1, 1])
    p1 = np.array([0.1, 0.4, 0.35, 0.8])
    aucs = M.auc_scores(y_true, np.stack([1 - p1, p1], axis=1))
    assert aucs["roc_auc"] == pytest.approx(0.75)
    # Positives at ranks 1 (precision 1/1) and 3 (precision 2/3): AP = (1 + 2/3) / 2.
    assert aucs["pr_auc"] == pytest.approx(5 / 6)
    fpr, tpr, thresholds = M.roc_curve(y_true == 1, p1)
    np.testing.assert_allclose(fpr, [0, 0, 0.5, 0.5, 1])
    np.testing.assert_allclose(tpr, [0, 0.5, 0.5, 1, 1])
    assert thresholds[0] == np.inf


def test_tied_scores_count_half():
    aucs = M.auc_scores(np.array([0, 1]), np.array([[0.5, 0.5], [0.5, 0.5]]))
    assert aucs["roc_auc"] == pytest.approx(0.5)
    assert aucs["pr_auc"] == pytest.approx(0.5)


def _brute_force_auc(is_pos, scores):
    pos, neg = scores[is_pos], scores[~is_pos]
    diff = pos[:, None] - neg[None, :]
    return float(np.mean((diff > 0) + 0.5 * (diff == 0)))


def _brute_force_ap(is_pos, scores):
    return float(np.mean([(is_pos & (scores >= s)).sum() / (scores >= s).sum() for s in scores[is_pos]]))


def test_auc_matches_brute_force_definitions_with_ties():
    rng = np.random.default_rng(0)
    y_true = rng.integers(0, 2, 300)
    p1 = np.round(np.clip(0.3 * y_true + rng.random(300) * 0.7, 0, 1), 1)  # many ties
    aucs = M.auc_scores(y_true, np.stack([1 - p1, p1], axis=1))
    assert aucs["roc_auc"] == pytest.approx(_brute_force_auc(y_true == 1, p1))
    assert aucs["pr_auc"] == pytest.approx(_brute_force_ap(y_true == 1, p1))
    assert 0.6 < aucs["roc_auc"] < 0.95


def test_perfect_model_scores_one_and_inverted_scores_zero():
    y_true = np.array([0, 1, 1, 0, 1, 0, 0, 1])
    perfect = M.classification_report(y_true, _one_hot(y_true, 2) * 0.9 + 0.05, ["cats", "dogs"])
    assert perfect["accuracy"] == 1.0
    assert perfect["roc_auc"] == 1.0 and perfect["pr_auc"] == 1.0
    assert perfect["positive_class"] == "dogs"
    assert perfect["confusion_matrix"] == [[4, 0], [0, 4]]
    inverted = M.classification_report(y_true, _one_hot(1 - y_true, 2) * 0.9 + 0.05, ["cats", "dogs"])
    assert inverted["accuracy"] == 0.0
    assert inverted["roc_auc"] == 0.0
    assert inverted["confusion_matrix"] == [[0, 4], [4, 0]]
    assert inverted["log_loss"] == pytest.approx(-np.log(0.05))
    assert inverted["calibration"]["ece"] == pytest.approx(0.95)


def test_multiclass_one_vs_rest_macro():
    y_true = np.array([0, 1, 2, 2, 1, 0])
    perfect = M.auc_scores(y_true, _one_hot(y_true, 3))
    assert perfect == {
        "average": "macro_ovr",
        "roc_auc": 1.0,
        "pr_auc": 1.0,
        "per_class_roc_auc": [1.0, 1.0, 1.0],
        "per_class_pr_auc": [1.0, 1.0, 1.0],
    }
    # Class 2 never occurs: its AUC is undefined and left out of the macro average.
    y_true = np.array([0, 0, 1, 1])
    probs = np.array([[0.6, 0.3, 0.1], [0.2, 0.5, 0.3], [0.3, 0.6, 0.1], [0.5, 0.4, 0.1]])
    aucs = M.auc_scores(y_true, probs)
    assert aucs["per_class_roc_auc"][2] is None
    # Class 0: positives score 0.6, 0.2 against negatives 0.3, 0.5: 2 of 4 pairs right.
    assert aucs["per_class_roc_auc"][0] == pytest.approx(0.5)
    # Class 1: positives 0.6, 0.4 against negatives 0.3, 0.5: 3 of 4 pairs right.
    assert aucs["per_class_roc_auc"][1] == pytest.approx(0.75)
    assert aucs["roc_auc"] == pytest.approx(0.625)


def test_auc_undefined_with_one_class_present():
    aucs = M.auc_scores(np.array([1, 1]), np.array([[0.2, 0.8], [0.6, 0.4]]))
    assert aucs["roc_auc"] is None and aucs["pr_auc"] is None
    with pytest.raises(ValueError, match="both positive and negative"):
        M.roc_curve(np.array([True, True]), np.array([0.1, 0.2]))


def test_log_loss_by_hand_and_clipped():
    probs = np.array([[0.5, 0.5], [0.75, 0.25]])
    assert M.log_loss(np.array([0, 1]), probs) == pytest.approx((np.log(2) + np.log(4)) / 2)
    assert np.isfinite(M.log_loss(np.array([1]), np.array([[1.0, 0.0]])))


def test_ece_by_hand():
    # Four bins of width 0.25. Bin (0.5, 0.75]: confidences 0.6 (right) and 0.7 (wrong):
    # gap |0.5 - 0.65| = 0.15. Bin (0.75, 1]: 0.9 and 1.0, both right: gap 0.05.
    y_true = np.array([0, 0, 1, 1])
    probs = np.array([[0.6, 0.4], [0.3, 0.7], [0.1, 0.9], [0.0, 1.0]])
    rel = M.reliability(y_true, probs, bins=4)
    assert rel.counts.tolist() == [0, 0, 2, 2]
    np.testing.assert_allclose(rel.mean_confidence[2:], [0.65, 0.95])
    np.testing.assert_allclose(rel.accuracy[2:], [0.5, 1.0])
    assert rel.ece == pytest.approx((2 * 0.15 + 2 * 0.05) / 4)
    as_dict = rel.to_dict()
    assert as_dict["accuracy"][:2] == [None, None]
    json.dumps(as_dict)


def _synthetic_calibration(confidence_of_truth, n=20_000, seed=1):
    """Rows whose top-class confidence is uniform in [0.5, 1] and correct with a chosen probability."""
    rng = np.random.default_rng(seed)
    confidence = rng.uniform(0.5, 1.0, n)
    correct = rng.random(n) < confidence_of_truth(confidence)
    y_true = rng.integers(0, 2, n)
    predicted = np.where(correct, y_true, 1 - y_true)
    probs = np.empty((n, 2))
    probs[np.arange(n), predicted] = confidence
    probs[np.arange(n), 1 - predicted] = 1 - confidence
    return y_true, probs


def test_ece_small_when_calibrated_and_large_when_overconfident():
    calibrated = M.reliability(*_synthetic_calibration(lambda c: c))
    assert calibrated.ece < 0.05
    overconfident = M.reliability(*_synthetic_calibration(lambda c: c - 0.3))
    assert overconfident.ece == pytest.approx(0.3, abs=0.03)


def test_classification_report_is_json_ready_and_checks_shapes():
    y_true = np.array([0, 1, 2])
    report = M.classification_report(y_true, _one_hot([0, 2, 2], 3), ["a", "b", "c"])
    json.dumps(report)
    assert report["per_class"]["b"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 1}
    assert report["macro_f1"] == pytest.approx((1 + 0 + 2 / 3) / 3)
    with pytest.raises(ValueError, match="class names"):
        M.classification_report(y_true, _one_hot([0, 2, 2], 3), ["a", "b"])
    with pytest.raises(ValueError, match="true labels"):
        M.classification_report(np.array([0, 3]), _one_hot([0, 1], 3), ["a", "b", "c"])
