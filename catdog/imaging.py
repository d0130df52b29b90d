"""Image decoding: the one place that turns file bytes into model-ready RGB pixels.

Training, feature caching, scoring and single-image prediction all decode through here, so a
model sees the same pixels in every job.
"""

from __future__ import annotations

import errno
import io
import os
import queue
import stat
import threading
import time
import warnings
from concurrent.futures import Future
from functools import lru_cache
from typing import Protocol, Sequence

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from catdog.errors import ImageDecodeError
from catdog.input_paths import unescape_local_path

# Default decompression-bomb limit: 100 megapixels (a 10,000 x 10,000 photo) is far beyond any
# camera image we expect, while a 30,000 x 30,000 PNG (900 MP, ~2.7 GB as RGB) is refused before
# its pixels are decoded.
DEFAULT_MAX_IMAGE_PIXELS = 100_000_000

# Bump when a change here alters the pixels or the error a file decodes to (limits included): caches key on it.
DECODER_VERSION = 1

# PIL's own guard warns or raises at its global limit; we check size ourselves (header only), so
# lift PIL's so that our limit and our error message are the ones that apply.
Image.MAX_IMAGE_PIXELS = None
ImageFile.LOAD_TRUNCATED_IMAGES = False

_ROTATING_ORIENTATIONS = {5, 6, 7, 8}  # EXIF orientations that swap width and height


def _to_rgb(img: Image.Image) -> Image.Image:
    """Convert any PIL mode to 8-bit RGB (16-bit and float images rescaled, not clipped)."""
    if img.mode == "RGB":
        return img
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        pixels = np.asarray(img, dtype=np.float64)
        high = 65535.0 if img.mode.startswith("I;16") or pixels.max(initial=0) > 255 else 255.0
        gray = np.clip(pixels / high * 255.0, 0, 255).astype(np.uint8)
        return Image.fromarray(gray, mode="L").convert("RGB")
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA"):
        # Composite transparent pixels on white rather than whatever colour hides under alpha=0.
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")


def decode_image(
    data: bytes, image_size: int, max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS
) -> tuple[np.ndarray, int, int]:
    """Decode image bytes to (pixels uint8 [image_size, image_size, 3], width, height).

    EXIF orientation is applied, any mode becomes RGB, JPEGs are decoded at reduced scale when the
    target is much smaller, and the image is resized (bilinear, like Keras'
    `image_dataset_from_directory`) to a square. Width and height are the original's, as displayed.

    Raises:
        ImageDecodeError: with a stable `kind` (empty_file, not_an_image, too_large, truncated,
            decode_error).
    """
    if not data:
        raise ImageDecodeError("empty_file", "file has 0 bytes")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            img = Image.open(io.BytesIO(data))
            width, height = img.size
            if width * height > max_pixels:
                raise ImageDecodeError(
                    "too_large", f"{width}x{height} = {width * height:,} pixels exceeds the limit of {max_pixels:,}"
                )
            orientation = img.getexif().get(0x0112, 1)
            if orientation in _ROTATING_ORIENTATIONS:
                width, height = height, width
            if img.format == "JPEG":
                img.draft("RGB", (image_size, image_size))
            img = ImageOps.exif_transpose(img)
            img = _to_rgb(img)
            img = img.resize((image_size, image_size), Image.Resampling.BILINEAR)
            pixels = np.asarray(img, dtype=np.uint8)
    except ImageDecodeError:
        raise
    except UnidentifiedImageError as exc:
        raise ImageDecodeError("not_an_image", str(exc)) from exc
    except OSError as exc:
        kind = "truncated" if "truncated" in str(exc).lower() else "decode_error"
        raise ImageDecodeError(kind, str(exc)) from exc
    except Exception as exc:  # noqa: BLE001 - any decoder failure is one bad file, not a crashed job
        raise ImageDecodeError("decode_error", f"{type(exc).__name__}: {exc}") from exc
    if pixels.shape != (image_size, image_size, 3):
        raise ImageDecodeError("decode_error", f"unexpected decoded shape {pixels.shape}")
    return pixels, width, height


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
    """Read a local file named by its `path` column spelling (catdog.input_paths: non-UTF-8 bytes escaped)."""
    name = unescape_local_path(path)
    _check_regular(os.stat(name).st_mode, name)  # follows links; a FIFO or device is never opened
    with os.fdopen(_open_regular(name), "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if max_bytes is not None and size > max_bytes:
            raise _too_large(size, max_bytes)
        data = f.read() if max_bytes is None else f.read(max_bytes + 1)  # the file may have grown since fstat
    if max_bytes is not None and len(data) > max_bytes:
        raise _too_large(len(data), max_bytes)
    return data


def read_file(path: str, max_bytes: int | None = None) -> bytes:
    """Read one local file or URI, reusing one filesystem object per bucket. No time limit: see
    `read_and_decode` for one.

    A local `path` is taken in the `path` column's spelling (`catdog.input_paths`); only regular
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
    """Told of reads that wait long (`catdog.progress.ProgressCounter` has these methods)."""

    def reading_slowly(self, path: str, since: float) -> None: ...  # since: time.time() when the read began

    def done_reading(self, path: str) -> None: ...


class _ReadThread:
    """One daemon thread running reads one at a time; abandoned when a read outlives its limit.

    A thread blocked in the kernel (a hung NFS mount, a socket that never answers) cannot be
    killed. It is left behind, daemon so it never holds up the process's exit, and a new thread
    takes the next reads, so they do not queue behind it. Memory: one stuck thread (its stack)
    per hung file, for as long as the file stays hung; it ends by itself if the read returns.
    """

    def __init__(self):
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        threading.Thread(target=self._run, name="catdog-read", daemon=True).start()

    def _run(self) -> None:
        while (job := self._jobs.get()) is not None:
            future, fn, args = job
            try:
                future.set_result(fn(*args))
            except BaseException as exc:  # noqa: BLE001 - handed to the waiting caller
                future.set_exception(exc)

    def submit(self, fn, *args) -> Future:
        future: Future = Future()
        future.set_running_or_notify_cancel()
        self._jobs.put((future, fn, args))
        return future

    def stop(self) -> None:
        """Let the thread end once its current read returns (at once when idle)."""
        self._jobs.put(None)


class _TimedReader:
    """`read_file` under a time limit per file, reporting slow reads to a `ReadWatcher`."""

    def __init__(self, limit_s: float, watcher: ReadWatcher | None):
        self.limit_s, self.watcher = limit_s, watcher
        self.slow_after_s = min(SLOW_READ_S, limit_s / 4)
        self._thread = _ReadThread()

    def read(self, path: str, max_bytes: int | None) -> bytes:
        since = time.time()
        future = self._thread.submit(read_file, path, max_bytes)
        try:
            return future.result(timeout=self.slow_after_s)
        except TimeoutError:
            pass
        if self.watcher is not None:
            self.watcher.reading_slowly(path, since)
        try:
            return future.result(timeout=max(0.0, self.limit_s - (time.time() - since)))
        except TimeoutError:
            self._thread.stop()  # abandoned: it ends if its read ever returns
            self._thread = _ReadThread()
            raise ImageDecodeError("read_timeout", f"no data after {self.limit_s:g} s") from None
        finally:
            if self.watcher is not None:
                self.watcher.done_reading(path)

    def close(self) -> None:
        self._thread.stop()


def read_and_decode(
    paths: Sequence[str], image_size: int, max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
    max_bytes: int | None = DEFAULT_MAX_FILE_BYTES, read_timeout_s: float | None = DEFAULT_READ_TIMEOUT_S,
    watcher: ReadWatcher | None = None,
) -> dict[str, np.ndarray]:
    """Read and decode a batch of files; a failure is recorded per file, never raised.

    Each file's read (open + read) runs in a worker thread and may take `read_timeout_s` (None: no
    limit): a file that takes longer is a `read_timeout` row and the batch moves on, leaving the
    stuck thread behind (`_ReadThread`). A read waiting more than SLOW_READ_S (or a quarter of the
    limit) is reported to `watcher` until it ends.

    Returns columns `image` uint8 [n, s, s, 3] (zeros where decoding failed), `width`, `height`
    int32 (-1 where unknown) and `error` (None where decoded, else "kind: message").
    """
    n = len(paths)
    images = np.zeros((n, image_size, image_size, 3), dtype=np.uint8)
    widths = np.full(n, -1, dtype=np.int32)
    heights = np.full(n, -1, dtype=np.int32)
    errors: list[str | None] = [None] * n
    reader = _TimedReader(read_timeout_s, watcher) if read_timeout_s is not None and n else None
    try:
        for i, path in enumerate(paths):
            try:
                data = reader.read(path, max_bytes) if reader else read_file(path, max_bytes)
            except ImageDecodeError as exc:
                errors[i] = str(exc)
                continue
            except IsADirectoryError as exc:
                errors[i] = f"read_error: is a directory: {exc}"
                continue
            except Exception as exc:  # noqa: BLE001 - OSError, or pyarrow refusing a malformed URI: one bad file
                errors[i] = f"read_error: {type(exc).__name__}: {exc}"
                continue
            try:
                images[i], widths[i], heights[i] = decode_image(data, image_size, max_pixels)
            except ImageDecodeError as exc:
                errors[i] = str(exc)
    finally:
        if reader:
            reader.close()
    return {"image": images, "width": widths, "height": heights, "error": np.array(errors, dtype=object)}


def error_kind(error: str | None) -> str | None:
    """The stable kind prefix of an error string produced by `read_and_decode`."""
    return None if error is None else error.split(":", 1)[0]
