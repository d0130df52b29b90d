"""Set work at scale (catdog.score.ledger, PredictionsFolder.account, InputSource.chunks): the bucketed
resume plan and accounting give the verdicts of a whole-table comparison, a folder listed in chunks
gives the rows of a one-shot listing, transient errors are planned for a retry, replaced rows are
found file by file, and no step holds more than a chunk or a bucket."""

from __future__ import annotations

import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from catdog.io import inputs
from catdog.score import ledger
from catdog.score.ledger import plan_resume
from catdog.score.predictions_folder import AccountingError, PredictionsFolder
from support.outputs import PATHS, write_part

N = 3000


def _paths(n: int, prefix: str = "/data/img") -> list[str]:
    return [f"{prefix}/{i:06d}.jpg" for i in range(n)]


def _listing(paths: list[str]) -> pa.Table:
    n = len(paths)
    return pa.table({"path": paths, "file_size": pa.array(np.arange(n), pa.int64()),
                     "file_modified": pa.array(np.arange(n), pa.int64()).cast(inputs.MODIFIED_TYPE)})


def test_buckets_are_stable_disjoint_and_bounded(tmp_path, monkeypatch):
    monkeypatch.setattr(ledger, "FLUSH_ROWS", 700)  # several flushes, as a large input would make
    table = _listing(_paths(N))
    buckets = ledger.split((table.slice(i, 500) for i in range(0, N, 500)), str(tmp_path), 7, table.schema)
    parts = [buckets.read(b) for b in range(7)]
    assert sum(p.num_rows for p in parts) == N
    assert sorted(sum((p["path"].to_pylist() for p in parts), [])) == sorted(table["path"].to_pylist())
    assert max(p.num_rows for p in parts) < N / 7 * 1.5  # spread, not one bucket
    again = ledger.bucket_ids(table["path"], 7)
    for bucket, part in enumerate(parts):
        assert set(ledger.bucket_ids(part["path"], 7)) == {bucket}
    assert np.array_equal(again, ledger.bucket_ids(table["path"], 7))  # stable across calls
    files = [f for _, _, names in os.walk(tmp_path) for f in names]
    assert len(files) <= 7 * 5  # one file per bucket per flush of 700 rows


def test_bucketed_resume_plan_equals_the_whole_table_plan(tmp_path):
    listed = _listing(_paths(N))
    done = _listing(_paths(N)[:2000] + _paths(50, "/gone"))  # 1000 to do, 50 no longer listed
    sizes = done["file_size"].to_numpy().copy()
    sizes[::100] += 1  # 20 changed since scored
    done = done.set_column(1, "file_size", pa.array(sizes, pa.int64()))
    repeated = pa.concat_tables([listed, listed.slice(0, 30)])  # a manifest naming 30 files twice
    whole = plan_resume(listed, done)

    order = repeated.schema.append(pa.field(ledger.ORDER_COLUMN, pa.int64()))
    listing = ledger.split(ledger.with_order([repeated]), f"{tmp_path}/l", 5, order)
    rows = ledger.split([done], f"{tmp_path}/d", 5, done.schema)
    todo, changed, unlisted = [], [], []
    counts = ledger.plan(listing, rows, todo.append, changed.append, unlisted.append)
    assert (counts.listed, counts.repeated, counts.todo, counts.changed, counts.unlisted) == (N, 30, 1020, 20, 50)
    assert sorted(pa.concat_tables(todo)["path"].to_pylist()) == sorted(whole.todo["path"].to_pylist())
    assert sorted(pa.concat_arrays(changed).to_pylist()) == sorted(whole.changed.to_pylist())
    assert sorted(pa.concat_arrays(unlisted).to_pylist()) == sorted(whole.unlisted.to_pylist())
    assert pa.concat_tables(todo).column_names == listed.column_names


@pytest.mark.parametrize("plant, message", [
    (None, None), ("duplicate", "7 duplicates"), ("missing", "11 missing"), ("unlisted", "5 for unlisted"),
])
def test_accounting_verdicts_with_planted_rows(tmp_path, monkeypatch, plant, message):
    monkeypatch.setattr(ledger, "BUCKET_ROWS", 400)  # 3000 rows in 8 buckets
    out = tmp_path / "out"
    paths = _paths(N)
    written = list(paths)
    if plant == "missing":
        written = written[11:]
    for task, start in enumerate(range(0, len(written), 1000)):
        write_part(out, written[start:start + 1000], task)
    if plant == "duplicate":
        write_part(out, paths[100:107], 7, run_id="bbbbbbbbbbbb")
    if plant == "unlisted":
        write_part(out, _paths(5, "/elsewhere"), 8)
    folder = PredictionsFolder(str(out))
    for index, start in enumerate(range(0, N, 1000)):
        folder.write_listing_chunk(index, _listing(paths[start:start + 1000]))
    if plant is None:
        counts = folder.account(listed_rows=N)
        assert counts["rows_written"] == N and counts["errors"] == 0 and counts["rows_not_in_listing"] == 0
        # Rows of paths a resume reported as no longer listed are kept out of the verdict.
        write_part(out, _paths(5, "/elsewhere"), 9)
        with pytest.raises(AccountingError, match="5 for unlisted"):
            folder.account(listed_rows=N)
        assert folder.account(kept_unlisted=pa.array(_paths(5, "/elsewhere")))["rows_not_in_listing"] == 5
        return
    with pytest.raises(AccountingError, match=message) as failed:
        folder.account(listed_rows=N)
    if plant == "duplicate":
        assert failed.value.duplicates == 7


def test_a_folder_listed_in_chunks_gives_the_rows_of_a_one_shot_listing(tmp_path):
    for i in range(23):
        folder = tmp_path / "in" / f"d{i % 4}" / ("sub" if i % 3 else "")
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{i:03d}.jpg").write_bytes(b"x" * i)
    source = inputs.open_input(str(tmp_path / "in"))
    chunks = list(source.chunks(chunk_rows=4))
    assert [c.num_rows for c in chunks] == [4, 4, 4, 4, 4, 3]  # nothing held beyond a chunk
    streamed = pa.concat_tables(chunks).sort_by("path")
    assert streamed.equals(inputs.list_inputs(str(tmp_path / "in")).table)


def test_a_manifest_is_read_in_chunks(tmp_path):
    manifest = tmp_path / "m.parquet"
    pq.write_table(pa.table({"path": _paths(250), "true_label": ["cats"] * 250}), manifest, row_group_size=100)
    source = inputs.open_input(str(manifest))
    assert source.kind == "manifest" and source.has_true_label
    chunks = list(source.chunks(chunk_rows=64))
    assert max(c.num_rows for c in chunks) <= 64 and sum(c.num_rows for c in chunks) == 250
    csv = tmp_path / "m.csv"
    csv.write_text("path\n" + "\n".join(_paths(250)) + "\n")
    assert sum(c.num_rows for c in inputs.open_input(str(csv)).chunks(chunk_rows=64)) == 250


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
