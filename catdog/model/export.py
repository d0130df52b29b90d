"""Export a run's model as a TensorFlow SavedModel for TF Serving and `tf.saved_model.load`.

Two signatures over the same float32 inference model that catdog scores with
(`catdog.model.inference.load_checked`: Keras safe mode, BatchNorm folded):

    serving_default  image_bytes: string [n] (encoded JPEG/PNG/GIF/BMP/WebP), decoded in the graph
    pixels           pixels: uint8 [n, size, size, 3], already decoded as catdog.io.imaging decodes

Both return `probabilities` float32 [n, classes], `classes` string [n, classes] (the class names,
the same on every row, so that TF Serving's row format works) and `label` string [n].

The in-graph decoder reproduces `catdog.io.imaging.decode_image` for upright images without
transparency: a JPEG is decoded at the DCT scale of PIL's draft mode with the same IDCT, and every
image is resized with Pillow's own fixed-point bilinear arithmetic, so the 500 dev photos decode to
identical pixels. It does not apply EXIF orientation, composite transparency on white or refuse
images over catdog's pixel limit, and one undecodable image fails the whole request
(docs/serving.md).
"""

from __future__ import annotations

import json
import logging
import tempfile
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import pyarrow.fs as pafs

from catdog.errors import OutputExistsError
from catdog.io import storage

logger = logging.getLogger(__name__)

BYTES_SIGNATURE = "serving_default"  # the signature TF Serving calls when a request names none
PIXELS_SIGNATURE = "pixels"
MANIFEST_FILENAME = "catdog_export.json"  # what was exported, from where; TF Serving ignores it
# What an export folder holds, and all that --overwrite removes.
SAVED_MODEL_ENTRIES = ("saved_model.pb", "fingerprint.pb", "variables", "assets", MANIFEST_FILENAME)
# PIL's draft mode decodes a JPEG at 1/8, 1/4 or 1/2 scale when the target is that much smaller.
JPEG_SCALES = (1, 2, 4, 8)


@dataclass(frozen=True)
class ExportConfig:
    """What `export_model` needs: a run folder (or .keras file) and the SavedModel folder to write."""

    model: str
    output: str
    overwrite: bool = False


def export_model(config: ExportConfig) -> dict:
    """Write the SavedModel of `config.model` to `config.output` (path or URI).

    Returns:
        The manifest written beside it (model id, classes, image size, signatures).

    Raises:
        OutputExistsError: the output is non-empty without `overwrite`, a file, or unsafe (a root,
            the home folder, or overlapping the model's folder).
        ModelLoadError: the model cannot be loaded safely or does not fit its classes.json.
    """
    started = time.monotonic()
    storage.refuse_unsafe_output(config.output, config.model)
    _prepare_output(config.output, config.overwrite)

    from catdog.model.inference import load_checked

    tf = _tensorflow()
    model, info = load_checked(config.model, "float32")
    module = build_module(model, info.image_size, info.class_names)
    manifest = {
        "model": config.model, "model_id": info.model_id, "image_size": info.image_size,
        "class_names": list(info.class_names), "precision": "float32", "tensorflow": tf.__version__,
        "exported_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "signatures": {BYTES_SIGNATURE: "image_bytes: string [n]",
                       PIXELS_SIGNATURE: f"pixels: uint8 [n, {info.image_size}, {info.image_size}, 3]"},
        "outputs": "probabilities: float32 [n, classes], classes: string [n, classes], label: string [n]",
    }
    with tempfile.TemporaryDirectory(prefix="catdog-export-") as tmp:
        tf.saved_model.save(module, tmp, signatures=signatures(module))
        (Path(tmp) / MANIFEST_FILENAME).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
        _copy_folder(Path(tmp), config.output)
    logger.info("Exported model %s (%s, %d px, classes %s) to %s in %.1f s", info.model_id, config.model,
                info.image_size, list(info.class_names), config.output, time.monotonic() - started)
    return manifest


def build_module(model, image_size: int, class_names: tuple[str, ...]):
    """A tf.Module with the bytes and pixels functions of `model`, and `class_names` (a variable).

    Not keras.export.ExportArchive: on TensorFlow it stores every weight twice (keras issue 23553),
    which doubles the SavedModel and TF Serving's memory. Here only the tf.Variables the functions
    capture are saved.
    """
    tf = _tensorflow()

    module = tf.Module(name="catdog")
    module.class_names = tf.Variable(class_names, trainable=False, name="class_names")

    def outputs(pixels: tf.Tensor) -> dict[str, tf.Tensor]:
        probabilities = model(tf.cast(pixels, tf.float32), training=False)
        names = module.class_names.read_value()
        n = tf.shape(probabilities)[0]
        return {"probabilities": probabilities, "classes": tf.tile(names[None], [n, 1]),
                "label": tf.gather(names, tf.argmax(probabilities, axis=1))}

    def from_bytes(image_bytes: tf.Tensor) -> dict[str, tf.Tensor]:
        pixels = tf.map_fn(lambda data: decode_image(data, image_size), image_bytes,
                           fn_output_signature=tf.TensorSpec([image_size, image_size, 3], tf.uint8))
        return outputs(pixels)

    module.from_bytes = tf.function(
        from_bytes, input_signature=[tf.TensorSpec([None], tf.string, name="image_bytes")], autograph=False)
    module.from_pixels = tf.function(
        outputs, input_signature=[tf.TensorSpec([None, image_size, image_size, 3], tf.uint8, name="pixels")],
        autograph=False)
    captured = {}
    for function in (module.from_bytes, module.from_pixels):
        for variable in function.get_concrete_function().variables:
            captured[variable.ref()] = variable
    module.model_variables = list(captured.values())  # tracked, so saved once each
    return module


def signatures(module) -> dict:
    """The SavedModel signatures of a `build_module` module, by name."""
    return {BYTES_SIGNATURE: module.from_bytes.get_concrete_function(),
            PIXELS_SIGNATURE: module.from_pixels.get_concrete_function()}


def decode_image(data, image_size: int):
    """One encoded image -> uint8 [image_size, image_size, 3], as catdog.io.imaging decodes it where TF can.

    JPEGs: decoded at the DCT scale PIL's draft mode picks (the largest of 8, 4, 2, 1 that keeps
    both sides at least `image_size`) with libjpeg's accurate integer IDCT, PIL's default. Other
    formats: `tf.io.decode_image` (first frame of a GIF; an alpha channel is dropped). Then PIL's
    bilinear resize, reproduced (`resize_like_pil`).
    """
    tf = _tensorflow()

    def jpeg() -> tf.Tensor:
        height_width = tf.image.extract_jpeg_shape(data)[:2]
        fits = tf.reduce_min(height_width // image_size)  # PIL: min(width // size, height // size)
        branch = tf.reduce_sum(tf.cast(fits >= tf.constant(JPEG_SCALES[1:], tf.int32), tf.int32))
        return tf.switch_case(branch, [
            (lambda ratio=ratio: tf.io.decode_jpeg(data, channels=3, ratio=ratio, dct_method="INTEGER_ACCURATE"))
            for ratio in JPEG_SCALES
        ])

    def other() -> tf.Tensor:
        return tf.io.decode_image(data, channels=3, expand_animations=False)

    image = tf.cond(tf.io.is_jpeg(data), jpeg, other)
    image.set_shape([None, None, 3])
    return resize_like_pil(image, image_size)


# PIL's fixed-point resampling of 8-bit images: coefficients carry 22 fraction bits (libImaging/Resample.c).
_PRECISION_BITS = 22


def resize_like_pil(image, image_size: int):
    """uint8 [h, w, 3] -> uint8 [image_size, image_size, 3], bit for bit as Pillow's BILINEAR resize.

    `tf.image.resize(..., antialias=True)` has the same kernel but computes in float in one step;
    Pillow rounds its coefficients to 22-bit fixed point and rounds to uint8 after each of two
    passes, which changes 16% of the values by 1. Here each pass is a float64 product of integers
    (exact below 2**53) with Pillow's integer coefficients, rounded as Pillow rounds. Pillow 13.0.0
    runs the vertical pass first when 2 max(w, size) < max(h, size) + size: found by experiment
    (exact on 1,478 random shapes and the 500 photos); test_export checks it against Pillow.
    """
    tf = _tensorflow()

    half, one = 2.0 ** (_PRECISION_BITS - 1), 2.0 ** _PRECISION_BITS

    def horizontal(pixels: tf.Tensor) -> tf.Tensor:
        weights = _pil_coefficients(tf.shape(pixels)[1], image_size)  # [size, w]
        return tf.clip_by_value(tf.floor((half + tf.einsum("hwc,ow->hoc", pixels, weights)) / one), 0, 255)

    def vertical(pixels: tf.Tensor) -> tf.Tensor:
        weights = _pil_coefficients(tf.shape(pixels)[0], image_size)  # [size, h]
        return tf.clip_by_value(tf.floor((half + tf.einsum("hwc,oh->owc", pixels, weights)) / one), 0, 255)

    pixels = tf.cast(image, tf.float64)
    height, width = tf.shape(image)[0], tf.shape(image)[1]
    vertical_first = 2 * tf.maximum(width, image_size) < tf.maximum(height, image_size) + image_size
    pixels = tf.cond(vertical_first, lambda: horizontal(vertical(pixels)), lambda: vertical(horizontal(pixels)))
    pixels.set_shape([image_size, image_size, 3])
    return tf.cast(pixels, tf.uint8)


def _pil_coefficients(in_size, out_size: int):
    """PIL's bilinear coefficients (precompute_coeffs, then normalize_coeffs_8bpc) as a dense
    float64 [out_size, in_size] matrix of integers."""
    tf = _tensorflow()

    size = tf.cast(in_size, tf.float64)
    scale = size / out_size
    filterscale = tf.maximum(scale, 1.0)
    support = filterscale  # the bilinear filter's support is 1
    center = (tf.range(out_size, dtype=tf.float64) + 0.5) * scale
    first = tf.maximum(tf.floor(center - support + 0.5), 0.0)  # C truncates; the same as floor once clamped at 0
    last = tf.minimum(tf.floor(center + support + 0.5), size)
    x = tf.range(size, dtype=tf.float64)
    distance = tf.abs((x[None, :] - center[:, None] + 0.5) * (1.0 / filterscale))
    inside = (x[None, :] >= first[:, None]) & (x[None, :] < last[:, None])
    weights = tf.where(inside, tf.maximum(1.0 - distance, 0.0), 0.0)
    total = tf.reduce_sum(weights, axis=1, keepdims=True)
    weights = tf.math.divide_no_nan(weights, total)
    return tf.floor(0.5 + weights * 2.0 ** _PRECISION_BITS)


def _tensorflow():
    """TensorFlow, imported quietly (catdog.model.tensorflow_setup) by whichever function needs it first."""
    from catdog.model.tensorflow_setup import configure_tensorflow

    configure_tensorflow()
    import tensorflow as tf

    return tf


def _prepare_output(output: str, overwrite: bool) -> None:
    """Refuse a non-empty output unless `overwrite`, which removes an earlier SavedModel's entries only."""
    fs, path = storage.resolve(output)
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.File:
        raise OutputExistsError(f"--output {output} is a file, not a folder")
    if info.type == pafs.FileType.NotFound or not fs.get_file_info(pafs.FileSelector(path)):
        return
    if not overwrite:
        raise OutputExistsError(f"--output {output} already holds files; pass --overwrite to replace its SavedModel")
    for name in SAVED_MODEL_ENTRIES:
        entry = fs.get_file_info(f"{path.rstrip('/')}/{name}")
        if entry.type == pafs.FileType.Directory:
            fs.delete_dir(entry.path)
        elif entry.type == pafs.FileType.File:
            fs.delete_file(entry.path)


def _copy_folder(local: Path, output: str) -> None:
    """Copy a written SavedModel to `output`, saved_model.pb last: TF Serving loads a version
    folder as soon as it appears, and retries one whose graph is not there yet."""
    files = sorted((p for p in local.rglob("*") if p.is_file()), key=lambda p: p.name == "saved_model.pb")
    for path in files:
        storage.write_bytes(storage.join(output, *path.relative_to(local).parts), path.read_bytes())
