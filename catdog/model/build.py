"""The model: ResNet50 preprocessing, the frozen backbone, the classifier head, save and load.

This is the only module that knows about ResNet50 and its preprocessing. A full model maps RGB
pixels in [0, 255] (any float or uint8 dtype) at `image_size` to class probabilities:

    pixels -> preprocess (frozen 1x1 Conv2D) -> ResNet50 (frozen, training=False) -> head -> probabilities

The head is trained on cached backbone features or end to end; either way the saved `.keras`
file holds preprocessing, backbone and head, built from Keras' own layers only: it loads with
plain `keras.saving.load_model(path, safe_mode=True)`, in code that never imports catdog.
The copy that predicts (BatchNorm folded, at a chosen precision) is `catdog.model.inference`'s.
"""

from __future__ import annotations

import hashlib
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

from catdog.errors import ModelLoadError
from catdog.io import storage
from catdog.model.options import HEADS
from catdog.model.run_folder import MODEL_FILENAME, existing_model_file
from catdog.model.tensorflow_setup import configure_tensorflow

configure_tensorflow()

import keras  # noqa: E402
import numpy as np  # noqa: E402

BACKBONE_FEATURES = 2048  # channels of ResNet50's last block
# ResNet50's "caffe" preprocessing (`keras.applications.resnet50.preprocess_input`): RGB -> BGR,
# then minus the ImageNet mean of each channel, in BGR order.
IMAGENET_BGR_MEAN = (103.939, 116.779, 123.68)


def build_preprocessing(name: str = "preprocess") -> keras.layers.Conv2D:
    """`resnet50.preprocess_input` as one frozen built-in layer: a 1x1 convolution whose kernel
    reverses the channels (RGB -> BGR) and whose bias subtracts the ImageNet mean.

    Exact: each output is one pixel times 1, plus zeros, plus the bias, so a single rounding like
    preprocess_input's own subtraction (in every precision, for integer pixels). Built-in, so the
    saved model needs no catdog class to load.
    """
    layer = keras.layers.Conv2D(3, 1, name=name, trainable=False)
    layer.build((None, None, None, 3))
    flip = np.eye(3, dtype=np.float32)[::-1].reshape(1, 1, 3, 3)  # kernel[0, 0, in, out]: out = 2 - in
    layer.set_weights([flip, -np.asarray(IMAGENET_BGR_MEAN, dtype=np.float32)])
    return layer


@keras.saving.register_keras_serializable(package="catdog")
class ResNet50Preprocess(keras.layers.Layer):
    """Legacy: the preprocessing layer of models saved before `build_preprocessing`. Kept registered
    so those run folders still load through catdog; new models never use it (plain Keras cannot
    load a model that holds it)."""

    def call(self, inputs):
        return keras.applications.resnet50.preprocess_input(keras.ops.cast(inputs, self.compute_dtype))


@dataclass(frozen=True)
class ModelSpec:
    """Everything needed to rebuild the architecture; saved with the model as config."""

    num_classes: int
    image_size: int = 180
    head: str = "gap"  # "gap": pooled features -> Dense; "flatten": the tutorial's Flatten head
    hidden_units: int = 384
    dropout: float = 0.2
    temperature: float = 1.0  # softmax temperature fitted on validation data after training

    def __post_init__(self):
        if self.head not in HEADS:
            raise ValueError(f"head must be one of {HEADS}, got {self.head!r}")
        if self.num_classes < 2:
            raise ValueError("a classifier needs at least 2 classes")
        if self.image_size < 32:
            raise ValueError("ResNet50 needs images of at least 32x32 pixels")

    @property
    def feature_shape(self) -> tuple[int, ...]:
        """Shape of one backbone feature: pooled vector, or the spatial map for the Flatten head."""
        if self.head == "gap":
            return (BACKBONE_FEATURES,)
        side = -(-self.image_size // 32)  # ResNet50 downsamples by 32, rounding up
        return (side, side, BACKBONE_FEATURES)

    def to_dict(self) -> dict:
        return asdict(self)


def _resolve_weights(weights: str | None) -> str | None:
    """'imagenet', None (random init) or a local path to a weights file (URIs copied locally)."""
    if weights in (None, "none", "None"):
        return None
    if weights == "imagenet":
        return "imagenet"
    if not storage.exists(weights):
        raise ModelLoadError(f"weights file not found: {weights}")
    if storage.is_uri(weights):
        local = Path(tempfile.mkdtemp(prefix="catdog-weights-")) / Path(weights).name
        return str(storage.copy_to_local(weights, local))
    return str(Path(weights).expanduser().resolve())


def build_feature_extractor(spec: ModelSpec, weights: str | None = "imagenet", seed: int = 0) -> keras.Model:
    """Pixels [0, 255] -> frozen backbone features (pooled for the gap head, the map for flatten).

    With `weights=None` the random initialisation comes from `seed` alone (`_seeded_init`), so
    every process and thread that builds the extractor with the same seed gets the same backbone
    (cached features stay valid).
    """
    local_weights = _resolve_weights(weights)
    try:
        backbone = keras.applications.ResNet50(
            include_top=False,
            weights=local_weights,
            input_shape=(spec.image_size, spec.image_size, 3),
            pooling="avg" if spec.head == "gap" else None,
        )
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"could not load backbone weights {weights!r}: {exc}") from exc
    if local_weights is None:
        _seeded_init(backbone, seed)
    backbone.trainable = False
    pixels = keras.Input((spec.image_size, spec.image_size, 3), name="pixels")
    features = backbone(build_preprocessing()(pixels), training=False)
    return keras.Model(pixels, features, name="feature_extractor")


def _seeded_init(model: keras.Model, seed: int) -> None:
    """Re-initialise every weight from `seed` alone: Glorot-uniform kernels (Keras' default), zero
    biases, identity BatchNormalization. Keras' own initialisers draw from process-wide random
    state, which another thread (Ray starting up) may advance at the same time."""
    for index, layer in enumerate(model._flatten_layers(include_self=False)):
        if not layer.weights:
            continue
        rng = np.random.default_rng([seed, index])
        if isinstance(layer, keras.layers.BatchNormalization):
            values = [np.ones(w.shape) if "gamma" in w.path or "variance" in w.path else np.zeros(w.shape)
                      for w in layer.weights]
        else:
            values = []
            for weight in layer.weights:
                shape = tuple(weight.shape)
                if len(shape) < 2:  # bias
                    values.append(np.zeros(shape))
                    continue
                receptive = int(np.prod(shape[:-2]))
                limit = np.sqrt(6.0 / (receptive * (shape[-2] + shape[-1])))
                values.append(rng.uniform(-limit, limit, shape))
        layer.set_weights([v.astype(np.float32) for v in values])


def build_head(spec: ModelSpec) -> keras.Model:
    """Features -> class probabilities. Temperature divides the logits; softmax stays float32."""
    features = keras.Input(spec.feature_shape, name="features")
    x = keras.layers.Flatten(name="flatten")(features) if spec.head == "flatten" else features
    x = keras.layers.Dense(spec.hidden_units, activation="relu", name="hidden")(x)
    x = keras.layers.Dropout(spec.dropout, name="dropout")(x)
    logits = keras.layers.Dense(spec.num_classes, name="logits")(x)
    scaled = keras.layers.Rescaling(1.0 / spec.temperature, name="temperature")(logits)
    probabilities = keras.layers.Softmax(dtype="float32", name="probabilities")(scaled)
    return keras.Model(features, probabilities, name="head")


def build_model(extractor: keras.Model, head: keras.Model) -> keras.Model:
    """Compose the full pixels -> probabilities model from an extractor and a head."""
    pixels = keras.Input(extractor.input_shape[1:], name="pixels")
    probabilities = head(extractor(pixels, training=False))
    return keras.Model(pixels, probabilities, name="catdog_classifier")


def weights_fingerprint(model: keras.Model) -> str:
    """A short hash of a model's weight values: identifies a backbone for the feature cache."""
    digest = hashlib.sha256()
    for weight in model.weights:
        digest.update(np.ascontiguousarray(keras.ops.convert_to_numpy(weight)).tobytes())
    return digest.hexdigest()[:16]


def save_model(model: keras.Model, location: str) -> None:
    """Save a full model as `.keras` to a local path or URI."""
    with tempfile.TemporaryDirectory(prefix="catdog-save-") as tmp:
        local = Path(tmp) / MODEL_FILENAME
        model.save(local)
        storage.write_bytes(location, local.read_bytes())


def load_model(location: str) -> keras.Model:
    """Load a run folder's (or a `.keras` file's) model, as saved, in Keras safe mode.

    Raises:
        ModelLoadError: the file is missing, not a Keras model, or holds unsafe layers (Lambda).
    """
    path = existing_model_file(location)
    with tempfile.TemporaryDirectory(prefix="catdog-load-") as tmp:
        local = storage.copy_to_local(path, Path(tmp) / MODEL_FILENAME)
        try:
            return keras.saving.load_model(local, safe_mode=True, compile=False)
        except Exception as exc:  # noqa: BLE001 - any failure to load is the user's artifact
            raise load_error(path, exc) from exc


def load_error(path: str, exc: Exception) -> ModelLoadError:
    """The user's error for a model Keras could not load or build (safe mode refuses Lambda)."""
    hint = " (Lambda layers are refused: catdog loads models in Keras safe mode)" if "lambda" in str(exc).lower() else ""
    return ModelLoadError(f"could not load model {path}: {exc}{hint}")

