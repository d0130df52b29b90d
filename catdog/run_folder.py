"""The layout of a training run folder, shared by the trainer, the scorer and the evaluator.

No TensorFlow here: a scoring driver checks a model artifact without importing it.
"""

from __future__ import annotations

import hashlib
import io
import json
import zipfile

from catdog import storage
from catdog.errors import ModelLoadError

MODEL_FILENAME = "model.keras"  # full model: preprocessing + backbone + head
CLASSES_FILENAME = "classes.json"  # JSON list of class names in output order


def model_file(location: str) -> str:
    """The model file of a run folder, or the file itself when `location` names a .keras file."""
    return location if location.endswith(".keras") else storage.join(location, MODEL_FILENAME)


def existing_model_file(location: str) -> str:
    """`model_file(location)`, checked to exist.

    Raises:
        ModelLoadError: there is no model file there.
    """
    path = model_file(location)
    if not storage.exists(path):
        raise ModelLoadError(f"no model at {path} (expected a training run folder or a .keras file)")
    return path


def read_archive_member(path: str, data: bytes, name: str) -> bytes:
    """One file (config.json, model.weights.h5) of a Keras 3 `.keras` archive, from its bytes.

    Raises:
        ModelLoadError: `data` is not such an archive.
    """
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as archive:
            return archive.read(name)
    except (zipfile.BadZipFile, KeyError) as exc:
        raise ModelLoadError(f"could not load model {path}: not a Keras 3 .keras archive ({exc})") from exc


def saved_config(path: str, data: bytes) -> dict:
    """The saved model's config (config.json) of a `.keras` archive's bytes.

    Raises:
        ModelLoadError: `data` is not a Keras 3 archive.
    """
    raw = read_archive_member(path, data, "config.json")
    try:
        return json.loads(raw)
    except ValueError as exc:
        raise ModelLoadError(f"could not load model {path}: not a Keras 3 .keras archive ({exc})") from exc


def classes_file(location: str) -> str:
    """classes.json of a run folder, or beside a .keras file."""
    if location.endswith(".keras"):
        parent = location.rsplit("/", 1)[0] if "/" in location else "."
        return storage.join(parent, CLASSES_FILENAME)
    return storage.join(location, CLASSES_FILENAME)


def artifact_id(data: bytes) -> str:
    """A short hash of a model artifact's bytes, written into every prediction row."""
    return hashlib.sha256(data).hexdigest()[:16]


def model_id(location: str) -> str:
    """The artifact id of a run folder's (or .keras file's) model."""
    return artifact_id(storage.read_bytes(model_file(location)))
