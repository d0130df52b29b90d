"""The files of a training run folder, written through catdog.storage so that s3:// works:

    model.keras    full model (written by catdog.model.save_model)
    classes.json   JSON list of class names in label order (read by the scorer)
    config.json    the run's full configuration, with "model_spec" and "weights"
    metrics.json   final and best metrics, validation report, calibration, data counts, cache hits
    history.csv    one row per epoch: loss, accuracy, val_loss, val_accuracy, epoch_time_s
    curves.png     train vs validation accuracy and loss per epoch
"""

from __future__ import annotations

import csv
import io
from typing import Sequence

import numpy as np

from catdog import storage
from catdog.run_folder import CLASSES_FILENAME, MODEL_FILENAME

CLASSES_FILE = CLASSES_FILENAME
CONFIG_FILE = "config.json"
METRICS_FILE = "metrics.json"
HISTORY_FILE = "history.csv"
CURVES_FILE = "curves.png"
HISTORY_COLUMNS = ["epoch", "loss", "accuracy", "val_loss", "val_accuracy", "epoch_time_s"]
ARTIFACTS = (MODEL_FILENAME, CLASSES_FILE, CONFIG_FILE, METRICS_FILE, HISTORY_FILE, CURVES_FILE)


def classification_report(labels: np.ndarray, predictions: np.ndarray, class_names: Sequence[str]) -> dict:
    """Accuracy, per-class precision/recall/F1/support and the confusion matrix (rows: true class)."""
    n = len(class_names)
    confusion = np.zeros((n, n), dtype=np.int64)
    np.add.at(confusion, (np.asarray(labels), np.asarray(predictions)), 1)
    per_class = {}
    for i, name in enumerate(class_names):
        true_positive = int(confusion[i, i])
        predicted, actual = int(confusion[:, i].sum()), int(confusion[i, :].sum())
        precision = true_positive / predicted if predicted else 0.0
        recall = true_positive / actual if actual else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        per_class[name] = {"precision": precision, "recall": recall, "f1": f1, "support": actual}
    total = int(confusion.sum())
    return {
        "accuracy": float(np.trace(confusion) / total) if total else 0.0,
        "per_class": per_class,
        "confusion_matrix": confusion.tolist(),
        "confusion_matrix_labels": list(class_names),
    }


def history_csv(history: Sequence[dict]) -> str:
    """The history rows as CSV text, columns in HISTORY_COLUMNS order."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=HISTORY_COLUMNS, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    writer.writerows(history)
    return buffer.getvalue()


def curves_png(history: Sequence[dict]) -> bytes:
    """The tutorial's plot: training vs validation accuracy (left) and loss (right) per epoch."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    epochs = [row["epoch"] for row in history]
    figure = Figure(figsize=(10, 4), dpi=100)
    for axis, metric, title in zip(figure.subplots(1, 2), ("accuracy", "loss"), ("Accuracy", "Loss")):
        axis.plot(epochs, [row[metric] for row in history], marker="o", label=f"Training {metric}")
        axis.plot(epochs, [row[f"val_{metric}"] for row in history], marker="o", label=f"Validation {metric}")
        axis.set_title(f"Training and validation {metric}")
        axis.set_xlabel("epoch")
        axis.set_ylabel(title)
        axis.legend(loc="best")
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    return buffer.getvalue()


def write_run_artifacts(output: str, class_names: Sequence[str], config: dict, metrics: dict,
                        history: Sequence[dict]) -> None:
    """Write every run file except model.keras (see the module docstring)."""
    storage.write_json(storage.join(output, CLASSES_FILE), list(class_names))
    storage.write_json(storage.join(output, CONFIG_FILE), config)
    storage.write_json(storage.join(output, METRICS_FILE), metrics)
    storage.write_text(storage.join(output, HISTORY_FILE), history_csv(history))
    storage.write_bytes(storage.join(output, CURVES_FILE), curves_png(history))
