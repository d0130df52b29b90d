"""Shared fixtures: one local Ray cluster per test session, generated image folders, real photos."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from catdog.runtime import quiet_environment

quiet_environment()

REAL_PHOTOS = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "catdog-dev"


@pytest.fixture(scope="session")
def ray_cluster():
    """A real local Ray cluster (2 CPUs, like this machine and CI), shared by the whole session."""
    import ray

    from catdog.runtime import init_ray

    init_ray(num_cpus=int(os.environ.get("CATDOG_TEST_CPUS", "2")))
    yield ray
    ray.shutdown()


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
