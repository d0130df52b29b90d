"""The feature cache: frozen-backbone embeddings computed once with Ray Data, kept as Parquet.

An embedding is a function of the file's bytes, the decoder, the extractor's preprocessing and
structure, its weights and compute dtype, the image size and the feature kind. The folder name
holds all but the file's bytes, so a change to any of them is a cache miss, never a stale hit:

    <cache_dir>/<fingerprint>-<size>px-<pooled|map>-<dtype>-decoder<N>-<EXTRACTOR_VERSION>/part-<run id>.parquet

(fingerprint: of the backbone's weight values; N: `catdog.io.imaging.DECODER_VERSION`), e.g.
`3f9c0a51d2e4b687-180px-pooled-float32-decoder1-resnet50caffe1`. Each part holds one row per
file: path, file_size, mtime_ns, features (float32 list), error (null when decoded). A row is
reused only when path, size and mtime all match the listing, so a file replaced under the same
name is embedded again. Files that failed to decode are cached with their error (the same bytes
fail the same way), so they are reported, not retried; a read error (permissions, I/O, a file
moved away mid-run) may not recur, so it is never cached and the next run tries again.

Part files are written under `_staging/` and moved into place when complete; readers skip
`_`-prefixed names and any part whose Parquet footer is unreadable.
"""

from __future__ import annotations

import logging
import posixpath
import uuid
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from catdog.cluster.actor_pool import configure_model_actor, model_actor_pool
from catdog.io import imaging, storage
from catdog.io.labelled import LabelledImages

logger = logging.getLogger(__name__)

FEATURE_KINDS = {"gap": "pooled", "flatten": "map"}
BLOCK_ROWS = 64  # files per Ray Data block: enough blocks to keep several actors busy
KEY_COLUMNS = ["path", "file_size", "mtime_ns"]
# Bump when the extractor computes other features from the same weights and decoded pixels: a change
# to catdog.model.build's preprocessing (ResNet50's "caffe" mode: RGB -> BGR minus the ImageNet mean), the
# backbone graph or its pooling, or how catdog.model.inference.inference_model folds it.
EXTRACTOR_VERSION = "resnet50caffe1"
# Decode failures that the same bytes and decoder always repeat. Any other error (read_error, or a
# kind added later) may be transient: it is not cached, and the next run tries the file again.
CACHEABLE_ERRORS = frozenset({"empty_file", "not_an_image", "too_large", "truncated", "decode_error"})


@dataclass
class FeatureSet:
    """Embeddings of a split, ready for Ray Train: tables with columns path, label, features."""

    train: pa.Table
    val: pa.Table
    reused: int
    computed: int
    location: str
    skipped: list[dict] = field(default_factory=list)  # {"path", "error"} per unreadable image


def cache_folder(cache_dir: str, fingerprint: str, image_size: int, head: str, dtype: str = "float32") -> str:
    """The cache folder for one backbone, image size, feature kind, compute dtype, decoder and extractor version."""
    kind = FEATURE_KINDS[head]
    name = f"{fingerprint}-{image_size}px-{kind}-{dtype}-decoder{imaging.DECODER_VERSION}-{EXTRACTOR_VERSION}"
    return storage.join(cache_dir, name)


def _cacheable(error: str | None) -> bool:
    """Whether a row's outcome may be reused: embedded, or a decode failure that would recur."""
    return error is None or imaging.error_kind(error) in CACHEABLE_ERRORS


class FeatureEmbedder:
    """Ray Data actor: file paths -> backbone embeddings (decoding through catdog.io.imaging).

    The driver's own extractor, already folded for inference (`catdog.model.inference.inference_model`),
    arrives as its config and an object-store reference to its weights: an actor neither
    rebuilds nor re-downloads the backbone, and computes with exactly the driver's weights.
    """

    def __init__(self, extractor_config: dict, weights_ref: list, image_size: int, use_gpu: bool):
        configure_model_actor(use_gpu)  # on CPU: two batches at once, each op on half the cores
        import keras
        import ray
        import tensorflow as tf

        from catdog.model import build as catdog_model  # noqa: F401 - registers catdog's layers

        self.image_size = image_size
        self.extractor = keras.Model.from_config(extractor_config)
        self.extractor.set_weights(ray.get(weights_ref[0]))  # in a list: Ray resolves only top-level refs
        self.width = _feature_width(self.extractor)
        # One trace for every batch length (the last batch, batches with unreadable files): each
        # new shape would otherwise trace ResNet50 again.
        self.forward = tf.function(
            lambda pixels: self.extractor(pixels, training=False),
            input_signature=[tf.TensorSpec([None, image_size, image_size, 3], tf.float32)],
        )

    def __call__(self, batch: pa.Table) -> pa.Table:
        return _embed(batch, self.forward, self.image_size, self.width)


def _feature_width(extractor) -> int:
    """Floats per file: the extractor's output flattened (a pooled vector, or a feature map)."""
    return int(np.prod(extractor.output_shape[1:]))


def _embed(batch: pa.Table, forward, image_size: int, width: int) -> pa.Table:
    """Key columns of `batch`, plus each file's features (null where it failed) and error."""
    decoded = imaging.read_and_decode(batch.column("path").to_pylist(), image_size)
    ok = np.array([error is None for error in decoded["error"]])
    features = np.zeros((len(ok), width), dtype=np.float32)
    if ok.any():
        out = forward(decoded["image"][ok].astype(np.float32))
        features[ok] = np.asarray(out, dtype=np.float32).reshape(int(ok.sum()), width)
    column = pa.FixedSizeListArray.from_arrays(pa.array(features.ravel()), width, mask=pa.array(~ok))
    return batch.select(KEY_COLUMNS).append_column("features", column).append_column(
        "error", pa.array(list(decoded["error"]), pa.string())
    )


class FeatureHandoff:
    """Ray actor (async): hands the embeddings' object refs to Train workers that started first.

    The driver computes the embeddings while Ray Train boots its controller and workers; each
    worker waits in `get` until the driver `put`s the refs (or `fail`s: then every waiting and
    later worker raises, and the driver reports its own error).
    """

    def __init__(self) -> None:
        import asyncio

        self._ready = asyncio.Event()
        self._refs: dict | None = None
        self._error: str | None = None

    async def put(self, refs: dict) -> None:
        """refs: {"train": ObjectRef, "val": ObjectRef} of the label+features tables."""
        self._refs = refs
        self._ready.set()

    async def fail(self, error: str) -> None:
        self._error = error
        self._ready.set()

    async def get(self) -> dict:
        await self._ready.wait()
        if self._error is not None:
            raise RuntimeError(f"the driver could not compute the embeddings: {self._error}")
        return self._refs


def _read_cache(folder: str, wanted_paths: list[str]) -> pa.Table | None:
    """Rows of the readable part files whose path is wanted (all columns), or None."""
    if not storage.is_dir(folder):
        return None
    fs, inner = storage.resolve(folder)
    tables = []
    for entry in storage.list_files(folder, [".parquet"]):
        relative = entry.path[len(storage.to_location(folder, inner).rstrip("/")) + 1 :]
        if any(part.startswith(("_", ".")) for part in relative.split("/")):
            continue
        _, part_path = storage.resolve(entry.path)
        try:
            with fs.open_input_file(part_path) as f:
                table = pq.read_table(f, filters=[("path", "in", wanted_paths)])
        except (pa.ArrowInvalid, OSError) as exc:
            logger.warning("Ignoring unreadable feature cache file %s: %s", entry.path, exc)
            continue
        tables.append(table)
    return pa.concat_tables(tables) if tables else None


def _write_part(folder: str, table: pa.Table, run_id: str) -> str:
    """Write a complete part file under _staging/, then move it into the cache folder."""
    name = f"part-{run_id}.parquet"
    staging = storage.join(folder, "_staging", name)
    final = storage.join(folder, name)
    fs, staging_inner = storage.resolve(staging)
    fs.create_dir(posixpath.dirname(staging_inner), recursive=True)
    with fs.open_output_stream(staging_inner) as stream:
        pq.write_table(table, stream)
    fs.move(staging_inner, storage.resolve(final)[1])
    return final


def _compute(missing: pa.Table, extractor, image_size: int, *, use_gpu: bool, actors: int,
             cpus_per_actor: float, batch_size: int) -> pa.Table:
    """Embed the missing files with an actor pool; the driver gathers the (small) results.

    At most one batch of files (a few edited files on a warm cache) is embedded here, in the
    driver, with the extractor it already holds: starting a pool means starting a process that
    imports TensorFlow and rebuilds the model, far longer than one batch takes. That needs one
    batch of decoded pixels and its activations in the driver.
    """
    if missing.num_rows <= batch_size:
        logger.info("Embedding %d file(s) in the driver: at most one batch, no actor pool to start", missing.num_rows)
        return _embed(missing, lambda pixels: extractor(pixels, training=False), image_size, _feature_width(extractor))

    import ray

    weights_ref = ray.put(extractor.get_weights())
    blocks = [missing.slice(start, BLOCK_ROWS) for start in range(0, missing.num_rows, BLOCK_ROWS)]
    dataset = ray.data.from_blocks(blocks).map_batches(
        FeatureEmbedder,
        fn_constructor_kwargs=dict(extractor_config=extractor.get_config(), weights_ref=[weights_ref],
                                   image_size=image_size, use_gpu=use_gpu),
        batch_size=batch_size,
        batch_format="pyarrow",
        compute=model_actor_pool(use_gpu, min_size=1, max_size=max(1, actors)),
        num_cpus=cpus_per_actor,
        num_gpus=1 if use_gpu else 0,
    )
    return pa.concat_tables(list(dataset.iter_batches(batch_format="pyarrow", batch_size=None)))


def _split_table(rows: pa.Table, index: dict[str, int], images: LabelledImages) -> pa.Table:
    """The decodable rows of `images`, in listing order, with their labels."""
    picks, labels = [], []
    for path, label in zip(images.paths, images.labels):
        picks.append(index[path])
        labels.append(label)
    table = rows.take(pa.array(picks, pa.int64()))
    ok = np.array([error is None for error in table.column("error").to_pylist()], dtype=bool)
    table = table.append_column("label", pa.array(labels, pa.int32())).filter(pa.array(ok))
    return table.select(["path", "label", "features"])


def build_features(
    train: LabelledImages, val: LabelledImages, spec: dict, extractor, fingerprint: str,
    cache_dir: str, *, use_gpu: bool = False, actors: int = 1, cpus_per_actor: float = 0.5, batch_size: int = 32,
) -> FeatureSet:
    """Embeddings for the train and validation images: reused from the cache where valid, the rest computed.

    Args:
        spec: `ModelSpec.to_dict()` of the model being trained (image size and head decide the features).
        extractor: the feature extractor to compute with, best folded for inference
            (`catdog.model.inference.inference_model`).
        fingerprint: `weights_fingerprint` of the extractor as built: one part of the cache key
            (`cache_folder`; the extractor's output dtype is another).
    """
    folder = cache_folder(cache_dir, fingerprint, spec["image_size"], spec["head"], str(extractor.output.dtype))
    listed = {}
    for images in (train, val):
        for path, size, mtime in zip(images.paths, images.sizes, images.mtimes):
            listed[path] = (size, mtime)
    rows = _read_cache(folder, list(listed))
    index = _reusable_rows(rows, listed) if rows is not None else {}
    reused = len(index)
    missing = [path for path in listed if path not in index]
    if missing:
        logger.info("Computing %d embeddings (%d reused from %s)", len(missing), reused, folder)
        todo = pa.table({"path": missing, "file_size": [listed[p][0] for p in missing],
                         "mtime_ns": [listed[p][1] for p in missing]}, schema=_key_schema())
        new = _compute(todo, extractor, spec["image_size"], use_gpu=use_gpu, actors=actors,
                       cpus_per_actor=cpus_per_actor, batch_size=batch_size)
        _cache_new_rows(folder, new)
        offset = rows.num_rows if rows is not None else 0
        for row, path in enumerate(new.column("path").to_pylist()):
            index[path] = offset + row
        rows = pa.concat_tables([rows, new.cast(rows.schema)]) if rows is not None else new
    else:
        logger.info("All %d embeddings reused from %s", reused, folder)
    errors = rows.column("error").to_pylist()
    skipped = [{"path": path, "error": errors[row]} for path, row in sorted(index.items()) if errors[row] is not None]
    return FeatureSet(_split_table(rows, index, train), _split_table(rows, index, val), reused, len(missing), folder, skipped)


def _reusable_rows(cached: pa.Table, listed: dict[str, tuple[int, int]]) -> dict[str, int]:
    """path -> row of the cached rows still valid: same size and mtime as listed, no error that may be transient."""
    index: dict[str, int] = {}
    columns = zip(*(cached.column(name).to_pylist() for name in [*KEY_COLUMNS, "error"]))
    for row, (path, size, mtime, error) in enumerate(columns):
        if path not in index and listed.get(path) == (size, mtime) and _cacheable(error):
            index[path] = row
    return index


def _cache_new_rows(folder: str, new: pa.Table) -> None:
    """Write this run's rows to the cache, all but those with an error that may be transient (retried next run)."""
    keep = pa.array([_cacheable(error) for error in new.column("error").to_pylist()], pa.bool_())
    kept = new.filter(keep)
    if kept.num_rows < new.num_rows:
        logger.info("Not caching %d unreadable files: the next run tries them again", new.num_rows - kept.num_rows)
    if kept.num_rows:
        logger.info("Wrote %s", _write_part(folder, kept, uuid.uuid4().hex[:12]))


def _key_schema() -> pa.Schema:
    return pa.schema([("path", pa.string()), ("file_size", pa.int64()), ("mtime_ns", pa.int64())])
