"""catdog.model.run_folder: the training run folder's files, without Ray or TensorFlow."""

from __future__ import annotations

import json

import numpy as np
import pytest

from catdog.analyse.metrics import label_scores
from catdog.errors import OutputExistsError
from catdog.model.run_folder import RUN_FILES, RunFolder

HISTORY = [{"epoch": e, "loss": 1.0 / e, "accuracy": 0.5 + e / 10, "val_loss": 1.1 / e, "val_accuracy": 0.5 + e / 20,
            "epoch_time_s": 2.0, "not_a_column": "dropped"} for e in (1, 2)]


def test_run_files_are_written_and_read_back(tmp_path):
    run = RunFolder(str(tmp_path / "run"))
    metrics = {"calibration": {"temperature": 1.5, "fitted": True}}
    run.write_run_files(["cats", "dogs"], {"seed": 1}, metrics, HISTORY)
    written = sorted(p.name for p in (tmp_path / "run").iterdir())
    assert written == sorted(name for name in RUN_FILES if name != "model.keras")
    assert json.loads((tmp_path / "run" / "classes.json").read_text()) == ["cats", "dogs"]
    assert (tmp_path / "run" / "history.csv").read_text().splitlines()[0] == \
        "epoch,loss,accuracy,val_loss,val_accuracy,epoch_time_s"
    assert (tmp_path / "run" / "curves.png").read_bytes()[:4] == b"\x89PNG"
    assert run.read_metrics() == metrics and run.class_names() == ("cats", "dogs")
    assert run.temperature() == {"temperature": 1.5, "training_calibration": metrics["calibration"]}
    beside = RunFolder(str(tmp_path / "run" / "exported.keras"))  # a .keras file: its folder's files
    assert beside.model_file.endswith("exported.keras") and beside.class_names() == ("cats", "dogs")
    assert RunFolder(str(tmp_path / "bare")).temperature() is None


def test_overwrite_removes_only_the_run_files_and_checkpoints(tmp_path):
    folder = tmp_path / "run"
    run = RunFolder(str(folder))
    assert run.refuse_existing(overwrite=False) is False  # missing: nothing to replace
    folder.mkdir()
    assert run.refuse_existing(overwrite=False) is False  # empty
    for name in ("catdog_train_run.json", "model.keras", "metrics.json", "notes.txt", "checkpoints/train-1/state.json"):
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_text("x")
    with pytest.raises(OutputExistsError, match="--overwrite"):
        run.refuse_existing(overwrite=False)
    assert run.refuse_existing(overwrite=True) is True
    run.delete_run_files()
    assert sorted(p.name for p in folder.iterdir()) == ["notes.txt"]
    assert run.checkpoint_storage() == str(folder.resolve() / "checkpoints")
    assert run.worker_log("train-1") == str(folder / "checkpoints" / "train-1" / "worker_reports.json")
    (tmp_path / "file").write_text("x")
    with pytest.raises(OutputExistsError, match="is a file"):
        RunFolder(str(tmp_path / "file")).refuse_existing(overwrite=True)


def test_validation_report_of_hard_predictions():
    scores = label_scores(np.array([0, 0, 1, 1]), np.array([0, 1, 1, 1]), ["cats", "dogs"])
    assert scores["accuracy"] == 0.75 and scores["confusion_matrix"] == [[1, 1], [0, 2]]
    assert scores["per_class"]["cats"] == {"precision": 1.0, "recall": 0.5, "f1": pytest.approx(2 / 3), "support": 2}
    assert scores["per_class"]["dogs"]["precision"] == pytest.approx(2 / 3)
