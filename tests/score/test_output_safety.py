"""Nothing lost by mistake (issue 13): --overwrite stays inside its own output, outputs that would
mix with the input or a root are refused, resume survives a changed input, every listed input gives
a row (unknown schemes, oversized files). Real files, real Parquet, the session's real Ray."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from catdog.errors import OutputExistsError
from catdog.io import imaging, storage
from catdog.io.inputs import list_inputs
from catdog.io.sample_data import generate_sample_dataset, remove_sample_dataset
from catdog.score.config import ScoreConfig
from catdog.score.ledger import plan_resume
from catdog.score.predictions_folder import SUCCESS_FILE, PredictionsFolder
from support import run_job_module


# ---- fast: the folder's own files, refusals, the resume plan, reading (no Ray) ----

@pytest.mark.parametrize("case", ["same", "inside_input", "holds_input", "root", "home", "holds_home", "bucket"])
def test_outputs_that_overlap_the_input_or_a_root_are_refused(tmp_path, case):
    photos = tmp_path / "photos"
    photos.mkdir()
    output, input_ = {
        "same": (photos, photos), "inside_input": (photos / "preds", photos), "holds_input": (tmp_path, photos),
        "root": ("/", photos), "home": (os.path.expanduser("~"), photos),
        "holds_home": (os.path.dirname(os.path.expanduser("~")), photos), "bucket": ("s3://bucket/", "s3://bucket/in"),
    }[case]
    with pytest.raises(OutputExistsError):
        storage.refuse_unsafe_output(str(output), str(input_))


def test_output_spelled_through_a_symlink_still_overlaps(tmp_path):
    photos = tmp_path / "photos"
    photos.mkdir()
    os.symlink(photos, tmp_path / "alias")
    with pytest.raises(OutputExistsError, match="overlaps"):
        storage.refuse_unsafe_output(str(tmp_path / "alias" / "preds"), str(photos))
    storage.refuse_unsafe_output(str(tmp_path / "preds"), str(photos))  # a sibling is fine
    storage.refuse_unsafe_output("s3://bucket/preds", "s3://bucket/photos")


def test_score_job_refuses_output_equal_to_input_and_leaves_it_unchanged(tiny_model_run, tmp_path, capsys):
    photos = generate_sample_dataset(tmp_path / "photos", images_per_class=2)
    before = sorted(str(p.relative_to(photos)) for p in photos.rglob("*"))
    code = run_job_module("jobs.score", "--model", str(tiny_model_run), "--input", str(photos), "--output", str(photos),
                          "--overwrite")
    err = capsys.readouterr().err
    assert code == 2, err[-2000:]
    assert "overlaps the input" in err
    assert sorted(str(p.relative_to(photos)) for p in photos.rglob("*")) == before


def test_resume_plan_rescoring_changed_files_and_reporting_unlisted_ones():
    ts = pa.timestamp("us", tz="UTC")
    listed = pa.table({"path": ["/a", "/b", "/c", "/d", "/e"], "file_size": pa.array([1, 2, 3, None, 5], pa.int64()),
                       "file_modified": pa.array([10, 20, 30, 40, None], pa.int64()).cast(ts)})
    done = pa.table({"path": ["/a", "/b", "/c", "/d", "/e", "/gone"],
                     "file_size": pa.array([1, 9, 3, 4, 5, 6], pa.int64()),  # /b: size changed
                     "file_modified": pa.array([10, 20, 31, 40, 50, 60], pa.int64()).cast(ts)})  # /c: time changed
    plan = plan_resume(listed, done)
    assert sorted(plan.changed.to_pylist()) == ["/b", "/c"]
    assert plan.unlisted.to_pylist() == ["/gone"]
    assert plan.todo["path"].to_pylist() == ["/b", "/c"]  # unknown values on either side match
    # Rows written before file stats existed key on the path alone.
    plan = plan_resume(listed, done.select(["path"]))
    assert plan.todo.num_rows == 0 and not len(plan.changed)


def test_reading_refuses_unknown_schemes_and_oversized_files_without_reading_them(tmp_path):
    huge = tmp_path / "huge.jpg"
    with open(huge, "wb") as f:  # sparse: reading it would allocate 3 GiB and decode as not_an_image
        f.truncate(3 * 2**30)
    good = tmp_path / "ok.png"
    generate_sample_dataset(tmp_path / "g", images_per_class=1)
    good.write_bytes(next((tmp_path / "g" / "cats").iterdir()).read_bytes())
    paths = [str(huge), "http://example.com/x.jpg", "hdfs://namenode/x.jpg", "s3:/malformed.jpg", str(good)]
    started = time.monotonic()
    errors = list(imaging.read_and_decode(paths, 32)["error"])
    kinds = [imaging.error_kind(e) for e in errors]
    assert kinds == ["too_large", "unsupported_scheme", "unsupported_scheme", "read_error", None], errors
    assert "3,221,225,472 bytes" in errors[0]
    assert time.monotonic() - started < 5  # a read of 3 GiB would not finish this soon


def test_remove_sample_dataset_keeps_a_users_files(tmp_path):
    root = generate_sample_dataset(tmp_path / "data", images_per_class=3)
    (root / "cats" / "mine.jpg").write_bytes(b"my photo")
    assert remove_sample_dataset(root) == 6
    assert [p.name for p in root.rglob("*") if p.is_file()] == ["mine.jpg"]


# ---- slow: scoring jobs on the session's Ray cluster ----

def _score(run: Path, input_: Path | str, out: Path, **kw) -> dict:
    from catdog.score.run import score

    kw.setdefault("rows_per_file", 4)
    kw.setdefault("batch_size", 4)
    return score(ScoreConfig(model=str(run), input=str(input_), output=str(out), **kw))


def _rows(out: Path) -> dict[str, dict]:
    table = PredictionsFolder(str(out)).read()
    paths = table["path"].to_pylist()
    assert len(paths) == len(set(paths)), "duplicate rows"
    return {r["path"]: r for r in table.to_pylist()}


@pytest.mark.slow
def test_resume_after_removed_renamed_and_replaced_inputs_ends_exact(ray_cluster, tiny_model_run, tmp_path):
    photos = generate_sample_dataset(tmp_path / "photos", images_per_class=6)
    # The input is spelled through a symlink the first time: rows must use the folder's real path.
    os.symlink(photos, tmp_path / "alias")
    out = tmp_path / "preds"
    _score(tiny_model_run, tmp_path / "alias", out)
    first = _rows(out)
    assert all(p.startswith(str(photos) + "/") for p in first)

    removed, renamed, replaced = photos / "cats" / "cats_0001.jpg", photos / "cats" / "cats_0002.jpg", photos / "dogs" / "dogs_0003.jpg"
    removed.unlink()
    renamed.rename(photos / "cats" / "renamed.jpg")
    replaced.write_bytes((photos / "cats" / "cats_0004.jpg").read_bytes())  # other bytes, size and time
    os.utime(replaced, ns=(time.time_ns(), time.time_ns() + 10**9))
    listed = {str(p) for p in photos.rglob("*") if p.is_file()}

    summary = _score(tiny_model_run, photos, out, resume=True)
    rows = _rows(out)
    assert summary["rescored_changed_files"] == 1 and summary["rows_scored_this_run"] == 2  # replaced + renamed
    assert summary["rows_written"] == len(listed) and summary["rows_not_in_listing"] == 2
    assert set(rows) == listed | {str(removed), str(renamed)}
    assert rows[str(replaced)]["file_size"] == replaced.stat().st_size
    assert rows[str(replaced)]["scored_at"] > first[str(replaced)]["scored_at"]
    assert rows[str(replaced)]["prob_cats"] == pytest.approx(rows[str(photos / "cats" / "cats_0004.jpg")]["prob_cats"])
    assert (out / SUCCESS_FILE).exists()

    summary = _score(tiny_model_run, photos, out, resume=True, drop_unlisted=True)
    assert set(_rows(out)) == listed
    assert summary["rows_removed"] == 2 and summary["rows_scored_this_run"] == 0
    assert summary["rows_not_in_listing"] == 0 and summary["rows_written"] == len(listed)
    assert not list(out.glob("_quarantine/*"))  # rewritten files are not left behind


@pytest.mark.slow
def test_manifest_with_unknown_schemes_and_an_oversized_file_gives_error_rows(ray_cluster, tiny_model_run, tmp_path):
    photos = generate_sample_dataset(tmp_path / "photos", images_per_class=2)
    huge = tmp_path / "big" / "huge.jpg"
    huge.parent.mkdir()
    with open(huge, "wb") as f:
        f.truncate(200 * 2**20)
    good = sorted(str(p) for p in photos.rglob("*") if p.is_file())
    manifest = tmp_path / "m.csv"
    manifest.write_text("path\n" + "\n".join(good + [str(huge), "http://example.com/a.jpg", "hdfs://nn/b.jpg",
                                                     "s3:/malformed.jpg"]) + "\n")
    out = tmp_path / "preds"
    summary = _score(tiny_model_run, manifest, out, max_file_bytes=2**20)
    rows = _rows(out)
    assert summary["rows_written"] == len(good) + 4 == len(rows)
    kinds = {p: (r["error"] or "").split(":", 1)[0] for p, r in rows.items()}
    assert kinds[str(huge)] == "too_large"
    assert kinds["http://example.com/a.jpg"] == kinds["hdfs://nn/b.jpg"] == "unsupported_scheme"
    assert kinds[str(tmp_path / "s3:" / "malformed.jpg")] == "read_error"
    assert all(kinds[p] == "" for p in good)
    assert summary["errors_by_kind"] == {"read_error": 1, "too_large": 1, "unsupported_scheme": 2}


def test_listing_records_size_and_time_for_folders_and_null_for_manifests(tmp_path):
    photos = generate_sample_dataset(tmp_path / "photos", images_per_class=1)
    table = list_inputs(str(photos)).table
    first = Path(table["path"][0].as_py())
    assert table["file_size"][0].as_py() == first.stat().st_size
    assert table["file_modified"][0].value == first.stat().st_mtime_ns // 1000
    manifest = tmp_path / "m.parquet"
    pq.write_table(pa.table({"path": [str(first)]}), manifest)
    listed = list_inputs(str(manifest)).table
    assert listed["file_size"].null_count == 1 and listed["file_modified"].null_count == 1
