"""Set work over listings and rows of any size, one hash bucket at a time.

A resume must subtract the rows already written from the listing; accounting must check that the
rows and the listing match one to one; replacing rows must find them in the part files. All are
set operations over every path of a run. Here the inputs are streamed once into `Buckets` (local
Parquet, split by a stable hash of the path, or by an integer key), then compared bucket by
bucket, so a process holds one bucket (`BUCKET_ROWS` rows) and a flush buffer, never the whole
input; the caller keeps counters. Disk: about the size of the paths, in a local scratch folder
(the run's `--scratch-dir`).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import Callable, Iterable

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from catdog.errors import TRANSIENT_ERROR_KINDS
from catdog.io.inputs import MODIFIED_COLUMN, PATH_COLUMN, SIZE_COLUMN, first_occurrences

# Rows per bucket: what one comparison step holds in memory (~100 bytes a path).
BUCKET_ROWS = 250_000
# Rows buffered before they are split into buckets and written: bounds memory and file count.
FLUSH_ROWS = 500_000
ORDER_COLUMN = "__order"


def bucket_count(rows: int, bucket_rows: int = BUCKET_ROWS) -> int:
    return max(1, math.ceil(rows / bucket_rows))


def bucket_ids(paths: pa.Array | pa.ChunkedArray, buckets: int) -> np.ndarray:
    """A stable bucket per path (the same in every process and run)."""
    values = paths.to_numpy(zero_copy_only=False) if len(paths) else np.array([], dtype=object)
    return (pd.util.hash_array(values, categorize=False) % np.uint64(buckets)).astype(np.int64)


def _key_ids(column: pa.Array | pa.ChunkedArray, buckets: int) -> np.ndarray:
    if pa.types.is_integer(column.type):
        return (column.to_numpy() % buckets).astype(np.int64)
    return bucket_ids(column, buckets)


class Buckets:
    """Tables split by `key` (a path hash, or an integer modulo `count`) into `count` folders of
    Parquet files under a local `root`."""

    def __init__(self, root: str, count: int, schema: pa.Schema, key: str = PATH_COLUMN):
        self.root, self.count, self.schema, self.key = root, count, schema, key
        self._pending: list[pa.Table] = []
        self._pending_rows = 0
        self._flushes = 0
        self.rows = 0

    def add(self, table: pa.Table) -> None:
        if not table.num_rows:
            return
        self._pending.append(table.select(self.schema.names).cast(self.schema))
        self._pending_rows += table.num_rows
        self.rows += table.num_rows
        if self._pending_rows >= FLUSH_ROWS:
            self.flush()

    def flush(self) -> None:
        if not self._pending:
            return
        table = pa.concat_tables(self._pending)
        self._pending, self._pending_rows = [], 0
        if self.count == 1:  # nothing to split: no hashing, no reordered copy
            bounds = np.array([0, table.num_rows])
        else:
            ids = _key_ids(table[self.key].combine_chunks(), self.count)
            table = table.take(pa.array(np.argsort(ids, kind="stable")))
            bounds = np.concatenate([[0], np.cumsum(np.bincount(ids, minlength=self.count))])
        for bucket in range(self.count):
            start, stop = int(bounds[bucket]), int(bounds[bucket + 1])
            if stop > start:
                folder = os.path.join(self.root, f"{bucket:05d}")
                os.makedirs(folder, exist_ok=True)
                pq.write_table(table.slice(start, stop - start), os.path.join(folder, f"{self._flushes:06d}.parquet"))
        self._flushes += 1

    def tables(self) -> Iterable[pa.Table]:
        """Every stored table, bucket after bucket."""
        for bucket in range(self.count):
            table = self.read(bucket)
            if table.num_rows:
                yield table

    def read(self, bucket: int) -> pa.Table:
        folder = os.path.join(self.root, f"{bucket:05d}")
        if not os.path.isdir(folder):
            return self.schema.empty_table()
        return pa.concat_tables([pq.read_table(os.path.join(folder, name), schema=self.schema)
                                 for name in sorted(os.listdir(folder))])


def split(tables: Iterable[pa.Table], root: str, count: int, schema: pa.Schema, key: str = PATH_COLUMN) -> Buckets:
    """Stream `tables` into new `Buckets`."""
    buckets = Buckets(root, count, schema, key)
    for table in tables:
        buckets.add(table)
    buckets.flush()
    return buckets


def with_order(tables: Iterable[pa.Table]) -> Iterable[pa.Table]:
    """Number the rows in stream order, so repeats can keep their first occurrence."""
    offset = 0
    for table in tables:
        yield table.append_column(ORDER_COLUMN, pa.array(np.arange(offset, offset + table.num_rows), pa.int64()))
        offset += table.num_rows


@dataclass
class ResumeCounts:
    """What a bucketed resume plan found (counters only; the rows went to the callbacks)."""

    listed: int = 0  # distinct listed paths
    repeated: int = 0  # listing rows dropped as repeats of an earlier path
    todo: int = 0
    changed: int = 0
    retried: int = 0  # rows with a transient error (TRANSIENT_ERROR_KINDS), scored again
    unlisted: int = 0
    overlap: int = 0  # listed paths that already have a row


@dataclass
class ResumePlan:
    """How a resumed run's listing meets the rows already written (one bucket, or a small whole)."""

    todo: pa.Table  # listed files to score in this run
    changed: pa.Array  # paths whose file changed since their row was written: rows replaced
    unlisted: pa.Array  # paths with rows that are no longer listed
    retried: pa.Array = field(default_factory=lambda: pa.array([], pa.string()))  # transient errors: rows replaced
    overlap: int = 0  # listed paths that have a row


def plan_resume(listed: pa.Table, done: pa.Table) -> ResumePlan:
    """Compare a listing (path, file_size, file_modified) with the rows already written.

    A listed file is done when it has a row, neither its size nor its modification time differ
    from what the row recorded (an unknown value on either side matches), and the row's `error`
    (when given) is not of a transient kind. Memory: both tables.
    """
    empty = pa.array([], pa.string())
    if not done.num_rows:
        return ResumePlan(listed, empty, empty)
    done_paths = done[PATH_COLUMN].combine_chunks()
    listed_mask = pc.is_in(done_paths, value_set=listed[PATH_COLUMN])
    unlisted = pc.unique(done_paths.filter(pc.invert(listed_mask)))
    overlap = pc.sum(listed_mask).as_py() or 0  # rows of listed paths: a row each, in a sound output
    changed = empty
    stats = [c for c in (SIZE_COLUMN, MODIFIED_COLUMN) if c in done.column_names and c in listed.column_names]
    if stats:
        rows = done.select([PATH_COLUMN, *stats]).rename_columns([PATH_COLUMN, *[f"row_{c}" for c in stats]])
        both = listed.select([PATH_COLUMN, *stats]).join(rows, keys=PATH_COLUMN, join_type="inner", use_threads=False)
        differs = pa.array([False] * both.num_rows, pa.bool_())
        for column in stats:
            differs = pc.or_(differs, pc.fill_null(pc.not_equal(both[column], both[f"row_{column}"]), False))
        changed = pc.unique(both[PATH_COLUMN].filter(differs).combine_chunks()) if both.num_rows else empty
    retried = empty
    if "error" in done.column_names and done["error"].null_count < done.num_rows:
        errors = done["error"].combine_chunks()
        transient = pa.array(np.zeros(len(errors), dtype=bool))
        for kind in sorted(TRANSIENT_ERROR_KINDS):
            transient = pc.or_(transient, pc.fill_null(pc.starts_with(errors, f"{kind}:"), False))
        retried = pc.unique(done_paths.filter(pc.and_(transient, listed_mask)))
        if len(changed):
            retried = retried.filter(pc.invert(pc.is_in(retried, value_set=changed)))
    again = pa.concat_arrays([changed, retried]) if len(retried) else changed
    finished = done_paths.filter(pc.invert(pc.is_in(done_paths, value_set=again))) if len(again) else done_paths
    todo = listed.filter(pc.invert(pc.is_in(listed[PATH_COLUMN], value_set=finished)))
    return ResumePlan(todo, changed, unlisted, retried, overlap)


def plan(listing: Buckets, done: Buckets, on_todo: Callable[[pa.Table], None],
         on_replaced: Callable[[pa.Array], None], on_unlisted: Callable[[pa.Array], None]) -> ResumeCounts:
    """Per bucket: drop repeated listed paths, then `plan_resume`; hand on the results.

    `on_replaced` gets the paths whose rows this run replaces (changed files, transient errors).
    `listing` and `done` must have the same bucket count.
    """
    counts = ResumeCounts()
    for bucket in range(listing.count):
        listed = listing.read(bucket)
        unique = first_occurrences(listed, ORDER_COLUMN)
        counts.repeated += listed.num_rows - unique.num_rows
        counts.listed += unique.num_rows
        result = plan_resume(unique, done.read(bucket))
        counts.todo += result.todo.num_rows
        counts.changed += len(result.changed)
        counts.retried += len(result.retried)
        counts.unlisted += len(result.unlisted)
        counts.overlap += result.overlap
        if result.todo.num_rows:
            on_todo(result.todo.drop_columns([ORDER_COLUMN]))
        if len(result.changed) or len(result.retried):
            on_replaced(pa.concat_arrays([result.changed, result.retried]))
        if len(result.unlisted):
            on_unlisted(result.unlisted)
    return counts


FILE_COLUMN, ROW_COLUMN = "__file", "__row"
_LOCATED = pa.schema([(PATH_COLUMN, pa.string()), (FILE_COLUMN, pa.int32()), (ROW_COLUMN, pa.int64())])
_HITS = pa.schema([(FILE_COLUMN, pa.int32()), (ROW_COLUMN, pa.int64())])
# Files per bucket of hits: what one rewrite step holds is the row numbers of this many files.
FILES_PER_HIT_BUCKET = 64


def locate(files: list, read_paths: Callable[[object], pa.Array], wanted: Buckets, scratch: str) -> Iterable[tuple[int, np.ndarray]]:
    """Where the rows of `wanted` paths are: (index into `files`, sorted row numbers) per file holding any.

    Every file's `path` column is streamed once into buckets beside `wanted`, joined bucket by
    bucket, and the hits regrouped by file: a process holds one bucket of paths, then the row
    numbers of `FILES_PER_HIT_BUCKET` files, never a set of every path. Files come in index order
    within each group of files.
    """

    def rows() -> Iterable[pa.Table]:
        for index, file in enumerate(files):
            paths = read_paths(file)
            yield pa.table({PATH_COLUMN: paths, FILE_COLUMN: pa.array(np.full(len(paths), index, np.int32)),
                            ROW_COLUMN: pa.array(np.arange(len(paths), dtype=np.int64))})

    located = split(rows(), os.path.join(scratch, "located"), wanted.count, _LOCATED)
    hits = Buckets(os.path.join(scratch, "hits"), max(1, math.ceil(len(files) / FILES_PER_HIT_BUCKET)), _HITS,
                   key=FILE_COLUMN)
    for bucket in range(wanted.count):
        paths = wanted.read(bucket)[PATH_COLUMN].combine_chunks()
        if not len(paths):
            continue
        table = located.read(bucket)
        hits.add(table.filter(pc.is_in(table[PATH_COLUMN], value_set=paths)).select([FILE_COLUMN, ROW_COLUMN]))
    hits.flush()
    for bucket in range(hits.count):
        table = hits.read(bucket).sort_by([(FILE_COLUMN, "ascending"), (ROW_COLUMN, "ascending")])
        if not table.num_rows:
            continue
        file_ids = table[FILE_COLUMN].to_numpy()
        row_ids = table[ROW_COLUMN].to_numpy()
        starts = np.flatnonzero(np.r_[True, file_ids[1:] != file_ids[:-1]])
        for start, stop in zip(starts, np.r_[starts[1:], len(file_ids)]):
            yield int(file_ids[start]), np.unique(row_ids[start:stop])


@dataclass
class Verdict:
    """Accounting of one output against its listing, summed over buckets."""

    listed: int = 0
    rows: int = 0
    duplicates: int = 0
    missing: int = 0
    unknown: int = 0  # rows of paths neither listed nor kept from an earlier listing
    kept_unlisted: int = 0
    in_listing: int = 0
    errors_by_kind: dict[str, int] = field(default_factory=dict)

    @property
    def exact(self) -> bool:
        return not (self.duplicates or self.missing or self.unknown) and self.in_listing == self.listed


def account(listing: Buckets, rows: Buckets, kept_unlisted: Buckets | None = None) -> Verdict:
    """Compare rows (path, error) with the listing, bucket by bucket. Same bucket count everywhere."""
    verdict = Verdict()
    for bucket in range(listing.count):
        listed = pc.unique(listing.read(bucket)[PATH_COLUMN].combine_chunks())
        table = rows.read(bucket)
        paths = table[PATH_COLUMN].combine_chunks()
        kept = kept_unlisted.read(bucket)[PATH_COLUMN].combine_chunks() if kept_unlisted else pa.array([], pa.string())
        distinct = pc.count_distinct(paths).as_py() if len(paths) else 0
        in_listing_mask = pc.is_in(paths, value_set=listed)
        in_listing = pc.sum(in_listing_mask).as_py() or 0
        kept_rows = pc.sum(pc.is_in(paths, value_set=kept)).as_py() or 0
        # listed paths that have a row: the distinct paths among the rows of listed paths
        found = in_listing if distinct == len(paths) else pc.count_distinct(paths.filter(in_listing_mask)).as_py()
        verdict.listed += len(listed)
        verdict.rows += len(paths)
        verdict.duplicates += len(paths) - distinct
        verdict.missing += len(listed) - found
        verdict.unknown += len(paths) - in_listing - kept_rows
        verdict.kept_unlisted += kept_rows
        verdict.in_listing += in_listing
        errors = table["error"].combine_chunks().filter(in_listing_mask).drop_null()
        if len(errors):
            kinds = pc.list_element(pc.split_pattern(errors, ":", max_splits=1), 0)
            for row in pc.value_counts(kinds).to_pylist():
                verdict.errors_by_kind[row["values"]] = verdict.errors_by_kind.get(row["values"], 0) + row["counts"]
    verdict.errors_by_kind = dict(sorted(verdict.errors_by_kind.items()))
    return verdict
