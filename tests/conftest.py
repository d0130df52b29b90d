"""Shared fixtures: one local Ray cluster per test session, generated image folders, real photos."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from catdog.process_env import quiet_environment

quiet_environment()

REAL_PHOTOS = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "catdog-dev"


@pytest.fixture(scope="session")
def ray_cluster():
    """A real local Ray cluster (2 CPUs, like this machine and CI), shared by the whole session."""
    import ray

    from catdog.ray_session import init_ray

    init_ray(num_cpus=int(os.environ.get("CATDOG_TEST_CPUS", "2")))
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def s3():
    """A local S3-compatible server (moto) on 127.0.0.1, one per test module."""
    pytest.importorskip("moto.server")
    from s3local import LocalS3

    server = LocalS3()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def sample_images(tmp_path_factory) -> Path:
    """A separable two-class folder of real JPEG/PNG files (cats/, dogs/), 40 images each."""
    from catdog.sample_data import generate_sample_dataset

    return generate_sample_dataset(tmp_path_factory.mktemp("sample"), images_per_class=40)


@pytest.fixture(scope="session")
def real_photos() -> Path:
    """The 500 Kaggle photos beside the project; tests using it skip when the folder is absent."""
    if not (REAL_PHOTOS / "cats").is_dir():
        pytest.skip(f"real photos not found at {REAL_PHOTOS}")
    return REAL_PHOTOS


def write_model_run(run: Path, image_size: int = 32, classes: tuple[str, ...] = ("cats", "dogs"), seed: int = 0) -> Path:
    """A run folder as training writes it (model.keras, classes.json, config.json), with a randomly
    initialised (seeded) backbone and head: no download, a few seconds to build."""
    import json

    from catdog.model import ModelSpec, build_feature_extractor, build_head, build_model, save_model

    import keras  # after catdog.model, which imports TensorFlow quietly

    spec = ModelSpec(num_classes=len(classes), image_size=image_size)
    extractor = build_feature_extractor(spec, None, seed=seed)
    keras.utils.set_random_seed(seed)
    save_model(build_model(extractor, build_head(spec)), str(run / "model.keras"))
    (run / "classes.json").write_text(json.dumps(list(classes)))
    (run / "config.json").write_text(json.dumps({"model_spec": spec.to_dict()}))
    return run


@pytest.fixture(scope="session")
def tiny_model_run(tmp_path_factory) -> Path:
    """A 32-pixel two-class (cats, dogs) run folder for scoring tests."""
    return write_model_run(tmp_path_factory.mktemp("tiny-run"))


@pytest.fixture(scope="session")
def multinode():
    """A real multi-node Ray cluster on 127.0.0.1, shared by the session (tests/multinode.py): a head
    that takes no tasks, like cluster.yaml's, and three 1-CPU worker nodes. Jobs under test run as
    subprocesses with `env=multinode.job_env()`; a test that removes nodes starts with
    `multinode.ensure_worker_nodes()` or ends with it, so the next test finds three again."""
    from multinode import MultiNodeCluster

    with MultiNodeCluster(worker_nodes=3, cpus_per_node=1) as cluster:
        yield cluster
