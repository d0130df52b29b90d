"""PNG charts of an evaluation or a report, drawn with matplotlib's Agg backend (no display).

Figures are built with `matplotlib.figure.Figure` rather than pyplot, so no global figure state
is kept between calls, and written through `catdog.io.storage` (local paths or URIs).
"""

from __future__ import annotations

import io
import logging
from dataclasses import dataclass
from typing import Sequence

import matplotlib

matplotlib.use("Agg")

import numpy as np  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from catdog.analyse.metrics import Reliability, roc_curve  # noqa: E402
from catdog.errors import ImageDecodeError  # noqa: E402
from catdog.io import storage# noqa: E402
from catdog.io.file_reads import read_file  # noqa: E402
from catdog.io.imaging import decode_image  # noqa: E402

logger = logging.getLogger(__name__)

DPI = 100
THUMBNAIL_SIZE = 128  # pixels per contact-sheet tile: enough to recognise a cat or a dog
MISTAKE_COLUMNS = 5


@dataclass(frozen=True)
class Mistake:
    """One confidently wrong prediction for the contact sheet."""

    path: str
    true_label: str
    label: str
    confidence: float


def _save(fig: Figure, output: str) -> None:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=DPI, bbox_inches="tight")
    storage.write_bytes(output, buffer.getvalue())
    logger.debug("Wrote %s", output)


def plot_confusion(confusion: np.ndarray, class_names: Sequence[str], output: str) -> None:
    """Confusion matrix heat map with counts; rows true, columns predicted."""
    size = max(4.0, 0.6 * len(class_names) + 2)
    fig = Figure(figsize=(size, size))
    ax = fig.add_subplot()
    ax.imshow(confusion, cmap="Blues")
    ticks = np.arange(len(class_names))
    ax.set_xticks(ticks, labels=class_names, rotation=45, ha="right")
    ax.set_yticks(ticks, labels=class_names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    high = confusion.max(initial=0)
    for (row, col), count in np.ndenumerate(confusion):
        colour = "white" if high and count > high / 2 else "black"
        ax.text(col, row, str(count), ha="center", va="center", color=colour)
    ax.set_title("Confusion matrix")
    _save(fig, output)


def plot_roc(y_true: np.ndarray, probs: np.ndarray, class_names: Sequence[str], output: str) -> None:
    """ROC curve of the positive class (binary) or one curve per class, one-vs-rest."""
    fig = Figure(figsize=(5, 5))
    ax = fig.add_subplot()
    ax.plot([0, 1], [0, 1], linestyle="--", color="grey", linewidth=1)
    classes = [1] if len(class_names) == 2 else range(len(class_names))
    for c in classes:
        is_positive = np.asarray(y_true) == c
        if is_positive.all() or not is_positive.any():
            continue  # undefined without both positives and negatives
        fpr, tpr, _ = roc_curve(is_positive, probs[:, c])
        ax.plot(fpr, tpr, label=f"{class_names[c]} (AUC {np.trapezoid(tpr, fpr):.3f})")
    if ax.get_legend_handles_labels()[0]:
        ax.legend(loc="lower right")
    else:
        ax.text(0.5, 0.5, "undefined: one class only", ha="center")
    ax.set_xlabel("false positive rate")
    ax.set_ylabel("true positive rate")
    ax.set_title("ROC" if len(class_names) == 2 else "ROC, one-vs-rest")
    _save(fig, output)


def plot_reliability(reliability: Reliability, output: str, title: str = "Reliability") -> None:
    """Accuracy per confidence bin against the diagonal, with bin counts below."""
    fig = Figure(figsize=(5, 6))
    top, bottom = fig.subplots(2, 1, sharex=True, height_ratios=[3, 1])
    edges = reliability.edges
    width = np.diff(edges)
    filled = reliability.counts > 0
    top.bar(edges[:-1][filled], reliability.accuracy[filled], width=width[filled], align="edge",
            edgecolor="black", alpha=0.8, label="accuracy")
    top.plot([0, 1], [0, 1], linestyle="--", color="grey", label="perfect calibration")
    top.set_ylabel("accuracy")
    top.set_ylim(0, 1)
    top.set_title(f"{title} (ECE {reliability.ece:.3f})")
    top.legend(loc="upper left")
    bottom.bar(edges[:-1], reliability.counts, width=width, align="edge", edgecolor="black")
    bottom.set_xlabel("confidence")
    bottom.set_ylabel("rows")
    bottom.set_xlim(0, 1)
    _save(fig, output)


def plot_confidence(counts: np.ndarray, edges: np.ndarray, output: str, threshold: float | None = None) -> None:
    """Histogram of confidence from pre-computed counts (reports accumulate them per batch)."""
    fig = Figure(figsize=(6, 4))
    ax = fig.add_subplot()
    ax.bar(edges[:-1], counts, width=np.diff(edges), align="edge", edgecolor="black")
    if threshold is not None:
        ax.axvline(threshold, color="red", linestyle="--", label=f"threshold {threshold:g}")
        ax.legend(loc="upper left")
    ax.set_xlabel("confidence (probability of the predicted class)")
    ax.set_ylabel("rows")
    ax.set_xlim(edges[0], edges[-1])
    ax.set_title(f"Confidence of {int(np.sum(counts)):,} scored rows")
    _save(fig, output)


def _thumbnail(path: str, size: int) -> np.ndarray:
    """Decoded thumbnail, or a grey tile when the file is gone or undecodable."""
    try:
        pixels, _, _ = decode_image(read_file(path), size)
        return pixels
    except (OSError, ImageDecodeError) as exc:
        logger.warning("No thumbnail for %s: %s", path, exc)
        return np.full((size, size, 3), 128, dtype=np.uint8)


def _tail(path: str) -> str:
    """The class folder and file name: enough to find the file, short enough for a tile."""
    return "/".join(path.rstrip("/").split("/")[-2:])


def _shorten(text: str, limit: int = 28) -> str:
    return text if len(text) <= limit else "…" + text[-(limit - 1):]


def plot_mistakes(mistakes: Sequence[Mistake], output: str, thumbnail_size: int = THUMBNAIL_SIZE) -> None:
    """Contact sheet of wrong predictions: thumbnail, file name, true and predicted label."""
    columns = max(1, min(MISTAKE_COLUMNS, len(mistakes)))
    rows = max(1, -(-len(mistakes) // columns))
    fig = Figure(figsize=(2.4 * columns, 2.8 * rows), layout="constrained")
    axes = np.atleast_1d(fig.subplots(rows, columns)).ravel()
    for ax in axes:
        ax.set_axis_off()
    if not mistakes:
        axes[0].text(0.5, 0.5, "no mistakes", ha="center", va="center", fontsize=14)
    for ax, mistake in zip(axes, mistakes):
        ax.imshow(_thumbnail(mistake.path, thumbnail_size))
        ax.set_title(
            f"{_shorten(_tail(mistake.path))}\ntrue {mistake.true_label}\n"
            f"pred {mistake.label} ({mistake.confidence:.2f})",
            fontsize=8,
        )
    fig.suptitle(f"{len(mistakes)} most confidently wrong" if mistakes else "mistakes")
    _save(fig, output)
