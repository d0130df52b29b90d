"""jobs.report: exact summaries of generated predictions folders, user errors, a 1M-row memory bound."""

from __future__ import annotations

import json
import os
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from benchmarks.peak_memory import run_python
from catdog.analyse.report import ReportConfig, format_report, report, summarise
from catdog.errors import InputError
from catdog.score.predictions_folder import predictions_schema, prob_column
from jobs import report as report_job

REPO = Path(__file__).resolve().parents[2]
CLASSES = ("cats", "dogs")
START = datetime(2025, 1, 1, tzinfo=timezone.utc)


def write_predictions(folder: Path, rows: int, files: int, seed: int = 0, with_true_label: bool = False) -> dict:
    """Write `rows` predictions over `files` Parquet files with the real schema; return what a
    correct report must count, computed here with numpy."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    schema = predictions_schema(CLASSES, with_true_label=with_true_label)
    p_dogs = rng.random(rows).astype(np.float32)
    failed = np.zeros(rows, dtype=bool)
    failed[::997] = True  # about 0.1% of files could not be decoded
    kinds = np.where(np.arange(rows) % 2 == 0, "truncated", "not_an_image")
    labels = np.where(p_dogs >= 0.5, "dogs", "cats")
    confidence = np.maximum(p_dogs, 1 - p_dogs)
    true_labels = np.where(rng.random(rows) < 0.8, labels, np.where(labels == "dogs", "cats", "dogs"))
    bounds = np.linspace(0, rows, files + 1).astype(int)
    for i, (lo, hi) in enumerate(zip(bounds[:-1], bounds[1:])):
        bad = failed[lo:hi]
        columns = {
            "path": pa.array([f"s3://bucket/images/{j:08d}.jpg" for j in range(lo, hi)]),
            "label": pa.array(labels[lo:hi], mask=bad),
            prob_column("cats"): pa.array(1 - p_dogs[lo:hi], mask=bad),
            prob_column("dogs"): pa.array(p_dogs[lo:hi], mask=bad),
            "confidence": pa.array(confidence[lo:hi], mask=bad),
            "error": pa.array(np.char.add(kinds[lo:hi], ": cannot decode"), mask=~bad),
            "width": pa.array(np.full(hi - lo, 640, np.int32), mask=bad),
            "height": pa.array(np.full(hi - lo, 480, np.int32), mask=bad),
            "model_id": pa.array(["abc123"] * (hi - lo)),
            "scored_at": pa.array([START] * (hi - lo), type=pa.timestamp("us", tz="UTC")),
            "file_size": pa.array(np.full(hi - lo, 50_000, np.int64)),
            "file_modified": pa.array([START] * (hi - lo), type=pa.timestamp("us", tz="UTC")),
        }
        if with_true_label:
            columns["true_label"] = pa.array(true_labels[lo:hi])
        pq.write_table(pa.table(columns, schema=schema), folder / f"part-{i:04d}.parquet")
    ok = ~failed
    return {
        "rows": rows,
        "errors": int(failed.sum()),
        "errors_by_kind": {k: int((failed & (kinds == k)).sum()) for k in ("not_an_image", "truncated")},
        "label_counts": {c: int((ok & (labels == c)).sum()) for c in CLASSES},
        "histogram": np.histogram(confidence[ok], bins=np.linspace(0, 1, 21))[0].tolist(),
        "low_below_0.7": int((confidence[ok] < 0.7).sum()),
        "accuracy": float(np.mean(labels[ok] == true_labels[ok])),
    }


def _assert_png(path: Path, min_side: int = 100) -> None:
    assert path.stat().st_size > 1000
    with Image.open(path) as image:
        assert image.format == "PNG"
        image.load()
        assert min(image.size) >= min_side


def test_small_folder_counts_exactly(tmp_path):
    expected = write_predictions(tmp_path / "preds", rows=5000, files=3, with_true_label=True)
    (tmp_path / "preds" / "_SUCCESS.json").write_text(json.dumps({"rows_written": 5000, "wall_time_s": 50.0, "images_per_s": 100.0}))
    # Files that are not results must be skipped: quarantined half-written Parquet, hidden files.
    (tmp_path / "preds" / "_quarantine").mkdir()
    (tmp_path / "preds" / "_quarantine" / "broken.parquet").write_bytes(b"PAR1 truncated")
    (tmp_path / "preds" / ".hidden.parquet").write_bytes(b"junk")

    summary = report(ReportConfig(str(tmp_path / "preds"), threshold=0.7, output=str(tmp_path / "out")))

    assert summary["files"] == 3
    assert summary["rows"] == 5000
    assert summary["errors"] == expected["errors"] == 6
    assert summary["scored"] == 5000 - expected["errors"]
    assert summary["errors_by_kind"] == expected["errors_by_kind"]
    assert summary["label_counts"] == expected["label_counts"]
    assert summary["confidence_histogram"]["counts"] == expected["histogram"]
    assert summary["low_confidence"] == expected["low_below_0.7"]
    assert summary["low_confidence_share"] == pytest.approx(expected["low_below_0.7"] / summary["scored"])
    assert summary["accuracy_where_labelled"] == pytest.approx(expected["accuracy"])
    assert summary["throughput_images_per_s"] == pytest.approx(100.0)
    assert summary["model_ids"] == {"abc123": 5000}
    saved = json.loads((tmp_path / "out" / "report.json").read_text())
    assert saved["rows"] == 5000 and saved["label_counts"] == expected["label_counts"]
    _assert_png(tmp_path / "out" / "confidence.png")
    text = format_report(summary)
    assert "rows: 5,000" in text and "100.0 images/s" in text and "error truncated: 3" in text


def test_uri_input_and_default_output(tmp_path):
    write_predictions(tmp_path / "preds", rows=200, files=2)
    summary = report(ReportConfig(f"file://{tmp_path}/preds", threshold=0.9))
    assert summary["rows"] == 200
    assert summary["throughput_images_per_s"] is None
    assert summary["output"] == f"file://{tmp_path}/preds-report"
    _assert_png(tmp_path / "preds-report" / "confidence.png")


def test_user_mistakes_are_input_errors(tmp_path):
    with pytest.raises(InputError, match="not found"):
        summarise(ReportConfig(str(tmp_path / "absent")))
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="no .parquet files"):
        summarise(ReportConfig(str(tmp_path / "empty")))
    (tmp_path / "file.parquet").write_bytes(b"x")
    with pytest.raises(InputError, match="must be a folder"):
        summarise(ReportConfig(str(tmp_path / "file.parquet")))
    (tmp_path / "other").mkdir()
    pq.write_table(pa.table({"x": [1, 2]}), tmp_path / "other" / "a.parquet")
    with pytest.raises(InputError, match="not a catdog predictions folder"):
        summarise(ReportConfig(str(tmp_path / "other")))
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "a.parquet").write_bytes(b"PAR1 cut short")
    with pytest.raises(InputError, match="unreadable Parquet"):
        summarise(ReportConfig(str(tmp_path / "broken")))


def test_job_exit_codes_and_help(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        report_job.main(["--help"])
    assert exit_info.value.code == 0
    assert "--threshold" in capsys.readouterr().out
    for argv in ([str(tmp_path / "absent")], [str(tmp_path), "--threshold", "1.5"]):
        with pytest.raises(SystemExit) as exit_info:
            report_job.main(argv)
        assert exit_info.value.code == 2
    write_predictions(tmp_path / "preds", rows=50, files=1)
    with pytest.raises(SystemExit) as exit_info:
        report_job.main([str(tmp_path / "preds"), "--output", str(tmp_path / "out")])
    assert exit_info.value.code == 0
    assert "rows: 50" in capsys.readouterr().out


@pytest.mark.slow
def test_million_rows_under_one_gib(tmp_path):
    expected = write_predictions(tmp_path / "preds", rows=1_000_000, files=8, seed=7)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    # VmHWM of the child itself: ru_maxrss/wait4 would report this (large) pytest process's peak.
    run = run_python("-m", "jobs.report", [str(tmp_path / "preds"), "--threshold", "0.7"], cwd=REPO, env=env)
    stdout = run.stdout
    assert run.returncode == 0, run.stderr
    print(f"jobs.report on 1,000,000 rows: peak RSS {run.peak_rss_mib:.0f} MiB")
    assert run.peak_rss_mib < 1024
    assert "rows: 1,000,000" in stdout
    summary = json.loads((tmp_path / "preds-report" / "report.json").read_text())
    assert summary["rows"] == 1_000_000
    assert summary["label_counts"] == expected["label_counts"]
    assert summary["errors_by_kind"] == expected["errors_by_kind"]
    assert summary["low_confidence"] == expected["low_below_0.7"]
    _assert_png(tmp_path / "preds-report" / "confidence.png")


def test_label_partitioned_folder(tmp_path):
    """`jobs.score --partition-by label` layout: label only in folder names, errors in the null folder."""
    import pyarrow.dataset as ds

    expected = write_predictions(tmp_path / "flat", rows=3000, files=1)
    table = pq.read_table(tmp_path / "flat")
    ds.write_dataset(
        table, tmp_path / "parted", format="parquet",
        partitioning=ds.partitioning(pa.schema([("label", pa.string())]), flavor="hive"),
    )
    assert (tmp_path / "parted" / "label=__HIVE_DEFAULT_PARTITION__").is_dir()
    assert "label" not in pq.read_schema(next((tmp_path / "parted" / "label=cats").iterdir())).names
    summary = summarise(ReportConfig(str(tmp_path / "parted")))
    assert summary["rows"] == 3000
    assert summary["label_counts"] == expected["label_counts"]
    assert summary["errors_by_kind"] == expected["errors_by_kind"]


ANALYSING_DOC = REPO / "docs" / "analysing.md"


def _readme_snippets() -> list[str]:
    """The Python snippets of docs/analysing.md (the README's analysing recipes moved there)."""
    text = ANALYSING_DOC.read_text()
    return [block.split("```", 1)[0] for block in text.split("```python\n")[1:]]


def test_readme_analysing_snippets_run(tmp_path, monkeypatch, capsys):
    """Every Python snippet of docs/analysing.md runs against folders with the documented schema."""
    expected = write_predictions(tmp_path / "predictions", rows=4000, files=2)
    (tmp_path / "predictions" / "_SUCCESS.json").write_text("{}")
    (tmp_path / "predictions" / "_quarantine").mkdir()
    (tmp_path / "predictions" / "_quarantine" / "cut.parquet").write_bytes(b"PAR1 cut short")
    write_predictions(tmp_path / "evaluation" / "predictions", rows=300, files=1, with_true_label=True)
    monkeypatch.chdir(tmp_path)
    snippets = _readme_snippets()
    assert len(snippets) == 4
    for snippet in snippets:
        exec(compile(snippet, str(ANALYSING_DOC), "exec"), {})
    out = capsys.readouterr().out
    assert "4000" in out  # pyarrow count_rows
    for label, count in expected["label_counts"].items():
        assert str(count) in out, label
    assert (tmp_path / "to_review.csv").is_file()


@pytest.fixture
def s3_bucket(s3, monkeypatch):
    """A bucket on the session's local S3 server (moto, 127.0.0.1), reached through the standard AWS
    variables (as users would reach MinIO); yields the bucket name."""
    for key in [k for k in os.environ if k.startswith("AWS_")]:
        monkeypatch.delenv(key)
    for key, value in s3.env.items():
        monkeypatch.setenv(key, value)
    yield s3.bucket


def test_report_on_s3(tmp_path, s3_bucket):
    import boto3
    import pyarrow.fs as pafs

    expected = write_predictions(tmp_path / "p", rows=3000, files=2)
    (tmp_path / "p" / "_SUCCESS.json").write_text(json.dumps({"images_per_s": 42.5}))
    s3, _ = pafs.FileSystem.from_uri(f"s3://{s3_bucket}/run")
    pafs.copy_files(str(tmp_path / "p"), f"{s3_bucket}/run", source_filesystem=pafs.LocalFileSystem(), destination_filesystem=s3)

    summary = report(ReportConfig(f"s3://{s3_bucket}/run", threshold=0.7))

    assert summary["rows"] == 3000 and summary["label_counts"] == expected["label_counts"]
    assert summary["throughput_images_per_s"] == 42.5
    keys = sorted(o["Key"] for o in boto3.client("s3").list_objects_v2(Bucket=s3_bucket)["Contents"])
    assert [k for k in keys if k.startswith("run-report")] == ["run-report/confidence.png", "run-report/report.json"]
    saved = json.loads(boto3.client("s3").get_object(Bucket=s3_bucket, Key="run-report/report.json")["Body"].read())
    assert saved["rows"] == 3000
