"""Live scoring metrics through Ray's metrics API, exported on every node's Prometheus endpoint.

Each predictor actor records, per batch: images scored, errors by kind, batch latency and its
images/s so far. Ray exports them (prefixed `ray_`) on each node's metrics port, which the
dashboard's Grafana panels and any Prometheus read on a cluster; a local Ray serves it on
127.0.0.1 only. Names:

    ray_catdog_images_scored_total{model_id}            counter
    ray_catdog_image_errors_total{model_id, kind}       counter
    ray_catdog_batch_latency_seconds{model_id}          histogram
    ray_catdog_images_per_second{model_id}              gauge (per actor, since its first batch)
"""

from __future__ import annotations

import threading
import time

# Batch latency buckets, seconds: from a GPU batch to a slow CPU batch of large images.
LATENCY_BOUNDARIES = [0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0]


class ScoringMetrics:
    """The metrics of one predictor actor; `record` is safe to call from concurrent batches."""

    def __init__(self, model_id: str):
        from ray.util.metrics import Counter, Gauge, Histogram

        tags = {"model_id": model_id}
        self._images = Counter("catdog_images_scored", description="Images scored (rows written), errors included",
                               tag_keys=("model_id",))
        self._errors = Counter("catdog_image_errors", description="Files that gave an error row, by kind",
                               tag_keys=("model_id", "kind"))
        self._latency = Histogram("catdog_batch_latency_seconds", description="Predictor time per batch",
                                  boundaries=LATENCY_BOUNDARIES, tag_keys=("model_id",))
        self._rate = Gauge("catdog_images_per_second", description="Images/s of this predictor since its first batch",
                           tag_keys=("model_id",))
        for metric in (self._images, self._errors, self._latency, self._rate):
            metric.set_default_tags(tags)
        self._lock = threading.Lock()
        self._first: float | None = None
        self._total = 0

    def record(self, rows: int, errors: dict[str, int], started: float, finished: float) -> None:
        """One batch of `rows` rows that ran from `started` to `finished` (time.monotonic)."""
        self._images.inc(rows)
        for kind, count in errors.items():
            self._errors.inc(count, tags={"kind": kind})
        self._latency.observe(finished - started)
        with self._lock:
            self._first = started if self._first is None else min(self._first, started)
            self._total += rows
            elapsed = finished - self._first
            rate = self._total / elapsed if elapsed > 0 else 0.0
        self._rate.set(rate)
