"""One canonical spelling of each input file's path, so listing, output, resume and accounting agree.

Local paths are absolute, under their folder's real path (a folder reached through a symlink or
`..` gives the same names), and URIs read `scheme://bucket/key`.

Local names are bytes; the `path` column is UTF-8 text. A local path that is not valid UTF-8
(a Latin-1 name on a legacy share) is written with each byte that is not UTF-8 as `\\xNN`, and a
backslash that is part of a name as `\\\\`, so every file has one readable, distinct spelling;
`local_path_bytes` gives the exact bytes back. Paths without a backslash or a bad byte (nearly
all) are unchanged. Object-store keys are UTF-8 already and never escaped.
"""

from __future__ import annotations

import os
import posixpath
import re
from functools import lru_cache

from catdog.io import storage

_ESCAPED_BYTE = re.compile(r"\\(\\|x[0-9a-f]{2})")


def escape_local_path(path: str) -> str:
    """The `path` column's spelling of a local path as Python's `os` functions return it.

    `os.scandir` and `os.fsdecode` hand back bytes that are not UTF-8 as lone surrogates
    (U+DC80..U+DCFF); those become `\\xNN`, and a literal backslash `\\\\`.
    """
    if "\\" not in path:
        try:
            path.encode("utf-8")
            return path  # the common case: nothing to escape
        except UnicodeEncodeError:
            pass
    out = []
    for char in path:
        if char == "\\":
            out.append("\\\\")
        elif "\udc80" <= char <= "\udcff":
            out.append(f"\\x{ord(char) - 0xDC00:02x}")
        else:
            out.append(char)
    return "".join(out)


def unescape_local_path(path: str) -> str:
    """The `os` spelling (surrogate-escaped str) of a `path` column value: `open()` takes it."""
    if "\\" not in path:
        return path
    return _ESCAPED_BYTE.sub(lambda m: "\\" if m.group(1) == "\\" else chr(0xDC00 + int(m.group(1)[1:], 16)), path)


def local_path_bytes(path: str) -> bytes:
    """The exact bytes of the local file a `path` column value names."""
    return os.fsencode(unescape_local_path(path))


def normalise_path(path: str, base: str | None = None) -> str:
    """One canonical spelling per file: absolute normalised local path, or a clean URI.

    `base` (a local folder or URI) anchors relative paths; `file://` URIs become local paths.
    Local paths are taken in the `path` column's spelling (escaped, see the module docstring).
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
        path = os.path.join(escape_local_path(base), path)
    absolute = os.path.abspath(os.path.expanduser(unescape_local_path(path)))
    folder, name = os.path.split(absolute)
    return escape_local_path(os.path.join(_real_folder(folder), name))


@lru_cache(maxsize=4096)
def _real_folder(folder: str) -> str:
    """The real path of a folder (symlinks resolved once per folder, not per file)."""
    return os.path.realpath(folder)
