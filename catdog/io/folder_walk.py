"""Walk a local folder or an object-store prefix for image files, one file at a time.

Folder policy (local folders):
- searched recursively for `catdog.io.storage.IMAGE_EXTENSIONS` (case-insensitive);
- a directory whose name looks like an image (`x.jpg/`) is a directory: walked, never listed;
- a symlink whose target lies outside the input folder is skipped unless `follow_symlinks`;
- each real directory is walked once, so symlink loops end and aliases give no duplicates;
- a dangling symlink or an unreadable file is listed: scoring gives it an error row;
- so is anything else named like an image (a FIFO, a socket, a device): never opened here;
- a name that is not UTF-8 is listed in its escaped spelling (`catdog.io.paths`).

Memory: one entry per directory walked (loop detection) for local folders; for s3:// a few pages
of keys, whatever the prefix holds (`catdog.io.bucket_listing`); for other object stores one
directory's entries at a time, whose API lists a level in one call (a flat prefix of tens of
millions of objects there wants a manifest, see `catdog.io.manifests`).
"""

from __future__ import annotations

import logging
import os
from typing import Iterator

import pyarrow.fs as pafs

from catdog.io import bucket_listing, storage
from catdog.io.paths import escape_local_path, normalise_path

logger = logging.getLogger(__name__)

Row = tuple[str, "int | None", "int | None"]  # path, size in bytes, mtime in ns


def walk_local(folder: str, follow_symlinks: bool, skipped: dict[str, int]) -> Iterator[Row]:
    """Walk a local folder depth-first, each folder's entries in name order, applying the folder policy.

    Args:
        folder: the input folder.
        follow_symlinks: list files behind symlinks that point outside `folder` too.
        skipped: reason -> count, updated in place as entries are skipped.

    Yields:
        (path, size, mtime_ns) of each image file; size and mtime are None for a dangling link.
    """
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
                yield (escape_local_path(os.path.normpath(entry.path)), *_size_and_mtime(entry))
        stack.extend(reversed(subfolders))


def walk_uri(location: str) -> Iterator[Row]:
    """Walk an object-store prefix: s3:// page by page in key order, others one level at a time.

    Yields:
        (normalised URI, size, mtime_ns) of each image file: in key order for s3://, else
        depth-first in key order (one level's entries held at once).
    """
    if bucket_listing.can_list(location):
        yield from bucket_listing.list_images(location)
        return
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


def _inside(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip(os.sep) + os.sep)


def _size_and_mtime(entry: os.DirEntry) -> tuple[int | None, int | None]:
    try:
        stat = entry.stat(follow_symlinks=True)
    except OSError:
        return None, None  # a dangling link: scoring gives it an error row
    return stat.st_size, stat.st_mtime_ns
