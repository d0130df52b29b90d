"""Local paths and object-store URIs (s3://, gs://, file://) through pyarrow filesystems.

S3-compatible servers (MinIO, moto, ...) are reached through the standard AWS variables, which
pyarrow reads itself: AWS_ENDPOINT_URL (or AWS_ENDPOINT_URL_S3), AWS_REGION/AWS_DEFAULT_REGION,
AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY. Ray workers need the same variables: a local Ray inherits
the driver's environment; on a cluster pass them in the job's `--runtime-env-json` env_vars (or
use instance profiles for credentials).
"""

from __future__ import annotations

import json
import os
import posixpath
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import pyarrow.fs as pafs

from catdog.errors import OutputExistsError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp")


@dataclass(frozen=True)
class FileEntry:
    """One listed file: its normalised URI-or-path, size in bytes and mtime in nanoseconds."""

    path: str
    size: int
    mtime_ns: int


def is_uri(location: str) -> bool:
    """True for scheme-qualified locations such as s3://bucket/key (file:// included)."""
    return "://" in location


def resolve(location: str) -> tuple[pafs.FileSystem, str]:
    """Return (filesystem, path inside it) for a local path or URI."""
    if is_uri(location):
        return pafs.FileSystem.from_uri(location)
    return pafs.LocalFileSystem(), str(Path(location).expanduser().resolve())


def to_location(location: str, inner_path: str) -> str:
    """Turn a filesystem-internal path back into the user-facing form (keeps the URI scheme)."""
    if is_uri(location):
        scheme = location.split("://", 1)[0]
        return f"{scheme}://{inner_path.lstrip('/')}" if scheme != "file" else f"file://{inner_path}"
    return inner_path


def join(location: str, *parts: str) -> str:
    """Join path parts onto a local path or URI."""
    if is_uri(location):
        return posixpath.join(location.rstrip("/"), *parts)
    return str(Path(location).expanduser().joinpath(*parts))


def exists(location: str) -> bool:
    fs, path = resolve(location)
    return fs.get_file_info(path).type != pafs.FileType.NotFound


def is_dir(location: str) -> bool:
    fs, path = resolve(location)
    return fs.get_file_info(path).type == pafs.FileType.Directory


def list_files(location: str, extensions: Iterable[str] | None = None) -> list[FileEntry]:
    """Recursively list regular files under a folder, sorted by path, optionally by extension.

    Symlinks are followed by the local filesystem; callers that must not leave the folder
    filter with `inside_folder`.
    """
    fs, root = resolve(location)
    selector = pafs.FileSelector(root, recursive=True, allow_not_found=False)
    wanted = tuple(e.lower() for e in extensions) if extensions else None
    entries = []
    for info in fs.get_file_info(selector):
        if info.type != pafs.FileType.File:
            continue
        if wanted and not info.path.lower().endswith(wanted):
            continue
        mtime_ns = info.mtime_ns if info.mtime_ns is not None else 0
        entries.append(FileEntry(to_location(location, info.path), int(info.size or 0), int(mtime_ns)))
    entries.sort(key=lambda e: e.path)
    return entries


def read_bytes(location: str) -> bytes:
    """Read a whole file. A random-access file reads an object in one sized request; a stream's
    cost grows much faster than the object (benchmarks/README.md, Reading whole objects from S3)."""
    fs, path = resolve(location)
    with fs.open_input_file(path) as f:
        return f.read()


def read_head(location: str, size: int) -> bytes:
    """The first `size` bytes of a file (fewer if it is shorter)."""
    fs, path = resolve(location)
    with fs.open_input_file(path) as f:
        return f.read(size)


def write_bytes(location: str, data: bytes) -> None:
    """Write a whole file; parents are created on local filesystems.

    Object stores have no folders: creating one there would only add empty marker objects.
    """
    fs, path = resolve(location)
    if isinstance(fs, pafs.LocalFileSystem):
        fs.create_dir(posixpath.dirname(path), recursive=True)
    with fs.open_output_stream(path) as stream:
        stream.write(data)


def write_text(location: str, text: str) -> None:
    write_bytes(location, text.encode("utf-8"))


def write_json(location: str, payload: object) -> None:
    write_text(location, json.dumps(payload, indent=2, sort_keys=True, default=str) + "\n")


def read_json(location: str) -> object:
    return json.loads(read_bytes(location).decode("utf-8"))


def make_dirs(location: str) -> None:
    fs, path = resolve(location)
    fs.create_dir(path, recursive=True)


def delete_file(location: str) -> None:
    fs, path = resolve(location)
    fs.delete_file(path)


def copy_to_local(location: str, local_path: str | Path) -> Path:
    """Copy a file from any filesystem to a local path (Keras needs local files)."""
    local_path = Path(local_path)
    local_path.parent.mkdir(parents=True, exist_ok=True)
    local_path.write_bytes(read_bytes(location))
    return local_path


def refuse_unsafe_output(output: str, input_location: str) -> None:
    """Refuse an output that is a root, the home folder (or holds it), or overlaps the input.

    Raises:
        OutputExistsError: as above; call it before anything is read or written.
    """
    where = _comparable(output)
    if is_uri(where):
        if "/" not in where.split("://", 1)[1]:
            raise OutputExistsError(f"output {output} is a bucket root; give a folder inside it")
    else:
        if os.path.dirname(where) == where:
            raise OutputExistsError(f"output {output} is a filesystem root; give a folder of its own")
        if _inside(_comparable(os.path.expanduser("~")), where):
            raise OutputExistsError(f"output {output} is or holds the home folder; give a folder of its own")
    source = _comparable(input_location)
    if _inside(where, source) or _inside(source, where):
        raise OutputExistsError(f"output {output} overlaps the input {input_location}: results and inputs must not "
                                "share a folder; give an output outside the input")


def _comparable(location: str) -> str:
    """A location spelled for prefix comparison: real local paths, lower-case schemes, no trailing slash."""
    if location.startswith("file://"):
        location = location[len("file://"):]
    if is_uri(location):
        scheme, rest = location.split("://", 1)
        return f"{scheme.lower()}://{posixpath.normpath(rest.strip('/') or '/').strip('/')}"
    return os.path.realpath(os.path.expanduser(location))


def _inside(path: str, folder: str) -> bool:
    """True when `path` equals `folder` or lies under it (both from `_comparable`)."""
    if path == folder:
        return True
    separator = "/" if is_uri(folder) or folder.endswith("/") else os.sep
    return path.startswith(folder.rstrip("/") + separator) if folder != "/" else path.startswith("/")
