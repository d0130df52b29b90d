"""jobs.train as safe about its output as scoring: an output inside or around --data/--val-data, a
root or the home folder is refused before anything is written, and --overwrite removes only a run's
own files, only in a folder that holds a run. Fast tests stop before Ray or TensorFlow start; one
slow test overwrites a real run."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from catdog.errors import OutputExistsError
from catdog.io.sample_data import generate_sample_dataset
from catdog.model.run_folder import RUN_FILES, RUN_MARKER, RunFolder
from catdog.train.config import TrainConfig
from support import job_lines, run_job_module

HISTORY = [{"epoch": 1, "loss": 1.0, "accuracy": 0.5, "val_loss": 1.1, "val_accuracy": 0.5, "epoch_time_s": 1.0}]
RUN_ID = "0123456789ab"
# What a run writes besides RUN_FILES: its marker, Ray Train's folder of the run, rank 0's event file.
RUN_EXTRAS = [RUN_MARKER, f"checkpoints/train-{RUN_ID}/checkpoint_000001/best_head.weights.h5",
              f"checkpoints/train-{RUN_ID}/worker_reports.json", f"checkpoints/train-{RUN_ID}/.validate_storage_marker",
              "tensorboard/events.out.tfevents.1700000000.host.123.0.v2"]
USER_FILES = ["notes.txt", "checkpoints/mine.txt", "checkpoints/my-experiment/state.json",
              "checkpoints/train-notes/keep.txt", "tensorboard/my-notes.md"]


@pytest.fixture
def no_ray(monkeypatch):
    """Fail a test that goes on to load the backbone or start Ray: every refusal comes before."""
    import catdog.cluster.session
    import catdog.train.run

    def refuse(*args, **kwargs):
        raise AssertionError("training went on to start Ray or TensorFlow")

    monkeypatch.setattr(catdog.cluster.session, "init_ray", refuse)
    monkeypatch.setattr(catdog.train.run, "_load_backbone", refuse)


def _snapshot(folder: Path) -> dict[str, bytes | None]:
    """Every entry under `folder`: file contents, None for folders."""
    return {str(p.relative_to(folder)): (p.read_bytes() if p.is_file() else None) for p in sorted(folder.rglob("*"))}


def _train(**kw):
    from catdog.train.run import train

    return train(TrainConfig(weights="none", image_size=32, **kw))


def _write(folder: Path, names: list[str], text: str = "x") -> None:
    for name in names:
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_text(text)


def _write_run(folder: Path) -> RunFolder:
    """A run folder as training leaves it (a stand-in model.keras), without training."""
    run = RunFolder(str(folder))
    run.write_marker({"run_id": RUN_ID})
    run.write_run_files(["cats", "dogs"], {"run_id": RUN_ID, "model_spec": {"num_classes": 2}}, {}, HISTORY)
    (folder / "model.keras").write_bytes(b"PK stand-in")
    _write(folder, RUN_EXTRAS[1:])
    return run


# ---- fast: outputs that overlap the data, roots, the home folder (no Ray, no TensorFlow) ----

def test_output_inside_data_is_refused_and_nothing_is_written(tmp_path, no_ray):
    data = generate_sample_dataset(tmp_path / "data", images_per_class=2)
    before = _snapshot(tmp_path)
    with pytest.raises(OutputExistsError, match="overlaps the input"):
        _train(data=str(data), output=str(data / "run"))
    assert _snapshot(tmp_path) == before  # no output folder, no class "run" in the data


@pytest.mark.parametrize("overwrite", [False, True])
def test_output_holding_data_is_refused_and_nothing_is_deleted(tmp_path, no_ray, overwrite):
    data = generate_sample_dataset(tmp_path / "work" / "data", images_per_class=2)
    _write(tmp_path / "work", ["model.keras", "checkpoints/x"])  # names --overwrite used to delete
    before = _snapshot(tmp_path)
    with pytest.raises(OutputExistsError, match="overlaps the input"):
        _train(data=str(data), output=str(tmp_path / "work"), overwrite=overwrite)
    assert _snapshot(tmp_path) == before


def test_output_equal_to_val_datas_parent_is_refused(tmp_path, no_ray):
    data = generate_sample_dataset(tmp_path / "train", images_per_class=2)
    val = generate_sample_dataset(tmp_path / "val" / "images", images_per_class=2)
    before = _snapshot(tmp_path)
    with pytest.raises(OutputExistsError, match=f"overlaps the input {val}"):
        _train(data=str(data), val_data=str(val), output=str(tmp_path / "val"), overwrite=True)
    assert _snapshot(tmp_path) == before


def test_file_uri_output_inside_data_is_refused(tmp_path, no_ray):
    data = generate_sample_dataset(tmp_path / "data", images_per_class=2)
    before = _snapshot(tmp_path)
    with pytest.raises(OutputExistsError, match="overlaps the input"):
        _train(data=f"file://{data}", output=f"file://{data}/run")
    with pytest.raises(OutputExistsError, match="overlaps the input"):  # spelled differently: still the same folder
        _train(data=str(data), output=f"file://{tmp_path}")
    assert _snapshot(tmp_path) == before


@pytest.mark.parametrize("output, inputs", [
    ("s3://bucket/data/run", ("s3://bucket/data", None)),
    ("s3://bucket/runs", ("s3://bucket/train", "s3://bucket/runs/val")),
    ("s3://bucket", ("s3://other/data", None)),
])
def test_object_store_outputs_that_overlap_an_input_or_are_a_bucket_are_refused(output, inputs):
    with pytest.raises(OutputExistsError):  # string checks only: no request reaches a server
        RunFolder(output).refuse_unsafe(*inputs)
    RunFolder("s3://bucket/runs/r1").refuse_unsafe("s3://bucket/train", "s3://bucket/val")


@pytest.mark.parametrize("where, message", [("/", "filesystem root"), ("~", "home folder")])
def test_root_and_home_outputs_are_refused(tmp_path, no_ray, where, message):
    data = generate_sample_dataset(tmp_path / "data", images_per_class=2)
    with pytest.raises(OutputExistsError, match=message):
        _train(data=str(data), output=os.path.expanduser(where))


def test_job_refuses_output_inside_data_with_exit_2(tmp_path, no_ray, capsys):
    data = generate_sample_dataset(tmp_path / "data", images_per_class=2)
    before = _snapshot(tmp_path)
    code = run_job_module("jobs.train", "--data", str(data), "--output", str(data / "run"), "--weights", "none")
    captured = capsys.readouterr()
    output = "\n".join(job_lines(captured.out) + job_lines(captured.err))
    assert code == 2, output
    assert "overlaps the input" in output and "Traceback" not in output
    assert _snapshot(tmp_path) == before


# ---- fast: --overwrite only where a run is, and only a run's files ----

def test_overwrite_of_a_folder_without_a_run_exits_2_and_deletes_nothing(tmp_path, no_ray, capsys):
    data = generate_sample_dataset(tmp_path / "data", images_per_class=2)
    folder = tmp_path / "mine"
    # A user's folder, some names a run uses among them (a config.json of another tool, no classes.json).
    _write(folder, ["model.keras", "metrics.json", "history.csv", "config.json", *USER_FILES,
                    "tensorboard/events.out.tfevents.1.other-tool.v2"])
    before = _snapshot(tmp_path)
    with pytest.raises(OutputExistsError, match="no catdog training run"):
        RunFolder(str(folder)).refuse_existing(overwrite=True)
    code = run_job_module("jobs.train", "--data", str(data), "--output", str(folder), "--weights", "none",
                          "--overwrite")
    captured = capsys.readouterr()
    output = "\n".join(job_lines(captured.out) + job_lines(captured.err))
    assert code == 2, output
    assert "no catdog training run" in output
    assert _snapshot(tmp_path) == before


def test_a_run_is_its_marker_or_a_finished_runs_config_and_classes(tmp_path):
    assert _write_run(tmp_path / "run").holds_run()
    crashed = tmp_path / "crashed"  # stopped in training: only the marker and Ray Train's folder
    _write(crashed, [RUN_MARKER, f"checkpoints/train-{RUN_ID}/worker_reports.json"])
    assert RunFolder(str(crashed)).refuse_existing(overwrite=True) is True
    older = tmp_path / "older"  # written before the marker existed
    _write(older, ["model.keras"])
    (older / "classes.json").write_text('["cats", "dogs"]')
    (older / "config.json").write_text(json.dumps({"model_spec": {"num_classes": 2}}))
    assert RunFolder(str(older)).holds_run()
    (older / "config.json").write_text('{"some": "other tool"}')
    assert not RunFolder(str(older)).holds_run()
    with pytest.raises(OutputExistsError, match="already holds a catdog run; pass --overwrite"):
        RunFolder(str(crashed)).refuse_existing(overwrite=False)


def test_overwrite_removes_the_runs_files_and_keeps_the_users(tmp_path):
    folder = tmp_path / "run"
    run = _write_run(folder)
    _write(folder, USER_FILES, "mine")
    assert run.refuse_existing(overwrite=True) is True
    assert run.delete_run_files() == len(RUN_FILES) + 1 + 1 + 1  # files, marker, event file, train-<id>/
    assert sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()) == sorted(USER_FILES)
    assert all((folder / name).read_text() == "mine" for name in USER_FILES)
    alone = _write_run(tmp_path / "alone")  # nothing but the run's: its sub-folders go too
    alone.delete_run_files()
    assert list((tmp_path / "alone").iterdir()) == []


def test_overwrite_deletes_nothing_before_ray_and_the_checks_on_it(tmp_path, no_ray):
    data = generate_sample_dataset(tmp_path / "data", images_per_class=2)
    _write_run(tmp_path / "run")
    before = _snapshot(tmp_path)
    with pytest.raises(AssertionError, match="start Ray"):
        _train(data=str(data), output=str(tmp_path / "run"), overwrite=True)
    assert _snapshot(tmp_path) == before


# ---- slow: a real run overwritten ----

@pytest.mark.slow
@pytest.mark.ray
def test_overwrite_of_a_trained_run_keeps_a_users_files(ray_cluster, tmp_path):
    data = generate_sample_dataset(tmp_path / "data", images_per_class=12)
    run = tmp_path / "run"
    settings = dict(data=str(data), output=str(run), epochs=2, patience=0, cache_dir=str(tmp_path / "cache"))
    first = _train(**settings).metrics["run_id"]
    assert json.loads((run / RUN_MARKER).read_text())["run_id"] == first
    assert [p.name for p in (run / "checkpoints").iterdir()] == [f"train-{first}"]
    _write(run, USER_FILES, "mine")
    second = _train(**settings, overwrite=True).metrics["run_id"]
    assert json.loads((run / RUN_MARKER).read_text())["run_id"] == second != first
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == sorted(
        ["mine.txt", "my-experiment", "train-notes", f"train-{second}"])
    assert len([p for p in (run / "tensorboard").iterdir() if p.name.startswith("events.out.tfevents.")]) == 1
    assert all((run / name).read_text() == "mine" for name in USER_FILES)
    assert all((run / name).is_file() for name in RUN_FILES)
