"""Set work over listings and rows of any size, one hash bucket at a time.

A resume must subtract the rows already written from the listing; accounting must check that the
rows and the listing match one to one. Both are set operations over every path of a run. Here
both inputs are streamed once into `Buckets` (local Parquet, split by a stable hash of the path),
then compared bucket by bucket, so a process holds one bucket (`BUCKET_ROWS` rows) and a flush
buffer, never the whole input; the caller keeps counters. Disk: about the size of the paths, in a
local scratch folder.
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

from catdog.inputs import PATH_COLUMN, first_occurrences

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


class Buckets:
    """Tables split by path hash into `count` folders of Parquet files under a local `root`."""

    def __init__(self, root: str, count: int, schema: pa.Schema):
        self.root, self.count, self.schema = root, count, schema
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
            ids = bucket_ids(table[PATH_COLUMN], self.count)
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


def split(tables: Iterable[pa.Table], root: str, count: int, schema: pa.Schema) -> Buckets:
    """Stream `tables` into new `Buckets`."""
    buckets = Buckets(root, count, schema)
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
    unlisted: int = 0


def plan(listing: Buckets, done: Buckets, on_todo: Callable[[pa.Table], None],
         on_changed: Callable[[pa.Array], None], on_unlisted: Callable[[pa.Array], None]) -> ResumeCounts:
    """Per bucket: drop repeated listed paths, then `predictions_folder.plan_resume`; hand on the results.

    `listing` and `done` must have the same bucket count.
    """
    from catdog.predictions_folder import plan_resume

    counts = ResumeCounts()
    for bucket in range(listing.count):
        listed = listing.read(bucket)
        unique = first_occurrences(listed, ORDER_COLUMN)
        counts.repeated += listed.num_rows - unique.num_rows
        counts.listed += unique.num_rows
        result = plan_resume(unique, done.read(bucket))
        counts.todo += result.todo.num_rows
        counts.changed += len(result.changed)
        counts.unlisted += len(result.unlisted)
        if result.todo.num_rows:
            on_todo(result.todo.drop_columns([ORDER_COLUMN]))
        if len(result.changed):
            on_changed(result.changed)
        if len(result.unlisted):
            on_unlisted(result.unlisted)
    return counts


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
    duplicated_paths: list[pa.Array] = field(default_factory=list)

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
        if len(paths) != distinct:
            counted = pc.value_counts(paths)
            verdict.duplicated_paths.append(counted.field("values").filter(pc.greater(counted.field("counts"), 1)))
        errors = table["error"].combine_chunks().filter(in_listing_mask).drop_null()
        if len(errors):
            kinds = pc.list_element(pc.split_pattern(errors, ":", max_splits=1), 0)
            for row in pc.value_counts(kinds).to_pylist():
                verdict.errors_by_kind[row["values"]] = verdict.errors_by_kind.get(row["values"], 0) + row["counts"]
    verdict.errors_by_kind = dict(sorted(verdict.errors_by_kind.items()))
    return verdict
