"""The predictions folder: the one owner of a scoring output's files and of their schema.

Layout of an output folder (local path or URI):

    catdog-<run id>-<write uuid>_<task>-<i>.parquet   part files (under label=<class>/ when partitioned)
    _catdog_run.json                                  written first: model id, classes, layout
    _listing/chunk-<n>.listing                        the files this output was scored from (Parquet)
    _todo/                                            a resumed run's files to score (while it runs)
    _quarantine/                                      part files set aside by --resume (unreadable footer)
    _rewrite/                                         a part file being replaced (while it is rewritten)
    _catdog_lease.json                                the run that holds the output (catdog.score.lease)
    _SUCCESS.json                                     written last: the run summary

Names starting with `_` are skipped by pyarrow, pandas, Spark and DuckDB globs on `*.parquet`, so
readers see only part files. A folder without `_SUCCESS.json` is partial.

What belongs to this output: the files above at its top level and part files in its own `label=`
folders. A sub-folder holding its own `_catdog_run.json` is another output and is never entered;
`--overwrite` deletes only this output's files, and nothing else in the folder.

Two readers, one dataset: `read()` takes exactly this output's part files (scoring, resume, the
demo, tests); `scan()` takes what any Parquet reader of the folder sees, every `*.parquet` outside
`_`/`.` names, whoever wrote it (jobs.report, jobs.evaluate).

Memory: listing the folder holds one entry per part file (thousands, not per row). Rows and the
listing are read a batch at a time; resume, accounting and replacing rows compare them bucket by
bucket (`catdog.score.ledger`), in a scratch folder on local disk.

Crash safety: a part file is replaced by writing its successor first, then retiring it, with a
journal in `_rewrite/`; whatever step a crash stops at, each row lives in exactly one part file,
or the next `--resume` (`recover_rewrites`) puts it back and says so. `_SUCCESS.json` is removed
only when a run is about to change rows (`mark_partial`).

Over 300 lines on purpose: the schema, the layout, the run's lifecycle and the readers of one
folder stay in one module, so that no other code knows its file names.
"""

from __future__ import annotations

import functools
import json
import logging
import posixpath
import re
import tempfile
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Iterable, Iterator, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.fs as pafs
import pyarrow.parquet as pq
from catdog.errors import CatdogError, InputError, OutputExistsError
from catdog.io import storage
from catdog.score.lease import LEASE_FILE

logger = logging.getLogger(__name__)

SUCCESS_FILE = "_SUCCESS.json"
RUN_MARKER = "_catdog_run.json"
QUARANTINE_DIR = "_quarantine"
REWRITE_DIR = "_rewrite"
LISTING_DIR = "_listing"
TODO_DIR = "_todo"
# Parquet files named so that no `*.parquet` glob over the output, however deep, takes them for rows.
_LISTING_CHUNK = re.compile(r"^chunk-\d{6,}\.listing$")
PART_PREFIX = "catdog-"
PARTITION_PREFIX = "label="
# Our part file names, as written by Ray's parquet datasink from PartFilenameProvider's template.
PART_PATTERN = re.compile(r"^catdog-[0-9a-f]{12}-[0-9a-f]{32}_\d{6}-\d+\.parquet$")
_SUCCESS_TEMPORARY = re.compile(r"^_SUCCESS\.[0-9a-f]{8}\.tmp$")
# Columns that identify the content a row was scored from; a resume rescores a file when they changed.
FILE_SIZE_COLUMN = "file_size"
FILE_MODIFIED_COLUMN = "file_modified"
_IDENTITY_TYPES = {FILE_SIZE_COLUMN: pa.int64(), FILE_MODIFIED_COLUMN: pa.timestamp("us", tz="UTC")}
# What makes a folder of Parquet files one of ours for a reader (`scan`).
REQUIRED_COLUMNS = ("label", "confidence", "error")

# ---- the schema: one constant, used by the writer, the readers and the docs ----

# Columns before and after the per-class probabilities, in file order.
LEADING_FIELDS = [
    pa.field("path", pa.string(), nullable=False),  # input file, normalised URI or absolute path
    pa.field("label", pa.string()),  # predicted class; null when the file could not be scored
]
TRAILING_FIELDS = [
    pa.field("confidence", pa.float32()),  # probability of the predicted class
    pa.field("error", pa.string()),  # null when scored, else "kind: message"
    pa.field("width", pa.int32()),  # original image width in pixels, as displayed; null if unknown
    pa.field("height", pa.int32()),
    pa.field("model_id", pa.string(), nullable=False),  # hash of the model artifact
    pa.field("scored_at", pa.timestamp("us", tz="UTC"), nullable=False),
    # What the file was when listed; a resume rescores a file whose size or time changed. Null when unknown.
    pa.field(FILE_SIZE_COLUMN, pa.int64()),
    pa.field(FILE_MODIFIED_COLUMN, pa.timestamp("us", tz="UTC")),
]
PROB_PREFIX = "prob_"
TRUE_LABEL_FIELD = pa.field("true_label", pa.string())  # added by jobs.evaluate only


def prob_column(class_name: str) -> str:
    """Column name holding the probability of one class."""
    return f"{PROB_PREFIX}{class_name}"


TOP_K_LABELS, TOP_K_PROBS, EMBEDDING = "top_k_labels", "top_k_probs", "embedding"


def predictions_schema(class_names: Sequence[str], with_true_label: bool = False, top_k: int = 0,
                       embedding_width: int = 0) -> pa.Schema:
    """The pyarrow schema of a predictions file for a model with these classes.

    `top_k` > 0 adds `top_k_labels` / `top_k_probs` (fixed-size lists, best first);
    `embedding_width` > 0 adds `embedding`, the pooled backbone features (fixed-size float32 list).
    Both are null for rows that could not be scored.
    """
    probs = [pa.field(prob_column(name), pa.float32()) for name in class_names]
    extra = []
    if top_k:
        extra += [pa.field(TOP_K_LABELS, pa.list_(pa.string(), top_k)), pa.field(TOP_K_PROBS, pa.list_(pa.float32(), top_k))]
    if embedding_width:
        extra.append(pa.field(EMBEDDING, pa.list_(pa.float32(), embedding_width)))
    if with_true_label:
        extra.append(TRUE_LABEL_FIELD)
    return pa.schema(LEADING_FIELDS + probs + TRAILING_FIELDS + extra)


def error_kinds(errors: Sequence[str | None]) -> dict[str, int]:
    """Count errors by their stable kind prefix ("truncated", "not_an_image", ...)."""
    counts: dict[str, int] = {}
    for error in errors:
        if error is not None:
            kind = error.split(":", 1)[0]
            counts[kind] = counts.get(kind, 0) + 1
    return dict(sorted(counts.items()))


# ---- names ----


class AccountingError(RuntimeError):
    """The output does not hold exactly one row per listed file (a bug or a concurrent writer)."""

    duplicates: int = 0  # rows beyond the first of a path


Tables = Iterable[pa.Table] | pa.Array  # a stream of tables with `path`, or the paths in one array


def _as_tables(value: Tables) -> Iterable[pa.Table]:
    if isinstance(value, (pa.Array, pa.ChunkedArray)):
        return [pa.table({"path": value})]
    return value


def new_run_id() -> str:
    return uuid.uuid4().hex[:12]


def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def is_part_file(name: str) -> bool:
    return PART_PATTERN.match(posixpath.basename(name)) is not None


def part_file_name(run_id: str, write_uuid: str, task_index: int) -> str:
    """`catdog-<run id>-<write uuid>_<task>.parquet`: unique per run and write, with no dot before
    the extension (Ray's datasink inserts `-<i>` before `.parquet`)."""
    return f"{PART_PREFIX}{run_id}-{write_uuid}_{task_index:06}.parquet"


@functools.cache
def _part_filename_provider() -> type:
    # Defined on first use: importing Ray Data would slow every reader of the schema.
    from ray.data.datasource import FilenameProvider

    class PartFilenameProvider(FilenameProvider):
        """Ray Data's file names for our part files (`part_file_name`)."""

        def __init__(self, run_id: str):
            super().__init__(file_format="parquet")
            self.run_id = run_id

        def get_filename_for_task(self, write_uuid: str, task_index: int) -> str:
            return part_file_name(self.run_id, write_uuid, task_index)

    PartFilenameProvider.__qualname__ = "PartFilenameProvider"  # pickled by reference, via __getattr__
    return PartFilenameProvider


def __getattr__(name: str):
    if name == "PartFilenameProvider":
        return _part_filename_provider()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


@dataclass
class ResumeState:
    """What an output folder already holds when a run starts, after the resume checks."""

    kept_files: list[str] = field(default_factory=list)
    quarantined: list[str] = field(default_factory=list)
    recovered: list[str] = field(default_factory=list)  # interrupted rewrites finished or undone
    deleted: int = 0
    created: bool = False  # the run made the folder


class PredictionsFolder:
    """A predictions folder, resolved once; the only code that knows its file names."""

    def __init__(self, location: str):
        self.location = location
        self.fs, self.root = storage.resolve(location)
        self._quarantine = posixpath.join(self.root, QUARANTINE_DIR)

    def __repr__(self) -> str:
        return f"PredictionsFolder({self.location!r})"

    # ---- reading the folder ----

    def _info(self, inner: str) -> pafs.FileInfo:
        return self.fs.get_file_info(inner)

    def _children(self, inner: str | None = None) -> list[pafs.FileInfo]:
        inner = self.root if inner is None else inner
        if self._info(inner).type == pafs.FileType.NotFound:
            return []
        return self.fs.get_file_info(pafs.FileSelector(inner, recursive=False, allow_not_found=True))

    def _entries(self) -> list[pafs.FileInfo]:
        """What the folder holds, less the lease of the run that holds it (`catdog.score.lease`)."""
        return [i for i in self._children() if not posixpath.basename(i.path).startswith(LEASE_FILE)]

    def _own_partitions(self, top: list[pafs.FileInfo]) -> list[str]:
        """`label=` sub-folders of this output; one holding its own run marker is another output."""
        return [info.path for info in top if info.type == pafs.FileType.Directory
                and posixpath.basename(info.path).startswith(PARTITION_PREFIX)
                and self._info(posixpath.join(info.path, RUN_MARKER)).type == pafs.FileType.NotFound]

    def part_files(self) -> list[str]:
        """Our part files (filesystem-internal paths, sorted): top level and own `label=` folders."""
        top = self._children()
        files = [info.path for info in top if info.type == pafs.FileType.File and is_part_file(info.path)]
        for folder in self._own_partitions(top):
            files += [i.path for i in self._children(folder) if i.type == pafs.FileType.File and is_part_file(i.path)]
        return sorted(files)

    def exists(self) -> bool:
        return self._info(self.root).type != pafs.FileType.NotFound

    def is_complete(self) -> bool:
        return self._info(self._file(SUCCESS_FILE)).type == pafs.FileType.File

    def _file(self, name: str) -> str:
        return posixpath.join(self.root, name)

    def _location(self, name: str) -> str:
        return storage.join(self.location, name)

    def read_success(self) -> dict | None:
        """The run summary in `_SUCCESS.json`; None while the folder is partial (or it holds no JSON object)."""
        if not self.is_complete():
            return None
        try:
            summary = storage.read_json(self._location(SUCCESS_FILE))
        except ValueError:
            logger.warning("%s is not valid JSON", self._location(SUCCESS_FILE))
            return None
        return summary if isinstance(summary, dict) else None

    def read(self, columns: Sequence[str] | None = None) -> pa.Table:
        """Our part files (hive `label=` folders included) as one table."""
        files = self.part_files()
        if not files:
            raise CatdogError(f"no catdog predictions in {self.location}")
        return self._dataset(files).to_table(columns=list(columns) if columns else None)

    def parquet_files(self) -> list[str]:
        """Every `*.parquet` below the folder outside `_`/`.` names, as pandas or DuckDB read it (sorted)."""
        files = []
        for info in self.fs.get_file_info(pafs.FileSelector(self.root, recursive=True)):
            hidden = any(part.startswith(("_", ".")) for part in info.path[len(self.root) + 1:].split("/"))
            if info.type == pafs.FileType.File and info.path.endswith(".parquet") and not hidden:
                files.append(info.path)
        return sorted(files)

    def scan(self) -> pads.Dataset:
        """A pyarrow dataset over `parquet_files()`, whoever wrote them, flat or in `label=<class>/`.

        Raises:
            InputError: missing folder, no Parquet, unreadable Parquet, or not catdog's columns.
        """
        kind = self._info(self.root).type
        if kind == pafs.FileType.NotFound:
            raise InputError(f"predictions folder not found: {self.location}")
        if kind != pafs.FileType.Directory:
            raise InputError(f"predictions must be a folder of Parquet files: {self.location}")
        files = self.parquet_files()
        if not files:
            raise InputError(f"no .parquet files in {self.location}")
        try:
            dataset = self._dataset(files)
        except pa.ArrowInvalid as exc:  # a truncated file from a killed run, or a foreign file
            raise InputError(f"unreadable Parquet in {self.location}: {exc}") from exc
        missing = [c for c in REQUIRED_COLUMNS if c not in dataset.schema.names]
        if missing:
            raise InputError(f"{self.location} is not a catdog predictions folder: no column(s) {missing}")
        return dataset

    def iter_rows(self, columns: Sequence[str], batch_rows: int = 100_000) -> Iterator[pa.Table]:
        """Our rows, a batch at a time; a column an older file lacks comes back null."""
        files = self.part_files()
        if not files:
            return
        dataset = pads.dataset(files, filesystem=self.fs, format="parquet")
        present = [c for c in columns if c in dataset.schema.names]
        # No read-ahead: a scanner's default buffers batches of several files at once.
        for batch in dataset.to_batches(columns=present, batch_size=batch_rows, batch_readahead=0,
                                        fragment_readahead=0, use_threads=False):
            table = pa.Table.from_batches([batch])
            for name in columns:
                if name not in present:
                    table = table.append_column(name, pa.nulls(table.num_rows, _IDENTITY_TYPES.get(name, pa.string())))
            yield table

    def _own_chunks(self, folder: str, pattern: re.Pattern) -> list[str]:
        return sorted(i.path for i in self._children(posixpath.join(self.root, folder))
                      if i.type == pafs.FileType.File and pattern.match(posixpath.basename(i.path)))

    def write_listing_chunk(self, index: int, table: pa.Table) -> None:
        """Keep one listing chunk; a retried chunk replaces its first write (the name is its index)."""
        self.write_chunk(LISTING_DIR, index, table)

    def count_listed(self) -> int:
        """Files in the kept listing, from its footers."""
        return sum(pq.read_metadata(path, filesystem=self.fs).num_rows
                   for path in self._own_chunks(LISTING_DIR, _LISTING_CHUNK))

    def iter_listing(self) -> Iterator[pa.Table]:
        """The listing this output was scored from, a chunk at a time."""
        for path in self._own_chunks(LISTING_DIR, _LISTING_CHUNK):
            yield pq.read_table(path, filesystem=self.fs)

    def clear_listing(self) -> None:
        for path in self._own_chunks(LISTING_DIR, _LISTING_CHUNK):
            self.fs.delete_file(path)

    def write_todo(self, index: int, table: pa.Table) -> None:
        self.write_chunk(TODO_DIR, index, table)

    def todo_files(self) -> list[str]:
        return self._own_chunks(TODO_DIR, _LISTING_CHUNK)

    def clear_todo(self) -> None:
        for path in self.todo_files():
            self.fs.delete_file(path)
        self._remove_if_empty(posixpath.join(self.root, TODO_DIR))

    def write_chunk(self, folder_name: str, index: int, table: pa.Table) -> None:
        folder = posixpath.join(self.root, folder_name)
        if isinstance(self.fs, pafs.LocalFileSystem):
            self.fs.create_dir(folder, recursive=True)
        pq.write_table(table, posixpath.join(folder, f"chunk-{index:06d}.listing"), filesystem=self.fs)

    def _remove_if_empty(self, folder: str) -> None:
        if self._info(folder).type == pafs.FileType.Directory and not self._children(folder):
            self.fs.delete_dir(folder)

    def _dataset(self, files: list[str]) -> pads.Dataset:
        """Partition values stay strings (a class named "1" stays "1"); the folder of unscored rows,
        `label=__HIVE_DEFAULT_PARTITION__`, reads back as a null label."""
        partitioned = any(f"/{PARTITION_PREFIX}" in f[len(self.root):] for f in files)
        label = pads.partitioning(pa.schema([pa.field("label", pa.string())]), flavor="hive")
        return pads.dataset(files, filesystem=self.fs, format="parquet", partitioning=label if partitioned else None,
                            partition_base_dir=self.root if partitioned else None)

    # ---- before a run ----

    def refuse_unsafe(self, input_location: str) -> None:
        """See `storage.refuse_unsafe_output`."""
        storage.refuse_unsafe_output(self.location, input_location)

    def refuse_existing(self, *, overwrite: bool, resume: bool) -> None:
        """Fail fast, before any work, when the folder holds files and neither flag was given.

        Raises:
            OutputExistsError: as above, or the output is a file.
        """
        if self._info(self.root).type == pafs.FileType.File:
            raise OutputExistsError(f"output {self.location} is a file; give a folder")
        existing = self._entries()
        if existing and not (overwrite or resume):
            parts = len(self.part_files())
            raise OutputExistsError(
                f"output {self.location} already exists and is not empty ({len(existing)} entries, {parts} catdog "
                f"part files, {'complete: _SUCCESS.json present' if self.is_complete() else 'partial: no _SUCCESS.json'}"
                "); pass --resume to finish it, --overwrite to replace catdog's files in it, or choose a new folder"
            )

    def prepare(self, *, overwrite: bool, resume: bool, run_info: dict, schema: pa.Schema,
                input_moved: bool = False) -> ResumeState:
        """Make the folder ready for a run and return what it already holds.

        `run_info` (model_id, class_names, partition_by, input, precision, ...) is written to the
        run marker; a resume must match it (`input_moved`: another input is accepted). `schema` is
        the file schema this run writes. A resume keeps `_SUCCESS.json` until rows change
        (`mark_partial`) and first finishes or undoes a rewrite a crash interrupted.

        Raises:
            OutputExistsError: the folder holds files and neither overwrite nor resume was asked,
                or it is a file.
            CatdogError: a resume with another model, classes, layout, input or precision than
                the existing output.
        """
        self.refuse_existing(overwrite=overwrite, resume=resume)
        state = ResumeState(created=not self.exists())
        if self._entries():
            if overwrite:
                state.deleted = self._delete_own_files()
            else:
                self._check_resumable(run_info, input_moved)
                recovered = self.recover_rewrites()
                state = self._scan_for_resume(schema)
                state.recovered = recovered
        self.fs.create_dir(self.root, recursive=True)
        storage.write_json(self._location(RUN_MARKER), run_info)
        return state

    def mark_partial(self) -> None:
        """Remove `_SUCCESS.json`: this run is about to change rows (no-op when absent)."""
        if self.is_complete():
            self.fs.delete_file(self._file(SUCCESS_FILE))

    def discard_if_empty(self, remove_folder: bool) -> None:
        """When no part file exists: remove our run marker, and the folder if we created it."""
        if self.part_files():
            return
        if self._info(self._file(RUN_MARKER)).type == pafs.FileType.File:
            self.fs.delete_file(self._file(RUN_MARKER))
        if remove_folder and not self._entries():
            self.fs.delete_dir(self.root)

    def _delete_own_files(self) -> int:
        """Delete our part files, marker, _SUCCESS.json and quarantine; then our empty `label=` folders."""
        top = self._children()
        doomed = [i.path for i in top if i.type == pafs.FileType.File and _is_own_top_level_file(i.path)]
        partitions = self._own_partitions(top)
        for folder in partitions:
            doomed += [i.path for i in self._children(folder) if i.type == pafs.FileType.File and is_part_file(i.path)]
        doomed += [i.path for i in self._children(self._quarantine)
                   if i.type == pafs.FileType.File and is_part_file(i.path)]
        doomed += self._own_chunks(LISTING_DIR, _LISTING_CHUNK) + self.todo_files() + self._rewrite_files()
        for path in doomed:
            self.fs.delete_file(path)
        for folder in partitions + [self._quarantine, self._file(LISTING_DIR), self._file(TODO_DIR),
                                    self._file(REWRITE_DIR)]:
            self._remove_if_empty(folder)
        logger.info("--overwrite: deleted %d catdog files from %s (other files left alone)", len(doomed), self.location)
        return len(doomed)

    def _check_resumable(self, run_info: dict, input_moved: bool = False) -> None:
        marker = self._location(RUN_MARKER)
        if not storage.exists(marker):
            return
        previous = storage.read_json(marker)
        optional_columns = {"top_k": 0, "embedding_width": 0}  # absent from outputs written before they existed
        for key in ("model_id", "class_names", "partition_by", "with_true_label", *optional_columns):
            if previous.get(key, optional_columns.get(key)) != run_info.get(key, optional_columns.get(key)):
                raise CatdogError(
                    f"cannot resume {self.location}: it was written with {key}={previous.get(key)!r}, this run has "
                    f"{run_info.get(key)!r}; use --overwrite or a new output folder"
                )
        # Outputs written before these were recorded are taken as they are.
        if "precision" in previous and previous["precision"] != run_info.get("precision"):
            raise CatdogError(
                f"cannot resume {self.location}: its rows were scored at --precision {previous['precision']}, this run "
                f"asks for {run_info.get('precision')}; resume with --precision {previous['precision']}, or use "
                "--overwrite or a new output folder")
        before, now = previous.get("input_canonical"), run_info.get("input_canonical")
        if before is not None and before != now:
            if not input_moved:
                raise CatdogError(
                    f"cannot resume {self.location}: it was scored from {before}, this run lists {now}; check --input, "
                    "or pass --input-moved if the input moved on purpose")
            logger.warning("--input-moved: resuming %s, scored from %s, with the files of %s", self.location, before,
                           now)

    def _scan_for_resume(self, schema: pa.Schema) -> ResumeState:
        """Quarantine part files without a valid footer; read the rows already scored."""
        state = ResumeState()
        expected = set(schema.names)
        for path in self.part_files():
            try:
                names = set(pq.read_metadata(path, filesystem=self.fs).schema.to_arrow_schema().names)
            except (pa.ArrowException, OSError) as exc:
                state.quarantined.append(self._quarantine_file(path, exc))
                continue
            if not names <= expected or "path" not in names:
                raise CatdogError(f"cannot resume {self.location}: {path} has columns {sorted(names)}, this run "
                                  f"writes {schema.names}; use --overwrite or a new output folder")
            state.kept_files.append(path)
        logger.info("--resume: %d part files kept, %d truncated files quarantined",
                    len(state.kept_files), len(state.quarantined))
        return state

    def _quarantine_file(self, path: str, reason: object) -> str:
        target = posixpath.join(self._quarantine, posixpath.basename(path))
        self.fs.create_dir(self._quarantine, recursive=True)
        if self._info(target).type != pafs.FileType.NotFound:
            target = f"{target[:-len('.parquet')]}-{uuid.uuid4().hex[:8]}.parquet"
        self.fs.move(path, target)
        logger.warning("Quarantined part file %s (%s) to %s", path, reason, target)
        return target

    def remove_rows(self, replaced, run_id: str, schema: pa.Schema, scratch: str) -> int:
        """Rewrite the part files that hold rows of the `replaced` paths (`ledger.Buckets`) without
        them; return the rows removed. Found bucket by bucket in `scratch` (`ledger.locate`); each
        file replaced crash-safely (`_replace_part_file`)."""
        from catdog.score import ledger

        if not replaced.rows:
            return 0
        files = self.part_files()
        removed = 0
        for index, rows in ledger.locate(files, self._paths_of, replaced, scratch):
            table = pq.read_table(files[index], filesystem=self.fs)
            keep = np.ones(table.num_rows, dtype=bool)
            keep[rows] = False
            kept = table.filter(pa.array(keep))
            self._replace_part_file(files[index], kept.cast(_file_schema(schema, kept.schema)), run_id,
                                    f"{len(rows)} rows replaced")
            removed += len(rows)
        return removed

    def _paths_of(self, part_file: str) -> pa.Array:
        return pq.read_table(part_file, columns=["path"], filesystem=self.fs)["path"].combine_chunks()

    def _replace_part_file(self, old: str, kept: pa.Table, run_id: str, why: str) -> None:
        """Replace part file `old` by one holding `kept` (no file when empty), in steps a crash may stop
        anywhere: (1) the successor is written to `_rewrite/`, (2) a journal names both, (3) `old`
        is retired into `_rewrite/`, (4) the successor is moved to its place, (5) the retired file
        and the journal go. `recover_rewrites` finishes or undoes it from any step."""
        name = part_file_name(run_id, uuid.uuid4().hex, 0).replace(".parquet", "-0.parquet")
        new = posixpath.join(posixpath.dirname(old), name) if kept.num_rows else None
        staged, journal, retired = self._rewrite_names(name)
        if not storage.is_uri(self.location):  # object stores have no folders to make
            self.fs.create_dir(self._file(REWRITE_DIR), recursive=True)
        if new is not None:
            pq.write_table(kept, staged, filesystem=self.fs)
        self._write_json(journal, {"old": self._relative(old), "new": self._relative(new) if new else None})
        self.fs.move(old, retired)
        if new is not None:
            self.fs.move(staged, new)
        self.fs.delete_file(retired)
        self.fs.delete_file(journal)
        logger.info("Rewrote part file %s (%s)%s", old, why, f" as {new}" if new else ": no row left, removed")

    def _rewrite_names(self, name: str) -> tuple[str, str, str]:
        staged = posixpath.join(self.root, REWRITE_DIR, name)
        return staged, f"{staged}.json", f"{staged}.old"

    def _relative(self, inner: str) -> str:
        return posixpath.relpath(inner, self.root)

    def _write_json(self, inner: str, payload: dict) -> None:
        with self.fs.open_output_stream(inner) as stream:
            stream.write(json.dumps(payload).encode("utf-8"))

    def _rewrite_files(self) -> list[str]:
        """Our files in `_rewrite/`: a staged part file, its journal (`.json`) and the retired one (`.old`)."""
        return sorted(i.path for i in self._children(self._file(REWRITE_DIR)) if i.type == pafs.FileType.File
                      and is_part_file(posixpath.basename(i.path).split(".parquet", 1)[0] + ".parquet"))

    def recover_rewrites(self) -> list[str]:
        """Finish or undo every part-file rewrite a crash interrupted (see `_replace_part_file`).

        Returns one line per rewrite saying what was done; each is logged as a warning.
        """
        done = []
        for journal in [f for f in self._rewrite_files() if f.endswith(".parquet.json")]:
            staged, _, retired = self._rewrite_names(posixpath.basename(journal)[: -len(".json")])
            with self.fs.open_input_stream(journal) as stream:
                entry = json.loads(stream.read().decode("utf-8"))
            old = self._file(entry["old"])
            new = self._file(entry["new"]) if entry.get("new") else None
            if self._is_file(old):
                outcome = f"undone: {entry['old']} was never retired"
            elif new is not None and self._is_file(new):
                outcome = f"finished: {entry['old']} had been replaced by {entry['new']}"
            elif self._is_file(retired):
                if new is None:
                    outcome = f"finished: {entry['old']} removed, every row of it replaced"
                elif self._readable(staged):
                    self.fs.move(staged, new)
                    outcome = f"finished: {entry['new']} put in place of {entry['old']}"
                else:
                    self.fs.move(retired, old)
                    outcome = f"undone: {entry['old']} restored, its successor was incomplete"
            else:
                outcome = f"nothing to recover for {entry['old']}: neither it nor its successor is there"
            for leftover in (staged, retired, journal):
                if self._is_file(leftover):
                    self.fs.delete_file(leftover)
            logger.warning("Interrupted rewrite of a part file %s", outcome)
            done.append(outcome)
        for stray in self._rewrite_files():  # a successor written before its journal: never in place
            self.fs.delete_file(stray)
        self._remove_if_empty(self._file(REWRITE_DIR))
        return done

    def _is_file(self, inner: str) -> bool:
        return self._info(inner).type == pafs.FileType.File

    def _readable(self, inner: str) -> bool:
        try:
            pq.read_metadata(inner, filesystem=self.fs)
            return True
        except (pa.ArrowException, OSError):
            return False

    # ---- after a run ----

    def count_rows(self) -> int:
        """Rows in our part files, from their footers."""
        return sum(pq.read_metadata(f, filesystem=self.fs).num_rows for f in self.part_files())

    def account(self, listing: Tables | None = None, kept_unlisted: Tables | None = None,
                listed_rows: int | None = None, scratch: str | None = None) -> dict:
        """Check the output holds exactly one row per listed path; count rows and errors by kind.

        `listing`: the listed paths (tables with `path`, or one array); default: this folder's
        `_listing/`. `kept_unlisted`: paths no longer listed whose rows a resume reported and
        kept; they are counted in `rows_not_in_listing` and left out of the verdict. Any other
        unlisted row fails it. Compared bucket by bucket (`catdog.score.ledger`) in a folder under
        `scratch` (default: the system's temporary folder): memory stays bounded.

        Raises:
            AccountingError: listed paths missing or duplicated, rows of unknown paths, or a path
                with more than one row; `duplicates` on the error counts the extra rows.
        """
        verdict = self._verdict(listing, kept_unlisted, listed_rows, scratch)
        if not verdict.exact:
            error = AccountingError(
                f"output {self.location} holds {verdict.rows} rows ({verdict.duplicates} duplicates, {verdict.unknown} "
                f"for unlisted paths) for {verdict.listed} listed files ({verdict.missing} missing); "
                "_SUCCESS.json not written")
            error.duplicates = verdict.duplicates
            raise error
        errors = sum(verdict.errors_by_kind.values())
        return {
            "rows_written": verdict.in_listing,
            "predictions": verdict.in_listing - errors,
            "errors": errors,
            "errors_by_kind": verdict.errors_by_kind,
            "rows_not_in_listing": verdict.kept_unlisted,
            "output_files": [posixpath.relpath(f, self.root) for f in self.part_files()],
        }

    def _verdict(self, listing: Tables | None, kept_unlisted: Tables | None, listed_rows: int | None,
                 scratch: str | None):
        from catdog.score import ledger

        listing = self.iter_listing() if listing is None else _as_tables(listing)
        rows = self.count_rows()
        buckets = ledger.bucket_count(max(rows, listed_rows or 0))
        paths = pa.schema([("path", pa.string())])
        with tempfile.TemporaryDirectory(prefix="catdog-accounting-", dir=scratch) as scratch:
            listed = ledger.split((t.select(["path"]) for t in listing), f"{scratch}/listing", buckets, paths)
            written = ledger.split(self.iter_rows(["path", "error"]), f"{scratch}/rows", buckets,
                                   pa.schema([("path", pa.string()), ("error", pa.string())]))
            kept = ledger.split(_as_tables(kept_unlisted), f"{scratch}/kept", buckets, paths) if kept_unlisted is not None else None
            return ledger.account(listed, written, kept)

    def drop_superseded_files(self, run_id: str, scratch: str | None = None) -> list[str]:
        """Delete earlier runs' part files whose every row has a copy in this run's (`run_id`) files.

        A killed run's worker can finish a write seconds after the kill, after a quick `--resume`
        scanned the folder; the resumed run then scores those files again. The late file is the
        redundant copy. Found bucket by bucket (`ledger.locate`): no set of paths in memory.
        """
        from catdog.score import ledger

        files = self.part_files()
        ours = f"{PART_PREFIX}{run_id}-"
        mine = [f for f in files if posixpath.basename(f).startswith(ours)]
        theirs = [f for f in files if not posixpath.basename(f).startswith(ours)]
        if not mine or not theirs:
            return []
        dropped = []
        with tempfile.TemporaryDirectory(prefix="catdog-superseded-", dir=scratch) as folder:
            count = ledger.bucket_count(self.count_rows())
            rescored = ledger.split((pa.table({"path": self._paths_of(f)}) for f in mine), f"{folder}/mine", count,
                                    pa.schema([("path", pa.string())]))
            for index, rows in ledger.locate(theirs, self._paths_of, rescored, folder):
                path = theirs[index]
                if len(rows) == pq.read_metadata(path, filesystem=self.fs).num_rows:
                    self.fs.delete_file(path)
                    dropped.append(path)
                    logger.warning("Deleted %s: a late write of an interrupted run, every row scored again", path)
        return dropped

    def write_success(self, summary: dict) -> None:
        """Write _SUCCESS.json last, through a temporary name so it is never seen half-written."""
        temporary = f"_SUCCESS.{uuid.uuid4().hex[:8]}.tmp"
        storage.write_json(self._location(temporary), summary)
        self.fs.move(self._file(temporary), self._file(SUCCESS_FILE))

    def filename_provider(self, run_id: str):
        """The `ray.data.datasource.FilenameProvider` of this run's part files."""
        return _part_filename_provider()(run_id)


def _is_own_top_level_file(path: str) -> bool:
    name = posixpath.basename(path)
    return name in (SUCCESS_FILE, RUN_MARKER) or is_part_file(name) or _SUCCESS_TEMPORARY.match(name) is not None


def _file_schema(schema: pa.Schema, present: pa.Schema) -> pa.Schema:
    """This run's schema restricted to the columns an older file has (older files lack newer columns)."""
    return pa.schema([schema.field(name) if name in schema.names else present.field(name) for name in present.names])
