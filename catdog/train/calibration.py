"""Probability calibration: temperature scaling, negative log-likelihood and expected calibration error.

Temperature scaling (Guo et al., 2017) divides the logits by one scalar T fitted on held-out data
to minimise the negative log-likelihood; it changes confidences, never the predicted class.

Training fits T on the validation set, which also picked the best epoch. So that the reported
effect of T is not measured on the rows T was fitted to, `calibrate` splits the validation rows
in two halves by a hash of each file's relative path and the run seed (like the train/validation
split: a file's half never depends on which other files exist): T is fitted on the "fit" half,
and the before/after ECE and NLL are computed on the "report" half only. The report half still
took part in choosing the best epoch; it is held out from the temperature fit, not from training.
When either half would hold fewer than MIN_ROWS_PER_HALF rows, no temperature is fitted (T = 1)
and the summary says so.

NumPy only, so the driver and evaluators can use it without TensorFlow.
"""

from __future__ import annotations

import hashlib
import math
from typing import Sequence

import numpy as np

from catdog.analyse import metrics

# Bounds for T: beyond them a validation set is too small or too separable for the fit to mean much
# (a perfectly separated set drives T towards 0, i.e. probabilities of exactly 0 and 1).
MIN_TEMPERATURE = 0.05
MAX_TEMPERATURE = 20.0
DEFAULT_BINS = 15
# Below this many rows in either half, a fitted T is mostly noise and its held-out figures say
# nothing: T stays 1 rather than being fitted and judged on a handful of rows.
MIN_ROWS_PER_HALF = 10
SPLIT_SALT = "calibration"  # keeps the halves independent of the train/validation hash of the same seed


def softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """Row-wise softmax of logits / temperature, computed stably in float64."""
    scaled = np.asarray(logits, dtype=np.float64) / temperature
    scaled -= scaled.max(axis=1, keepdims=True)
    exp = np.exp(scaled)
    return exp / exp.sum(axis=1, keepdims=True)


def negative_log_likelihood(logits: np.ndarray, labels: np.ndarray, temperature: float = 1.0) -> float:
    """Mean cross-entropy of the true labels under softmax(logits / temperature)."""
    scaled = np.asarray(logits, dtype=np.float64) / temperature
    shifted = scaled - scaled.max(axis=1, keepdims=True)
    log_norm = np.log(np.exp(shifted).sum(axis=1))
    return float(np.mean(log_norm - shifted[np.arange(len(labels)), labels]))


def expected_calibration_error(probabilities: np.ndarray, labels: np.ndarray, bins: int = DEFAULT_BINS) -> float:
    """ECE: the |accuracy - confidence| gap of equal-width confidence bins, weighted by bin size."""
    return metrics.reliability(np.asarray(labels), np.asarray(probabilities, dtype=np.float64), bins).ece


def fit_temperature(logits: np.ndarray, labels: np.ndarray, iterations: int = 60) -> float:
    """The temperature in [MIN_TEMPERATURE, MAX_TEMPERATURE] minimising the NLL of `labels`.

    The NLL is convex in 1/T, hence unimodal in log T: a golden-section search is enough.
    """
    low, high = math.log(MIN_TEMPERATURE), math.log(MAX_TEMPERATURE)
    ratio = (math.sqrt(5) - 1) / 2
    loss = lambda log_t: negative_log_likelihood(logits, labels, math.exp(log_t))  # noqa: E731
    a, b = high - ratio * (high - low), low + ratio * (high - low)
    fa, fb = loss(a), loss(b)
    for _ in range(iterations):
        if fa <= fb:
            high, b, fb = b, a, fa
            a = high - ratio * (high - low)
            fa = loss(a)
        else:
            low, a, fa = a, b, fb
            b = low + ratio * (high - low)
            fb = loss(b)
    return float(math.exp((low + high) / 2))


def calibration_summary(logits: np.ndarray, labels: np.ndarray, temperature: float, bins: int = DEFAULT_BINS) -> dict:
    """ECE and NLL of these rows before (T = 1) and after temperature scaling.

    Pass rows the temperature was not fitted on (`calibrate` does): on its own fit rows the NLL
    after scaling is never above the NLL before, by construction.
    """
    return {
        "temperature": temperature,
        "bins": bins,
        "before": {
            "ece": expected_calibration_error(softmax(logits), labels, bins),
            "nll": negative_log_likelihood(logits, labels),
        },
        "after": {
            "ece": expected_calibration_error(softmax(logits, temperature), labels, bins),
            "nll": negative_log_likelihood(logits, labels, temperature),
        },
    }


def fit_half(relative_paths: Sequence[str], seed: int) -> np.ndarray:
    """Which validation rows the temperature is fitted on (True) and which report its effect (False).

    A row is in the fit half when sha256("calibration:<seed>:<relative path>") falls in the lower
    half of its range: deterministic, about half of every class in expectation, and stable when
    files are added or removed.
    """
    def position(path: str) -> float:
        digest = hashlib.sha256(f"{SPLIT_SALT}:{seed}:{path}".encode()).digest()
        return int.from_bytes(digest[:8], "big") / 2**64

    return np.array([position(path) < 0.5 for path in relative_paths], dtype=bool)


def calibrate(logits: np.ndarray, labels: np.ndarray, relative_paths: Sequence[str], seed: int,
              bins: int = DEFAULT_BINS) -> tuple[float, dict]:
    """Fit the temperature on the fit half of the validation rows; report its effect on the other half.

    Args:
        logits: validation logits [n, classes] of the model being calibrated.
        labels: their true labels [n].
        relative_paths: each row's file path relative to its data root (decides its half).
        seed: the run seed.

    Returns:
        The temperature (1.0 when the set is too small to split) and the summary for metrics.json:
        `fitted`, `temperature`, `split` (the rule), `rows` (validation / fit / report counts),
        `before` and `after` (ECE, NLL on the report rows; `after` is None when nothing was fitted,
        and `before` then covers every validation row), and `note` when nothing was fitted.
    """
    logits, labels = np.asarray(logits), np.asarray(labels)
    fit = fit_half(relative_paths, seed)
    rows = {"validation": int(fit.size), "fit": int(fit.sum()), "report": int((~fit).sum())}
    split = (f"fit rows: sha256('{SPLIT_SALT}:{seed}:<relative path>') in the lower half; "
             "report rows: the others (before/after are measured on the report rows only)")
    errors_in_fit = int((logits[fit].argmax(axis=1) != labels[fit]).sum()) if rows["fit"] else 0
    note = None
    if min(rows["fit"], rows["report"]) < MIN_ROWS_PER_HALF:
        note = (f"not fitted: {rows['validation']} validation rows split {rows['fit']} fit / {rows['report']} report, "
                f"fewer than {MIN_ROWS_PER_HALF} in a half; temperature left at 1 rather than fitted in-sample "
                "(before: every validation row)")
    elif not errors_in_fit:
        # No mistake to learn from: the NLL keeps falling as T -> 0, which would ship 0/1 probabilities.
        note = (f"not fitted: the {rows['fit']} fit rows hold no misclassified row, so any T below 1 looks better "
                "there; temperature left at 1 (before: every validation row)")
    if note:
        before = {"ece": expected_calibration_error(softmax(logits), labels, bins),
                  "nll": negative_log_likelihood(logits, labels)}
        return 1.0, {"fitted": False, "temperature": 1.0, "bins": bins, "split": split, "rows": rows,
                     "before": before, "after": None, "note": note}
    temperature = fit_temperature(logits[fit], labels[fit])
    summary = calibration_summary(logits[~fit], labels[~fit], temperature, bins)
    return temperature, {"fitted": True, **summary, "split": split, "rows": rows}
