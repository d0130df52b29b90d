"""A corpus of awkward image files, generated on the spot, with what decoding each should give.

Used by the decode unit tests and the scoring tests. Every image is small (at most 64 x 48) except
`too_big.png`, which is refused at MAX_PIXELS; pass that limit to decoding and scoring.
"""

from __future__ import annotations

import io
import os
import socket
import stat
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

MAX_PIXELS = 50_000  # the bomb limit the tests pass: above every image here except too_big.png


@dataclass(frozen=True)
class Expected:
    """What decoding a file gives: `error` kind (None when decoded) and displayed size."""

    error: str | None
    size: tuple[int, int] | None = None  # (width, height) as displayed


def _jpeg(pixels: np.ndarray, **save) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=95, **save)
    return buffer.getvalue()


def _halves(width: int, height: int, left=(220, 30, 30), right=(30, 30, 220)) -> np.ndarray:
    """Left half one colour, right half another: shows rotations."""
    pixels = np.zeros((height, width, 3), np.uint8)
    pixels[:, : width // 2] = left
    pixels[:, width // 2 :] = right
    return pixels


def _noise(width: int, height: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def write_corpus(root: Path) -> dict[str, Expected]:
    """Write the corpus under `root`; return {path relative to root: Expected}.

    Also writes `notes.txt` (not an image extension: never listed) and a folder named `folder.jpg/`
    (a directory, walked, holding one good image).
    """
    root.mkdir(parents=True, exist_ok=True)
    expected: dict[str, Expected] = {}

    def put(name: str, data: bytes, outcome: Expected) -> None:
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        expected[name] = outcome

    good = _jpeg(_noise(64, 48, 0))
    put("plain.jpg", good, Expected(None, (64, 48)))
    put("zero_bytes.jpg", b"", Expected("empty_file"))
    put("truncated.jpg", good[: len(good) // 2], Expected("truncated"))
    put("text_renamed.jpg", b"these are not the pixels you are looking for\n" * 20, Expected("not_an_image"))
    rgba = np.zeros((40, 50, 4), np.uint8)
    rgba[..., 0] = 200
    rgba[:, 25:, 3] = 255  # left half fully transparent
    put("rgba.png", _png(Image.fromarray(rgba)), Expected(None, (50, 40)))
    sixteen = np.full((30, 40), 65535, np.uint16)
    sixteen[:, :20] = 0
    put("sixteen_bit.png", _png(Image.fromarray(sixteen)), Expected(None, (40, 30)))
    put("grayscale.jpg", _save(Image.fromarray(np.full((32, 48), 128, np.uint8)), "JPEG"), Expected(None, (48, 32)))
    put("cmyk.jpg", _save(Image.new("CMYK", (40, 40), (0, 255, 255, 0)), "JPEG"), Expected(None, (40, 40)))
    palette = Image.new("P", (36, 36))
    palette.putpalette([0, 200, 0] * 256)
    put("palette.gif", _save(palette, "GIF"), Expected(None, (36, 36)))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display: stored 60x30 shows as 30x60
    put("exif_rotated.jpg", _jpeg(_halves(60, 30), exif=exif.tobytes()), Expected(None, (30, 60)))
    put("one_pixel.png", _png(Image.new("RGB", (1, 1), (10, 20, 30))), Expected(None, (1, 1)))
    put("too_big.png", _png(Image.new("RGB", (300, 200), (1, 2, 3))), Expected("too_large"))
    put("name with spaces.jpg", _jpeg(_noise(40, 30, 1)), Expected(None, (40, 30)))
    put("näme ünïcode 猫.jpg", _jpeg(_noise(30, 40, 2)), Expected(None, (30, 40)))
    put("UPPER_CASE.JPEG", _jpeg(_noise(33, 33, 3)), Expected(None, (33, 33)))
    put("nested/deeper/inner.png", _png(Image.fromarray(_noise(20, 24, 4))), Expected(None, (20, 24)))
    put("nested/photo.bmp", _save(Image.fromarray(_noise(16, 16, 5)), "BMP"), Expected(None, (16, 16)))
    put("folder.jpg/inside.jpg", _jpeg(_noise(20, 20, 6)), Expected(None, (20, 20)))
    (root / "notes.txt").write_text("not an image extension: never listed\n")
    return expected


def write_storage_oddities(root: Path) -> dict[str, Expected]:
    """What real storage holds beside tidy files, under `root`; {escaped path relative to root: Expected}.

    A Latin-1 file name (bytes that are not UTF-8; keyed by the `path` column's spelling, see
    `catdog.io.paths`), a FIFO named like an image (opening it would block for ever), a Unix
    socket, and a character device when this process may make one (root). Never read these with
    plain `open()` in a test: the FIFO blocks.
    """
    from catdog.io.paths import escape_local_path

    root.mkdir(parents=True, exist_ok=True)
    expected: dict[str, Expected] = {}
    latin1 = os.path.join(os.fsencode(root), b"legacy", b"caf\xe9 cr\xe8me.jpg")
    os.makedirs(os.path.dirname(latin1), exist_ok=True)
    with open(latin1, "wb") as f:
        f.write(_jpeg(_noise(26, 18, 7)))
    expected[escape_local_path(os.path.relpath(os.fsdecode(latin1), root))] = Expected(None, (26, 18))
    os.mkfifo(root / "pipe.jpg")
    expected["pipe.jpg"] = Expected("not_a_regular_file")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(root / "socket.png"))
    listener.close()  # the socket file stays
    expected["socket.png"] = Expected("not_a_regular_file")
    try:
        os.mknod(root / "device.jpg", stat.S_IFCHR | 0o644, os.makedev(1, 3))  # /dev/null's numbers
        expected["device.jpg"] = Expected("not_a_regular_file")
    except PermissionError:
        pass  # not root: no device file in the corpus
    return expected


def _save(image: Image.Image, fmt: str) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


def _png(image: Image.Image) -> bytes:
    return _save(image, "PNG")


def write_huge_png(path: Path, side: int = 30_000) -> Path:
    """A valid all-black grayscale PNG of side x side pixels (900 MP at 30,000): ~4 MB on disk,
    0.9 GB as decoded grayscale and 2.7 GB as RGB -- a decompression bomb."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    compressor = zlib.compressobj(1)  # fastest level: ~2.5 s and ~4 MB for 30,000 x 30,000
    rows = b"\x00" * (side + 1) * 100  # 100 rows of (filter byte + one byte per pixel)
    idat = b"".join(compressor.compress(rows) for _ in range(side // 100))
    idat += compressor.compress(b"\x00" * (side + 1) * (side % 100)) + compressor.flush()
    header = struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)  # 8-bit grayscale
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", idat) + chunk(b"IEND", b""))
    return path
