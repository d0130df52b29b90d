"""The feature cache never serves a stale embedding: a new decoder version, a file replaced under
the same name and a read error that has gone away are all embedded again, with real files
(random-init backbone, 32 px, 4-5 tiny BMPs, batches of 4). Up to one batch of files is embedded
in the driver; more go through the real Ray actor pool: both ways are checked here."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from PIL import Image

from catdog.io import imaging
from catdog.io.labelled import LabelledImages, list_labelled_images

IMAGE_SIZE = 32


@pytest.fixture(scope="module")
def extractor():
    """The folded extractor the training job computes with, and its weights fingerprint."""
    from catdog.model.build import ModelSpec, build_feature_extractor, weights_fingerprint
    from catdog.model.inference import inference_model

    spec = ModelSpec(num_classes=2, image_size=IMAGE_SIZE)
    built = build_feature_extractor(spec, None, seed=0)
    return spec, inference_model(built), weights_fingerprint(built)


def _write_bmp(path: Path, seed: int) -> None:
    """A 40x40 RGB BMP of random pixels: every such file has the same size, whatever its pixels."""
    pixels = np.random.default_rng(seed).integers(0, 256, (40, 40, 3), dtype=np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path, format="BMP")


def _dataset(root: Path) -> Path:
    for seed, name in enumerate(["cats/a.bmp", "cats/b.bmp", "dogs/c.bmp", "dogs/d.bmp"]):
        _write_bmp(root / name, seed)
    return root


def _embed(images: LabelledImages, extractor, cache: Path):
    """build_features on a fixed split: even-numbered files train, odd ones validation."""
    from catdog.train.features import build_features

    spec, model, fingerprint = extractor
    train = images.subset(range(0, len(images), 2))
    val = images.subset(range(1, len(images), 2))
    return build_features(train, val, spec.to_dict(), model, fingerprint, str(cache), batch_size=4)


def _by_path(features) -> dict[str, np.ndarray]:
    table = pa.concat_tables([features.train, features.val])
    vectors = table.column("features").to_numpy(zero_copy_only=False)
    return dict(zip(table.column("path").to_pylist(), (np.asarray(v) for v in vectors)))


def _expected(path: str, extractor) -> np.ndarray:
    """The extractor's own output for the file's pixels as they are now."""
    pixels = imaging.decode_image(Path(path).read_bytes(), IMAGE_SIZE)[0][None].astype(np.float32)
    return np.asarray(extractor[1](pixels, training=False)).reshape(-1)


def test_a_new_decoder_version_is_a_cache_miss(ray_cluster, extractor, tmp_path, monkeypatch):
    images = list_labelled_images(str(_dataset(tmp_path / "data")))
    first = _embed(images, extractor, tmp_path / "cache")
    assert first.computed == 4 and first.reused == 0
    again = _embed(images, extractor, tmp_path / "cache")
    assert again.reused == 4 and again.computed == 0 and again.location == first.location

    monkeypatch.setattr(imaging, "DECODER_VERSION", imaging.DECODER_VERSION + 1)
    bumped = _embed(images, extractor, tmp_path / "cache")

    assert bumped.reused == 0 and bumped.computed == 4
    assert bumped.location != first.location and f"decoder{imaging.DECODER_VERSION}" in bumped.location


def test_a_file_replaced_under_the_same_name_is_embedded_again(ray_cluster, extractor, tmp_path, caplog):
    root = _dataset(tmp_path / "data")
    images = list_labelled_images(str(root))
    with caplog.at_level("INFO", logger="catdog.train.features"):
        first = _by_path(_embed(images, extractor, tmp_path / "cache"))
    assert "Embedding 4 file(s) in the driver" in caplog.text  # one batch: no actor pool
    target = root / "cats" / "b.bmp"
    before = target.stat()
    _write_bmp(target, seed=99)  # new pixels, the very same byte count
    os.utime(target, ns=(before.st_atime_ns, before.st_mtime_ns + 10**9))
    assert target.stat().st_size == before.st_size  # only the mtime tells the two files apart

    second = _embed(list_labelled_images(str(root)), extractor, tmp_path / "cache")

    assert second.computed == 1 and second.reused == 3
    vectors = _by_path(second)
    np.testing.assert_allclose(vectors[str(target)], _expected(str(target), extractor), rtol=1e-4, atol=1e-5)
    assert not np.allclose(vectors[str(target)], first[str(target)], rtol=1e-3, atol=1e-4)
    for path in set(first) - {str(target)}:
        np.testing.assert_array_equal(vectors[path], first[path])


def test_a_read_error_is_retried_next_run_while_a_decode_error_stays_cached(ray_cluster, extractor, tmp_path,
                                                                            caplog):
    root = _dataset(tmp_path / "data")
    (root / "dogs" / "notes.bmp").write_text("not an image")  # deterministic: not_an_image
    images = list_labelled_images(str(root))
    target = root / "cats" / "b.bmp"
    aside = tmp_path / "b.bmp.moved"
    target.rename(aside)  # gone between listing and reading: FileNotFoundError, a read_error

    with caplog.at_level("INFO", logger="catdog.train.features"):
        first = _embed(images, extractor, tmp_path / "cache")
    assert "in the driver" not in caplog.text  # five files, batches of four: the actor pool

    errors = {s["path"]: imaging.error_kind(s["error"]) for s in first.skipped}
    assert errors == {str(target): "read_error", str(root / "dogs" / "notes.bmp"): "not_an_image"}
    aside.rename(target)  # back: same size and mtime, so the listing (the cache key) is unchanged
    assert list_labelled_images(str(root)) == images

    second = _embed(images, extractor, tmp_path / "cache")

    assert second.computed == 1 and second.reused == 4  # the unreadable file only; notes.bmp remembered
    assert [s["path"] for s in second.skipped] == [str(root / "dogs" / "notes.bmp")]
    got = _by_path(second)[str(target)]
    np.testing.assert_allclose(got, _expected(str(target), extractor), rtol=1e-4, atol=1e-5)
    third = _embed(images, extractor, tmp_path / "cache")
    assert third.computed == 0 and third.reused == 5  # and once embedded, it is cached
