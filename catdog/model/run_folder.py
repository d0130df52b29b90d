"""The training run folder: the one owner of a run's files, for the trainer, scorer and evaluator.

    model.keras    full model: preprocessing, backbone, head, fitted temperature (catdog.model.build.save_model)
    classes.json   JSON list of class names in the model's output order
    config.json    the run's full configuration, with "model_spec" and "weights"
    metrics.json   final and best metrics, validation report, calibration, data counts, cache use
    history.csv    one row per epoch: loss, accuracy, val_loss, val_accuracy, epoch_time_s
    curves.png     training vs validation accuracy and loss per epoch
    tensorboard/   rank 0's per-epoch scalars as TensorFlow event files (`tensorboard --logdir RUN/tensorboard`)
    checkpoints/   Ray Train's storage: checkpoints/train-<run id>/, with worker_reports.json
    catdog_train_run.json   written first (run id, version, start time): marks the folder as a run

A location is a run folder, or a `.keras` file whose folder holds classes.json; a local path or a
URI (catdog.io.storage). No TensorFlow here: a scoring driver checks a model (`RunFolder.describe`)
without importing it.

`--overwrite` replaces a run, never a folder: it goes on only where the folder holds a run (the
marker, or config.json with a model_spec beside classes.json: a finished run written before the
marker existed), and deletes only the names above: the run's files, Ray Train's train-<run id>/
folders in checkpoints/, TensorFlow's event files in tensorboard/. A user's files stay, wherever
they are. About 400 lines: the folder's reading, writing and clearing stay in one place.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
import posixpath
import re
import zipfile
from dataclasses import dataclass
from functools import cached_property
from typing import Sequence

import pyarrow.fs as pafs

from catdog.errors import ModelLoadError, OutputExistsError
from catdog.io import storage

logger = logging.getLogger(__name__)

MODEL_FILENAME = "model.keras"
CLASSES_FILENAME = "classes.json"
CONFIG_FILENAME = "config.json"
METRICS_FILENAME = "metrics.json"
HISTORY_FILENAME = "history.csv"
CURVES_FILENAME = "curves.png"
CHECKPOINTS_DIR = "checkpoints"  # Ray Train storage inside the run folder (head-only checkpoints)
TENSORBOARD_DIR = "tensorboard"  # event files, written by rank 0 (catdog.train.tensorboard.EpochScalars)
WORKER_LOG = "worker_reports.json"  # beside one Train run's checkpoints
RUN_FILES = (MODEL_FILENAME, CLASSES_FILENAME, CONFIG_FILENAME, METRICS_FILENAME, HISTORY_FILENAME, CURVES_FILENAME)
# Written before anything else of a run, so a run that crashed before its run files is a run too.
# Not scoring's `_catdog_run.json`: a training --overwrite must not take a predictions folder for a run.
RUN_MARKER = "catdog_train_run.json"
_TRAIN_RUN_FOLDER = re.compile(r"^train-[0-9a-f]+$")  # train_run_name's folders; run ids are hex (uuid4().hex[:12])
EVENT_FILE_PREFIX = "events.out.tfevents."  # how TensorFlow's summary writer names its event files
HISTORY_COLUMNS = ["epoch", "loss", "accuracy", "val_loss", "val_accuracy", "epoch_time_s"]
UNSAFE_LAYERS = ("Lambda",)  # layers Keras safe mode refuses: they carry Python bytecode


@dataclass(frozen=True)
class ModelInfo:
    """What the driver needs to know about a model before scoring with it."""

    location: str
    image_size: int
    class_names: tuple[str, ...]
    model_id: str
    feature_width: int | None = None  # channels of the backbone features the head takes (the embedding size)


class RunFolder:
    """A training run folder (or a `.keras` file and its folder), resolved once, on first use."""

    def __init__(self, location: str):
        self.location = location
        if location.endswith(".keras"):
            self.folder = location.rsplit("/", 1)[0] if "/" in location else "."
            self.model_file = location
        else:
            self.folder = location
            self.model_file = storage.join(location, MODEL_FILENAME)
        self.classes_file = self._file(CLASSES_FILENAME)

    def __repr__(self) -> str:
        return f"RunFolder({self.location!r})"

    @cached_property
    def _resolved(self) -> tuple[pafs.FileSystem, str]:
        return storage.resolve(self.folder)

    def _file(self, name: str) -> str:
        """The location of one of the run's files."""
        return storage.join(self.folder, name)

    def _exists(self, name: str) -> bool:
        fs, root = self._resolved
        return fs.get_file_info(posixpath.join(root, name)).type != pafs.FileType.NotFound

    # ---- the model ----

    def existing_model_file(self) -> str:
        """`model_file`, checked to exist.

        Raises:
            ModelLoadError: there is no model file there.
        """
        if not storage.exists(self.model_file):
            raise ModelLoadError(f"no model at {self.model_file} (expected a training run folder or a .keras file)")
        return self.model_file

    def model_id(self) -> str:
        """The artifact id of the model (`artifact_id` of its bytes), written into every prediction row."""
        return artifact_id(storage.read_bytes(self.model_file))

    def class_names(self) -> tuple[str, ...]:
        """Class names in the model's output order, from classes.json.

        Raises:
            ModelLoadError: classes.json is missing, unreadable, or not a list of 2+ distinct names.
        """
        path = self.classes_file
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

    def describe(self) -> ModelInfo:
        """Check the model without loading it: image size, class names, id. Layers Keras safe mode
        refuses are refused here already.

        Raises:
            ModelLoadError: missing file, not a Keras 3 archive, a Lambda layer, no square RGB input,
                or a missing/invalid classes.json.
        """
        path = self.existing_model_file()
        class_names = self.class_names()
        data = storage.read_bytes(path)
        config = saved_config(path, data)
        unsafe = sorted(set(_layer_classes(config)) & set(UNSAFE_LAYERS))
        if unsafe:
            raise ModelLoadError(f"could not load model {path}: it contains {', '.join(unsafe)} layers "
                                 "(Lambda layers are refused: catdog loads models in Keras safe mode)")
        info = ModelInfo(self.location, _input_size(config, path), class_names, artifact_id(data),
                         _feature_width(config))
        logger.info("Model %s: id %s, %dx%d px, classes %s", self.location, info.model_id, info.image_size,
                    info.image_size, list(class_names))
        return info

    def temperature(self) -> dict | None:
        """The temperature training fitted, with training's calibration summary; None without one."""
        run_metrics = self.read_metrics()
        calibration = run_metrics.get("calibration") if isinstance(run_metrics, dict) else None
        temperature = calibration.get("temperature") if isinstance(calibration, dict) else None
        if not isinstance(temperature, (int, float)) or temperature <= 0:
            return None
        return {"temperature": float(temperature), "training_calibration": calibration}

    # ---- training's files ----

    def refuse_unsafe(self, *inputs: str | None) -> None:
        """Refuse an output that is a root, the home folder, or overlaps one of `inputs` (None ones
        skipped); reads and writes nothing (see `storage.refuse_unsafe_output`).

        Raises:
            OutputExistsError: as above.
        """
        # a file:// output as its local path: storage.refuse_unsafe_output would take it for a bucket URI
        output = self.folder[len("file://"):] if self.folder.startswith("file://") else self.folder
        for location in inputs:
            if location is not None:
                storage.refuse_unsafe_output(output, location)

    def holds_run(self) -> bool:
        """True when the folder holds a training run: the marker, or a finished run's config.json
        (with a model_spec) beside classes.json, as runs wrote before the marker existed."""
        if self._is_file(RUN_MARKER):
            return True
        if not (self._is_file(CLASSES_FILENAME) and self._is_file(CONFIG_FILENAME)):
            return False
        try:
            config = storage.read_json(self._file(CONFIG_FILENAME))
        except (ValueError, OSError):
            return False
        return isinstance(config, dict) and "model_spec" in config

    def refuse_existing(self, overwrite: bool) -> bool:
        """Refuse a non-empty folder unless it holds a run and `overwrite`; True when an earlier
        run's files must go (`delete_run_files`). Reads only.

        Raises:
            OutputExistsError: the location is a file; or it holds entries and either no run
                (whatever `overwrite` says) or a run without `overwrite`.
        """
        fs, root = self._resolved
        info = fs.get_file_info(root)
        if info.type == pafs.FileType.File:
            raise OutputExistsError(f"--output {self.location} is a file, not a folder")
        if info.type == pafs.FileType.NotFound:
            return False
        children = fs.get_file_info(pafs.FileSelector(root, recursive=False))
        if not children:
            return False
        if not self.holds_run():
            raise OutputExistsError(
                f"--output {self.location} is not empty ({len(children)} entries) but holds no catdog training run "
                f"(no {RUN_MARKER}, nor a finished run's {CONFIG_FILENAME} and {CLASSES_FILENAME}); --overwrite "
                "replaces only a run's own files: give a new or empty folder")
        if not overwrite:
            raise OutputExistsError(f"--output {self.location} already holds a catdog run; pass --overwrite to replace "
                                    "its files (other files in the folder are kept)")
        return True

    def delete_run_files(self) -> int:
        """Remove an earlier run's own entries (--overwrite; the caller checked `holds_run`): its files
        and marker, Ray Train's train-<run id>/ folders in checkpoints/ and the event files in
        tensorboard/, then those two folders if nothing else is left in them. Returns the count removed."""
        fs, root = self._resolved
        files = [posixpath.join(root, name) for name in (*RUN_FILES, RUN_MARKER) if self._is_file(name)]
        files += [entry.path for entry in self._entries(TENSORBOARD_DIR) if entry.type == pafs.FileType.File
                  and posixpath.basename(entry.path).startswith(EVENT_FILE_PREFIX)]
        folders = [entry.path for entry in self._entries(CHECKPOINTS_DIR) if entry.type == pafs.FileType.Directory
                   and _TRAIN_RUN_FOLDER.match(posixpath.basename(entry.path))]
        for path in files:
            fs.delete_file(path)
        for path in folders:
            fs.delete_dir(path)  # all of it Ray Train's (and catdog's worker log) for that one run
        for name in (CHECKPOINTS_DIR, TENSORBOARD_DIR):
            path = posixpath.join(root, name)
            if fs.get_file_info(path).type == pafs.FileType.Directory and not self._entries(name):
                fs.delete_dir(path)
        logger.info("--overwrite: removed %d files and %d checkpoint folders of the earlier run in %s (other files "
                    "left alone)", len(files), len(folders), self.location)
        return len(files) + len(folders)

    def write_marker(self, info: dict) -> None:
        """Mark the folder as a run (run id, version, start), before anything else of the run is written."""
        storage.write_json(self._file(RUN_MARKER), info)

    def _is_file(self, name: str) -> bool:
        fs, root = self._resolved
        return fs.get_file_info(posixpath.join(root, name)).type == pafs.FileType.File

    def _entries(self, name: str) -> list[pafs.FileInfo]:
        """The entries directly in one of the run's sub-folders; none when it is missing."""
        fs, root = self._resolved
        path = posixpath.join(root, name)
        if fs.get_file_info(path).type != pafs.FileType.Directory:
            return []
        return fs.get_file_info(pafs.FileSelector(path, recursive=False, allow_not_found=True))

    def checkpoint_storage(self) -> str:
        """Ray Train's `storage_path`: checkpoints/, as a URI or an absolute local path."""
        location = self._file(CHECKPOINTS_DIR)
        return location if storage.is_uri(location) else posixpath.join(self._resolved[1], CHECKPOINTS_DIR)

    def checkpoints(self, run_name: str) -> str:
        """The checkpoints of one Train run (`run_name`, as given to Ray Train's RunConfig)."""
        return storage.join(self.folder, CHECKPOINTS_DIR, run_name)

    def tensorboard_dir(self) -> str:
        """Where rank 0 copies its TensorFlow event files after every epoch."""
        return self._file(TENSORBOARD_DIR)

    def copy_run_files(self, local_folder: str) -> list[str]:
        """Copy the run's files and event files (not its checkpoints) into a local folder, for
        an MLflow run's artifacts (catdog.tracking); returns the names copied."""
        fs, root = self._resolved
        names = [name for name in RUN_FILES if self._exists(name)]
        events = posixpath.join(root, TENSORBOARD_DIR)
        if fs.get_file_info(events).type == pafs.FileType.Directory:
            names += sorted(posixpath.join(TENSORBOARD_DIR, posixpath.relpath(info.path, events))
                            for info in fs.get_file_info(pafs.FileSelector(events, recursive=True))
                            if info.type == pafs.FileType.File)
        for name in names:
            storage.copy_to_local(self._file(name), posixpath.join(local_folder, name))
        return names

    def worker_log(self, run_name: str) -> str:
        """The worker reports of one Train run, beside its checkpoints (catdog.train.worker_log)."""
        return storage.join(self.folder, CHECKPOINTS_DIR, run_name, WORKER_LOG)

    def write_run_files(self, class_names: Sequence[str], config: dict, metrics: dict,
                        history: Sequence[dict]) -> None:
        """Write every run file but model.keras (see the module docstring)."""
        storage.write_json(self.classes_file, list(class_names))
        storage.write_json(self._file(CONFIG_FILENAME), config)
        storage.write_json(self._file(METRICS_FILENAME), metrics)
        storage.write_text(self._file(HISTORY_FILENAME), _history_csv(history))
        storage.write_bytes(self._file(CURVES_FILENAME), _curves_png(history))

    def read_metrics(self) -> dict | None:
        """metrics.json, or None when the folder has none (a bare .keras file and classes.json)."""
        if not self._exists(METRICS_FILENAME):
            return None
        return storage.read_json(self._file(METRICS_FILENAME))


# ---- a location's model, for catdog.model.build, catdog.model.inference and the scoring driver ----

def model_file(location: str) -> str:
    """The model file of a run folder, or the file itself when `location` names a .keras file."""
    return RunFolder(location).model_file


def existing_model_file(location: str) -> str:
    """`model_file(location)`, checked to exist (see `RunFolder.existing_model_file`)."""
    return RunFolder(location).existing_model_file()


def model_id(location: str) -> str:
    """The artifact id of a run folder's (or .keras file's) model."""
    return RunFolder(location).model_id()


def describe_model(location: str) -> ModelInfo:
    """`RunFolder(location).describe()`: the driver's check of a model, without TensorFlow."""
    return RunFolder(location).describe()


def train_run_name(run_id: str) -> str:
    """Ray Train's name of one catdog run: its folder in checkpoints/, all that --overwrite removes there."""
    return f"train-{run_id}"


def artifact_id(data: bytes) -> str:
    """A short hash of a model artifact's bytes, written into every prediction row."""
    return hashlib.sha256(data).hexdigest()[:16]


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


def _layer_classes(config: object):
    """Every `class_name` in a Keras config, nested models included."""
    if isinstance(config, dict):
        if isinstance(config.get("class_name"), str):
            yield config["class_name"]
        for value in config.values():
            yield from _layer_classes(value)
    elif isinstance(config, list):
        for item in config:
            yield from _layer_classes(item)


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


def _feature_width(config: dict) -> int | None:
    """Channels of the features the `head` sub-model takes (pooled vector or map); None if unknown."""
    for layer in config.get("config", {}).get("layers", []):
        if layer.get("config", {}).get("name") == "head":
            inputs = [inner.get("config", {}).get("batch_shape") for inner in layer["config"].get("layers", [])
                      if inner.get("class_name") == "InputLayer"]
            return int(inputs[0][-1]) if len(inputs) == 1 and inputs[0] and inputs[0][-1] else None
    return None


def _history_csv(history: Sequence[dict]) -> str:
    """The history rows as CSV text, columns in HISTORY_COLUMNS order."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=HISTORY_COLUMNS, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    writer.writerows(history)
    return buffer.getvalue()


def _curves_png(history: Sequence[dict]) -> bytes:
    """The tutorial's plot: training vs validation accuracy (left) and loss (right) per epoch."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    epochs = [row["epoch"] for row in history]
    figure = Figure(figsize=(10, 4), dpi=100)
    for axis, metric, title in zip(figure.subplots(1, 2), ("accuracy", "loss"), ("Accuracy", "Loss")):
        axis.plot(epochs, [row[metric] for row in history], marker="o", label=f"Training {metric}")
        axis.plot(epochs, [row[f"val_{metric}"] for row in history], marker="o", label=f"Validation {metric}")
        axis.set_title(f"Training and validation {metric}")
        axis.set_xlabel("epoch")
        axis.set_ylabel(title)
        axis.legend(loc="best")
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    return buffer.getvalue()
