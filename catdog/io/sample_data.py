"""A small synthetic labelled image folder, generated locally (no download), for the demo and tests."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image

# One base colour per class; images are noisy shapes in that colour, so classes are separable even
# by a randomly initialised backbone while every file is a real JPEG/PNG with varied content.
_PALETTE = [(200, 40, 40), (40, 60, 200), (40, 170, 60), (220, 200, 40), (150, 50, 180)]


def generate_sample_dataset(
    root: str | Path,
    classes: Sequence[str] = ("cats", "dogs"),
    images_per_class: int = 40,
    size: tuple[int, int] = (96, 80),
    seed: int = 0,
) -> Path:
    """Write `images_per_class` images per class under `root/<class>/`, JPEG and PNG mixed.

    Returns the root folder.
    """
    if len(classes) > len(_PALETTE):
        raise ValueError(f"at most {len(_PALETTE)} synthetic classes")
    root = Path(root)
    rng = np.random.default_rng(seed)
    width, height = size
    for class_index, name in enumerate(classes):
        folder = root / name
        folder.mkdir(parents=True, exist_ok=True)
        base = np.array(_PALETTE[class_index], dtype=np.float32)
        for i in range(images_per_class):
            pixels = rng.normal(base * 0.6 + 40, 35, size=(height, width, 3))
            y0, x0 = rng.integers(0, height // 2), rng.integers(0, width // 2)
            pixels[y0 : y0 + height // 2, x0 : x0 + width // 2] = base + rng.normal(0, 15, 3)
            image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
            suffix = "png" if i % 5 == 0 else "jpg"
            image.save(folder / f"{name}_{i:04d}.{suffix}")
    return root


def remove_sample_dataset(root: str | Path, classes: Sequence[str] = ("cats", "dogs")) -> int:
    """Delete the files `generate_sample_dataset` writes under `root` (and folders left empty); keep
    anything else. Returns the number of files deleted."""
    root = Path(root)
    deleted = 0
    for name in classes:
        folder = root / name
        if not folder.is_dir():
            continue
        generated = re.compile(rf"^{re.escape(name)}_\d{{4}}\.(png|jpg)$")
        for path in folder.iterdir():
            if path.is_file() and not path.is_symlink() and generated.match(path.name):
                path.unlink()
                deleted += 1
        if not any(folder.iterdir()):
            folder.rmdir()
    if root.is_dir() and not any(root.iterdir()):
        root.rmdir()
    return deleted
