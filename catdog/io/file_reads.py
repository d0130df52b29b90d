"""Reading input files: the one place that opens them, under limits of size, kind and time.

Only regular files are opened (a FIFO, socket or device is a `not_a_regular_file` error, found by
`stat` first); local paths are taken in the `path` column's spelling (`catdog.io.paths`:
non-UTF-8 bytes escaped); object-store reads are one sized request each.

`read_ahead` reads a batch's files in a thread that runs a few files ahead of the caller (the
caller decodes one file while the next is read) and gives up on a file whose read outlives a time
limit: a thread blocked in the kernel (a hung NFS mount, a socket that never answers) cannot be
killed, so it is left behind, daemon, and a new thread reads on. Memory: up to `READ_AHEAD_BYTES`
read and not yet taken, plus one file (at most --max-file-bytes), and one stuck thread per hung
file for as long as it stays hung (it ends by itself if its read returns).
"""

from __future__ import annotations

import errno
import os
import queue
import stat
import threading
import time
from functools import lru_cache
from typing import Iterator, Protocol, Sequence

from catdog.errors import ImageDecodeError
from catdog.io.paths import unescape_local_path

# Files larger than this are `too_large` rows, never read: a multi-GB file named .jpg would
# otherwise land whole in a decode worker's memory. Camera JPEGs are far smaller.
DEFAULT_MAX_FILE_BYTES = 64 * 2**20
# Seconds one file's open + read may take: 64 MiB may still come at 0.5 MB/s; a hung NFS mount gives up in 2 min.
DEFAULT_READ_TIMEOUT_S = 120.0
# A read waiting this long (or a quarter of the limit, if less) is reported as slow to the progress line.
SLOW_READ_S = 30.0
# Schemes a worker can read through pyarrow; any other becomes an `unsupported_scheme` row.
READABLE_SCHEMES = ("s3", "gs", "gcs", "file")

_FILE_TYPES = ((stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISSOCK, "a socket"),
               (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"))


@lru_cache(maxsize=64)
def _filesystem_for(prefix: str):
    import pyarrow.fs as pafs

    return pafs.FileSystem.from_uri(prefix)[0]


def _too_large(size: int, max_bytes: int) -> ImageDecodeError:
    return ImageDecodeError("too_large", f"file is {size:,} bytes, over the limit of {max_bytes:,} (--max-file-bytes)")


def _check_regular(mode: int, name: str) -> None:
    """Raise unless `mode` is a regular file: a directory is an OSError, anything else not_a_regular_file."""
    if stat.S_ISREG(mode):
        return
    if stat.S_ISDIR(mode):
        raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR), name)
    what = next((text for is_type, text in _FILE_TYPES if is_type(mode)), f"file type {stat.S_IFMT(mode):o}")
    raise ImageDecodeError("not_a_regular_file", what)


def _open_regular(name: str) -> int:
    """Open a local file for reading, refusing anything that is not a regular file.

    O_NONBLOCK: a FIFO swapped in after the caller's stat opens at once instead of waiting for a
    writer, and fstat then refuses it. It changes nothing for a regular file's reads.
    """
    fd = os.open(name, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        _check_regular(os.fstat(fd).st_mode, name)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _read_local(path: str, max_bytes: int | None) -> bytes:
    """Read a local file named by its `path` column spelling (catdog.io.paths: non-UTF-8 bytes escaped)."""
    name = unescape_local_path(path)
    _check_regular(os.stat(name).st_mode, name)  # follows links; a FIFO or device is never opened
    with os.fdopen(_open_regular(name), "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if max_bytes is not None and size > max_bytes:
            raise _too_large(size, max_bytes)
        data = f.read(size + 1)  # a buffer of the file's size: one of max_bytes costs a large allocation per file
        if len(data) > size:  # it grew since fstat: read on, up to just past the limit
            data += f.read() if max_bytes is None else f.read(max_bytes + 1 - len(data))
    if max_bytes is not None and len(data) > max_bytes:
        raise _too_large(len(data), max_bytes)
    return data


def read_file(path: str, max_bytes: int | None = None) -> bytes:
    """Read one local file or URI, reusing one filesystem object per bucket. No time limit: see
    `read_and_decode` for one.

    A local `path` is taken in the `path` column's spelling (`catdog.io.paths`); only regular
    files are opened.

    Raises:
        ImageDecodeError: `too_large` when the file has more than `max_bytes` (checked before
            reading), `unsupported_scheme` for a URI no worker can open, `not_a_regular_file` for a
            FIFO, socket or device (never opened).
        OSError: the file cannot be read (IsADirectoryError for a directory).
    """
    if "://" in path:
        scheme, rest = path.split("://", 1)
        if scheme.lower() not in READABLE_SCHEMES:
            raise ImageDecodeError("unsupported_scheme", f"cannot read {scheme}:// paths (readable: {READABLE_SCHEMES})")
        if scheme.lower() != "file":
            bucket, _, key = rest.partition("/")
            fs = _filesystem_for(f"{scheme.lower()}://{bucket}")
            with fs.open_input_file(f"{bucket}/{key}") as f:  # sized read: faster than a stream (benchmarks/s3_read_bench.py)
                if max_bytes is not None and f.size() > max_bytes:
                    raise _too_large(f.size(), max_bytes)
                return f.read()
        path = rest
    return _read_local(path, max_bytes)


class ReadWatcher(Protocol):
    """Told of reads that wait long (`catdog.score.progress.ProgressCounter` has these methods)."""

    def reading_slowly(self, path: str, since: float) -> None: ...  # since: time.time() when the read began

    def done_reading(self, path: str) -> None: ...


# Bytes a reader thread may hold read ahead of the caller: a whole batch of photos, so the reader
# never waits on the caller (a wake-up per file would cost more than the read), yet bounded.
READ_AHEAD_BYTES = 64 * 2**20


class _Reader(threading.Thread):
    """Reads `paths[first:]` in order into `results` while fewer than READ_AHEAD_BYTES wait there."""

    def __init__(self, paths: Sequence[str], first: int, max_bytes: int | None):
        super().__init__(name="catdog-read", daemon=True)
        self.paths, self.first, self.max_bytes = paths, first, max_bytes
        self.results: queue.SimpleQueue = queue.SimpleQueue()
        self.reading: tuple[int, float] = (first, time.monotonic())  # the file being read, and since when
        self.abandoned = False
        self._buffered = 0  # bytes read and not yet taken
        self._room = threading.Condition(threading.Lock())

    def run(self) -> None:
        for index in range(self.first, len(self.paths)):
            with self._room:
                while self._buffered >= READ_AHEAD_BYTES and not self.abandoned:
                    self._room.wait()
            if self.abandoned:
                return
            self.reading = (index, time.monotonic())
            try:
                data = read_file(self.paths[index], self.max_bytes)
            except Exception as exc:  # noqa: BLE001 - handed to the taker: one bad file
                self.results.put((None, exc))
                continue
            with self._room:
                self._buffered += len(data)
            self.results.put((data, None))

    def taken(self, data: bytes | None) -> None:
        """The caller took a result: its bytes no longer count against the read-ahead."""
        if data:
            with self._room:
                self._buffered -= len(data)
                if self._buffered < READ_AHEAD_BYTES:
                    self._room.notify()

    def began(self, index: int) -> float:
        """When the read of `index` began (now, if it is about to)."""
        current, since = self.reading
        return since if current == index else time.monotonic()

    def abandon(self) -> None:
        """Let it end once its current read returns."""
        with self._room:
            self.abandoned = True
            self._room.notify()


def read_ahead(paths: Sequence[str], max_bytes: int | None, limit_s: float,
               watcher: ReadWatcher | None = None) -> Iterator[tuple[bytes | None, Exception | None]]:
    """(bytes, None) or (None, the exception its read raised) for each path, in order.

    A read that takes more than `limit_s` gives `ImageDecodeError("read_timeout")`; one waiting
    more than SLOW_READ_S (or a quarter of the limit) is reported to `watcher` until it ends.
    """
    slow_after_s = min(SLOW_READ_S, limit_s / 4)
    reader = _Reader(paths, 0, max_bytes)
    reader.start()
    try:
        for index, path in enumerate(paths):
            reported = False
            while True:
                began = reader.began(index)
                wake = began + (limit_s if reported or watcher is None else min(limit_s, slow_after_s))
                try:
                    result = reader.results.get(timeout=max(0.0, wake - time.monotonic()))
                    break
                except queue.Empty:
                    pass
                if time.monotonic() - began >= limit_s:
                    reader.abandon()
                    reader = _Reader(paths, index + 1, max_bytes)
                    reader.start()
                    result = (None, ImageDecodeError("read_timeout", f"no data after {limit_s:g} s"))
                    break
                if not reported:
                    watcher.reading_slowly(path, time.time() - (time.monotonic() - began))
                    reported = True
            if reported:
                watcher.done_reading(path)
            reader.taken(result[0])
            yield result
    finally:
        reader.abandon()
