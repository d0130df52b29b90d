"""Image decoding: the one place that turns file bytes into model-ready RGB pixels.

Training, feature caching, scoring and single-image prediction all decode through here, so a
model sees the same pixels in every job.
"""

from __future__ import annotations

import io
import warnings
from typing import Sequence

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from catdog.errors import ImageDecodeError
from catdog.io.file_reads import DEFAULT_MAX_FILE_BYTES, DEFAULT_READ_TIMEOUT_S, ReadWatcher, read_ahead, read_file

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


def read_and_decode(
    paths: Sequence[str], image_size: int, max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
    max_bytes: int | None = DEFAULT_MAX_FILE_BYTES, read_timeout_s: float | None = DEFAULT_READ_TIMEOUT_S,
    watcher: ReadWatcher | None = None,
) -> dict[str, np.ndarray]:
    """Read and decode a batch of files; a failure is recorded per file, never raised.

    Files are read a few ahead of decoding, each within `read_timeout_s` (None: no limit, read
    here): a file that takes longer is a `read_timeout` row and the batch moves on
    (`catdog.io.file_reads.read_ahead`, which also reports reads that wait long to `watcher`).

    Returns columns `image` uint8 [n, s, s, 3] (zeros where decoding failed), `width`, `height`
    int32 (-1 where unknown) and `error` (None where decoded, else "kind: message").
    """
    n = len(paths)
    images = np.zeros((n, image_size, image_size, 3), dtype=np.uint8)
    widths = np.full(n, -1, dtype=np.int32)
    heights = np.full(n, -1, dtype=np.int32)
    errors: list[str | None] = [None] * n
    if read_timeout_s is None:
        reads = (_read_now(path, max_bytes) for path in paths)
    else:
        reads = read_ahead(paths, max_bytes, read_timeout_s, watcher)
    for i, (data, failure) in enumerate(reads):
        if failure is not None:
            errors[i] = _read_error(failure)
            continue
        try:
            images[i], widths[i], heights[i] = decode_image(data, image_size, max_pixels)
        except ImageDecodeError as exc:
            errors[i] = str(exc)
    return {"image": images, "width": widths, "height": heights, "error": np.array(errors, dtype=object)}


def _read_now(path: str, max_bytes: int | None) -> tuple[bytes | None, Exception | None]:
    try:
        return read_file(path, max_bytes), None
    except Exception as exc:  # noqa: BLE001 - one bad file
        return None, exc


def _read_error(failure: Exception) -> str:
    """The error string of a file that could not be read."""
    if isinstance(failure, ImageDecodeError):
        return str(failure)
    if isinstance(failure, IsADirectoryError):
        return f"read_error: is a directory: {failure}"
    return f"read_error: {type(failure).__name__}: {failure}"  # OSError, or pyarrow refusing a malformed URI


def error_kind(error: str | None) -> str | None:
    """The stable kind prefix of an error string produced by `read_and_decode`."""
    return None if error is None else error.split(":", 1)[0]
