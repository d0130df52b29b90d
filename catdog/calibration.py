"""Probability calibration: temperature scaling, negative log-likelihood and expected calibration error.

Temperature scaling (Guo et al., 2017) divides the logits by one scalar T fitted on held-out data
to minimise the negative log-likelihood; it changes confidences, never the predicted class.
NumPy only, so the driver and evaluators can use it without TensorFlow.
"""

from __future__ import annotations

import math

import numpy as np

from catdog import metrics

# Bounds for T: beyond them a validation set is too small or too separable for the fit to mean much
# (a perfectly separated set drives T towards 0, i.e. probabilities of exactly 0 and 1).
MIN_TEMPERATURE = 0.05
MAX_TEMPERATURE = 20.0
DEFAULT_BINS = 15


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
    """ECE and NLL before (T = 1) and after temperature scaling."""
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
