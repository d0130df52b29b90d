"""Decoding (catdog.io.imaging) on a hostile corpus, without Ray or TensorFlow."""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from benchmarks.peak_memory import run_python
from catdog.errors import ImageDecodeError
from catdog.io.imaging import decode_image, error_kind, read_and_decode
from support.hostile_corpus import MAX_PIXELS, write_corpus, write_huge_png

SIZE = 32
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("hostile")
    return root, write_corpus(root)


def _decode(path: Path, size: int = SIZE):
    return decode_image(path.read_bytes(), size, MAX_PIXELS)


def test_every_corpus_file_decodes_or_fails_with_its_kind(corpus):
    root, expected = corpus
    assert len(expected) >= 18
    for name, outcome in expected.items():
        if outcome.error is None:
            pixels, width, height = _decode(root / name)
            assert pixels.shape == (SIZE, SIZE, 3) and pixels.dtype == np.uint8, name
            assert (width, height) == outcome.size, name
        else:
            with pytest.raises(ImageDecodeError) as info:
                _decode(root / name)
            assert info.value.kind == outcome.error, name
            assert str(info.value).startswith(f"{outcome.error}: ")


def test_transparent_pixels_become_white_not_hidden_colour(corpus):
    root, _ = corpus
    pixels, _, _ = _decode(root / "rgba.png")
    left, right = pixels[:, :12].reshape(-1, 3).mean(0), pixels[:, -12:].reshape(-1, 3).mean(0)
    np.testing.assert_allclose(left, [255, 255, 255], atol=2)  # alpha 0 over white
    np.testing.assert_allclose(right, [200, 0, 0], atol=2)  # opaque red as stored


def test_sixteen_bit_png_is_rescaled_not_clipped(corpus):
    root, _ = corpus
    pixels, _, _ = _decode(root / "sixteen_bit.png")
    assert pixels[:, :12].max() == 0
    assert pixels[:, -12:].min() == 255  # 65535 -> 255; clipping would give 255 for 256 as well, scaling 1


def test_modes_are_converted_to_rgb(corpus):
    root, _ = corpus
    gray, _, _ = _decode(root / "grayscale.jpg")
    assert (gray[..., 0] == gray[..., 1]).all() and (gray[..., 1] == gray[..., 2]).all()
    cmyk, _, _ = _decode(root / "cmyk.jpg")
    np.testing.assert_allclose(cmyk.reshape(-1, 3).mean(0), [255, 0, 0], atol=3)  # C=0 M=Y=255: red
    palette, _, _ = _decode(root / "palette.gif")
    np.testing.assert_allclose(palette.reshape(-1, 3).mean(0), [0, 200, 0], atol=1)
    one, _, _ = _decode(root / "one_pixel.png")
    assert (one.reshape(-1, 3) == [10, 20, 30]).all()


def test_exif_orientation_is_applied(corpus):
    root, _ = corpus
    pixels, width, height = _decode(root / "exif_rotated.jpg")
    assert (width, height) == (30, 60)
    top, bottom = pixels[:12].reshape(-1, 3).mean(0), pixels[-12:].reshape(-1, 3).mean(0)
    # Stored left half red, right half blue; rotated 90 degrees clockwise: red on top.
    assert top[0] > 180 and top[2] < 70, top
    assert bottom[2] > 180 and bottom[0] < 70, bottom


def test_large_jpeg_reduced_decode_keeps_original_size_and_content():
    rng = np.random.default_rng(0)
    small = rng.integers(0, 256, (15, 20, 3), dtype=np.uint8)
    big = Image.fromarray(small).resize((2000, 1500), Image.Resampling.NEAREST)
    buffer = io.BytesIO()
    big.save(buffer, format="JPEG", quality=95)
    pixels, width, height = decode_image(buffer.getvalue(), SIZE)
    assert (width, height) == (2000, 1500)
    reference = np.asarray(big.resize((SIZE, SIZE), Image.Resampling.BILINEAR), dtype=np.float32)
    assert np.abs(pixels.astype(np.float32) - reference).mean() < 12  # draft scale changes detail, not content


def test_read_and_decode_gives_one_row_per_path_and_never_raises(corpus, tmp_path):
    root, expected = corpus
    paths = [str(root / name) for name in expected] + [
        str(tmp_path / "missing.jpg"),  # deleted before reading
        str(root / "folder.jpg"),  # a directory named like an image
    ]
    out = read_and_decode(paths, SIZE, MAX_PIXELS)
    assert out["image"].shape == (len(paths), SIZE, SIZE, 3)
    kinds = [error_kind(e) for e in out["error"]]
    assert kinds[: len(expected)] == [o.error for o in expected.values()]
    assert kinds[-2:] == ["read_error", "read_error"]
    assert "FileNotFoundError" in out["error"][-2] and "directory" in out["error"][-1]
    failed = np.array([k is not None for k in kinds])
    assert (out["width"][failed] == -1).all() and (out["image"][failed] == 0).all()
    assert (out["width"][~failed] > 0).all()


def test_unreadable_file_is_an_error_row(tmp_path):
    """Permission denied is a read_error row. Root reads any file, so as root (CI) the decode runs
    in a child that drops to the unprivileged `nobody` user after importing catdog."""
    folder = Path(tempfile.mkdtemp(prefix="catdog-unreadable-"))  # traversable by nobody, unlike tmp_path
    try:
        folder.chmod(0o755)
        path = folder / "secret.jpg"
        Image.new("RGB", (8, 8)).save(path)
        path.chmod(0)
        if os.geteuid() != 0:
            error = read_and_decode([str(path)], SIZE)["error"][0]
        else:
            script = (
                "import os, sys\n"
                "from catdog.io.imaging import read_and_decode\n"
                "os.setgid(65534); os.setuid(65534)\n"
                f"print(read_and_decode([sys.argv[1]], {SIZE})['error'][0])\n"
            )
            run = subprocess.run([sys.executable, "-c", script, str(path)], cwd=ROOT, capture_output=True,
                                 text=True, timeout=60)
            assert run.returncode == 0, run.stderr
            error = run.stdout.strip().splitlines()[-1]
        assert error_kind(error) == "read_error" and "PermissionError" in error, error
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def test_decompression_bomb_is_refused_from_its_header_with_bounded_memory(tmp_path):
    """A real 30,000 x 30,000 PNG (0.9 GB decoded) is refused at the default limit; the decoding
    process's peak memory stays far below the image's size."""
    bomb = write_huge_png(tmp_path / "bomb.png")
    with Image.open(bomb) as image:
        assert image.size == (30_000, 30_000)  # a genuine bomb, not a broken file
    script = (
        "import json, sys\n"
        "from catdog.io.imaging import read_and_decode\n"
        "print(json.dumps({'error': read_and_decode([sys.argv[1]], 180)['error'][0]}))\n"
    )
    run = run_python("-c", script, [str(bomb)], cwd=ROOT, timeout=120)
    assert run.returncode == 0, run.stderr
    report = {**json.loads(run.stdout.strip().splitlines()[-1]), "peak_mb": run.peak_rss_mib}
    assert error_kind(report["error"]) == "too_large", report
    assert "900,000,000 pixels" in report["error"]
    assert report["peak_mb"] < 300, report  # decoding would need 900 MB (grayscale) to 2.7 GB (RGB)
