"""Where a scoring pipeline's paths come from: Ray Data sources that stream, never a driver list.

- `ListingSource`: one read task walks the input (`catdog.io.inputs.InputSource.chunks`) on the
  driver's node and yields blocks while it walks, so decoding starts with the first block. Each
  chunk is also kept in the output's `_listing/` under a name given by its position, so a retried
  task rewrites the same files instead of adding some.
- `ChunkFilesSource`: the `_todo/` files a resumed (or manifest) run planned, one read task per
  file, each yielding blocks of `block_rows` paths.

Memory: a read task holds one chunk (listing) or one file (todo); the driver holds neither.
"""

from __future__ import annotations

from typing import Iterable

import pyarrow as pa
import pyarrow.parquet as pq
from ray.data import Datasource, ReadTask
from ray.data.block import BlockMetadata

from catdog.io.inputs import InputSource


def _slices(table: pa.Table, rows: int) -> Iterable[pa.Table]:
    for start in range(0, table.num_rows, rows):
        yield table.slice(start, rows)


class ListingSource(Datasource):
    """The input, listed while it is scored (see the module docstring)."""

    def __init__(self, source: InputSource, output: str, block_rows: int, counter=None):
        super().__init__()
        self._source, self._output, self._block_rows, self._counter = source, output, block_rows, counter

    def estimate_inmemory_data_size(self) -> int | None:
        return None

    def get_read_tasks(self, parallelism: int, per_task_row_limit=None, data_context=None) -> list[ReadTask]:
        source, output, block_rows, counter = self._source, self._output, self._block_rows, self._counter

        def walk() -> Iterable[pa.Table]:
            from catdog.score.predictions_folder import PredictionsFolder

            folder = PredictionsFolder(output)
            listed = 0
            for index, chunk in enumerate(source.chunks()):
                folder.write_listing_chunk(index, chunk)
                listed += chunk.num_rows
                if counter is not None:
                    counter.listed.remote(listed, False, {})
                yield from _slices(chunk, block_rows)
            if counter is not None:
                counter.listed.remote(listed, True, {k: v for k, v in source.skipped.items() if v})

        metadata = BlockMetadata(num_rows=None, size_bytes=None, exec_stats=None, input_files=None)
        return [ReadTask(walk, metadata, schema=source.schema)]


class ChunkFilesSource(Datasource):
    """Planned paths in Parquet files (see the module docstring)."""

    def __init__(self, files: list[str], filesystem, block_rows: int):
        super().__init__()
        self._files, self._fs, self._block_rows = files, filesystem, block_rows

    def estimate_inmemory_data_size(self) -> int | None:
        return None

    def get_read_tasks(self, parallelism: int, per_task_row_limit=None, data_context=None) -> list[ReadTask]:
        def reader(path: str):
            fs, block_rows = self._fs, self._block_rows
            return lambda: _slices(pq.read_table(path, filesystem=fs), block_rows)

        metadata = BlockMetadata(num_rows=None, size_bytes=None, exec_stats=None, input_files=None)
        return [ReadTask(reader(path), metadata) for path in self._files]
