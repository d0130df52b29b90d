"""One canonical spelling of each input file's path, so listing, output, resume and accounting agree.

Local paths are absolute, under their folder's real path (a folder reached through a symlink or
`..` gives the same names), and URIs read `scheme://bucket/key`.
"""

from __future__ import annotations

import os
import posixpath
from functools import lru_cache

from catdog import storage


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
