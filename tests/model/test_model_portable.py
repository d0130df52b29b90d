"""A run folder's model.keras is plain Keras: it loads in safe mode in a Python that never imports catdog."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest

from support import write_model_run

IMAGE_SIZE = 64
PHOTOS_PER_CLASS = 2

# What a user's own code or serving stack does: plain Keras, no catdog on the path or imported.
FOREIGN_LOAD = """
import sys
import keras
import numpy as np
model = keras.saving.load_model(sys.argv[1], safe_mode=True)
probs = model.predict(np.load(sys.argv[2]), verbose=0)
leaked = sorted(name for name in sys.modules if name.split(".")[0] == "catdog")
assert not leaked, f"catdog was imported: {leaked}"
np.save(sys.argv[3], probs)
"""


@pytest.fixture(scope="module")
def portable_run(tmp_path_factory) -> Path:
    return write_model_run(tmp_path_factory.mktemp("portable-run"), image_size=IMAGE_SIZE, seed=4)


def _photos(real_photos: Path) -> list[Path]:
    return [path for kind in ("cats", "dogs") for path in sorted((real_photos / kind).glob("*.jpg"))[:PHOTOS_PER_CLASS]]


def test_saved_model_holds_only_keras_built_in_objects(portable_run):
    with zipfile.ZipFile(portable_run / "model.keras") as archive:
        config = json.loads(archive.read("config.json"))
    modules, registered = set(), set()

    def visit(item: object) -> None:
        if isinstance(item, dict):
            if "module" in item and "class_name" in item:
                modules.add(item["module"])
                registered.add(item.get("registered_name"))
            for value in item.values():
                visit(value)
        elif isinstance(item, list):
            for value in item:
                visit(value)

    visit(config)
    assert modules and all(module is None or module.split(".")[0] == "keras" for module in modules), modules
    assert not any(name and ">" in name for name in registered), registered  # "package>Class": a custom class


def test_model_loads_with_plain_keras_in_safe_mode_and_predicts_like_catdog(portable_run, real_photos, tmp_path):
    from catdog.io import imaging
    from catdog.score.predictor import predict_image

    photos = _photos(real_photos)
    pixels = np.stack([imaging.decode_image(photo.read_bytes(), IMAGE_SIZE)[0] for photo in photos])
    np.save(tmp_path / "pixels.npy", pixels)  # uint8, as catdog decodes them
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    # The fresh process loads Keras while catdog predicts here.
    done = subprocess.Popen(
        [sys.executable, "-I", "-c", FOREIGN_LOAD, str(portable_run / "model.keras"), "pixels.npy", "probs.npy"],
        cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        catdog = np.array([[predict_image(str(portable_run), str(photo))["probabilities"][name]
                            for name in ("cats", "dogs")] for photo in photos])
        _, stderr = done.communicate(timeout=300)
    finally:
        if done.poll() is None:
            done.kill()
            done.wait()
    assert done.returncode == 0, stderr[-3000:]

    foreign = np.load(tmp_path / "probs.npy")
    assert foreign.shape == catdog.shape == (len(photos), 2)
    assert np.ptp(catdog[:, 0]) > 1e-3  # the photos give different answers: the comparison can tell them apart
    np.testing.assert_allclose(foreign, catdog, atol=1e-5)
