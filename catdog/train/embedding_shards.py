"""Cached mode's per-worker data: one worker's shard of the embeddings, as arrays and in batches."""

from __future__ import annotations

import numpy as np


def embedding_arrays(table) -> tuple[np.ndarray, np.ndarray]:
    """Features [n, width] float32 and labels [n] int32 of an embeddings table (converted once)."""
    n = table.num_rows
    features = table.column("features").combine_chunks().flatten().to_numpy().reshape(n, -1)
    return features, table.column("label").to_numpy().astype(np.int32)


def cached_batches(features: np.ndarray, labels: np.ndarray, batch_size: int, seed: int | None = None,
                   rows_per_epoch: int | None = None):
    """Batches {"features", "label"} of this worker's own shard.

    With a seed (training) the shard is reshuffled and cut to `rows_per_epoch` rows: every worker
    must run the same number of MultiWorkerMirroredStrategy steps, and shards differ by a row at
    most (the rows left out change every epoch). Without a seed (validation): every row, in order.
    """
    n = len(labels)
    rows = np.arange(n) if seed is None else np.random.default_rng(seed).permutation(n)[:rows_per_epoch]
    for start in range(0, len(rows), batch_size):
        picked = rows[start:start + batch_size]
        yield {"features": features[picked], "label": labels[picked]}
