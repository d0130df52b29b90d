"""WorkerLoopConfig, the typed settings that cross the Ray Train boundary (no Ray, no TensorFlow)."""

from __future__ import annotations

import ast
import dataclasses
import pickle
import subprocess
import sys
from pathlib import Path

import pytest

import catdog.train
from catdog.train.config import TrainConfig
from catdog.train.loop_config import LOOP_KEY, WorkerLoopConfig

SPEC = {"num_classes": 2, "image_size": 64, "head": "gap", "hidden_units": 16, "dropout": 0.1, "temperature": 1.0}


class _Handoff:
    """Stands in for the FeatureHandoff actor handle: any picklable object travels in the field."""

    def __eq__(self, other) -> bool:
        return isinstance(other, _Handoff)


def _loop_config(**changes) -> WorkerLoopConfig:
    settings = dict(data="data", output="out", seed=7, epochs=4, batch_size=30, num_workers=4, learning_rate=0.01,
                    patience=2, weights="none", use_gpu=True)
    config = TrainConfig(**{**settings, **changes})
    return WorkerLoopConfig.from_train_config(config, SPEC, backbone_seed=0, backbone_fingerprint="abc123",
                                              tensorboard_dir="/runs/tb")


def test_built_from_a_train_config_it_holds_what_the_loop_needs():
    loop = _loop_config(mode="end-to-end", augment=True)
    assert dataclasses.asdict(loop) == {
        "model_spec": SPEC, "mode": "end-to-end", "weights": None, "seed": 7, "backbone_seed": 0,
        "backbone_fingerprint": "abc123", "epochs": 4, "learning_rate": 0.01, "patience": 2, "augment": True,
        "use_gpu": True, "per_worker_batch_size": 7, "tensorboard_dir": "/runs/tb", "feature_refs": None,
        "feature_handoff": None,
    }
    assert loop.end_to_end and not _loop_config().end_to_end
    assert _loop_config(weights="imagenet").weights == "imagenet"


def test_it_round_trips_through_pickle_inside_the_train_loop_config_dict():
    refs = {"train": ["ref0", "ref1"], "val": ["v0", "v1"], "val_paths": "paths"}
    for loop in (_loop_config().with_features(refs), _loop_config().with_features(handoff=_Handoff()),
                 _loop_config(mode="end-to-end")):
        wrapped = loop.as_train_loop_config()
        assert list(wrapped) == [LOOP_KEY]  # Ray Train's train_loop_config must be a dict
        unpickled = WorkerLoopConfig.from_train_loop_config(pickle.loads(pickle.dumps(wrapped)))
        assert unpickled == loop and unpickled is not loop


def test_it_is_frozen_and_a_copy_gets_the_features():
    loop = _loop_config()
    with pytest.raises(dataclasses.FrozenInstanceError):
        loop.epochs = 1  # type: ignore[misc]
    assert loop.with_features({"train": []}).feature_refs == {"train": []} and loop.feature_refs is None


@pytest.mark.parametrize("bad, message", [
    (lambda: _loop_config().as_train_loop_config(), "cached mode needs feature_refs"),
    (lambda: _loop_config().with_features({"train": []}, handoff=_Handoff()), "not both"),
    (lambda: _loop_config(mode="end-to-end").with_features({"train": []}), "end-to-end"),
    (lambda: dataclasses.replace(_loop_config(), mode="fast"), "mode must be one of"),
    (lambda: dataclasses.replace(_loop_config(), per_worker_batch_size=0), "at least 1"),
])
def test_settings_the_workers_could_not_run_with_are_refused_on_the_driver(bad, message):
    with pytest.raises(ValueError, match=message):
        bad()


@pytest.mark.parametrize("given", [{"model_spec": SPEC, "mode": "cached"}, {LOOP_KEY: {"mode": "cached"}}, None])
def test_a_worker_refuses_a_train_loop_config_that_is_not_a_wrapped_worker_loop_config(given):
    with pytest.raises(TypeError, match="WorkerLoopConfig"):
        WorkerLoopConfig.from_train_loop_config(given)


def test_every_setting_the_worker_loop_reads_is_a_field():
    """`config.<name>` in the loop's modules: a field or property of WorkerLoopConfig, never a dict key."""
    folder = Path(catdog.train.__file__).parent
    known = {field.name for field in dataclasses.fields(WorkerLoopConfig)} | {"end_to_end"}
    read = set()
    for module in ("loop.py", "worker_steps.py"):
        tree = ast.parse((folder / module).read_text())
        read |= {node.attr for node in ast.walk(tree) if isinstance(node, ast.Attribute)
                 and isinstance(node.value, ast.Name) and node.value.id == "config"}
        assert not [node for node in ast.walk(tree) if isinstance(node, ast.Subscript)
                    and isinstance(node.value, ast.Name) and node.value.id == "config"], module
    assert read and read <= known, read - known
    unused = known - read - {"mode"}  # read through end_to_end
    assert not unused, f"fields the loop never reads: {unused}"


def test_the_modules_the_train_controller_unpickles_load_no_tensorflow():
    """The controller unpickles the config (catdog.train.backend keeps TensorFlow out of it)."""
    code = ("import sys, catdog.train.loop_config, catdog.train.loop, catdog.train.fit; "
            "print(sorted(m for m in ('tensorflow', 'keras') if m in sys.modules))")
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert loaded.strip() == "[]"
