"""Classification metrics from true labels and predicted probabilities, in plain numpy.

Inputs everywhere: `y_true` integer class indices [n] and `probs` float [n, k] (rows sum to 1),
with predictions taken as the arg-max. Binary scores (ROC, PR) use the probability of the
positive class, which is class index 1 in the two-class case. Values that are undefined for the
data (an AUC when only one class is present) are returned as None, so they survive JSON.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

DEFAULT_BINS = 15  # the usual choice for ECE (Guo et al. 2017); 10-20 give similar values
LOG_LOSS_EPS = 1e-15  # clip probabilities away from 0 so one confident mistake stays finite


def _check(y_true: np.ndarray, probs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    y_true = np.asarray(y_true, dtype=np.int64)
    probs = np.asarray(probs, dtype=np.float64)
    if probs.ndim != 2 or y_true.shape != (probs.shape[0],):
        raise ValueError(f"need y_true [n] and probs [n, k], got {y_true.shape} and {probs.shape}")
    if y_true.size and (y_true.min() < 0 or y_true.max() >= probs.shape[1]):
        raise ValueError(f"true labels must lie in [0, {probs.shape[1]})")
    return y_true, probs


def accuracy(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    """Share of rows where the prediction equals the truth."""
    y_true, y_pred = np.asarray(y_true), np.asarray(y_pred)
    return float(np.mean(y_true == y_pred)) if y_true.size else 0.0


def confusion_matrix(y_true: np.ndarray, y_pred: np.ndarray, num_classes: int) -> np.ndarray:
    """Counts [k, k]: rows are true classes, columns predicted classes."""
    flat = np.asarray(y_true, dtype=np.int64) * num_classes + np.asarray(y_pred, dtype=np.int64)
    return np.bincount(flat, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def _safe_divide(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    """num / den with 0 where den is 0 (a class never predicted has precision 0, as sklearn's
    zero_division=0)."""
    num, den = np.asarray(num, dtype=np.float64), np.asarray(den, dtype=np.float64)
    return np.divide(num, den, out=np.zeros_like(num), where=den > 0)


def per_class_scores(confusion: np.ndarray) -> dict[str, np.ndarray]:
    """Precision, recall, F1 and support per class from a confusion matrix."""
    true_pos = np.diag(confusion).astype(np.float64)
    precision = _safe_divide(true_pos, confusion.sum(axis=0))
    recall = _safe_divide(true_pos, confusion.sum(axis=1))
    f1 = _safe_divide(2 * precision * recall, precision + recall)
    return {"precision": precision, "recall": recall, "f1": f1, "support": confusion.sum(axis=1)}


def _ranked(is_positive: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Cumulative true and false positives at each distinct score, highest score first."""
    order = np.argsort(-np.asarray(scores, dtype=np.float64), kind="mergesort")
    scores, is_positive = np.asarray(scores, dtype=np.float64)[order], np.asarray(is_positive, bool)[order]
    # Tied scores form one threshold: take the last index of each run of equal scores.
    last_of_run = np.r_[np.flatnonzero(np.diff(scores)), scores.size - 1]
    true_pos = np.cumsum(is_positive)[last_of_run]
    false_pos = (last_of_run + 1) - true_pos
    return true_pos, false_pos, scores[last_of_run]


def roc_curve(is_positive: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(false positive rate, true positive rate, thresholds), starting at (0, 0).

    Raises:
        ValueError: when positives or negatives are missing (the curve is undefined).
    """
    is_positive = np.asarray(is_positive, dtype=bool)
    positives, negatives = int(is_positive.sum()), int((~is_positive).sum())
    if positives == 0 or negatives == 0:
        raise ValueError("a ROC curve needs both positive and negative rows")
    true_pos, false_pos, thresholds = _ranked(is_positive, scores)
    fpr = np.r_[0.0, false_pos / negatives]
    tpr = np.r_[0.0, true_pos / positives]
    return fpr, tpr, np.r_[np.inf, thresholds]


def precision_recall_curve(is_positive: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(precision, recall) at each distinct threshold, highest threshold first."""
    is_positive = np.asarray(is_positive, dtype=bool)
    if not is_positive.any():
        raise ValueError("a precision-recall curve needs positive rows")
    true_pos, false_pos, _ = _ranked(is_positive, scores)
    return true_pos / (true_pos + false_pos), true_pos / is_positive.sum()


def _binary_auc(is_positive: np.ndarray, scores: np.ndarray) -> tuple[float, float] | None:
    """(ROC AUC by the trapezoid rule, average precision) or None when undefined."""
    is_positive = np.asarray(is_positive, dtype=bool)
    if is_positive.all() or not is_positive.any():
        return None
    fpr, tpr, _ = roc_curve(is_positive, scores)
    precision, recall = precision_recall_curve(is_positive, scores)
    # Average precision: precision weighted by each step in recall (no interpolation, as sklearn).
    average_precision = float(np.sum(np.diff(np.r_[0.0, recall]) * precision))
    return float(np.trapezoid(tpr, fpr)), average_precision


def auc_scores(y_true: np.ndarray, probs: np.ndarray) -> dict[str, object]:
    """ROC AUC and PR AUC (average precision): binary on class 1, else one-vs-rest macro.

    Returns `roc_auc`, `pr_auc` (None when undefined), `average` ("binary" or "macro_ovr") and,
    one-vs-rest, `per_class_roc_auc` / `per_class_pr_auc` (None for classes absent or alone).
    """
    y_true, probs = _check(y_true, probs)
    num_classes = probs.shape[1]
    if num_classes == 2:
        result = _binary_auc(y_true == 1, probs[:, 1])
        roc, pr = result if result else (None, None)
        return {"average": "binary", "positive_class_index": 1, "roc_auc": roc, "pr_auc": pr}
    per_class = [_binary_auc(y_true == c, probs[:, c]) for c in range(num_classes)]
    defined = [scores for scores in per_class if scores is not None]
    return {
        "average": "macro_ovr",
        "roc_auc": float(np.mean([s[0] for s in defined])) if defined else None,
        "pr_auc": float(np.mean([s[1] for s in defined])) if defined else None,
        "per_class_roc_auc": [s[0] if s else None for s in per_class],
        "per_class_pr_auc": [s[1] if s else None for s in per_class],
    }


def log_loss(y_true: np.ndarray, probs: np.ndarray, eps: float = LOG_LOSS_EPS) -> float:
    """Mean negative log probability of the true class (natural log)."""
    y_true, probs = _check(y_true, probs)
    if not y_true.size:
        return 0.0
    p_true = np.clip(probs[np.arange(y_true.size), y_true], eps, 1.0)
    return float(-np.mean(np.log(p_true)))


@dataclass(frozen=True)
class Reliability:
    """Calibration by equal-width confidence bins; empty bins hold NaN means."""

    edges: np.ndarray  # [bins + 1], 0..1
    counts: np.ndarray  # rows per bin
    mean_confidence: np.ndarray  # mean top-class probability per bin
    accuracy: np.ndarray  # share correct per bin
    ece: float  # sum over bins of (count / n) * |accuracy - mean_confidence|

    def to_dict(self) -> dict:
        def listed(values: np.ndarray) -> list:
            return [None if np.isnan(v) else float(v) for v in values]

        return {
            "ece": self.ece,
            "bins": len(self.counts),
            "edges": [float(e) for e in self.edges],
            "counts": [int(c) for c in self.counts],
            "mean_confidence": listed(self.mean_confidence),
            "accuracy": listed(self.accuracy),
        }


def reliability(y_true: np.ndarray, probs: np.ndarray, bins: int = DEFAULT_BINS) -> Reliability:
    """Expected calibration error and reliability-diagram data for top-class confidence."""
    y_true, probs = _check(y_true, probs)
    confidence = probs.max(axis=1)
    correct = (probs.argmax(axis=1) == y_true).astype(np.float64)
    edges = np.linspace(0.0, 1.0, bins + 1)
    # Bins are (lo, hi]; confidence 0 joins the first bin.
    index = np.clip(np.searchsorted(edges, confidence, side="left") - 1, 0, bins - 1)
    counts = np.bincount(index, minlength=bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_conf = np.bincount(index, weights=confidence, minlength=bins) / counts
        acc = np.bincount(index, weights=correct, minlength=bins) / counts
    gaps = np.where(counts > 0, np.abs(acc - mean_conf), 0.0)
    ece = float(np.sum(counts * gaps) / max(y_true.size, 1))
    return Reliability(edges, counts, mean_conf, acc, ece)


def label_scores(y_true: np.ndarray, y_pred: np.ndarray, class_names: Sequence[str]) -> dict:
    """Accuracy, per-class precision/recall/F1/support (keyed by class name) and the confusion
    matrix (rows: true class) of predicted class indices, JSON-ready."""
    confusion = confusion_matrix(y_true, y_pred, len(class_names))
    scores = per_class_scores(confusion)
    return {
        "accuracy": accuracy(y_true, y_pred),
        "per_class": {
            name: {key: float(values[i]) if key != "support" else int(values[i]) for key, values in scores.items()}
            for i, name in enumerate(class_names)
        },
        "confusion_matrix": confusion.tolist(),
    }


def classification_report(
    y_true: np.ndarray, probs: np.ndarray, class_names: Sequence[str], bins: int = DEFAULT_BINS
) -> dict:
    """Every metric of an evaluation as a JSON-ready dict (per-class values keyed by class name)."""
    y_true, probs = _check(y_true, probs)
    if probs.shape[1] != len(class_names):
        raise ValueError(f"{probs.shape[1]} probability columns but {len(class_names)} class names")
    labels = label_scores(y_true, probs.argmax(axis=1), class_names)
    aucs = auc_scores(y_true, probs)
    if aucs["average"] == "binary":
        aucs["positive_class"] = class_names[1]
    return {
        "rows": int(y_true.size),
        "accuracy": labels["accuracy"],
        "class_names": list(class_names),
        "per_class": labels["per_class"],
        "macro_f1": float(np.mean([scores["f1"] for scores in labels["per_class"].values()])),
        "confusion_matrix": labels["confusion_matrix"],
        **aucs,
        "log_loss": log_loss(y_true, probs),
        "calibration": reliability(y_true, probs, bins).to_dict(),
    }
