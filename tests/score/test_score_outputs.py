"""Optional outputs users ask for (issue 17): --top-k and --embeddings, written by a real scoring
run and read back by pandas, pyarrow and DuckDB with the documented types."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from catdog.errors import CatdogError
from catdog.io.sample_data import generate_sample_dataset
from catdog.score.config import ScoreConfig
from catdog.score.predictions_folder import PredictionsFolder, predictions_schema

CLASSES = ("ants", "bees", "cats")


@pytest.fixture(scope="module")
def three_class_run(tmp_path_factory):
    from support import write_model_run

    return write_model_run(tmp_path_factory.mktemp("three"), classes=CLASSES)


def test_schema_declares_fixed_size_top_k_and_embedding_columns():
    schema = predictions_schema(CLASSES, top_k=2, embedding_width=2048)
    assert schema.field("top_k_labels").type == pa.list_(pa.string(), 2)
    assert schema.field("top_k_probs").type == pa.list_(pa.float32(), 2)
    assert schema.field("embedding").type == pa.list_(pa.float32(), 2048)
    assert "embedding" not in predictions_schema(CLASSES).names


def test_top_k_beyond_the_class_count_is_refused(three_class_run):
    from catdog.model.run_folder import RunFolder

    info = RunFolder(str(three_class_run)).describe()
    assert info.feature_width == 2048
    with pytest.raises(CatdogError, match="exceeds"):
        ScoreConfig("m", "i", "o", top_k=4).output_columns(info)


@pytest.mark.slow
def test_top_k_and_embeddings_read_back_by_pandas_pyarrow_and_duckdb(ray_cluster, three_class_run, tmp_path):
    import duckdb
    import pandas as pd

    from catdog.score.run import score

    photos = generate_sample_dataset(tmp_path / "photos", classes=CLASSES, images_per_class=4)
    (photos / "ants" / "broken.jpg").write_bytes(b"nope")
    out = tmp_path / "preds"
    score(ScoreConfig(model=str(three_class_run), input=str(photos), output=str(out), batch_size=4, top_k=2,
                      embeddings=True))
    table = PredictionsFolder(str(out)).read()
    assert table.num_rows == 13
    rows = {row["path"]: row for row in table.to_pylist()}
    broken = rows.pop(str(photos / "ants" / "broken.jpg"))
    assert broken["top_k_labels"] is None and broken["top_k_probs"] is None and broken["embedding"] is None
    for row in rows.values():
        probs = {name: row[f"prob_{name}"] for name in CLASSES}
        best = sorted(CLASSES, key=lambda name: -probs[name])[:2]
        assert row["top_k_labels"] == best and row["top_k_labels"][0] == row["label"]
        assert row["top_k_probs"] == pytest.approx([probs[name] for name in best])
        assert row["top_k_probs"][0] == row["confidence"]
        assert len(row["embedding"]) == 2048 and np.isfinite(row["embedding"]).all()
    embeddings = np.array([row["embedding"] for row in rows.values()])
    assert np.unique(embeddings.round(5), axis=0).shape[0] == 12  # one vector per image, not a constant

    frame = pd.read_parquet(out, columns=["path", "top_k_labels", "embedding"])
    assert len(frame) == 13 and len(frame.dropna()["embedding"].iloc[0]) == 2048
    dataset = pa.dataset.dataset(str(out), format="parquet")
    assert dataset.schema.field("embedding").type == pa.list_(pa.float32(), 2048)
    found = duckdb.sql(f"""
        SELECT top_k_labels[1] AS best, len(embedding) AS width, top_k_probs[2] <= top_k_probs[1] AS ordered
        FROM read_parquet('{out}/*.parquet') WHERE error IS NULL
    """).fetchall()
    assert len(found) == 12 and all(width == 2048 and ordered for _, width, ordered in found)
    assert {best for best, _, _ in found} <= set(CLASSES)
