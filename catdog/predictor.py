"""The predictor: decoded pixel batches in, prediction rows (the predictions schema) out.

`Predictor` is the callable class of the scoring actor pool: the model loads once per actor, in
Keras safe mode, and each batch is one `tf.function` forward over the rows that decoded. Rows that
failed to decode keep their error and get null probabilities. TensorFlow is imported only where a
model is loaded, so importing this module stays cheap.

`describe_model` checks an artifact in the driver without TensorFlow (reading the .keras archive's
config), so a scoring driver starts sooner and stays small; the actors then load it.

On CPU an actor runs two batches at once, each op on half the cores
(`catdog.actor_pool.configure_model_actor`); on a GPU one batch at a time.

Memory: one actor holds TensorFlow, the model and the activations of the batches in flight; its
peak is in benchmarks/README.md, Scoring speed.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from datetime import datetime, timezone

import numpy as np
import pyarrow as pa

from catdog import storage
from catdog.errors import ImageDecodeError, InputError, ModelLoadError
from catdog.run_folder import CLASSES_FILENAME, artifact_id, classes_file, existing_model_file, saved_config
from catdog.schema import error_kinds, predictions_schema, prob_column

logger = logging.getLogger(__name__)

UNSAFE_CLASSES = ("Lambda",)  # layers Keras safe mode refuses: they carry Python bytecode


@dataclass(frozen=True)
class ModelInfo:
    """What the driver needs to know about a model before scoring with it."""

    location: str
    image_size: int
    class_names: tuple[str, ...]
    model_id: str


def load_class_names(location: str) -> tuple[str, ...]:
    """Class names in the model's output order, from classes.json."""
    path = classes_file(location)
    if not storage.exists(path):
        raise ModelLoadError(f"no {CLASSES_FILENAME} at {path}: the model's class names are needed for the labels")
    try:
        names = storage.read_json(path)
    except (ValueError, OSError) as exc:
        raise ModelLoadError(f"could not read {path}: {exc}") from exc
    if not isinstance(names, list) or len(names) < 2 or not all(isinstance(n, str) and n for n in names):
        raise ModelLoadError(f"{path} must be a JSON list of at least 2 class names, got {names!r}")
    if len(set(names)) != len(names):
        raise ModelLoadError(f"{path} repeats a class name: {names}")
    return tuple(names)


def load_checked(location: str, precision: str = "float32"):
    """Load a model (safe mode) with its class names, checking that they fit each other.

    Returns:
        (keras model for inference at `precision` (`catdog.inference.load_inference_model`), ModelInfo).

    Raises:
        ModelLoadError: missing or unsafe model, missing classes.json, or a class count that does
            not match the model's outputs.
    """
    from catdog import model as catdog_model
    from catdog.inference import load_inference_model

    class_names = load_class_names(location)
    model = load_inference_model(location, precision)
    input_shape, output_shape = model.input_shape, model.output_shape
    if len(input_shape) != 4 or input_shape[1] != input_shape[2] or input_shape[1] is None or input_shape[3] != 3:
        raise ModelLoadError(f"expected a model on square RGB images, got input shape {input_shape}")
    if output_shape[-1] != len(class_names):
        raise ModelLoadError(
            f"the model has {output_shape[-1]} outputs but {classes_file(location)} names {len(class_names)} classes"
        )
    return model, ModelInfo(location, int(input_shape[1]), class_names, catdog_model.model_id(location))


def describe_model(location: str) -> ModelInfo:
    """Check a model artifact without loading it: image size, class names, id (a hash of the file,
    as catdog.model.model_id). Layers Keras safe mode refuses are refused here already.

    Raises:
        ModelLoadError: missing file, not a Keras 3 archive, a Lambda layer, no square RGB input,
            or a missing/invalid classes.json.
    """
    path = existing_model_file(location)
    class_names = load_class_names(location)
    data = storage.read_bytes(path)
    config = saved_config(path, data)
    unsafe = sorted(set(_class_names_in(config)) & set(UNSAFE_CLASSES))
    if unsafe:
        raise ModelLoadError(f"could not load model {path}: it contains {', '.join(unsafe)} layers "
                             "(Lambda layers are refused: catdog loads models in Keras safe mode)")
    info = ModelInfo(location, _input_size(config, path), class_names, artifact_id(data))
    logger.info("Model %s: id %s, %dx%d px, classes %s", location, info.model_id, info.image_size,
                info.image_size, list(class_names))
    return info


def _class_names_in(config: object):
    """Every `class_name` in a Keras config, nested models included."""
    if isinstance(config, dict):
        if isinstance(config.get("class_name"), str):
            yield config["class_name"]
        for value in config.values():
            yield from _class_names_in(value)
    elif isinstance(config, list):
        for item in config:
            yield from _class_names_in(item)


def _input_size(config: dict, path: str) -> int:
    """Side of the square RGB input of a functional model's config."""
    inner = config.get("config", {})
    shapes = [layer.get("config", {}).get("batch_shape") for layer in inner.get("layers", [])
              if layer.get("class_name") == "InputLayer"]
    if len(shapes) != 1 or not shapes[0] or len(shapes[0]) != 4:
        raise ModelLoadError(f"expected a model with one image input in {path}, got input shapes {shapes}")
    _, height, width, channels = shapes[0]
    if height != width or height is None or channels != 3:
        raise ModelLoadError(f"expected a model on square RGB images in {path}, got input shape {shapes[0]}")
    return int(height)


class Predictor:
    """Ray Data callable class: {path, image, width, height, error[, true_label]} -> prediction rows.

    Thread-safe: on CPU the actor pool calls it from `concurrent_batches` threads at once.
    """

    def __init__(self, info: ModelInfo, precision: str = "float32", use_gpu: bool = False,
                 with_true_label: bool = False, progress=None):
        started = time.monotonic()
        self._progress = progress  # a catdog.progress.ProgressCounter actor, told of every batch
        from catdog.actor_pool import configure_model_actor

        self.concurrent_batches = configure_model_actor(use_gpu)
        import tensorflow as tf

        from catdog.inference import load_inference_model

        self._info = info
        self._class_names = np.array(info.class_names, dtype=object)
        self._schema = predictions_schema(info.class_names, with_true_label=with_true_label)
        self._model = load_inference_model(info.location, precision)
        if self._model.output_shape[-1] != len(info.class_names) or self._model.input_shape[1] != info.image_size:
            raise ModelLoadError(f"{info.location}: model shapes {self._model.input_shape} -> "
                                 f"{self._model.output_shape} do not fit {len(info.class_names)} classes")
        size = info.image_size
        # One trace for every batch length (the last batch, batches with failed rows).
        self._forward = tf.function(
            lambda pixels: self._model(tf.cast(pixels, tf.float32), training=False),
            input_signature=[tf.TensorSpec([None, size, size, 3], tf.uint8)],
            reduce_retracing=True,
        )
        self._forward(tf.zeros([1, size, size, 3], tf.uint8))  # trace now, not on the first batch
        logger.info("Predictor ready in %.1f s: model %s (%s); batches at a time: %d, TensorFlow threads per op: %s",
                    time.monotonic() - started, info.model_id, precision, self.concurrent_batches,
                    tf.config.threading.get_intra_op_parallelism_threads() or "all cores")

    def predict(self, pixels: np.ndarray) -> np.ndarray:
        """Probabilities [n, classes] float32 for uint8 pixels [n, size, size, 3]."""
        return np.asarray(self._forward(pixels), dtype=np.float32)

    def __call__(self, batch: dict[str, np.ndarray]) -> pa.Table:
        errors = batch["error"]
        ok = np.array([e is None for e in errors], dtype=bool)
        n = len(errors)
        probs = np.zeros((n, len(self._class_names)), dtype=np.float32)
        if ok.any():
            probs[ok] = self.predict(np.ascontiguousarray(batch["image"][ok]))
        rows = self._rows(batch, probs, ok)
        if self._progress is not None:
            self._progress.add.remote(n, error_kinds(errors))
        return rows

    def _rows(self, batch: dict[str, np.ndarray], probs: np.ndarray, ok: np.ndarray) -> pa.Table:
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
        if "true_label" in self._schema.names:
            columns["true_label"] = pa.array(batch["true_label"], pa.string())
        return pa.Table.from_pydict(columns, schema=self._schema)


def predict_image(model: str, image: str, precision: str = "float32",
                  max_pixels: int | None = None) -> dict:
    """Score one image in this process (no Ray): label, confidence and every class probability.

    Raises:
        InputError: the image cannot be read or decoded.
        ModelLoadError: the model cannot be loaded safely.
    """
    from catdog import imaging

    keras_model, info = load_checked(model, precision)
    try:
        data = imaging.read_file(image)
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
