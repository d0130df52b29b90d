"""Predictions folders made by hand for tests: part files as a scoring run writes them, and a
filesystem whose disk fills at a chosen change (I/O failure injected at the boundary, the files
underneath real)."""

from __future__ import annotations

import errno
from pathlib import Path

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from catdog.score import ledger
from catdog.score.predictions_folder import PartFilenameProvider, predictions_schema

CLASSES = ["cats", "dogs"]
PATHS = pa.schema([("path", pa.string())])


def part_name(task: int = 0, run_id: str = "0123456789ab") -> str:
    return PartFilenameProvider(run_id).get_filename_for_task("f" * 32, task).replace(".parquet", "-0.parquet")


def write_part(folder: Path, paths: list[str], task: int = 0, run_id: str = "0123456789ab",
               errors: list[str | None] | None = None) -> Path:
    """One part file of `paths` (every column of the predictions schema), as a run writes it."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    n = len(paths)
    table = pa.table({
        "path": paths, "label": ["cats"] * n, "prob_cats": pa.array([0.9] * n, pa.float32()),
        "prob_dogs": pa.array([0.1] * n, pa.float32()), "confidence": pa.array([0.9] * n, pa.float32()),
        "error": pa.array(errors or [None] * n, pa.string()), "width": pa.array([1] * n, pa.int32()),
        "height": pa.array([1] * n, pa.int32()), "model_id": ["m"] * n,
        "scored_at": pa.array([0] * n, pa.timestamp("us", tz="UTC")),
        "file_size": pa.array([1] * n, pa.int64()), "file_modified": pa.array([0] * n, pa.timestamp("us", tz="UTC")),
    }, schema=predictions_schema(CLASSES))
    path = folder / part_name(task, run_id)
    pq.write_table(table, path)
    return path


def replaced_paths(scratch: Path, paths: list[str]) -> ledger.Buckets:
    """`paths` as the bucketed set a resume hands to `PredictionsFolder.remove_rows`."""
    return ledger.split([pa.table({"path": paths})], str(scratch / "replaced"), 3, PATHS)


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
