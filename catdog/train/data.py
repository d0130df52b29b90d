"""The training data each Ray Train worker reads: embedding shards (cached mode) or decoded images.

Cached mode: embeddings come from `catdog.train.features` (reused from the cache or computed), then each
worker gets object refs of only its own shard: train rows dealt out after a seeded shuffle,
validation rows in contiguous ranges. End-to-end mode: decoded pixels as Ray Datasets, which Ray
Train splits across the workers. Either way the files that could not be decoded are reported, not
trained on.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from catdog.errors import InputError
from catdog.io.labelled import LabelledImages
from catdog.train.config import TrainConfig

DECODE_BATCH = 32


@dataclass
class TrainingData:
    """What the fit reads (embedding refs or decoded datasets) and what metrics.json reports of it."""

    skipped: list[dict]
    n_train: int
    n_val: int
    feature_refs: dict | None = None  # cached mode: object refs of the train/val embeddings
    datasets: dict | None = None  # end-to-end mode: Ray Datasets of decoded images
    cache: dict | None = None

    def check_enough(self, num_workers: int) -> None:
        if self.n_train < num_workers or self.n_val == 0:
            raise InputError(f"too few readable images: {self.n_train} train (need >= {num_workers} workers), "
                             f"{self.n_val} validation")


def decoded_datasets(train: LabelledImages, val: LabelledImages, config: TrainConfig) -> TrainingData:
    """End-to-end mode: decoded pixels for the workers, and the files that could not be decoded."""
    import ray

    from catdog.io.imaging import read_and_decode

    def decode(batch: dict) -> dict:
        out = read_and_decode(list(batch["path"]), config.image_size)
        # an explicit flag: an all-None error column becomes NaNs in numpy batches downstream
        readable = np.array([error is None for error in out["error"]], dtype=bool)
        return {"path": batch["path"], "label": batch["label"], "image": out["image"],
                "readable": readable, "error": np.array([e or "" for e in out["error"]], dtype=object)}

    def decodable(batch: dict, keep_path: bool) -> dict:
        columns = ["image", "label"] + (["path"] if keep_path else [])  # validation paths: calibration halves
        return {name: batch[name][batch["readable"]] for name in columns}

    def load(images: LabelledImages, keep_path: bool):
        table = pa.table({"path": images.paths, "label": pa.array(images.labels, pa.int32())})
        blocks = [table.slice(i, DECODE_BATCH * 2) for i in range(0, table.num_rows, DECODE_BATCH * 2)]
        decoded = ray.data.from_blocks(blocks).map_batches(
            decode, batch_size=DECODE_BATCH, batch_format="numpy", num_cpus=config.cpus_per_worker
        ).materialize()
        outcomes = decoded.select_columns(["path", "readable", "error"]).take_all()
        errors = [{"path": row["path"], "error": row["error"]} for row in outcomes if not row["readable"]]
        kept = decoded.map_batches(decodable, batch_format="numpy", fn_kwargs={"keep_path": keep_path})
        return kept.materialize(), errors

    (train_ds, train_errors), (val_ds, val_errors) = load(train, keep_path=False), load(val, keep_path=True)
    skipped = sorted(({"path": e["path"], "error": e["error"]} for e in train_errors + val_errors), key=lambda e: e["path"])
    return TrainingData(skipped, train_ds.count(), val_ds.count(), datasets={"train": train_ds, "val": val_ds})


def cached_features(train: LabelledImages, val: LabelledImages, config: TrainConfig, spec, fast_extractor,
                     fingerprint: str) -> TrainingData:
    """Cached mode: embeddings (reused or computed), as object refs of the train/val tables."""
    import ray

    from catdog.train.features import build_features

    features = build_features(
        train, val, spec.to_dict(), fast_extractor, fingerprint, config.feature_cache_dir,
        use_gpu=config.use_gpu, actors=config.num_workers, cpus_per_actor=config.cpus_per_worker,
    )
    # Each worker reads only its own shard of the embeddings from the object store (no Ray Data
    # split coordinator to start); rank 0 also gets the validation paths, for the calibration halves.
    refs = shard_refs(features.train.select(["label", "features"]), features.val.select(["label", "features"]),
                      config.num_workers, config.seed)
    refs["val_paths"] = ray.put(features.val["path"].combine_chunks())
    cache = {"location": features.location, "reused": features.reused, "computed": features.computed}
    return TrainingData(features.skipped, features.train.num_rows, features.val.num_rows, feature_refs=refs,
                         cache=cache)


def shard_refs(train, val, workers: int, seed: int) -> dict:
    """Object refs of each worker's shard: train rows dealt out after a seeded shuffle (classes mix),
    validation rows in contiguous ranges (rank order = table order, for reassembling logits)."""
    import ray

    order = np.random.default_rng(seed).permutation(train.num_rows)
    bounds = np.linspace(0, val.num_rows, workers + 1).astype(int)
    return {"train": [ray.put(train.take(np.sort(order[rank::workers]))) for rank in range(workers)],
            "val": [ray.put(val.slice(bounds[rank], bounds[rank + 1] - bounds[rank])) for rank in range(workers)]}
