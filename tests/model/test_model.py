"""The model module: preprocessing inside the model, frozen backbone, heads, safe save/load, precision."""

from __future__ import annotations

import json
import subprocess
import sys
import zipfile

import numpy as np
import pytest

from catdog.errors import ModelLoadError
from catdog.model import build as M
from catdog.model.inference import inference_model, load_inference_model
from catdog.model.options import DTYPE_POLICIES
from catdog.model.run_folder import RunFolder

keras = M.keras
SPEC = M.ModelSpec(num_classes=3, image_size=32)


@pytest.fixture(scope="module")
def saved_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("run")
    extractor = M.build_feature_extractor(SPEC, weights=None, seed=3)
    full = M.build_model(extractor, M.build_head(SPEC))
    M.save_model(full, str(run / M.MODEL_FILENAME))
    return run, full, extractor


@pytest.fixture(scope="module")
def extractor64():
    """64-pixel extractors with trained-looking BatchNorm statistics, one per head (the head decides
    the pooling), built once for the folding tests; each test builds and saves its own model around one."""
    built = {}

    def extractor(head: str = "gap") -> keras.Model:
        if head not in built:
            built[head] = M.build_feature_extractor(M.ModelSpec(num_classes=3, image_size=64, head=head), weights=None,
                                                    seed=1)
            _randomise_batchnorm(built[head])
        return built[head]

    return extractor


@pytest.fixture(scope="module")
def seeded_backbone():
    """The seed-5 random backbone at 32 px, built in the main thread with nothing else drawing random numbers."""
    return M.build_feature_extractor(M.ModelSpec(2, 32), None, seed=5)


def _pixels(n=4, size=32, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3)).astype("float32")


def test_preprocessing_is_resnet50_preprocess_input(saved_run):
    _, _, extractor = saved_run
    backbone = extractor.get_layer("resnet50")
    x = _pixels()
    expected = backbone(keras.applications.resnet50.preprocess_input(x.copy()), training=False)
    np.testing.assert_allclose(extractor(x), expected, atol=1e-5)


def test_backbone_frozen_and_head_small(saved_run):
    _, _, extractor = saved_run  # as build_feature_extractor returns it
    assert extractor.trainable_weights == []
    gap = M.build_head(M.ModelSpec(num_classes=2, image_size=180))
    flatten = M.build_head(M.ModelSpec(num_classes=2, image_size=180, head="flatten"))
    assert gap.count_params() < 1_000_000 < 28_000_000 < flatten.count_params()


def test_saved_model_loads_in_safe_mode_with_identical_outputs(saved_run):
    run, full, _ = saved_run
    loaded = M.load_model(str(run))
    x = _pixels(seed=1)
    np.testing.assert_array_equal(loaded(x), full(x))
    with zipfile.ZipFile(run / M.MODEL_FILENAME) as archive:
        config = archive.read("config.json").decode()
    assert "Lambda" not in config and "ResNet50Preprocess" not in config  # built-in layers only
    assert len(RunFolder(str(run)).model_id()) == 16


def test_preprocessing_layer_is_preprocess_input_exactly_in_every_precision():
    """Integer pixels (what catdog decodes) through the built-in layer give bit for bit what
    `resnet50.preprocess_input` (the legacy ResNet50Preprocess layer) gives, at each precision."""
    x = _pixels(n=2, size=16, seed=8)
    for policy in DTYPE_POLICIES.values():
        config = {**M.build_preprocessing().get_config(), "dtype": policy}
        layer = keras.layers.Conv2D.from_config(config)
        layer.build((None, None, None, 3))
        layer.set_weights(M.build_preprocessing().get_weights())
        np.testing.assert_array_equal(np.asarray(layer(x)), np.asarray(M.ResNet50Preprocess(dtype=policy)(x)))


def test_run_folder_saved_with_the_legacy_preprocess_layer_still_loads(saved_run, tmp_path, caplog):
    """Run folders saved before the built-in preprocessing hold catdog's ResNet50Preprocess: catdog
    still loads them (as saved and folded from the archive) with the same probabilities."""
    _, full, extractor = saved_run
    pixels = keras.Input((SPEC.image_size, SPEC.image_size, 3), name="pixels")
    features = extractor.get_layer("resnet50")(M.ResNet50Preprocess(name="preprocess")(pixels), training=False)
    legacy = M.build_model(keras.Model(pixels, features, name="feature_extractor"), full.get_layer("head"))
    M.save_model(legacy, str(tmp_path / M.MODEL_FILENAME))
    with zipfile.ZipFile(tmp_path / M.MODEL_FILENAME) as archive:
        assert "ResNet50Preprocess" in archive.read("config.json").decode()
    x = _pixels(seed=9)
    expected = np.asarray(full(x, training=False))
    np.testing.assert_allclose(M.load_model(str(tmp_path))(x, training=False), expected, atol=1e-6)
    with caplog.at_level("DEBUG", logger="catdog.model.inference"):
        folded = load_inference_model(str(tmp_path))
    assert "not in the expected layout" not in caplog.text
    np.testing.assert_allclose(folded(x, training=False), expected, atol=1e-5)


def _randomise_batchnorm(model: keras.Model, seed: int = 0) -> None:
    """Trained-looking BN statistics (fresh layers hold the identity, which folds trivially)."""
    rng = np.random.default_rng(seed)
    for layer in model._flatten_layers(include_self=False):
        if isinstance(layer, keras.layers.BatchNormalization):
            shape = layer.gamma.shape
            layer.set_weights([rng.uniform(0.5, 1.5, shape), rng.normal(0, 0.2, shape),
                               rng.normal(0, 0.2, shape), rng.uniform(0.5, 1.5, shape)])


def _layers_of(model: keras.Model, kind: type) -> list:
    return [layer for layer in model._flatten_layers(include_self=False) if isinstance(layer, kind)]


@pytest.mark.parametrize("head", ["gap", "flatten"])
def test_inference_model_folds_every_batchnorm_of_resnet50_exactly(tmp_path, extractor64, head):
    spec = M.ModelSpec(num_classes=3, image_size=64, head=head)
    extractor = extractor64(head)
    M.save_model(M.build_model(extractor, M.build_head(spec)), str(tmp_path / M.MODEL_FILENAME))
    saved = M.load_model(str(tmp_path))
    fast = inference_model(saved, "float32")
    assert len(_layers_of(saved, keras.layers.BatchNormalization)) == 53
    assert _layers_of(fast, keras.layers.BatchNormalization) == []
    assert all(conv.use_bias for conv in _layers_of(fast, keras.layers.Conv2D))
    x = _pixels(n=8, size=64, seed=4)
    features = saved.get_layer("feature_extractor")(x, training=False)
    np.testing.assert_allclose(fast.get_layer("feature_extractor")(x, training=False), features,
                               rtol=1e-4, atol=1e-4 * float(np.abs(features).max()))
    np.testing.assert_allclose(fast(x, training=False), saved(x, training=False), atol=1e-4)  # float32 rounding


@pytest.fixture(scope="module")
def archive_run(tmp_path_factory, extractor64):
    """A saved 64-pixel run with folded-looking BatchNorm statistics and a head of random weights and biases."""
    run = tmp_path_factory.mktemp("archive-run")
    head = M.build_head(M.ModelSpec(num_classes=3, image_size=64))
    head.set_weights([np.random.default_rng(6).normal(size=w.shape) for w in head.get_weights()])
    M.save_model(M.build_model(extractor64("gap"), head), str(run / M.MODEL_FILENAME))
    return run


@pytest.mark.parametrize("precision", ["float32", "bfloat16"])
def test_inference_model_straight_from_the_archive_equals_the_two_step_load(archive_run, precision, caplog):
    """load_inference_model reads Keras' weights file itself; it must give exactly the weights of
    inference_model(load_model(...)), without falling back to that two-step load."""
    with caplog.at_level("DEBUG", logger="catdog.model.inference"):
        direct = load_inference_model(str(archive_run), precision)
    assert "not in the expected layout" not in caplog.text
    two_step = inference_model(M.load_model(str(archive_run)), precision)
    assert [w.path for w in direct.weights] == [w.path for w in two_step.weights]
    for got, expected in zip(direct.get_weights(), two_step.get_weights()):
        assert got.dtype == expected.dtype
        np.testing.assert_array_equal(got, expected)
    assert _layers_of(direct, keras.layers.BatchNormalization) == []
    x = _pixels(n=2, size=64, seed=7)
    np.testing.assert_array_equal(np.asarray(direct(x, training=False)), np.asarray(two_step(x, training=False)))


def test_archive_with_unreadable_weights_is_a_user_error(saved_run, tmp_path):
    run, _, _ = saved_run
    with zipfile.ZipFile(run / M.MODEL_FILENAME) as source, \
            zipfile.ZipFile(tmp_path / M.MODEL_FILENAME, "w") as broken:
        for name in source.namelist():
            broken.writestr(name, b"not hdf5" if name == "model.weights.h5" else source.read(name))
    with pytest.raises(ModelLoadError, match="could not load model"):
        load_inference_model(str(tmp_path))
    with pytest.raises(ModelLoadError, match="precision must be one of"):
        load_inference_model(str(run), "float64")


def test_inference_model_folds_only_a_conv_that_feeds_its_batchnorm_alone():
    pixels = keras.Input((8, 8, 3))
    shared = keras.layers.Conv2D(4, 3, padding="same", use_bias=False, name="shared")(pixels)
    kept = keras.layers.BatchNormalization(name="kept")(shared)  # its conv also feeds `skip`
    skip = keras.layers.ReLU(name="skip")(shared)
    own = keras.layers.Conv2D(4, 1, name="own")(keras.layers.Add()([kept, skip]))
    out = keras.layers.BatchNormalization(name="folded")(own)  # a model output: rewired to `own`
    model = keras.Model(pixels, [out, skip])
    _randomise_batchnorm(model)
    fast = inference_model(model)
    assert [layer.name for layer in _layers_of(fast, keras.layers.BatchNormalization)] == ["kept"]
    x = _pixels(n=2, size=8)
    for got, expected in zip(fast(x, training=False), model(x, training=False)):
        # Folding reorders float32 products: errors scale with the largest activation (~1e2 here),
        # so a near-zero output among large ones can move by a few 1e-5 (seen in CI).
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=2e-6 * float(np.abs(expected).max()))


def test_bfloat16_within_tolerance_and_softmax_float32(saved_run):
    run, full, _ = saved_run
    low = inference_model(M.load_model(str(run)), precision="bfloat16")
    x = _pixels(seed=2)
    probs = np.asarray(low(x))
    assert probs.dtype == np.float32
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(probs, np.asarray(full(x)), atol=0.05)


def test_temperature_softens_probabilities():
    hot = M.build_head(M.ModelSpec(num_classes=2, image_size=32, temperature=1.0))
    cold = M.build_head(M.ModelSpec(num_classes=2, image_size=32, temperature=4.0))
    cold.set_weights(hot.get_weights())
    features = np.random.default_rng(0).normal(size=(8, M.BACKBONE_FEATURES)).astype("float32") * 5
    assert np.asarray(cold(features)).max(axis=1).mean() < np.asarray(hot(features)).max(axis=1).mean()


def test_weights_file_gives_identical_backbone(tmp_path):
    source = keras.applications.ResNet50(include_top=False, weights=None, input_shape=(32, 32, 3), pooling="avg")
    weights_file = tmp_path / "resnet50_notop.weights.h5"
    source.save_weights(weights_file)
    extractor = M.build_feature_extractor(SPEC, weights=str(weights_file))
    x = _pixels(seed=3)
    expected = source(keras.applications.resnet50.preprocess_input(x.copy()), training=False)
    np.testing.assert_allclose(extractor(x), expected, atol=1e-5)


def test_missing_or_bad_weights_and_models_are_user_errors(tmp_path):
    with pytest.raises(ModelLoadError, match="weights file not found"):
        M.build_feature_extractor(SPEC, weights=str(tmp_path / "nope.h5"))
    with pytest.raises(ModelLoadError, match="no model at"):
        M.load_model(str(tmp_path))
    (tmp_path / M.MODEL_FILENAME).write_bytes(b"not a zip")
    with pytest.raises(ModelLoadError, match="could not load model"):
        M.load_model(str(tmp_path))


def test_lambda_layer_model_is_refused(tmp_path):
    inputs = keras.Input((4,))
    outputs = keras.layers.Lambda(lambda t: t * 2)(inputs)
    keras.Model(inputs, outputs).save(tmp_path / M.MODEL_FILENAME)
    with pytest.raises(ModelLoadError, match="Lambda layers are refused"):
        M.load_model(str(tmp_path))
    with pytest.raises(ModelLoadError, match="Lambda layers are refused"):
        load_inference_model(str(tmp_path))


def test_random_backbone_is_identical_across_processes(seeded_backbone):
    """Cached features stay valid only if every process builds the same seeded random backbone."""
    code = (
        "from catdog.model import build as M;"
        "print(M.weights_fingerprint(M.build_feature_extractor(M.ModelSpec(2, 32), None, seed=5)))"
    )
    procs = [subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]  # side by side: two fresh processes
    runs = [(proc, *proc.communicate(timeout=300)) for proc in procs]
    assert all(proc.returncode == 0 for proc, _, _ in runs), [err[-2000:] for _, _, err in runs]
    prints = [out.strip().splitlines()[-1] for _, out, _ in runs]
    here = M.weights_fingerprint(seeded_backbone)
    assert prints[0] == prints[1] == here


def test_random_backbone_ignores_global_random_state_used_by_other_threads(seeded_backbone):
    """jobs.train builds the backbone in a thread while Ray starts in the main thread and draws
    from Python's and numpy's global random state; the backbone (the cache key) must not move."""
    import random
    import threading
    import time

    spec = M.ModelSpec(2, 32)
    expected = M.weights_fingerprint(seeded_backbone)
    built = {}
    thread = threading.Thread(target=lambda: built.update(
        fingerprint=M.weights_fingerprint(M.build_feature_extractor(spec, None, seed=5))))
    thread.start()
    draws = 0
    while thread.is_alive():
        random.random()
        np.random.random()
        draws += 1
        time.sleep(0.0005)  # a draw every ~half millisecond; a loop without a pause starves the build of the GIL
    thread.join()
    assert draws > 100, draws  # the draws really did interleave with the build
    assert built["fingerprint"] == expected
    kernel = seeded_backbone.get_layer("resnet50").get_layer("conv1_conv").kernel
    limit = np.sqrt(6 / (7 * 7 * (3 + 64)))  # Glorot-uniform, Keras' default for Conv2D
    assert 0.9 * limit < float(np.abs(np.asarray(kernel)).max()) <= limit
    assert M.weights_fingerprint(M.build_feature_extractor(spec, None, seed=6)) != expected


def test_spec_validation():
    with pytest.raises(ValueError):
        M.ModelSpec(num_classes=1)
    with pytest.raises(ValueError):
        M.ModelSpec(num_classes=2, head="attention")
    assert M.ModelSpec(2, 180, head="flatten").feature_shape == (6, 6, 2048)
    assert json.loads(json.dumps(SPEC.to_dict()))["num_classes"] == 3


def test_tensorflow_imports_without_pyplot_which_stays_importable():
    """Keras imports matplotlib.pyplot when it can (~0.7 s in every process that loads a model);
    catdog hides it during TensorFlow's import and never needs it."""
    code = ("import sys; from catdog.model.tensorflow_setup import configure_tensorflow; configure_tensorflow(); import keras; "
            "assert 'matplotlib.pyplot' not in sys.modules, 'pyplot imported'; "
            "import matplotlib.pyplot; from catdog.analyse.plots import plot_confidence; print('ok')")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-2000:]
