"""Read a Parquet or CSV manifest of input paths: its column names, then its rows a batch at a time.

A manifest (`.parquet`, `.csv`) needs a `path` column; a `true_label` column is carried through.
Relative paths in a manifest are relative to the manifest's folder (`catdog.io.inputs` anchors them
there). Repeated paths are scored once (the scoring run drops repeats after listing). Very large
inputs (millions of files) list faster from a manifest than from a folder.
"""

from __future__ import annotations

from typing import Iterator

import pyarrow as pa

from catdog.errors import InputError
from catdog.io import storage

MANIFEST_EXTENSIONS = (".parquet", ".csv")


def manifest_columns(location: str) -> list[str]:
    """The manifest's column names, read from the Parquet schema or the CSV header.

    Raises:
        InputError: the manifest cannot be read.
    """
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


def manifest_batches(location: str, columns: list[str], chunk_rows: int) -> Iterator[pa.RecordBatch]:
    """The manifest's `columns`, a batch of at most `chunk_rows` at a time (Parquet row batches; CSV blocks)."""
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
