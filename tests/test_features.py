"""Feature cache files: folder keys and robust reading (no Ray; the Ray path is in test_train.py)."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from catdog.features import _read_cache, _write_part, cache_folder


def _part(paths: list[str], width: int = 4) -> pa.Table:
    features = np.arange(len(paths) * width, dtype=np.float32)
    return pa.table({
        "path": paths,
        "file_size": pa.array([10] * len(paths), pa.int64()),
        "mtime_ns": pa.array([20] * len(paths), pa.int64()),
        "features": pa.FixedSizeListArray.from_arrays(pa.array(features), width),
        "error": pa.array([None] * len(paths), pa.string()),
    })


def test_cache_folder_names_the_backbone_size_and_feature_kind(tmp_path):
    base = cache_folder(str(tmp_path), "abc123", 180, "gap")
    assert base.endswith("abc123-180px-pooled")
    others = {cache_folder(str(tmp_path), "def456", 180, "gap"), cache_folder(str(tmp_path), "abc123", 64, "gap"),
              cache_folder(str(tmp_path), "abc123", 180, "flatten")}
    assert base not in others and len(others) == 3


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
