"""The inference copy of a model: every BatchNorm folded into its convolution, at a chosen precision.

`inference_model` rebuilds a loaded model; `load_inference_model` builds the folded model straight
from a `.keras` archive (its config, and its weights read from the archive's HDF5 weights file),
so the saved model is never built. Both compute the same function as the saved model; train and
save the original, predict with this copy. Why folding pays: benchmarks/README.md, What these
figures rest on.
"""

from __future__ import annotations

import io
import logging

from catdog.errors import ModelLoadError
from catdog.io import storage
from catdog.model.build import load_error, load_model
from catdog.model.options import DTYPE_POLICIES, PRECISIONS
from catdog.model.run_folder import ModelInfo, RunFolder, existing_model_file, read_archive_member, saved_config
from catdog.model.tensorflow_setup import configure_tensorflow

configure_tensorflow()

import h5py  # noqa: E402 - Keras' own weights format; a Keras dependency
import keras  # noqa: E402
import numpy as np  # noqa: E402
from keras.src.utils.naming import to_snake_case  # noqa: E402 - how Keras names weight groups

logger = logging.getLogger(__name__)


def inference_model(model: keras.Model, precision: str = "float32") -> keras.Model:
    """The same function as `model`, rebuilt for fast inference at `precision`.

    Each BatchNormalization that directly follows a Conv2D (all 53 in ResNet50) is folded into
    that convolution's kernel and bias, which is exact for a frozen model at inference
    (training=False) and removes a third of the layers and their memory traffic. Every layer
    then computes at `precision` (`catdog.model.options.PRECISIONS`), except the final softmax,
    which stays float32. The returned model is for inference only; train and save the original.

    Raises:
        ModelLoadError: an unknown precision.
    """
    policy = _dtype_policy(precision)
    config, folded = _fold_batchnorm_config(model.get_config())
    config = _set_dtype_policy(config, policy)
    fast = keras.Model.from_config(config)
    _copy_folded_weights(model, fast, folded)
    return fast


def _dtype_policy(precision: str) -> str:
    """The Keras dtype policy of a --precision; ModelLoadError for an unknown one."""
    if precision not in DTYPE_POLICIES:
        raise ModelLoadError(f"precision must be one of {sorted(PRECISIONS)}, got {precision!r}")
    return DTYPE_POLICIES[precision]


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
    builds ResNet50 once instead of twice, which shortens every scoring actor's start-up. An
    archive whose weights file is not laid out as this Keras version saves it falls back to the
    two-step load.

    Raises:
        ModelLoadError: missing file, not a Keras archive, unsafe layers, or an unknown precision.
    """
    policy = _dtype_policy(precision)
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
            {**saved, "config": _set_dtype_policy(config, policy), "compile_config": None},
            safe_mode=True,
        )
    except Exception as exc:  # noqa: BLE001 - any failure to build is the user's artifact
        raise load_error(path, exc) from exc
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


def load_checked(location: str, precision: str = "float32"):
    """Load a model (safe mode) with its class names, checking that they fit each other.

    Returns:
        (keras model for inference at `precision` (`catdog.model.inference.load_inference_model`), ModelInfo).

    Raises:
        ModelLoadError: missing or unsafe model, missing classes.json, or a class count that does
            not match the model's outputs.
    """
    run = RunFolder(location)
    class_names = run.class_names()
    model = load_inference_model(location, precision)
    input_shape, output_shape = model.input_shape, model.output_shape
    if len(input_shape) != 4 or input_shape[1] != input_shape[2] or input_shape[1] is None or input_shape[3] != 3:
        raise ModelLoadError(f"expected a model on square RGB images, got input shape {input_shape}")
    if output_shape[-1] != len(class_names):
        raise ModelLoadError(
            f"the model has {output_shape[-1]} outputs but {run.classes_file} names {len(class_names)} classes"
        )
    return model, ModelInfo(location, int(input_shape[1]), class_names, run.model_id())
