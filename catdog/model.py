"""The model: ResNet50 preprocessing, the frozen backbone, the classifier head, save and load.

This is the only module that knows about ResNet50 and its preprocessing. A full model maps RGB
pixels in [0, 255] (any float or uint8 dtype) at `image_size` to class probabilities:

    pixels -> preprocess (frozen 1x1 Conv2D) -> ResNet50 (frozen, training=False) -> head -> probabilities

The head is trained on cached backbone features or end to end; either way the saved `.keras`
file holds preprocessing, backbone and head, built from Keras' own layers only: it loads with
plain `keras.saving.load_model(path, safe_mode=True)`, in code that never imports catdog.
"""

from __future__ import annotations

import hashlib
import io
import logging
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

from catdog import storage
from catdog.run_folder import (  # noqa: F401 - MODEL_FILENAME, model_file, model_id re-exported
    MODEL_FILENAME, existing_model_file, model_file, model_id, read_archive_member, saved_config)
from catdog.errors import ModelLoadError
from catdog.tensorflow_setup import configure_tensorflow

configure_tensorflow()

import h5py  # noqa: E402 - Keras' own weights format; a Keras dependency
import keras  # noqa: E402
import numpy as np  # noqa: E402
from keras.src.utils.naming import to_snake_case  # noqa: E402 - how Keras names weight groups

logger = logging.getLogger(__name__)

BACKBONE_FEATURES = 2048  # channels of ResNet50's last block
HEADS = ("gap", "flatten")
# Keras dtype policy per --precision: bfloat16 runs every layer in bf16 (its range is float32's, and
# the per-layer casts of mixed_bfloat16 cost a third of its speed here); float16 keeps float32 variables.
PRECISIONS = {"float32": "float32", "bfloat16": "bfloat16", "float16": "mixed_float16"}
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
            raise _load_error(path, exc) from exc


def _load_error(path: str, exc: Exception) -> ModelLoadError:
    """The user's error for a model Keras could not load or build (safe mode refuses Lambda)."""
    hint = " (Lambda layers are refused: catdog loads models in Keras safe mode)" if "lambda" in str(exc).lower() else ""
    return ModelLoadError(f"could not load model {path}: {exc}{hint}")


def inference_model(model: keras.Model, precision: str = "float32") -> keras.Model:
    """The same function as `model`, rebuilt for fast inference at `precision`.

    Each BatchNormalization that directly follows a Conv2D (all 53 in ResNet50) is folded into
    that convolution's kernel and bias, which is exact for a frozen model at inference
    (training=False) and removes a third of the layers and their memory traffic. Every layer
    then computes at `precision` (`PRECISIONS`), except the final softmax, which stays float32.
    Measured here (2 cores with AMX, 180 px, batch 32): float32 24 -> 39 img/s, bfloat16 91 img/s.
    The returned model is for inference only; train and save the original.

    Raises:
        ModelLoadError: an unknown precision.
    """
    if precision not in PRECISIONS:
        raise ModelLoadError(f"precision must be one of {sorted(PRECISIONS)}, got {precision!r}")
    config, folded = _fold_batchnorm_config(model.get_config())
    config = _set_dtype_policy(config, PRECISIONS[precision])
    fast = keras.Model.from_config(config)
    _copy_folded_weights(model, fast, folded)
    return fast


def _inbound_layer_names(layer_config: dict) -> list[str]:
    """Names of the layers whose outputs feed a layer, from its functional config."""
    names = []

    def visit(item: object) -> None:
        if isinstance(item, dict) and item.get("class_name") == "__keras_tensor__":
            names.append(item["config"]["keras_history"][0])
        elif isinstance(item, dict):
            for value in item.values():
                visit(value)
        elif isinstance(item, (list, tuple)):
            for value in item:
                visit(value)

    visit(layer_config.get("inbound_nodes", []))
    return names


def _fold_batchnorm_config(config: dict) -> tuple[dict, dict[str, str]]:
    """A functional config with each Conv2D -> BatchNormalization pair (the conv feeding only that
    BN) merged into the conv, nested models included. Returns it and {conv name: BN name}."""
    layers = config["layers"]
    kinds = {layer["name"]: layer["class_name"] for layer in layers}
    consumers: dict[str, list[str]] = {}
    for layer in layers:
        for source in _inbound_layer_names(layer):
            consumers.setdefault(source, []).append(layer["name"])
    bn_to_conv = {}
    for layer in layers:
        sources = _inbound_layer_names(layer)
        if (layer["class_name"] == "BatchNormalization" and len(sources) == 1
                and kinds.get(sources[0]) == "Conv2D" and consumers.get(sources[0]) == [layer["name"]]):
            bn_to_conv[layer["name"]] = sources[0]
    folded = {conv: bn for bn, conv in bn_to_conv.items()}

    def rewire(item: object) -> object:
        if isinstance(item, dict) and item.get("class_name") == "__keras_tensor__":
            history = list(item["config"]["keras_history"])
            if history[0] in bn_to_conv:
                history = [bn_to_conv[history[0]], 0, 0]
            return {**item, "config": {**item["config"], "keras_history": history}}
        if isinstance(item, dict):
            return {key: rewire(value) for key, value in item.items()}
        if isinstance(item, (list, tuple)):
            return [rewire(value) for value in item]
        return item

    new_layers = []
    for layer in layers:
        if layer["name"] in bn_to_conv:
            continue
        layer = {**layer, "inbound_nodes": rewire(layer.get("inbound_nodes", []))}
        if layer["name"] in folded:
            layer["config"] = {**layer["config"], "use_bias": True}
        elif "layers" in layer.get("config", {}):  # a nested functional model
            inner, inner_folded = _fold_batchnorm_config(layer["config"])
            layer["config"] = inner
            folded.update(inner_folded)
        new_layers.append(layer)

    def rewire_output(output: list) -> list:  # [layer name, node index, tensor index]
        return [bn_to_conv[output[0]], 0, 0] if output[0] in bn_to_conv else output

    outputs = config["output_layers"]
    single = bool(outputs) and isinstance(outputs[0], str)
    outputs = rewire_output(outputs) if single else [rewire_output(output) for output in outputs]
    return {**config, "layers": new_layers, "output_layers": outputs}, folded


def _folded_conv_weights(conv: list[np.ndarray], bn: list[np.ndarray], bn_config: dict) -> list[np.ndarray]:
    """[kernel, bias] of a convolution with the BatchNormalization that follows it folded in.

    `conv` is [kernel] or [kernel, bias]; `bn` is BN's variables in Keras order: gamma (if it
    scales), beta (if it centres), moving mean, moving variance.
    """
    kernel, *rest = [np.asarray(w, dtype=np.float64) for w in conv]
    bias = rest[0] if rest else np.zeros(kernel.shape[-1])
    bn = [np.asarray(w, dtype=np.float64) for w in bn]
    gamma = bn.pop(0) if bn_config.get("scale", True) else np.ones(kernel.shape[-1])
    beta = bn.pop(0) if bn_config.get("center", True) else np.zeros(kernel.shape[-1])
    mean, variance = bn
    scale = gamma / np.sqrt(variance + bn_config.get("epsilon", 1e-3))
    return [(kernel * scale).astype(np.float32), ((bias - mean) * scale + beta).astype(np.float32)]


def _copy_folded_weights(source: keras.Model, target: keras.Model, folded: dict[str, str]) -> None:
    """Copy weights layer by layer (by name), folding each BN's statistics into its conv."""
    for layer in target.layers:
        original = source.get_layer(layer.name)
        if isinstance(layer, keras.Model):
            _copy_folded_weights(original, layer, folded)
        elif layer.name in folded:
            bn = source.get_layer(folded[layer.name])
            layer.set_weights(_folded_conv_weights(original.get_weights(), bn.get_weights(), bn.get_config()))
        elif layer.weights:
            layer.set_weights(original.get_weights())


def load_inference_model(location: str, precision: str = "float32") -> keras.Model:
    """`inference_model(load_model(location), precision)`, built once, straight from the archive.

    The saved model is never built: the folded model is built from the archive's config (Keras
    safe mode) and its weights are read from the archive's weights file and folded there. That
    builds ResNet50 once instead of twice: ~2.5 s less start-up per scoring actor (measured, see
    README "Where the time goes"). An archive whose weights file is not laid out as this Keras
    version saves it falls back to the two-step load.

    Raises:
        ModelLoadError: missing file, not a Keras archive, unsafe layers, or an unknown precision.
    """
    if precision not in PRECISIONS:
        raise ModelLoadError(f"precision must be one of {sorted(PRECISIONS)}, got {precision!r}")
    path = existing_model_file(location)
    data = storage.read_bytes(path)
    saved = saved_config(path, data)
    weights = read_archive_member(path, data, "model.weights.h5")
    try:
        config, folded = _fold_batchnorm_config(saved["config"])
    except (KeyError, TypeError) as exc:
        raise ModelLoadError(f"could not load model {path}: not a Keras 3 .keras archive ({exc})") from exc
    try:
        model = keras.saving.deserialize_keras_object(
            {**saved, "config": _set_dtype_policy(config, PRECISIONS[precision]), "compile_config": None},
            safe_mode=True,
        )
    except Exception as exc:  # noqa: BLE001 - any failure to build is the user's artifact
        raise _load_error(path, exc) from exc
    try:
        with h5py.File(io.BytesIO(weights), "r") as store:
            _assign_saved_weights(model, saved["config"], store["layers"], folded)
    except (KeyError, ValueError, OSError) as exc:
        logger.debug("Weights of %s not in the expected layout (%s); loading the saved model first", path, exc)
        return inference_model(load_model(location), precision)
    return model


def _saved_weights(group: h5py.Group) -> list[np.ndarray]:
    """One layer's variables, in order, from its group of a Keras weights file."""
    variables = group["vars"]
    return [variables[str(i)][()] for i in range(len(variables))]


def _assign_saved_weights(model: keras.Model, config: dict, layers: h5py.Group, folded: dict[str, str]) -> None:
    """Set a folded rebuild's weights from the saved model's weights file (nested models included).

    Keras saves a functional model's layers in `layers/`, one group per layer, named by class in
    snake case and numbered in layer order (conv2d, conv2d_1, ...); `config` is the saved model's
    functional config, which lists the layers in that order.

    Raises:
        KeyError, ValueError: the file is not laid out that way or shapes differ.
    """
    seen: dict[str, int] = {}
    groups, configs = {}, {}
    for layer_config in config["layers"]:
        kind = to_snake_case(layer_config["class_name"])
        seen[kind] = seen.get(kind, -1) + 1  # as Keras numbers them: conv2d, conv2d_1, conv2d_2, ...
        groups[layer_config["name"]] = layers[f"{kind}_{seen[kind]}" if seen[kind] else kind]
        configs[layer_config["name"]] = layer_config["config"]
    for layer in model.layers:
        if isinstance(layer, keras.Model):
            _assign_saved_weights(layer, configs[layer.name], groups[layer.name]["layers"], folded)
        elif layer.name in folded:
            bn = folded[layer.name]
            layer.set_weights(_folded_conv_weights(_saved_weights(groups[layer.name]), _saved_weights(groups[bn]),
                                                   configs[bn]))
        elif layer.weights:
            layer.set_weights(_saved_weights(groups[layer.name]))


def _set_dtype_policy(config: object, policy: str) -> object:
    """Return a copy of a model config with every layer's dtype set to `policy`, except the final
    softmax, which stays float32 for numerically sound probabilities."""
    if isinstance(config, (list, tuple)):
        return [_set_dtype_policy(item, policy) for item in config]
    if not isinstance(config, dict):
        return config
    out = {key: _set_dtype_policy(value, policy) for key, value in config.items()}
    if "dtype" in out and isinstance(out["dtype"], dict) and out.get("name") != "probabilities":
        out["dtype"] = policy
    return out
