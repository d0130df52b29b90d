"""The predictor: decoded pixel batches in, prediction rows (the predictions schema) out.

`Predictor` is the callable class of the scoring actor pool: the model loads once per actor, in
Keras safe mode, and each batch is one `tf.function` forward over the rows that decoded. Rows that
failed to decode keep their error and get null probabilities. TensorFlow is imported only where a
model is loaded, so importing this module stays cheap.

The driver checks a model without TensorFlow first (`catdog.model.run_folder.RunFolder.describe`, from
the .keras archive's config), so it starts sooner and stays small; the actors then load it.

On CPU an actor runs two batches at once, each op on half the cores
(`catdog.cluster.actor_pool.configure_model_actor`); on a GPU one batch at a time.

Memory: one actor holds TensorFlow, the model and the activations of the batches in flight; its
peak is in benchmarks/README.md, Scoring speed.
"""

from __future__ import annotations

import logging
import time
from datetime import datetime, timezone

import numpy as np
import pyarrow as pa

from catdog.errors import ImageDecodeError, InputError, ModelLoadError
from catdog.model.run_folder import ModelInfo
from catdog.score.predictions_folder import EMBEDDING, TOP_K_LABELS, TOP_K_PROBS, error_kinds, predictions_schema, prob_column

logger = logging.getLogger(__name__)


class Predictor:
    """Ray Data callable class: {path, image, width, height, error[, true_label]} -> prediction rows.

    Thread-safe: on CPU the actor pool calls it from `concurrent_batches` threads at once.
    """

    def __init__(self, info: ModelInfo, precision: str = "float32", use_gpu: bool = False,
                 schema: pa.Schema | None = None, progress=None):
        """`schema`: the run's rows (`predictions_schema`: its optional columns say what to add);
        default: the plain schema of the model's classes."""
        started = time.monotonic()
        self._progress = progress  # a catdog.score.progress.ProgressCounter actor, told of every batch
        self._metrics = None
        from catdog.cluster.actor_pool import configure_model_actor

        self.concurrent_batches = configure_model_actor(use_gpu)
        import tensorflow as tf

        from catdog.model.inference import load_inference_model

        self._info = info
        self._class_names = np.array(info.class_names, dtype=object)
        self._schema = schema if schema is not None else predictions_schema(info.class_names)
        self._top_k = self._schema.field(TOP_K_LABELS).type.list_size if TOP_K_LABELS in self._schema.names else 0
        self._embedding_width = (self._schema.field(EMBEDDING).type.list_size if EMBEDDING in self._schema.names
                                 else 0)
        embeddings = bool(self._embedding_width)
        self._model = load_inference_model(info.location, precision)
        if self._model.output_shape[-1] != len(info.class_names) or self._model.input_shape[1] != info.image_size:
            raise ModelLoadError(f"{info.location}: model shapes {self._model.input_shape} -> "
                                 f"{self._model.output_shape} do not fit {len(info.class_names)} classes")
        size = info.image_size
        # One trace for every batch length (the last batch, batches with failed rows).
        self._forward = tf.function(
            self._pooled_and_probabilities(tf) if embeddings else
            lambda pixels: self._model(tf.cast(pixels, tf.float32), training=False),
            input_signature=[tf.TensorSpec([None, size, size, 3], tf.uint8)],
            reduce_retracing=True,
        )
        self._forward(tf.zeros([1, size, size, 3], tf.uint8))  # trace now, not on the first batch
        import ray

        if ray.is_initialized():  # in an actor (or a driver with Ray): live metrics on the node's endpoint
            from catdog.score.live_metrics import ScoringMetrics

            self._metrics = ScoringMetrics(info.model_id)
        logger.info("Predictor ready in %.1f s: model %s (%s); batches at a time: %d, TensorFlow threads per op: %s",
                    time.monotonic() - started, info.model_id, precision, self.concurrent_batches,
                    tf.config.threading.get_intra_op_parallelism_threads() or "all cores")

    def _pooled_and_probabilities(self, tf):
        """The model as its two halves: probabilities, and the backbone features averaged over space."""
        head = self._model.get_layer("head")
        extractor = next(layer for layer in self._model.layers if hasattr(layer, "layers") and layer is not head)

        def forward(pixels):
            features = extractor(tf.cast(pixels, tf.float32), training=False)
            pooled = features if len(features.shape) == 2 else tf.reduce_mean(features, axis=[1, 2])
            return head(features, training=False), tf.cast(pooled, tf.float32)

        return forward

    def predict(self, pixels: np.ndarray) -> np.ndarray:
        """Probabilities [n, classes] float32 for uint8 pixels [n, size, size, 3]."""
        out = self._forward(pixels)
        return np.asarray(out[0] if isinstance(out, tuple) else out, dtype=np.float32)

    def __call__(self, batch: dict[str, np.ndarray]) -> pa.Table:
        started = time.monotonic()
        errors = batch["error"]
        ok = np.array([e is None for e in errors], dtype=bool)
        n = len(errors)
        probs = np.zeros((n, len(self._class_names)), dtype=np.float32)
        pooled = np.zeros((n, self._embedding_width), dtype=np.float32) if self._embedding_width else None
        if ok.any():
            out = self._forward(np.ascontiguousarray(batch["image"][ok]))
            if pooled is not None:
                out, pooled[ok] = out[0], np.asarray(out[1], dtype=np.float32)
            probs[ok] = np.asarray(out, dtype=np.float32)
        rows = self._rows(batch, probs, ok, pooled)
        kinds = error_kinds(errors)
        if self._progress is not None:
            self._progress.add.remote(n, kinds)
        if self._metrics is not None:
            self._metrics.record(n, kinds, started, time.monotonic())
        return rows

    def _rows(self, batch: dict[str, np.ndarray], probs: np.ndarray, ok: np.ndarray,
              pooled: np.ndarray | None = None) -> pa.Table:
        failed = ~ok
        best = probs.argmax(axis=1)
        columns = {
            "path": pa.array(batch["path"], pa.string()),
            "label": pa.array(self._class_names[best], pa.string(), mask=failed),
        }
        for k, name in enumerate(self._info.class_names):
            columns[prob_column(name)] = pa.array(probs[:, k], pa.float32(), mask=failed)
        columns["confidence"] = pa.array(probs.max(axis=1), pa.float32(), mask=failed)
        columns["error"] = pa.array(batch["error"], pa.string())
        columns["width"] = pa.array(batch["width"], pa.int32(), mask=batch["width"] < 0)
        columns["height"] = pa.array(batch["height"], pa.int32(), mask=batch["height"] < 0)
        n = len(failed)
        columns["model_id"] = pa.array([self._info.model_id] * n, pa.string())
        now = datetime.now(timezone.utc)
        columns["scored_at"] = pa.array([now] * n, pa.timestamp("us", tz="UTC"))
        for name, kind in (("file_size", pa.int64()), ("file_modified", pa.timestamp("us", tz="UTC"))):
            # The pipeline carries these as int64 with -1 for unknown (numpy batches hold no nulls).
            known = batch.get(name, np.full(n, -1, dtype=np.int64))
            columns[name] = pa.array(known, pa.int64(), mask=known < 0).cast(kind)
        if self._top_k:
            best_first = np.argsort(-probs, axis=1, kind="stable")[:, :self._top_k]
            labels = self._class_names[best_first].ravel()
            top = np.take_along_axis(probs, best_first, axis=1).ravel()
            columns[TOP_K_LABELS] = _fixed_lists(pa.array(labels, pa.string()), self._top_k, failed)
            columns[TOP_K_PROBS] = _fixed_lists(pa.array(top, pa.float32()), self._top_k, failed)
        if pooled is not None:
            columns[EMBEDDING] = _fixed_lists(pa.array(pooled.ravel(), pa.float32()), pooled.shape[1], failed)
        if "true_label" in self._schema.names:
            columns["true_label"] = pa.array(batch["true_label"], pa.string())
        return pa.Table.from_pydict(columns, schema=self._schema)


def _fixed_lists(values: pa.Array, size: int, missing: np.ndarray) -> pa.Array:
    """Rows of `size` values each, null where `missing`."""
    return pa.FixedSizeListArray.from_arrays(values, size, mask=pa.array(missing, pa.bool_()))


def predict_image(model: str, image: str, precision: str = "float32",
                  max_pixels: int | None = None) -> dict:
    """Score one image in this process (no Ray): label, confidence and every class probability.

    Raises:
        InputError: the image cannot be read or decoded.
        ModelLoadError: the model cannot be loaded safely.
    """
    from catdog.io import file_reads, imaging

    from catdog.model.inference import load_checked

    keras_model, info = load_checked(model, precision)
    try:
        data = file_reads.read_file(image)
        kwargs = {} if max_pixels is None else {"max_pixels": max_pixels}
        pixels, width, height = imaging.decode_image(data, info.image_size, **kwargs)
    except (OSError, ImageDecodeError) as exc:
        raise InputError(f"cannot score {image}: {exc}") from exc
    probs = np.asarray(keras_model(pixels[None].astype(np.float32), training=False), dtype=np.float32)[0]
    best = int(probs.argmax())
    return {
        "path": image,
        "label": info.class_names[best],
        "confidence": float(probs[best]),
        "probabilities": {name: float(p) for name, p in zip(info.class_names, probs)},
        "width": width,
        "height": height,
        "model_id": info.model_id,
    }
