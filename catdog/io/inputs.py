"""The scoring input: list a folder or URI of images, or read a Parquet/CSV manifest of paths.

The listing is a stream: `InputSource.chunks()` yields tables of at most `chunk_rows` files while
it walks, so the first files can be scored before the last folder is read, and no process holds
the whole listing. Memory: one chunk, plus what the walk holds (see `catdog.io.folder_walk`).

Every listed path is normalised once (`catdog.io.paths`), so the `path` column of the output,
resume and accounting all compare the same strings. Folder and prefix listings also give each
file's size and modification time (`file_size`, `file_modified`), which a resume compares to
rescore changed files; manifests leave them null (a resume then keys on the path alone).

Folder policy: see `catdog.io.folder_walk`; manifest format: see `catdog.io.manifests`.
"""

from __future__ import annotations

import os
import posixpath
from dataclasses import dataclass, field
from typing import Iterator

import pyarrow as pa
import pyarrow.compute as pc

from catdog.errors import InputError
from catdog.io import storage
from catdog.io.folder_walk import Row, walk_local, walk_uri
from catdog.io.manifests import MANIFEST_EXTENSIONS, manifest_batches, manifest_columns
from catdog.io.paths import escape_local_path, normalise_path

PATH_COLUMN = "path"
TRUE_LABEL_COLUMN = "true_label"
SIZE_COLUMN = "file_size"
MODIFIED_COLUMN = "file_modified"
MODIFIED_TYPE = pa.timestamp("us", tz="UTC")
# Files per listing chunk: the unit the listing hands on; bounds what the lister holds.
CHUNK_ROWS = 50_000


def listing_schema(with_true_label: bool) -> pa.Schema:
    """Columns of every listing chunk."""
    label = [pa.field(TRUE_LABEL_COLUMN, pa.string())] if with_true_label else []
    return pa.schema([pa.field(PATH_COLUMN, pa.string()), *label, pa.field(SIZE_COLUMN, pa.int64()),
                      pa.field(MODIFIED_COLUMN, MODIFIED_TYPE)])


@dataclass
class InputListing:
    """A whole listing in memory (small inputs and tests): `path` (and `true_label`), sizes, times."""

    table: pa.Table
    source: str  # "folder" or "manifest"
    skipped: dict[str, int] = field(default_factory=dict)  # reason -> count, for the logs and summary

    @property
    def num_files(self) -> int:
        return self.table.num_rows

    @property
    def has_true_label(self) -> bool:
        return TRUE_LABEL_COLUMN in self.table.column_names


@dataclass
class InputSource:
    """A checked input, listed on demand as a stream of chunks (see the module docstring)."""

    location: str
    kind: str  # "folder" or "manifest"
    follow_symlinks: bool = False
    has_true_label: bool = False
    skipped: dict[str, int] = field(default_factory=dict)  # filled while chunks() runs
    preloaded: pa.Table | None = None  # a listing made earlier, in memory

    @classmethod
    def from_table(cls, location: str, listing: InputListing) -> "InputSource":
        """A source that yields an in-memory listing (small inputs, tests)."""
        return cls(location, listing.source, has_true_label=listing.has_true_label, skipped=dict(listing.skipped),
                   preloaded=listing.table)

    @property
    def schema(self) -> pa.Schema:
        return listing_schema(self.has_true_label)

    def chunks(self, chunk_rows: int = CHUNK_ROWS) -> Iterator[pa.Table]:
        """Tables of at most `chunk_rows` listed files, in walk (or manifest) order.

        Raises:
            InputError: the input cannot be read.
        """
        local = _strip_file_scheme(self.location)
        if self.preloaded is not None:
            yield from (self.preloaded.slice(start, chunk_rows) for start in range(0, self.preloaded.num_rows, chunk_rows))
            return
        try:
            if self.kind == "manifest":
                yield from self._manifest_chunks(local, chunk_rows)
            elif storage.is_uri(local):
                yield from _rows_in_chunks(walk_uri(local), chunk_rows)
            else:
                yield from _rows_in_chunks(walk_local(local, self.follow_symlinks, self.skipped), chunk_rows)
        except InputError:
            raise
        except (OSError, pa.ArrowException, ValueError) as exc:
            raise InputError(f"could not list input {self.location}: {exc}") from exc

    def _manifest_chunks(self, location: str, chunk_rows: int) -> Iterator[pa.Table]:
        base = posixpath.dirname(location) if storage.is_uri(location) else os.path.dirname(os.path.abspath(location))
        columns = [PATH_COLUMN, TRUE_LABEL_COLUMN] if self.has_true_label else [PATH_COLUMN]
        for batch in manifest_batches(location, columns, chunk_rows):
            table = pa.Table.from_batches([batch]).select(columns).cast(pa.schema([(c, pa.string()) for c in columns]))
            paths = table[PATH_COLUMN]
            valid = pc.and_(pc.is_valid(paths), pc.not_equal(pc.utf8_trim_whitespace(paths), ""))
            empty = table.num_rows - (pc.sum(valid).as_py() or 0)
            if empty:
                self.skipped["empty_path"] = self.skipped.get("empty_path", 0) + empty
                table = table.filter(valid)
            # One Python call per row: the listing is far from the hot path.
            normalised = pa.array([normalise_path(p, base) for p in table[PATH_COLUMN].to_pylist()], pa.string())
            unknown = pa.nulls(table.num_rows, pa.int64())
            table = (table.set_column(0, PATH_COLUMN, normalised).append_column(SIZE_COLUMN, unknown)
                     .append_column(MODIFIED_COLUMN, unknown.cast(MODIFIED_TYPE)))
            if table.num_rows:
                yield table


def open_input(location: str, follow_symlinks: bool = False) -> InputSource:
    """Check an input (folder, URI prefix or Parquet/CSV manifest) without listing it.

    Raises:
        InputError: missing, not a folder or manifest, or a manifest without a `path` column.
    """
    if not location:
        raise InputError("--input is empty")
    local = _strip_file_scheme(location)
    try:
        if storage.is_uri(local):
            if local.lower().endswith(MANIFEST_EXTENSIONS) and not storage.is_dir(local):
                return _open_manifest(location, local)
            if not storage.exists(local):
                raise InputError(f"input not found: {location}")
            return InputSource(location, "folder", follow_symlinks)
        if os.path.isdir(local):
            return InputSource(location, "folder", follow_symlinks)
        if os.path.isfile(local):
            return _open_manifest(location, local)
    except InputError:
        raise
    except (OSError, pa.ArrowException, ValueError) as exc:
        raise InputError(f"could not open input {location}: {exc}") from exc
    raise InputError(f"input not found: {location}")


def canonical_location(location: str) -> str:
    """The input's one spelling, recorded by an output so that a resume can tell the same input:
    a local folder's or manifest's real path, or a clean URI (no trailing slash)."""
    local = _strip_file_scheme(location)
    if storage.is_uri(local):
        return normalise_path(local).rstrip("/")
    return escape_local_path(os.path.realpath(os.path.expanduser(local)))


def list_inputs(location: str, follow_symlinks: bool = False) -> InputListing:
    """The whole listing in memory, sorted and with repeats dropped: for small inputs and tests.

    Raises:
        InputError: the input is missing, not a folder or manifest, unreadable, or holds no images.
    """
    source = open_input(location, follow_symlinks)
    tables = list(source.chunks())
    table = pa.concat_tables(tables) if tables else source.schema.empty_table()
    if source.kind == "folder":
        table = table.sort_by(PATH_COLUMN)
    else:
        before = table.num_rows
        table = first_occurrences(table)
        if before - table.num_rows:
            source.skipped["duplicate_path"] = before - table.num_rows
    check_not_empty(source, table.num_rows)
    return InputListing(table, source.kind, {k: v for k, v in source.skipped.items() if v})


def check_not_empty(source: InputSource, files: int) -> None:
    """Raises InputError when the input listed no file."""
    if files:
        return
    what = "paths" if source.kind == "manifest" else f"image files ({', '.join(storage.IMAGE_EXTENSIONS)})"
    skipped = {k: v for k, v in source.skipped.items() if v}
    raise InputError(f"no {what} found in input {source.location}" + (f"; skipped: {skipped}" if skipped else ""))


def first_occurrences(table: pa.Table, order_column: str | None = None) -> pa.Table:
    """Drop repeated paths, keeping each path's first row (and its true_label), in listing order."""
    if order_column is None:
        order_column = "__row"
        table = table.append_column(order_column, pa.array(range(table.num_rows), pa.int64()))
        dropped = [order_column]
    else:
        dropped = []
    first = table.group_by(PATH_COLUMN, use_threads=False).aggregate([(order_column, "min")])
    kept = table.filter(pc.is_in(table[order_column], value_set=first[f"{order_column}_min"]))
    return kept.sort_by(order_column).drop_columns(dropped)


def _strip_file_scheme(location: str) -> str:
    return location[len("file://") :] if location.startswith("file://") else location


def _open_manifest(location: str, local: str) -> InputSource:
    if not local.lower().endswith(MANIFEST_EXTENSIONS):
        raise InputError(
            f"input {location} is a file but not a manifest: pass a folder, or a .parquet/.csv file with a 'path' column"
        )
    names = manifest_columns(local)
    if PATH_COLUMN not in names:
        raise InputError(f"manifest {location} has no '{PATH_COLUMN}' column (columns: {names})")
    return InputSource(location, "manifest", has_true_label=TRUE_LABEL_COLUMN in names)


def _rows_in_chunks(rows: Iterator[Row], chunk_rows: int) -> Iterator[pa.Table]:
    buffer: list[Row] = []
    for row in rows:
        buffer.append(row)
        if len(buffer) >= chunk_rows:
            yield _listing_table(buffer)
            buffer = []
    if buffer:
        yield _listing_table(buffer)


def _listing_table(rows: list[Row]) -> pa.Table:
    paths, sizes, mtimes_ns = zip(*rows)
    mtimes_us = [None if m is None else m // 1000 for m in mtimes_ns]
    return pa.table({
        PATH_COLUMN: pa.array(paths, pa.string()),
        SIZE_COLUMN: pa.array(sizes, pa.int64()),
        MODIFIED_COLUMN: pa.array(mtimes_us, pa.int64()).cast(MODIFIED_TYPE),
    })
