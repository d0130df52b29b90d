"""Feature cache files: folder keys, robust reading, and embeddings from the real Ray actor pool
(the cache in a whole training run is tested in test_train.py)."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from catdog.train.features import _read_cache, _write_part, cache_folder


def _part(paths: list[str], width: int = 4) -> pa.Table:
    features = np.arange(len(paths) * width, dtype=np.float32)
    return pa.table({
        "path": paths,
        "file_size": pa.array([10] * len(paths), pa.int64()),
        "mtime_ns": pa.array([20] * len(paths), pa.int64()),
        "features": pa.FixedSizeListArray.from_arrays(pa.array(features), width),
        "error": pa.array([None] * len(paths), pa.string()),
    })


def test_cache_folder_names_everything_that_changes_an_embedding(tmp_path, monkeypatch):
    from catdog.io import imaging
    from catdog.train.features import EXTRACTOR_VERSION

    base = cache_folder(str(tmp_path), "abc123", 180, "gap")
    assert base.endswith(f"abc123-180px-pooled-float32-decoder{imaging.DECODER_VERSION}-{EXTRACTOR_VERSION}")
    others = {cache_folder(str(tmp_path), "def456", 180, "gap"), cache_folder(str(tmp_path), "abc123", 64, "gap"),
              cache_folder(str(tmp_path), "abc123", 180, "flatten"),
              cache_folder(str(tmp_path), "abc123", 180, "gap", "bfloat16")}
    monkeypatch.setattr(imaging, "DECODER_VERSION", imaging.DECODER_VERSION + 1)
    others.add(cache_folder(str(tmp_path), "abc123", 180, "gap"))
    monkeypatch.setattr("catdog.train.features.EXTRACTOR_VERSION", EXTRACTOR_VERSION + "x")
    others.add(cache_folder(str(tmp_path), "abc123", 180, "gap"))
    assert base not in others and len(others) == 6


def test_only_errors_that_would_recur_are_reusable():
    from catdog.train.features import _cacheable, _reusable_rows

    rows = pa.table({
        "path": ["/d/ok.jpg", "/d/text.jpg", "/d/cut.jpg", "/d/locked.jpg", "/d/moved.jpg", "/d/old.jpg"],
        "file_size": pa.array([10] * 6, pa.int64()),
        "mtime_ns": pa.array([20] * 6, pa.int64()),
        "error": [None, "not_an_image: cannot identify", "truncated: image file is truncated",
                  "read_error: PermissionError: denied", "read_error: FileNotFoundError: gone", None],
    })
    listed = {path: (10, 20) for path in rows.column("path").to_pylist()} | {"/d/old.jpg": (10, 21)}
    assert sorted(_reusable_rows(rows, listed)) == ["/d/cut.jpg", "/d/ok.jpg", "/d/text.jpg"]
    assert not _cacheable("some_future_kind: unknown") and _cacheable("too_large: 900 MP")


def test_reading_skips_staging_and_broken_parts_and_keeps_wanted_rows(tmp_path):
    folder = str(tmp_path / "fp-32px-pooled")
    final = _write_part(folder, _part(["/d/a.jpg", "/d/b.jpg", "/d/c.jpg"]), "run1")
    assert final.endswith("part-run1.parquet") and not list((tmp_path / "fp-32px-pooled" / "_staging").iterdir())
    (tmp_path / "fp-32px-pooled" / "_staging" / "part-half.parquet").write_bytes(b"PAR1 an interrupted write")
    pq.write_table(_part(["/d/z.jpg"]), tmp_path / "fp-32px-pooled" / "_staging" / "part-unmoved.parquet")
    (tmp_path / "fp-32px-pooled" / "part-truncated.parquet").write_bytes(b"PAR1 killed mid-write, no footer")

    rows = _read_cache(folder, ["/d/a.jpg", "/d/c.jpg", "/d/z.jpg", "/d/new.jpg"])

    assert sorted(rows.column("path").to_pylist()) == ["/d/a.jpg", "/d/c.jpg"]
    assert rows.column("features").type.list_size == 4
    assert _read_cache(str(tmp_path / "absent"), ["/d/a.jpg"]) is None


def test_embeddings_from_the_concurrent_actor_pool_equal_the_extractor_in_process(ray_cluster, sample_images, tmp_path):
    """The embedding actor runs two batches at once on CPU (catdog.cluster.actor_pool.model_actor_pool): every
    file's features must still be the extractor's own output for that file's pixels."""
    import tensorflow as tf

    from catdog.io.imaging import decode_image
    from catdog.io.labelled import list_labelled_images, split_train_val
    from catdog.model.build import ModelSpec, build_feature_extractor, weights_fingerprint
    from catdog.model.inference import inference_model
    from catdog.train.features import build_features

    spec = ModelSpec(num_classes=2, image_size=32)
    extractor = inference_model(build_feature_extractor(spec, None, seed=0))
    train, val = split_train_val(list_labelled_images(str(sample_images)), 0.25, seed=1)
    features = build_features(train, val, spec.to_dict(), extractor, weights_fingerprint(extractor),
                              str(tmp_path / "cache"), batch_size=4)
    assert features.computed == len(train.paths) + len(val.paths) and not features.skipped

    table = pa.concat_tables([features.train, features.val])
    paths = table.column("path").to_pylist()
    assert sorted(paths) == sorted(train.paths + val.paths)
    pixels = np.stack([decode_image(open(p, "rb").read(), 32)[0] for p in paths]).astype(np.float32)
    expected = np.asarray(tf.function(lambda x: extractor(x, training=False))(pixels)).reshape(len(paths), -1)
    got = np.stack(table.column("features").to_numpy(zero_copy_only=False))
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5)
