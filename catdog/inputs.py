"""The scoring input: list a folder or URI of images, or read a Parquet/CSV manifest of paths.

The listing is a stream: `InputSource.chunks()` yields tables of at most `chunk_rows` files while
it walks, so the first files can be scored before the last folder is read, and no process holds
the whole listing. Memory: one chunk, plus one entry per directory walked (loop detection) for
local folders and one directory's entries at a time for object stores, whose API lists a prefix
in one call (a flat prefix of tens of millions of objects wants a manifest).

Every listed path is normalised once, here, so the `path` column of the output, resume and
accounting all compare the same strings: local paths are absolute, under the input folder's real
path (a folder reached through a symlink or `..` lists the same names), and URIs read
`scheme://bucket/key`. Folder and prefix listings also give each file's size and modification
time (`file_size`, `file_modified`), which a resume compares to rescore changed files; manifests
leave them null (a resume then keys on the path alone).

Folder policy (local folders):
- searched recursively for `catdog.storage.IMAGE_EXTENSIONS` (case-insensitive);
- a directory whose name looks like an image (`x.jpg/`) is a directory: walked, never listed;
- a symlink whose target lies outside the input folder is skipped unless `follow_symlinks`;
- each real directory is walked once, so symlink loops end and aliases give no duplicates;
- a dangling symlink or an unreadable file is listed: scoring gives it an error row.

Manifests (`.parquet`, `.csv`) need a `path` column; a `true_label` column is carried through.
Relative paths in a manifest are relative to the manifest's folder. Repeated paths are scored
once (the scoring run drops repeats after listing). Very large inputs (millions of files) list
faster from a manifest than from a folder.
"""

from __future__ import annotations

import logging
import os
import posixpath
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Iterator

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs

from catdog import storage
from catdog.errors import InputError

logger = logging.getLogger(__name__)

MANIFEST_EXTENSIONS = (".parquet", ".csv")
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


def normalise_path(path: str, base: str | None = None) -> str:
    """One canonical spelling per file: absolute normalised local path, or a clean URI.

    `base` (a local folder or URI) anchors relative paths; `file://` URIs become local paths.
    """
    path = path.strip()
    if path.startswith("file://"):
        path = path[len("file://") :]
    if storage.is_uri(path):
        scheme, rest = path.split("://", 1)
        return f"{scheme.lower()}://{posixpath.normpath(rest.lstrip('/'))}"
    if base is not None and not os.path.isabs(os.path.expanduser(path)):
        if storage.is_uri(base):
            return normalise_path(posixpath.join(base.rstrip("/"), path))
        path = os.path.join(base, path)
    absolute = os.path.abspath(os.path.expanduser(path))
    folder, name = os.path.split(absolute)
    return os.path.join(_real_folder(folder), name)


@lru_cache(maxsize=4096)
def _real_folder(folder: str) -> str:
    """The real path of a folder (symlinks resolved once per folder, not per file)."""
    return os.path.realpath(folder)


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
                yield from _rows_in_chunks(_walk_uri(local), chunk_rows)
            else:
                yield from _rows_in_chunks(_walk_local(local, self.follow_symlinks, self.skipped), chunk_rows)
        except InputError:
            raise
        except (OSError, pa.ArrowException, ValueError) as exc:
            raise InputError(f"could not list input {self.location}: {exc}") from exc

    def _manifest_chunks(self, location: str, chunk_rows: int) -> Iterator[pa.Table]:
        base = posixpath.dirname(location) if storage.is_uri(location) else os.path.dirname(os.path.abspath(location))
        columns = [PATH_COLUMN, TRUE_LABEL_COLUMN] if self.has_true_label else [PATH_COLUMN]
        for batch in _manifest_batches(location, columns, chunk_rows):
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
    names = _manifest_columns(local)
    if PATH_COLUMN not in names:
        raise InputError(f"manifest {location} has no '{PATH_COLUMN}' column (columns: {names})")
    return InputSource(location, "manifest", has_true_label=TRUE_LABEL_COLUMN in names)


def _manifest_columns(location: str) -> list[str]:
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    fs, inner = storage.resolve(location)
    try:
        if location.lower().endswith(".parquet"):
            with fs.open_input_file(inner) as f:
                return pq.read_schema(f).names
        with fs.open_input_stream(inner) as stream:
            return pacsv.open_csv(stream).schema.names
    except (pa.ArrowException, OSError, ValueError) as exc:
        raise InputError(f"could not read manifest {location}: {exc}") from exc


def _manifest_batches(location: str, columns: list[str], chunk_rows: int) -> Iterator[pa.RecordBatch]:
    """The manifest's `columns`, a batch at a time (Parquet row batches; CSV blocks)."""
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    fs, inner = storage.resolve(location)
    if location.lower().endswith(".parquet"):
        with fs.open_input_file(inner) as f:
            yield from pq.ParquetFile(f).iter_batches(batch_size=chunk_rows, columns=columns)
        return
    convert = pacsv.ConvertOptions(include_columns=columns, column_types={c: pa.string() for c in columns})
    with fs.open_input_stream(inner) as stream:
        for batch in pacsv.open_csv(stream, convert_options=convert):
            for start in range(0, batch.num_rows, chunk_rows):
                yield batch.slice(start, chunk_rows)


Row = tuple[str, "int | None", "int | None"]  # path, size in bytes, mtime in ns


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


def _inside(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip(os.sep) + os.sep)


def _walk_local(folder: str, follow_symlinks: bool, skipped: dict[str, int]) -> Iterator[Row]:
    """Walk a local folder depth-first, each folder's entries in name order, applying the symlink policy."""
    root = os.path.realpath(os.path.expanduser(folder))
    wanted = tuple(storage.IMAGE_EXTENSIONS)
    for reason in ("symlink_outside_input", "repeated_folder", "unreadable_folder"):
        skipped.setdefault(reason, 0)
    visited: set[str] = set()
    stack = [root]
    while stack:
        current = stack.pop()
        real = os.path.realpath(current)
        if real in visited:
            skipped["repeated_folder"] += 1  # a symlink loop, or a second name for a folder
            continue
        visited.add(real)
        try:
            with os.scandir(current) as it:
                entries = sorted(it, key=lambda e: e.name)
        except OSError as exc:
            logger.warning("Cannot read folder %s: %s", current, exc)
            skipped["unreadable_folder"] += 1
            continue
        subfolders = []
        for entry in entries:
            if entry.is_symlink() and not follow_symlinks and not _inside(os.path.realpath(entry.path), root):
                skipped["symlink_outside_input"] += 1
                continue
            try:
                is_dir = entry.is_dir(follow_symlinks=True)
            except OSError:
                is_dir = False
            if is_dir:
                subfolders.append(entry.path)
            elif entry.name.lower().endswith(wanted):
                yield (os.path.normpath(entry.path), *_size_and_mtime(entry))
        stack.extend(reversed(subfolders))


def _size_and_mtime(entry: os.DirEntry) -> tuple[int | None, int | None]:
    try:
        stat = entry.stat(follow_symlinks=True)
    except OSError:
        return None, None  # a dangling link: scoring gives it an error row
    return stat.st_size, stat.st_mtime_ns


def _walk_uri(location: str) -> Iterator[Row]:
    """Walk an object-store prefix one level at a time (one prefix's entries held at once)."""
    fs, root = storage.resolve(location)
    wanted = tuple(storage.IMAGE_EXTENSIONS)
    stack = [root]
    while stack:
        current = stack.pop()
        entries = sorted(fs.get_file_info(pafs.FileSelector(current, recursive=False, allow_not_found=True)),
                         key=lambda info: info.path)
        subfolders = []
        for info in entries:
            if info.type == pafs.FileType.Directory:
                subfolders.append(info.path)
            elif info.type == pafs.FileType.File and info.path.lower().endswith(wanted):
                path = normalise_path(storage.to_location(location, info.path))
                yield path, int(info.size or 0), (info.mtime_ns or None)
        stack.extend(reversed(subfolders))
