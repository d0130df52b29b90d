"""Resume in a hostile world, without Ray: a part-file rewrite that fails at any step loses or
repeats no row, a resume checks the input and precision it resumes, transient read errors are
retried, and replaced rows are found bucket by bucket. Real files and real Parquet; I/O failures
are injected at the filesystem boundary (a disk that fills mid-rewrite)."""

from __future__ import annotations

import errno
import json
import os

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest

from catdog.errors import CatdogError
from catdog.io.paths import escape_local_path, local_path_bytes, normalise_path, unescape_local_path
from catdog.score import ledger
from catdog.score.predictions_folder import (REWRITE_DIR, SUCCESS_FILE, PredictionsFolder, part_file_name,
                                       predictions_schema)

CLASSES = ("cats", "dogs")
PATHS = pa.schema([("path", pa.string())])


def write_part(folder, paths: list[str], task: int, run_id: str = "0123456789ab", errors=None) -> str:
    """A part file as a scoring run writes it (every column of the predictions schema)."""
    os.makedirs(folder, exist_ok=True)
    n = len(paths)
    schema = predictions_schema(CLASSES)
    columns = {f.name: pa.nulls(n, f.type) for f in schema}
    columns.update(path=pa.array(paths, pa.string()), model_id=pa.array(["m"] * n),
                   scored_at=pa.array([0] * n, pa.timestamp("us", tz="UTC")),
                   error=pa.array(errors or [None] * n, pa.string()))
    name = part_file_name(run_id, f"{task:032x}", task).replace(".parquet", "-0.parquet")
    pq.write_table(pa.table(columns, schema=schema), os.path.join(folder, name))
    return os.path.join(folder, name)


class FullDisk(pafs.FileSystemHandler):
    """The local filesystem, whose `fail_at`-th change (write, move, delete) fails with ENOSPC."""

    def __init__(self, fail_at: int):
        self.local, self.fail_at, self.changes = pafs.LocalFileSystem(), fail_at, 0

    def _change(self) -> None:
        self.changes += 1
        if self.changes == self.fail_at:
            raise OSError(errno.ENOSPC, "No space left on device (injected)")

    def get_type_name(self): return "fulldisk"
    def equals(self, other): return other is self
    def get_file_info(self, paths): return self.local.get_file_info(paths)
    def get_file_info_selector(self, selector): return self.local.get_file_info(selector)
    def create_dir(self, path, recursive): self.local.create_dir(path, recursive=recursive)
    def delete_dir(self, path): self._change(); self.local.delete_dir(path)
    def delete_dir_contents(self, path, missing_dir_ok=False): self._change(); self.local.delete_dir_contents(path)
    def delete_root_dir_contents(self): raise OSError("refused")
    def delete_file(self, path): self._change(); self.local.delete_file(path)
    def move(self, src, dest): self._change(); self.local.move(src, dest)
    def copy_file(self, src, dest): self._change(); self.local.copy_file(src, dest)
    def open_input_stream(self, path): return self.local.open_input_stream(path)
    def open_input_file(self, path): return self.local.open_input_file(path)
    def open_output_stream(self, path, metadata): self._change(); return self.local.open_output_stream(path)
    def open_append_stream(self, path, metadata): self._change(); return self.local.open_append_stream(path)
    def normalize_path(self, path): return path


def _all_paths(out) -> list[str]:
    return sorted(PredictionsFolder(str(out)).read(columns=["path"])["path"].to_pylist())


def _replaced(tmp_path, paths: list[str]) -> ledger.Buckets:
    return ledger.split([pa.table({"path": paths})], str(tmp_path / "replaced"), 3, PATHS)


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
        removed = folder.remove_rows(_replaced(tmp_path, ["/a.jpg", "/c.jpg", "/d.jpg"]), "bbbbbbbbbbbb",
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
        folder.remove_rows(_replaced(tmp_path, ["/x.jpg"]), "bbbbbbbbbbbb", predictions_schema(CLASSES), str(tmp_path))
    assert _all_paths(out) == ["/unlisted.jpg", "/x.jpg"]  # nothing was retired
    folder = PredictionsFolder(str(out))
    assert folder.remove_rows(_replaced(tmp_path, ["/x.jpg"]), "cccccccccccc", predictions_schema(CLASSES),
                              str(tmp_path)) == 1
    assert _all_paths(out) == ["/unlisted.jpg"]


def test_a_rewrite_stopped_after_the_old_file_was_retired_is_finished_by_the_next_resume(tmp_path):
    out = tmp_path / "out"
    write_part(out, ["/x.jpg", "/unlisted.jpg"], 0)
    folder = PredictionsFolder(str(out))
    folder.fs = pafs.PyFileSystem(FullDisk(4))  # 1 successor, 2 journal, 3 retire, 4 move in place: fails
    with pytest.raises(OSError, match="injected"):
        folder.remove_rows(_replaced(tmp_path, ["/x.jpg"]), "bbbbbbbbbbbb", predictions_schema(CLASSES), str(tmp_path))
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


def test_resume_retries_transient_errors_and_keeps_permanent_ones():
    listed = pa.table({"path": ["/ok", "/link", "/slow", "/bad", "/s3"], "file_size": pa.array([1] * 5, pa.int64())})
    done = pa.table({"path": ["/ok", "/link", "/slow", "/bad", "/s3", "/gone"],
                     "file_size": pa.array([1] * 6, pa.int64()),
                     "error": [None, "read_error: FileNotFoundError: dangling", "read_timeout: no data after 120 s",
                               "not_an_image: cannot identify", "read_error: OSError: AWS error 503", "read_error: x"]})
    plan = ledger.plan_resume(listed, done)
    assert sorted(plan.retried.to_pylist()) == ["/link", "/s3", "/slow"]  # /gone is not listed: not retried
    assert sorted(plan.todo["path"].to_pylist()) == ["/link", "/s3", "/slow"]
    assert not len(plan.changed) and plan.unlisted.to_pylist() == ["/gone"] and plan.overlap == 5


def test_locate_finds_every_replaced_row_file_by_file(tmp_path, monkeypatch):
    monkeypatch.setattr(ledger, "FILES_PER_HIT_BUCKET", 2)  # several groups of files
    rng = np.random.default_rng(0)
    files = [[f"/img/{f}-{i}.jpg" for i in range(rng.integers(1, 40))] for f in range(9)]
    wanted = [p for names in files for p in names if rng.random() < 0.3] + ["/not/there.jpg"]
    buckets = ledger.split([pa.table({"path": wanted})], str(tmp_path / "w"), 4, PATHS)
    found = {index: rows.tolist() for index, rows in
             ledger.locate(list(range(9)), lambda f: pa.array(files[f]), buckets, str(tmp_path))}
    expected = {f: [i for i, p in enumerate(names) if p in set(wanted)] for f, names in enumerate(files)}
    assert found == {f: rows for f, rows in expected.items() if rows}


@pytest.mark.parametrize("raw", [b"/srv/caf\xe9.jpg", b"/srv/a\\xe9.jpg", b"/srv/a\\\\b.jpg", b"/srv/plain.jpg",
                                 "/srv/猫.jpg".encode(), b"/srv/\xff\xfe/x.png"])
def test_every_local_name_has_one_readable_spelling_with_its_bytes_back(raw):
    spelled = escape_local_path(os.fsdecode(raw))
    spelled.encode("utf-8")  # valid UTF-8: Arrow, Parquet and every reader take it
    assert local_path_bytes(spelled) == raw
    assert unescape_local_path(spelled) == os.fsdecode(raw)
    assert normalise_path(spelled) == spelled  # listing and manifests agree on the spelling


def test_a_latin1_name_and_a_name_that_looks_escaped_stay_two_paths():
    latin1 = escape_local_path(os.fsdecode(b"/srv/caf\xe9.jpg"))
    literal = escape_local_path("/srv/caf\\xe9.jpg")  # a real backslash in a (valid UTF-8) name
    assert latin1 == "/srv/caf\\xe9.jpg" and literal == "/srv/caf\\\\xe9.jpg" and latin1 != literal
