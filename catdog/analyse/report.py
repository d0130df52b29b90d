"""Summarise a predictions folder of any size by scanning it in batches with pyarrow.

The folder is read through `PredictionsFolder.scan`, every Parquet file a reader of it sees. Only
the small columns a summary needs are read (never `path` or the per-class probabilities), one
record batch at a time; counts and the confidence histogram are accumulated per batch, so memory
stays flat whether the folder holds a thousand rows or a billion.
"""

from __future__ import annotations

import collections
import logging
import time
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from catdog.errors import CatdogError
from catdog.io import storage
from catdog.score.predictions_folder import REQUIRED_COLUMNS, PredictionsFolder

logger = logging.getLogger(__name__)

REPORT_FILE = "report.json"
CONFIDENCE_PLOT = "confidence.png"
OPTIONAL_COLUMNS = ("model_id", "scored_at", "true_label")


@dataclass(frozen=True)
class ReportConfig:
    """What `jobs.report` asks for."""

    predictions: str  # predictions folder, local path or URI
    threshold: float = 0.5  # confidence below this counts as low confidence
    output: str | None = None  # where report.json and confidence.png go; default "<predictions>-report"
    bins: int = 20  # confidence histogram bins over [0, 1]
    batch_size: int = 65_536  # rows per scanned record batch; bounds memory, not results

    def __post_init__(self):
        if not 0.0 <= self.threshold <= 1.0:
            raise CatdogError(f"--threshold must lie in [0, 1], got {self.threshold}")
        if self.bins < 1 or self.batch_size < 1:
            raise CatdogError("--bins and the batch size must be positive")

    @property
    def output_location(self) -> str:
        return self.output or f"{self.predictions.rstrip('/')}-report"


def _count(counter: collections.Counter, values: pa.Array) -> None:
    for item in pc.value_counts(values.drop_null()).to_pylist():
        counter[item["values"]] += item["counts"]


class _Accumulator:
    """Running totals over record batches."""

    def __init__(self, edges: np.ndarray, threshold: float):
        self.edges, self.threshold = edges, threshold
        self.rows = self.failed = self.low = self.labelled = self.correct = 0
        self.confidence_sum = 0.0
        self.histogram = np.zeros(len(edges) - 1, dtype=np.int64)
        self.errors: collections.Counter = collections.Counter()
        self.labels: collections.Counter = collections.Counter()
        self.model_ids: collections.Counter = collections.Counter()
        self.first_scored = self.last_scored = None

    def add(self, batch: pa.RecordBatch) -> None:
        self.rows += batch.num_rows
        error = batch.column("error")
        failed = error.drop_null()
        self.failed += len(failed)
        _count(self.errors, pc.list_element(pc.split_pattern(failed, ":", max_splits=1), 0))
        _count(self.labels, batch.column("label"))
        scored = pc.and_(error.is_null(), batch.column("confidence").is_valid())
        confidence = pc.filter(batch.column("confidence"), scored).to_numpy(zero_copy_only=False)
        self.histogram += np.histogram(confidence, bins=self.edges)[0]
        self.low += int(np.count_nonzero(confidence < self.threshold))
        self.confidence_sum += float(confidence.sum(dtype=np.float64))
        names = batch.schema.names
        if "model_id" in names:
            _count(self.model_ids, batch.column("model_id"))
        if "scored_at" in names and batch.num_rows:
            bounds = pc.min_max(batch.column("scored_at")).as_py()
            if bounds["min"] is not None:
                self.first_scored = min(filter(None, [self.first_scored, bounds["min"]]))
                self.last_scored = max(filter(None, [self.last_scored, bounds["max"]]))
        if "true_label" in names:
            both = pc.and_(batch.column("true_label").is_valid(), batch.column("label").is_valid())
            self.labelled += int(pc.sum(both).as_py() or 0)
            self.correct += int(pc.sum(pc.equal(batch.column("label"), batch.column("true_label"))).as_py() or 0)


def summarise(config: ReportConfig) -> dict:
    """Scan the predictions folder and return the summary (writes nothing)."""
    started = time.perf_counter()
    folder = PredictionsFolder(config.predictions)
    dataset = folder.scan()
    columns = list(REQUIRED_COLUMNS) + [c for c in OPTIONAL_COLUMNS if c in dataset.schema.names]
    totals = _Accumulator(np.linspace(0.0, 1.0, config.bins + 1), config.threshold)
    # One file at a time: a whole-dataset scan reads files ahead of a slow consumer, so its memory
    # grows with the folder; per-file scans stay flat (benchmarks/README.md, Report).
    for fragment in dataset.get_fragments():
        for batch in fragment.to_batches(schema=dataset.schema, columns=columns, batch_size=config.batch_size):
            totals.add(batch)
    scored = totals.rows - totals.failed
    success = folder.read_success()
    throughput = success.get("images_per_s") if success else None  # as catdog.score.run writes it
    summary = {
        "predictions": config.predictions,
        "files": len(dataset.files),
        "rows": totals.rows,
        "scored": scored,
        "errors": totals.failed,
        "errors_by_kind": dict(sorted(totals.errors.items())),
        "label_counts": dict(sorted(totals.labels.items())),
        "mean_confidence": totals.confidence_sum / scored if scored else None,
        "threshold": config.threshold,
        "low_confidence": totals.low,
        "low_confidence_share": totals.low / scored if scored else None,
        "confidence_histogram": {
            "edges": [float(e) for e in totals.edges],
            "counts": totals.histogram.tolist(),
        },
        "model_ids": dict(totals.model_ids),
        "first_scored_at": totals.first_scored,
        "last_scored_at": totals.last_scored,
        "throughput_images_per_s": float(throughput) if isinstance(throughput, (int, float)) else None,
        "success_marker": success,
        "report_seconds": round(time.perf_counter() - started, 3),
    }
    if totals.labelled:
        summary["accuracy_where_labelled"] = totals.correct / totals.labelled
    return summary


def report(config: ReportConfig) -> dict:
    """Summarise a predictions folder; write report.json and confidence.png to the output folder.

    Raises:
        InputError: the folder is missing, holds no Parquet, or is not a catdog predictions folder.
    """
    from catdog.analyse.plots import plot_confidence  # matplotlib only when a report is written

    summary = summarise(config)
    output = config.output_location
    summary["output"] = output
    storage.write_json(storage.join(output, REPORT_FILE), summary)
    histogram = summary["confidence_histogram"]
    plot_confidence(
        np.array(histogram["counts"]), np.array(histogram["edges"]),
        storage.join(output, CONFIDENCE_PLOT), threshold=config.threshold,
    )
    logger.info("Report of %s rows from %s written to %s", f"{summary['rows']:,}", config.predictions, output)
    return summary


def _share(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.1%}"


def format_report(summary: dict) -> str:
    """The summary as a few human-readable lines."""
    lines = [
        f"predictions: {summary['predictions']} ({summary['files']} files)",
        f"rows: {summary['rows']:,}  scored: {summary['scored']:,}  errors: {summary['errors']:,}",
    ]
    for kind, count in summary["errors_by_kind"].items():
        lines.append(f"  error {kind}: {count:,}")
    for label, count in summary["label_counts"].items():
        lines.append(f"  label {label}: {count:,} ({_share(count / summary['scored'] if summary['scored'] else None)})")
    mean = summary["mean_confidence"]
    lines.append(f"mean confidence: {'n/a' if mean is None else f'{mean:.3f}'}")
    lines.append(
        f"low confidence (< {summary['threshold']:g}): {summary['low_confidence']:,} "
        f"({_share(summary['low_confidence_share'])})"
    )
    if "accuracy_where_labelled" in summary:
        lines.append(f"accuracy where true_label is known: {summary['accuracy_where_labelled']:.3f}")
    throughput = summary["throughput_images_per_s"]
    lines.append(f"throughput: {'unknown (no _SUCCESS.json)' if throughput is None else f'{throughput:,.1f} images/s'}")
    if "output" in summary:
        lines.append(f"report: {summary['output']}")
    return "\n".join(lines)
