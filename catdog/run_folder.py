"""The layout of a training run folder, shared by the trainer, the scorer and the evaluator.

No TensorFlow here: a scoring driver checks a model artifact without importing it.
"""

from __future__ import annotations

import hashlib

from catdog import storage

MODEL_FILENAME = "model.keras"  # full model: preprocessing + backbone + head
CLASSES_FILENAME = "classes.json"  # JSON list of class names in output order


def model_file(location: str) -> str:
    """The model file of a run folder, or the file itself when `location` names a .keras file."""
    return location if location.endswith(".keras") else storage.join(location, MODEL_FILENAME)


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
