"""The predictions folder (`catdog.score.predictions_folder`), without Ray: its part-file names,
what --overwrite deletes and never enters, the resume checks and scan, accounting, the late write
of a killed run, and part-file rewrites that a full disk cuts at every step. Real files and real
Parquet; I/O failures injected at the filesystem boundary (`support.outputs.FullDisk`)."""

from __future__ import annotations

import json

import pandas as pd
import pyarrow as pa
import pyarrow.fs as pafs
import pytest

from catdog.errors import CatdogError, OutputExistsError
from catdog.score import predictions_folder as output
from catdog.score.predictions_folder import (REWRITE_DIR, RUN_MARKER, SUCCESS_FILE, PredictionsFolder,
                                             predictions_schema)
from support.outputs import CLASSES, FullDisk, replaced_paths, write_part


def test_part_file_names_carry_run_and_write_ids_and_match_our_pattern():
    name = output.PartFilenameProvider("0123456789ab").get_filename_for_task("a" * 32, 7)
    assert name == f"catdog-0123456789ab-{'a' * 32}_000007.parquet"
    assert "." not in name[: -len(".parquet")]  # Ray's template needs no dot before the extension
    assert output.is_part_file(name.replace(".parquet", "-0.parquet"))
    for other in ("part-0.parquet", "catdog-x.parquet", f"catdog-0123456789ab-{'a' * 32}_000007-0.parquet.tmp"):
        assert not output.is_part_file(other)


def test_existing_output_is_refused_then_overwrite_removes_only_our_files(tmp_path):
    out = tmp_path / "out"
    ours = [write_part(out, ["/a.jpg"]), write_part(out / "label=cats", ["/b.jpg"], 1)]
    (out / output.SUCCESS_FILE).write_text("{}")
    (out / output.RUN_MARKER).write_text("{}")
    theirs = [out / "notes.md", out / "part-00000.parquet", out / "label=cats" / "mine.csv", out / "sub" / "x.parquet"]
    for path in theirs:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("keep me")
    with pytest.raises(OutputExistsError, match="--resume.*--overwrite"):
        PredictionsFolder(str(out)).refuse_existing(overwrite=False, resume=False)
    (tmp_path / "file").write_text("x")
    with pytest.raises(OutputExistsError, match="is a file"):
        PredictionsFolder(str(tmp_path / "file")).refuse_existing(overwrite=True, resume=False)
    state = PredictionsFolder(str(out)).prepare(overwrite=True, resume=False, run_info={"model_id": "m"},
                                  schema=predictions_schema(CLASSES))
    assert state.deleted == 4
    assert not any(p.exists() for p in ours) and not (out / output.SUCCESS_FILE).exists()
    assert all(p.read_text() == "keep me" for p in theirs)
    assert json.loads((out / output.RUN_MARKER).read_text()) == {"model_id": "m"}


def test_resume_quarantines_truncated_parts_and_refuses_another_model(tmp_path):
    out = tmp_path / "out"
    good = write_part(out, ["/a.jpg", "/b.jpg"])
    bad = write_part(out, ["/c.jpg"], 1)
    bad.write_bytes(bad.read_bytes()[:-20])  # a write killed before its footer
    run_info = {"model_id": "m", "class_names": CLASSES, "partition_by": None, "with_true_label": False}
    (out / output.RUN_MARKER).write_text(json.dumps(run_info))
    (out / output.SUCCESS_FILE).write_text("{}")
    with pytest.raises(CatdogError, match="model_id"):
        PredictionsFolder(str(out)).prepare(overwrite=False, resume=True, run_info={**run_info, "model_id": "other"},
                              schema=predictions_schema(CLASSES))
    state = PredictionsFolder(str(out)).prepare(overwrite=False, resume=True, run_info=run_info,
                                  schema=predictions_schema(CLASSES))
    done = [row["path"] for table in PredictionsFolder(str(out)).iter_rows(["path"]) for row in table.to_pylist()]
    assert sorted(done) == ["/a.jpg", "/b.jpg"]
    assert state.kept_files == [str(good)] and len(state.quarantined) == 1
    assert not bad.exists() and (out / output.QUARANTINE_DIR / bad.name).exists()
    assert (out / output.SUCCESS_FILE).exists()  # kept until the resumed run is about to change rows
    assert PredictionsFolder(str(out)).part_files() == [str(good)]
    assert pd.read_parquet(out)["path"].tolist() == ["/a.jpg", "/b.jpg"]  # readers skip _quarantine


def test_accounting_catches_duplicates_missing_and_unlisted_rows(tmp_path):
    out = tmp_path / "out"
    write_part(out, ["/a.jpg", "/b.jpg"])
    assert PredictionsFolder(str(out)).account(pa.array(["/a.jpg", "/b.jpg"]))["rows_written"] == 2
    for listed in (["/a.jpg", "/b.jpg", "/c.jpg"], ["/a.jpg"], ["/a.jpg", "/c.jpg"]):
        with pytest.raises(output.AccountingError):
            PredictionsFolder(str(out)).account(pa.array(listed))
    write_part(out, ["/b.jpg"], 1)
    with pytest.raises(output.AccountingError, match="1 duplicates"):
        PredictionsFolder(str(out)).account(pa.array(["/a.jpg", "/b.jpg"]))


def test_a_late_write_of_a_killed_run_is_dropped_when_the_resumed_run_rescored_it(tmp_path):
    out = tmp_path / "out"
    kept = write_part(out, ["/a.jpg"], 0, run_id="aaaaaaaaaaaa")  # scanned by the resume: not rescored
    late = write_part(out, ["/b.jpg", "/c.jpg"], 1, run_id="aaaaaaaaaaaa")  # appeared after the scan
    write_part(out, ["/b.jpg", "/c.jpg", "/d.jpg"], 0, run_id="bbbbbbbbbbbb")  # the resumed run
    listed = pa.array(["/a.jpg", "/b.jpg", "/c.jpg", "/d.jpg"])
    folder = PredictionsFolder(str(out))
    with pytest.raises(output.AccountingError, match="2 duplicates") as failed:
        folder.account(listed)
    assert failed.value.duplicates == 2
    assert folder.drop_superseded_files("bbbbbbbbbbbb", str(tmp_path)) == [str(late)]
    assert kept.exists() and folder.account(listed)["rows_written"] == 4


def test_overwrite_never_enters_another_output_nested_in_its_folder(tmp_path):
    out = tmp_path / "preds"
    ours = [write_part(out, ["/a.jpg"]), write_part(out / "label=cats", ["/b.jpg"], 1)]
    (out / SUCCESS_FILE).write_text("{}")
    (out / RUN_MARKER).write_text("{}")
    # An earlier scoring run written inside this folder, and one that happens to be named label=dogs.
    nested = [write_part(out / "old", ["/x.jpg"]), write_part(out / "old" / "label=cats", ["/y.jpg"], 1),
              write_part(out / "label=dogs", ["/z.jpg"], 2)]
    for folder in (out / "old", out / "label=dogs"):
        (folder / RUN_MARKER).write_text("{}")
        (folder / SUCCESS_FILE).write_text("{}")
    folder = PredictionsFolder(str(out))
    assert folder.part_files() == sorted(str(p) for p in ours)  # listing, accounting and resume agree
    state = folder.prepare(overwrite=True, resume=False, run_info={"model_id": "m"}, schema=predictions_schema(CLASSES))
    assert state.deleted == 4  # two part files, the marker and _SUCCESS.json
    assert not any(p.exists() for p in ours) and not (out / "label=cats").exists()
    assert all(p.exists() for p in nested)
    assert (out / "old" / SUCCESS_FILE).exists() and (out / "label=dogs" / RUN_MARKER).exists()


def _all_paths(out) -> list[str]:
    return sorted(PredictionsFolder(str(out)).read(columns=["path"])["path"].to_pylist())


@pytest.mark.parametrize("fail_at", range(1, 12))
def test_a_rewrite_that_fails_at_any_step_keeps_each_row_once_and_resume_restores_it(tmp_path, fail_at):
    out = tmp_path / "out"
    write_part(out, ["/a.jpg", "/b.jpg", "/kept-unlisted.jpg"], 0)
    write_part(out, ["/c.jpg", "/d.jpg"], 1)
    (out / SUCCESS_FILE).write_text("{}")
    folder = PredictionsFolder(str(out))
    disk = FullDisk(fail_at)
    folder.fs = pafs.PyFileSystem(disk)
    try:
        removed = folder.remove_rows(replaced_paths(tmp_path, ["/a.jpg", "/c.jpg", "/d.jpg"]), "bbbbbbbbbbbb",
                                     predictions_schema(CLASSES), str(tmp_path))
    except OSError as failure:
        assert "injected" in str(failure)
        removed = None
    if removed is not None:  # the disk never filled: fewer changes than fail_at
        assert disk.changes < fail_at and removed == 3
    survivors = _all_paths(out)  # readers see each row at most once, whatever step failed
    assert len(survivors) == len(set(survivors))
    assert {"/b.jpg", "/kept-unlisted.jpg"} <= set(survivors) or removed is None

    recovered = PredictionsFolder(str(out)).recover_rewrites()
    after = _all_paths(out)
    assert len(after) == len(set(after)), after
    # Rows not being replaced are never lost; replaced ones are either all still there or gone.
    assert {"/b.jpg", "/kept-unlisted.jpg"} <= set(after), (fail_at, after, recovered)
    assert not (out / REWRITE_DIR).exists()
    assert (out / SUCCESS_FILE).exists()  # remove_rows never touches it; the run calls mark_partial first
    # Changes: file 0 (rows kept) 1 successor, 2 journal, 3 retire, 4 move in, 5 and 6 clean up;
    # file 1 (no row kept) 7 journal, 8 retire, 9 and 10 clean up. A journal written: said so.
    if removed is None and fail_at not in (1, 2, 7):
        assert recovered, "an interrupted rewrite must be finished or undone, and said so"


def test_the_disk_filling_while_the_successor_is_written_restores_the_old_file(tmp_path):
    """The found defect: the old file parked and the new one never written lost every row."""
    out = tmp_path / "out"
    write_part(out, ["/x.jpg", "/unlisted.jpg"], 0)
    folder = PredictionsFolder(str(out))
    folder.fs = pafs.PyFileSystem(FullDisk(1))  # the very first write (the successor) fails
    with pytest.raises(OSError, match="injected"):
        folder.remove_rows(replaced_paths(tmp_path, ["/x.jpg"]), "bbbbbbbbbbbb", predictions_schema(CLASSES), str(tmp_path))
    assert _all_paths(out) == ["/unlisted.jpg", "/x.jpg"]  # nothing was retired
    folder = PredictionsFolder(str(out))
    assert folder.remove_rows(replaced_paths(tmp_path, ["/x.jpg"]), "cccccccccccc", predictions_schema(CLASSES),
                              str(tmp_path)) == 1
    assert _all_paths(out) == ["/unlisted.jpg"]


def test_a_rewrite_stopped_after_the_old_file_was_retired_is_finished_by_the_next_resume(tmp_path):
    out = tmp_path / "out"
    write_part(out, ["/x.jpg", "/unlisted.jpg"], 0)
    folder = PredictionsFolder(str(out))
    folder.fs = pafs.PyFileSystem(FullDisk(4))  # 1 successor, 2 journal, 3 retire, 4 move in place: fails
    with pytest.raises(OSError, match="injected"):
        folder.remove_rows(replaced_paths(tmp_path, ["/x.jpg"]), "bbbbbbbbbbbb", predictions_schema(CLASSES), str(tmp_path))
    assert not PredictionsFolder(str(out)).part_files()  # the only copy of /unlisted.jpg is in _rewrite/
    state = PredictionsFolder(str(out)).prepare(overwrite=False, resume=True, run_info={"model_id": "m"},
                                                schema=predictions_schema(CLASSES))
    assert len(state.recovered) == 1 and "finished" in state.recovered[0]
    assert _all_paths(out) == ["/unlisted.jpg"]


def _marker(out, **info) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "_catdog_run.json").write_text(json.dumps({"model_id": "m", "class_names": list(CLASSES), **info}))


def test_resume_refuses_another_input_or_precision_unless_the_input_moved_on_purpose(tmp_path, caplog):
    out = tmp_path / "out"
    write_part(out, ["/data/a.jpg"], 0)
    (out / SUCCESS_FILE).write_text("{}")
    _marker(out, input_canonical="/data", precision="bfloat16")
    folder = PredictionsFolder(str(out))
    same = {"model_id": "m", "class_names": list(CLASSES), "input_canonical": "/data", "precision": "bfloat16"}
    schema = predictions_schema(CLASSES)
    with pytest.raises(CatdogError, match=r"scored from /data, this run lists /dtaa.*--input-moved"):
        folder.prepare(overwrite=False, resume=True, run_info={**same, "input_canonical": "/dtaa"}, schema=schema)
    with pytest.raises(CatdogError, match=r"--precision bfloat16, this run asks for float32"):
        folder.prepare(overwrite=False, resume=True, run_info={**same, "precision": "float32"}, schema=schema)
    assert (out / SUCCESS_FILE).exists() and _all_paths(out) == ["/data/a.jpg"]  # refusals change nothing
    folder.prepare(overwrite=False, resume=True, run_info={**same, "input_canonical": "/mnt/data"}, schema=schema,
                   input_moved=True)
    assert "--input-moved" in caplog.text
    assert (out / SUCCESS_FILE).exists()  # kept until rows change (mark_partial)
    folder.mark_partial()
    assert not (out / SUCCESS_FILE).exists()
    # Outputs written before input and precision were recorded resume as before.
    _marker(out)
    folder.prepare(overwrite=False, resume=True, run_info={**same, "input_canonical": "/else"}, schema=schema)
