"""The scoring input: list a folder or URI of images, or read a Parquet/CSV manifest of paths.

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
once. Very large inputs (millions of files) list faster from a manifest than from a folder.
"""

from __future__ import annotations

import logging
import os
import posixpath
from dataclasses import dataclass, field
from functools import lru_cache

import pyarrow as pa
import pyarrow.compute as pc

from catdog import storage
from catdog.errors import InputError

logger = logging.getLogger(__name__)

MANIFEST_EXTENSIONS = (".parquet", ".csv")
PATH_COLUMN = "path"
TRUE_LABEL_COLUMN = "true_label"
SIZE_COLUMN = "file_size"
MODIFIED_COLUMN = "file_modified"
MODIFIED_TYPE = pa.timestamp("us", tz="UTC")


@dataclass
class InputListing:
    """The files to score: a table with `path` (and `true_label` for labelled manifests)."""

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


def list_inputs(location: str, follow_symlinks: bool = False) -> InputListing:
    """List the files to score from a folder, a URI prefix or a Parquet/CSV manifest.

    Raises:
        InputError: the input is missing, not a folder or manifest, unreadable, or holds no images.
    """
    if not location:
        raise InputError("--input is empty")
    local = location[len("file://") :] if location.startswith("file://") else location
    try:
        if storage.is_uri(local):
            listing = _list_uri(local)
        elif os.path.isdir(local):
            listing = _list_local_folder(local, follow_symlinks)
        elif os.path.isfile(local):
            listing = _read_manifest(local)
        else:
            raise InputError(f"input not found: {location}")
    except InputError:
        raise
    except (OSError, pa.ArrowException) as exc:
        raise InputError(f"could not list input {location}: {exc}") from exc
    skipped = {reason: count for reason, count in listing.skipped.items() if count}
    listing.skipped = skipped
    if listing.num_files == 0:
        what = "paths" if listing.source == "manifest" else f"image files ({', '.join(storage.IMAGE_EXTENSIONS)})"
        detail = f"; skipped: {skipped}" if skipped else ""
        raise InputError(f"no {what} found in input {location}{detail}")
    logger.info("Listed %d files from %s %s%s", listing.num_files, listing.source, location,
                f" (skipped {skipped})" if skipped else "")
    return listing


def _inside(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip(os.sep) + os.sep)


def _list_local_folder(folder: str, follow_symlinks: bool) -> InputListing:
    """Walk a local folder depth-first in sorted order, applying the symlink policy."""
    root = os.path.realpath(os.path.expanduser(folder))
    wanted = tuple(storage.IMAGE_EXTENSIONS)
    skipped = {"symlink_outside_input": 0, "repeated_folder": 0, "unreadable_folder": 0}
    visited: set[str] = set()
    files: list[tuple[str, int | None, int | None]] = []
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
                files.append((os.path.normpath(entry.path), *_size_and_mtime(entry)))
        stack.extend(reversed(subfolders))
    files.sort()
    paths, sizes, mtimes = zip(*files) if files else ((), (), ())
    return InputListing(_listing_table(paths, sizes, mtimes), "folder", skipped)


def _size_and_mtime(entry: os.DirEntry) -> tuple[int | None, int | None]:
    try:
        stat = entry.stat(follow_symlinks=True)
    except OSError:
        return None, None  # a dangling link: scoring gives it an error row
    return stat.st_size, stat.st_mtime_ns


def _listing_table(paths, sizes, mtimes_ns) -> pa.Table:
    mtimes_us = [None if m is None else m // 1000 for m in mtimes_ns]
    return pa.table({
        PATH_COLUMN: pa.array(paths, pa.string()),
        SIZE_COLUMN: pa.array(sizes, pa.int64()),
        MODIFIED_COLUMN: pa.array(mtimes_us, pa.int64()).cast(MODIFIED_TYPE),
    })


def _list_uri(location: str) -> InputListing:
    """A folder in an object store (or a manifest there, by its extension)."""
    if location.lower().endswith(MANIFEST_EXTENSIONS) and not storage.is_dir(location):
        return _read_manifest(location)
    if not storage.exists(location):
        raise InputError(f"input not found: {location}")
    entries = {normalise_path(e.path): e for e in storage.list_files(location, storage.IMAGE_EXTENSIONS)}
    paths = sorted(entries)
    return InputListing(_listing_table(paths, [entries[p].size for p in paths], [entries[p].mtime_ns or None for p in paths]),
                        "folder")


def _read_manifest(location: str) -> InputListing:
    """Read a Parquet or CSV manifest's `path` (and `true_label`) columns."""
    lower = location.lower()
    if not lower.endswith(MANIFEST_EXTENSIONS):
        raise InputError(
            f"input {location} is a file but not a manifest: pass a folder, or a .parquet/.csv file with a 'path' column"
        )
    table = _read_manifest_table(location)
    if PATH_COLUMN not in table.column_names:
        raise InputError(f"manifest {location} has no '{PATH_COLUMN}' column (columns: {table.column_names})")
    columns = [c for c in (PATH_COLUMN, TRUE_LABEL_COLUMN) if c in table.column_names]
    table = table.select(columns).cast(pa.schema([pa.field(c, pa.string()) for c in columns]))
    valid = pc.and_(pc.is_valid(table[PATH_COLUMN]), pc.not_equal(pc.utf8_trim_whitespace(table[PATH_COLUMN]), ""))
    skipped = {"empty_path": table.num_rows - pc.sum(valid).as_py() if table.num_rows else 0}
    table = table.filter(valid)
    base = posixpath.dirname(location) if storage.is_uri(location) else os.path.dirname(os.path.abspath(location))
    # One Python call per row: listing happens once, in the driver, far from the hot path.
    normalised = pa.array([normalise_path(p, base) for p in table[PATH_COLUMN].to_pylist()], pa.string())
    table = table.set_column(0, PATH_COLUMN, normalised)
    before = table.num_rows
    table = _first_occurrences(table)
    skipped["duplicate_path"] = before - table.num_rows
    if skipped["duplicate_path"]:
        logger.warning("Manifest %s lists %d paths more than once; each is scored once", location, skipped["duplicate_path"])
    unknown = pa.nulls(table.num_rows, pa.int64())
    table = table.append_column(SIZE_COLUMN, unknown).append_column(MODIFIED_COLUMN, unknown.cast(MODIFIED_TYPE))
    return InputListing(table, "manifest", skipped)


def _read_manifest_table(location: str) -> pa.Table:
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    fs, inner = storage.resolve(location)
    try:
        if location.lower().endswith(".parquet"):
            return pq.read_table(inner, filesystem=fs)
        with fs.open_input_stream(inner) as stream:
            return pacsv.read_csv(stream)
    except (pa.ArrowException, OSError, ValueError) as exc:
        raise InputError(f"could not read manifest {location}: {exc}") from exc


def _first_occurrences(table: pa.Table) -> pa.Table:
    """Drop repeated paths, keeping each path's first row (and its true_label)."""
    indexed = table.append_column("__row", pa.array(range(table.num_rows), pa.int64()))
    first = indexed.group_by(PATH_COLUMN, use_threads=False).aggregate([("__row", "min")])
    keep = pc.sort_indices(first["__row_min"])
    rows = pc.take(first["__row_min"], keep)
    return table.take(rows)
