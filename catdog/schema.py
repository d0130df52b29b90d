"""The predictions Parquet schema: one constant, used by the writer, the readers and the docs."""

from __future__ import annotations

from typing import Sequence

import pyarrow as pa

# Columns before and after the per-class probabilities, in file order.
LEADING_FIELDS = [
    pa.field("path", pa.string(), nullable=False),  # input file, normalised URI or absolute path
    pa.field("label", pa.string()),  # predicted class; null when the file could not be scored
]
TRAILING_FIELDS = [
    pa.field("confidence", pa.float32()),  # probability of the predicted class
    pa.field("error", pa.string()),  # null when scored, else "kind: message"
    pa.field("width", pa.int32()),  # original image width in pixels, as displayed; null if unknown
    pa.field("height", pa.int32()),
    pa.field("model_id", pa.string(), nullable=False),  # hash of the model artifact
    pa.field("scored_at", pa.timestamp("us", tz="UTC"), nullable=False),
    # What the file was when listed; a resume rescores a file whose size or time changed. Null when unknown.
    pa.field("file_size", pa.int64()),
    pa.field("file_modified", pa.timestamp("us", tz="UTC")),
]
PROB_PREFIX = "prob_"
TRUE_LABEL_FIELD = pa.field("true_label", pa.string())  # added by jobs.evaluate only


def prob_column(class_name: str) -> str:
    """Column name holding the probability of one class."""
    return f"{PROB_PREFIX}{class_name}"


def predictions_schema(class_names: Sequence[str], with_true_label: bool = False) -> pa.Schema:
    """The pyarrow schema of a predictions file for a model with these classes."""
    probs = [pa.field(prob_column(name), pa.float32()) for name in class_names]
    extra = [TRUE_LABEL_FIELD] if with_true_label else []
    return pa.schema(LEADING_FIELDS + probs + TRAILING_FIELDS + extra)


def error_kinds(errors: Sequence[str | None]) -> dict[str, int]:
    """Count errors by their stable kind prefix ("truncated", "not_an_image", ...)."""
    counts: dict[str, int] = {}
    for error in errors:
        if error is not None:
            kind = error.split(":", 1)[0]
            counts[kind] = counts.get(kind, 0) + 1
    return dict(sorted(counts.items()))
