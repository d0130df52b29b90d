"""The predictions folder: refuse, overwrite or resume; name our part files; account; mark success.

Layout of an output folder (local path or URI):

    catdog-<run id>-<write uuid>_<task>-<i>.parquet   part files (under label=<class>/ when partitioned)
    _catdog_run.json                                  written first: model id, classes, layout
    _quarantine/                                      truncated part files found by --resume
    _SUCCESS.json                                     written last: the run summary

Names starting with `_` are skipped by pyarrow, pandas, Spark and DuckDB globs on `*.parquet`, so
readers see only part files. A folder without `_SUCCESS.json` is partial. `--overwrite` deletes
only files of these names; anything else in the folder is left alone.
"""

from __future__ import annotations

import logging
import posixpath
import re
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Sequence

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import pyarrow.fs as pafs
import pyarrow.parquet as pq
from ray.data.datasource import FilenameProvider

from catdog import storage
from catdog.errors import CatdogError, OutputExistsError

logger = logging.getLogger(__name__)

SUCCESS_FILE = "_SUCCESS.json"
RUN_MARKER = "_catdog_run.json"
QUARANTINE_DIR = "_quarantine"
PART_PREFIX = "catdog-"
# Our part file names, as written by Ray's parquet datasink from PartFilenameProvider's template.
PART_PATTERN = re.compile(r"^catdog-[0-9a-f]{12}-[0-9a-f]{32}_\d{6}-\d+\.parquet$")


class AccountingError(RuntimeError):
    """The output does not hold exactly one row per listed file (a bug or a concurrent writer)."""


def new_run_id() -> str:
    return uuid.uuid4().hex[:12]


class PartFilenameProvider(FilenameProvider):
    """`catdog-<run id>-<write uuid>_<task>`: unique per run and write, with no dot before the
    extension (Ray appends `-<i>.parquet`)."""

    def __init__(self, run_id: str):
        super().__init__(file_format="parquet")
        self.run_id = run_id

    def get_filename_for_task(self, write_uuid: str, task_index: int) -> str:
        return f"{PART_PREFIX}{self.run_id}-{write_uuid}_{task_index:06}.parquet"


def is_part_file(name: str) -> bool:
    return PART_PATTERN.match(posixpath.basename(name)) is not None


@dataclass
class OutputState:
    """What an output folder already holds when a run starts."""

    done_paths: pa.Array = field(default_factory=lambda: pa.array([], pa.string()))
    kept_files: list[str] = field(default_factory=list)
    quarantined: list[str] = field(default_factory=list)
    deleted: int = 0
    created: bool = False  # the run made the folder


def _entries(output: str, recursive: bool) -> list[pafs.FileInfo]:
    fs, root = storage.resolve(output)
    if fs.get_file_info(root).type == pafs.FileType.NotFound:
        return []
    return fs.get_file_info(pafs.FileSelector(root, recursive=recursive, allow_not_found=True))


def list_part_files(output: str) -> list[str]:
    """Our part files under `output` (filesystem-internal paths, sorted), quarantine excluded."""
    fs, root = storage.resolve(output)
    quarantine = posixpath.join(root, QUARANTINE_DIR) + "/"
    return sorted(
        info.path for info in _entries(output, recursive=True)
        if info.type == pafs.FileType.File and is_part_file(info.path) and not info.path.startswith(quarantine)
    )


def refuse_existing(output: str, *, overwrite: bool, resume: bool) -> None:
    """Fail fast, before any work, when `output` holds files and neither flag was given.

    Raises:
        OutputExistsError: as above, or `output` is a file.
    """
    fs, root = storage.resolve(output)
    if fs.get_file_info(root).type == pafs.FileType.File:
        raise OutputExistsError(f"output {output} is a file; give a folder")
    existing = _entries(output, recursive=False)
    if existing and not (overwrite or resume):
        parts = len(list_part_files(output))
        complete = storage.exists(storage.join(output, SUCCESS_FILE))
        raise OutputExistsError(
            f"output {output} already exists and is not empty ({len(existing)} entries, {parts} catdog part files, "
            f"{'complete: _SUCCESS.json present' if complete else 'partial: no _SUCCESS.json'}); pass --resume to "
            "finish it, --overwrite to replace catdog's files in it, or choose a new folder"
        )


def prepare_output(output: str, *, overwrite: bool, resume: bool, run_info: dict, schema: pa.Schema) -> OutputState:
    """Make `output` ready for a run and return what it already holds.

    `run_info` (model_id, class_names, partition_by, ...) is written to the run marker; a resume
    must match it. `schema` is the file schema this run writes.

    Raises:
        OutputExistsError: the output holds files and neither overwrite nor resume was asked, or
            it is a file.
        CatdogError: a resume with another model, classes or layout than the existing output.
    """
    refuse_existing(output, overwrite=overwrite, resume=resume)
    state = OutputState(created=not storage.exists(output))
    if _entries(output, recursive=False):
        if overwrite:
            state.deleted = _delete_own_files(output)
        else:
            _check_resumable(output, run_info)
            if storage.exists(storage.join(output, SUCCESS_FILE)):
                storage.delete_file(storage.join(output, SUCCESS_FILE))  # partial again until this run ends
            state = _scan_for_resume(output, schema)
    storage.make_dirs(output)
    storage.write_json(storage.join(output, RUN_MARKER), run_info)
    return state


def discard_if_empty(output: str, remove_folder: bool) -> None:
    """When no part file exists: remove our run marker, and the folder if we created it."""
    if list_part_files(output):
        return
    marker = storage.join(output, RUN_MARKER)
    if storage.exists(marker):
        storage.delete_file(marker)
    fs, root = storage.resolve(output)
    if remove_folder and not _entries(output, recursive=False):
        fs.delete_dir(root)


def _delete_own_files(output: str) -> int:
    """Delete part files, the marker, _SUCCESS.json and the quarantine; then empty label= folders."""
    fs, root = storage.resolve(output)
    own = {posixpath.join(root, SUCCESS_FILE), posixpath.join(root, RUN_MARKER)}
    quarantine = posixpath.join(root, QUARANTINE_DIR) + "/"
    entries = _entries(output, recursive=True)
    deleted = 0
    for info in entries:
        if info.type == pafs.FileType.File and (info.path in own or is_part_file(info.path)):
            fs.delete_file(info.path)
            deleted += 1
    folders = [i.path for i in entries if i.type == pafs.FileType.Directory
               and (i.path.startswith(quarantine) or i.path + "/" == quarantine
                    or posixpath.basename(i.path).startswith("label="))]
    for folder in sorted(folders, key=len, reverse=True):
        if not fs.get_file_info(pafs.FileSelector(folder, recursive=False)):
            fs.delete_dir(folder)
    logger.info("--overwrite: deleted %d catdog files from %s (other files left alone)", deleted, output)
    return deleted


def _check_resumable(output: str, run_info: dict) -> None:
    marker = storage.join(output, RUN_MARKER)
    if not storage.exists(marker):
        return
    previous = storage.read_json(marker)
    for key in ("model_id", "class_names", "partition_by", "with_true_label"):
        if previous.get(key) != run_info.get(key):
            raise CatdogError(
                f"cannot resume {output}: it was written with {key}={previous.get(key)!r}, this run has "
                f"{run_info.get(key)!r}; use --overwrite or a new output folder"
            )


def _scan_for_resume(output: str, schema: pa.Schema) -> OutputState:
    """Quarantine part files without a valid footer; collect the paths already scored."""
    fs, root = storage.resolve(output)
    state = OutputState()
    expected = set(schema.names)
    for path in list_part_files(output):
        try:
            names = set(pq.read_metadata(path, filesystem=fs).schema.to_arrow_schema().names)
        except (pa.ArrowException, OSError) as exc:
            state.quarantined.append(_quarantine(fs, root, path, exc))
            continue
        if not names <= expected or "path" not in names:
            raise CatdogError(f"cannot resume {output}: {path} has columns {sorted(names)}, this run writes "
                              f"{schema.names}; use --overwrite or a new output folder")
        state.kept_files.append(path)
    if state.kept_files:
        done = pads.dataset(state.kept_files, filesystem=fs, format="parquet").to_table(columns=["path"])
        state.done_paths = pc.unique(done["path"].combine_chunks())
    logger.info("--resume: %d part files kept (%d paths done), %d truncated files quarantined",
                len(state.kept_files), len(state.done_paths), len(state.quarantined))
    return state


def _quarantine(fs: pafs.FileSystem, root: str, path: str, reason: Exception) -> str:
    target = posixpath.join(root, QUARANTINE_DIR, posixpath.basename(path))
    fs.create_dir(posixpath.dirname(target), recursive=True)
    if fs.get_file_info(target).type != pafs.FileType.NotFound:
        target = f"{target[:-len('.parquet')]}-{uuid.uuid4().hex[:8]}.parquet"
    fs.move(path, target)
    logger.warning("Quarantined unreadable part file %s (%s) to %s", path, reason, target)
    return target


def account(output: str, listed_paths: pa.Array) -> dict:
    """Check the output holds exactly one row per listed path; count rows and errors by kind.

    Raises:
        AccountingError: rows missing, duplicated, or for paths that were not listed.
    """
    fs, root = storage.resolve(output)
    files = list_part_files(output)
    if files:
        table = pads.dataset(files, filesystem=fs, format="parquet").to_table(columns=["path", "error"])
    else:
        table = pa.table({"path": pa.array([], pa.string()), "error": pa.array([], pa.string())})
    paths = table["path"].combine_chunks()
    rows, distinct = table.num_rows, pc.count_distinct(paths).as_py()
    missing = len(listed_paths) - pc.sum(pc.is_in(listed_paths, value_set=paths)).as_py() if len(listed_paths) else 0
    unlisted = rows - pc.sum(pc.is_in(paths, value_set=listed_paths)).as_py() if rows else 0
    if rows != len(listed_paths) or distinct != rows or missing or unlisted:
        raise AccountingError(
            f"output {output} holds {rows} rows ({rows - distinct} duplicates, {unlisted} for unlisted paths) "
            f"for {len(listed_paths)} listed files ({missing} missing); _SUCCESS.json not written"
        )
    errors = table["error"].combine_chunks().drop_null()
    by_kind: dict[str, int] = {}
    if len(errors):
        kinds = pc.list_element(pc.split_pattern(errors, ":", max_splits=1), 0)
        by_kind = {row["values"]: row["counts"] for row in pc.value_counts(kinds).to_pylist()}
    return {
        "rows_written": rows,
        "predictions": rows - len(errors),
        "errors": len(errors),
        "errors_by_kind": dict(sorted(by_kind.items())),
        "output_files": [posixpath.relpath(f, root) for f in files],
    }


def drop_superseded_files(output: str, run_id: str) -> list[str]:
    """Delete part files of earlier runs whose every path this run scored again; return them.

    A killed run's worker can finish a write ~2 s after the kill, after a quick `--resume` scanned
    the folder; the resumed run then scores those files again. The late file is the redundant copy.
    """
    fs, _ = storage.resolve(output)
    files = list_part_files(output)
    ours = [f for f in files if posixpath.basename(f).startswith(f"{PART_PREFIX}{run_id}-")]
    if not ours:
        return []
    rescored = pads.dataset(ours, filesystem=fs, format="parquet").to_table(columns=["path"])["path"]
    dropped = []
    for path in sorted(set(files) - set(ours)):
        paths = pq.read_table(path, columns=["path"], filesystem=fs)["path"]
        if len(paths) and pc.all(pc.is_in(paths, value_set=rescored.combine_chunks())).as_py():
            fs.delete_file(path)
            dropped.append(path)
            logger.warning("Deleted %s: a late write of an interrupted run, every row scored again", path)
    return dropped


def write_success(output: str, summary: dict) -> None:
    """Write _SUCCESS.json last, through a temporary name so it is never seen half-written."""
    fs, root = storage.resolve(output)
    temporary = posixpath.join(root, f"_SUCCESS.{uuid.uuid4().hex[:8]}.tmp")
    storage.write_json(storage.to_location(output, temporary) if storage.is_uri(output) else temporary, summary)
    fs.move(temporary, posixpath.join(root, SUCCESS_FILE))


def read_predictions(output: str, columns: Sequence[str] | None = None) -> pa.Table:
    """Read our part files of an output folder (hive `label=` folders included) as one table."""
    fs, root = storage.resolve(output)
    files = list_part_files(output)
    if not files:
        raise CatdogError(f"no catdog predictions in {output}")
    partitioned = any("/label=" in f for f in files)
    dataset = pads.dataset(files, filesystem=fs, format="parquet",
                           partitioning="hive" if partitioned else None,
                           partition_base_dir=root if partitioned else None)
    return dataset.to_table(columns=list(columns) if columns else None)


def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")
