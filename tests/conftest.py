"""Shared fixtures: one local Ray cluster per test session (which job subprocesses join), one S3
server, one trained run and its feature cache, generated image folders, real photos."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from catdog.process import quiet_environment
from support import REAL_PHOTOS, REPO, write_model_run

quiet_environment()


def pytest_configure(config):
    """In the main pytest process, before any test process starts its own session Ray: create
    Ray's auth token (~/.ray/auth_token) if token auth is on and there is none, so that two test
    processes (pytest-xdist, pyproject addopts) do not each write a different one."""
    if hasattr(config, "workerinput"):
        return  # a test process: the main process has done it
    from ray._private.authentication.authentication_token_setup import ensure_token_if_auth_enabled

    ensure_token_if_auth_enabled()


@pytest.fixture(scope="session")
def ray_cluster():
    """A real local Ray cluster (2 CPUs, like this machine and CI), shared by the whole session."""
    import ray

    from catdog.cluster.session import init_ray

    init_ray(num_cpus=int(os.environ.get("CATDOG_TEST_CPUS", "2")))
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def ray_job_env(ray_cluster) -> dict[str, str]:
    """Environment for a job subprocess that joins the session's Ray through RAY_ADDRESS, as a
    submitted job joins its cluster, instead of starting a Ray of its own.

    The session Ray listens on 127.0.0.1 only (catdog.cluster.session); the job keeps to loopback too
    (RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0, without which a driver advertises the machine's external
    address and never finds the raylet). The token is the one the session's start wrote to
    ~/.ray/auth_token."""
    address = ray_cluster.get_runtime_context().gcs_address
    assert address.startswith("127.0.0.1:"), address
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(RAY_ADDRESS=address, RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0", PYTHONPATH=str(REPO))
    return env


@pytest.fixture(scope="session")
def s3_server():
    """A local S3-compatible server (moto) on 127.0.0.1, one per test session."""
    pytest.importorskip("moto.server")
    from support.s3local import LocalS3Server

    server = LocalS3Server()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def s3(s3_server):
    """A fresh bucket on the session's S3 server, one per test module."""
    return s3_server.new_bucket()


@pytest.fixture
def s3_env(s3, monkeypatch):
    """This process reaches the module's bucket through the standard AWS variables, as jobs do."""
    from catdog.io import file_reads

    for key in [k for k in os.environ if k.startswith("AWS_")]:
        monkeypatch.delenv(key)
    for key, value in s3.env.items():
        monkeypatch.setenv(key, value)
    file_reads._filesystem_for.cache_clear()  # filesystems read the variables when created
    yield s3
    file_reads._filesystem_for.cache_clear()


@pytest.fixture(scope="session")
def sample_images(tmp_path_factory) -> Path:
    """A separable two-class folder of real JPEG/PNG files (cats/, dogs/), 40 images each."""
    from catdog.io.sample_data import generate_sample_dataset

    return generate_sample_dataset(tmp_path_factory.mktemp("sample"), images_per_class=40)


@pytest.fixture(scope="session")
def real_photos() -> Path:
    """The 500 Kaggle photos beside the project; tests using it skip when the folder is absent."""
    if not (REAL_PHOTOS / "cats").is_dir():
        pytest.skip(f"real photos not found at {REAL_PHOTOS}")
    return REAL_PHOTOS.resolve()  # the spelling the rows use (real paths), where ../shared is a link


@pytest.fixture(scope="session")
def tiny_model_run(tmp_path_factory) -> Path:
    """A 32-pixel two-class (cats, dogs) run folder for scoring tests."""
    return write_model_run(tmp_path_factory.mktemp("tiny-run"))


_started_multinode: list = []  # the session's multi-node cluster, once a test asked for it


@pytest.fixture(scope="session")
def multinode():
    """A real multi-node Ray cluster on 127.0.0.1, shared by the session (tests/support/multinode.py): a head
    that takes no tasks, like cluster.yaml's, and three 1-CPU worker nodes. Jobs under test run as
    subprocesses with `env=multinode.job_env()`; a test that removes nodes starts with
    `multinode.ensure_worker_nodes()` or ends with it, so the next test finds three again.

    Stopped after the last test of the collection that uses it (pytest_runtest_teardown below): its
    four nodes' Ray processes would otherwise keep polling through the rest of the session. (Under
    pytest-xdist a test process collects every test but runs only some, so there it may live on
    to that process's end.)"""
    from support.multinode import MultiNodeCluster

    with MultiNodeCluster(worker_nodes=3, cpus_per_node=1) as cluster:
        _started_multinode.append(cluster)
        yield cluster


def pytest_runtest_teardown(item, nextitem):
    if not _started_multinode or "multinode" not in getattr(item, "fixturenames", ()):
        return
    later = item.session.items[item.session.items.index(item) + 1:]
    if not any("multinode" in getattr(other, "fixturenames", ()) for other in later):
        _started_multinode.pop().stop()  # stop() is idempotent: the fixture's own exit finds it stopped


# ---- the session's trained run and its feature cache --------------------------------------------


@pytest.fixture(scope="session")
def feature_cache(tmp_path_factory) -> Path:
    """The session's feature cache: `trained_run` fills it; runs on `training_data` reuse it."""
    return tmp_path_factory.mktemp("feature-cache")


@pytest.fixture(scope="session")
def training_data(sample_images, tmp_path_factory) -> Path:
    """The 80 generated images plus two unreadable ones: a text file and a truncated JPEG. One dog
    is a cat photo: a mistake in the calibration fit half of `trained_run` (seed 123,
    validation 0.4), so its temperature has something to fit (a fit half without mistakes is
    left at T = 1)."""
    from catdog.io.labelled import split_fraction
    from catdog.train.calibration import fit_half

    root = tmp_path_factory.mktemp("data") / "images"
    shutil.copytree(sample_images, root)
    mislabelled = next(name for name in sorted(os.listdir(root / "dogs")) if name.endswith(".jpg")
                       and split_fraction(f"dogs/{name}", 123) < 0.4 and fit_half([f"dogs/{name}"], 123)[0])
    (root / "dogs" / mislabelled).write_bytes((root / "cats" / mislabelled.replace("dogs", "cats")).read_bytes())
    (root / "cats" / "notes.jpg").write_text("not an image")
    jpeg = (sample_images / "dogs" / "dogs_0001.jpg").read_bytes()
    (root / "dogs" / "nested").mkdir()
    (root / "dogs" / "nested" / "cut.jpg").write_bytes(jpeg[: len(jpeg) // 2])
    return root


@pytest.fixture(scope="session")
def trained_run(ray_cluster, training_data, feature_cache, tmp_path_factory):
    """The session's one trained run: 2 workers, cached features, random-init backbone, 32 px.

    Returns (TrainConfig, run folder, TrainResult). A validation fraction of 0.4 gives 37 readable
    validation images, enough for both calibration halves (catdog.train.calibration.MIN_ROWS_PER_HALF);
    the default 0.2 gives 19. It computes every embedding of `training_data` into `feature_cache`
    (tests/train/test_train.py checks that): use it before any other run on that data with that cache."""
    from catdog.train.config import TrainConfig
    from catdog.train.run import train

    output = tmp_path_factory.mktemp("runs") / "two-workers"
    config = TrainConfig(data=str(training_data), output=str(output), weights="none", image_size=32, epochs=6,
                         patience=3, num_workers=2, cache_dir=str(feature_cache), keep_checkpoints=2, seed=123,
                         val_fraction=0.4)
    return config, output, train(config)
