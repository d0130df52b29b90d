"""TensorBoard: rank 0's event files in RUN/tensorboard/, read back with TensorFlow's own reader.

The tensorboard package is not installed (TensorFlow 2.21 does not depend on it), so the events
are read with `tf.compat.v1.train.summary_iterator`, as TensorBoard's loader reads them: each
value a float32 scalar tensor tagged for the scalars plugin.
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest

from catdog.model.run_folder import RunFolder
from catdog.train.tensorboard import EPOCH_SCALARS


def read_scalars(folder: Path) -> dict[str, dict[int, float]]:
    """{tag: {step: value}} of every scalar in the event files of `folder`."""
    import tensorflow as tf

    scalars: dict[str, dict[int, float]] = {}
    for path in sorted(folder.iterdir()):
        for event in tf.compat.v1.train.summary_iterator(str(path)):
            for value in event.summary.value:
                assert value.metadata.plugin_data.plugin_name == "scalars", value.tag
                assert event.step not in scalars.get(value.tag, {}), (value.tag, event.step)  # once per epoch
                scalars.setdefault(value.tag, {})[event.step] = float(tf.make_ndarray(value.tensor))
    return scalars


def test_event_files_are_replaced_with_the_run_and_logged_with_it(tmp_path):
    folder = tmp_path / "run"
    (folder / "tensorboard").mkdir(parents=True)
    for name in ("classes.json", "tensorboard/events.out.tfevents.1.host.2.0.v2", "checkpoints/train-1/state.json"):
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_text("x")
    run = RunFolder(str(folder))
    assert run.tensorboard_dir() == str(folder / "tensorboard")
    staged = tmp_path / "staged"
    assert run.copy_run_files(str(staged)) == ["classes.json", "tensorboard/events.out.tfevents.1.host.2.0.v2"]
    assert (staged / "tensorboard" / "events.out.tfevents.1.host.2.0.v2").read_text() == "x"
    run.delete_run_files()
    assert list(folder.iterdir()) == []


@pytest.mark.slow
@pytest.mark.ray
def test_rank_0_writes_every_scalar_of_every_epoch(ray_cluster, sample_images, tmp_path):
    from catdog.train.config import TrainConfig
    from catdog.train.run import train

    run = tmp_path / "run"
    train(TrainConfig(data=str(sample_images), output=str(run), weights="none", image_size=32, epochs=3, patience=0,
                      num_workers=2, learning_rate=2e-3, cache_dir=str(tmp_path / "cache")))
    events = sorted((run / "tensorboard").iterdir())
    assert len(events) == 1 and events[0].name.startswith("events.out.tfevents."), events  # rank 0 alone
    scalars = read_scalars(run / "tensorboard")
    assert sorted(scalars) == sorted(EPOCH_SCALARS)
    history = list(csv.DictReader((run / "history.csv").open()))
    assert [int(row["epoch"]) for row in history] == [1, 2, 3]
    for name in EPOCH_SCALARS:
        expected = {int(row["epoch"]): 2e-3 if name == "learning_rate" else float(row[name]) for row in history}
        assert sorted(scalars[name]) == sorted(expected), name  # step = epoch
        for step, value in expected.items():  # written as float32, like tf.summary.scalar
            assert scalars[name][step] == float(np.float32(value)), (name, step)
