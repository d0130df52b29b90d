"""Labelled image folders: one subfolder per class, and the train/validation split.

    data/
      cats/ a.jpg  more/b.png      <- searched recursively
      dogs/ c.jpeg

Class names are the sorted subfolder names; their index is the label. The split hashes each
file's path relative to the data root with the seed, so a file's side never depends on which other
files exist: adding images never moves an existing one between train and validation.
"""

from __future__ import annotations

import hashlib
import logging
import posixpath
from dataclasses import dataclass, field
from typing import Sequence

import pyarrow.fs as pafs

from catdog.errors import InputError
from catdog.io import storage

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class LabelledImages:
    """Image files with integer labels; `labels[i]` indexes `class_names`.

    `relative_paths` are POSIX paths relative to the data root (`cats/a.jpg`); `sizes` (bytes)
    and `mtimes` (ns) identify a file's content for the feature cache.
    """

    paths: list[str]
    labels: list[int]
    class_names: list[str]
    relative_paths: list[str] = field(default_factory=list)
    sizes: list[int] = field(default_factory=list)
    mtimes: list[int] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.paths)

    def subset(self, indices: Sequence[int]) -> LabelledImages:
        """The images at `indices`, in that order, with the same classes."""
        pick = lambda values: [values[i] for i in indices]  # noqa: E731
        return LabelledImages(
            pick(self.paths), pick(self.labels), list(self.class_names),
            pick(self.relative_paths), pick(self.sizes), pick(self.mtimes),
        )

    def class_counts(self) -> dict[str, int]:
        """Number of images per class name (every class listed, zeros included)."""
        counts = dict.fromkeys(self.class_names, 0)
        for label in self.labels:
            counts[self.class_names[label]] += 1
        return counts


def _class_folders(root: str) -> list[str]:
    fs, path = storage.resolve(root)
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.NotFound:
        raise InputError(f"data folder not found: {root}")
    if info.type != pafs.FileType.Directory:
        raise InputError(f"data location is not a folder: {root}")
    children = fs.get_file_info(pafs.FileSelector(path, recursive=False))
    return sorted(
        posixpath.basename(c.path.rstrip("/"))
        for c in children
        if c.type == pafs.FileType.Directory and not posixpath.basename(c.path.rstrip("/")).startswith((".", "_"))
    )


def list_labelled_images(root: str, class_names: Sequence[str] | None = None) -> LabelledImages:
    """List the images of a labelled folder (one subfolder per class, searched recursively).

    Args:
        root: local folder or URI holding one subfolder per class.
        class_names: the classes to use, in label order (e.g. the training classes when listing a
            separate validation folder). A subfolder not in this list is an error; a class with
            no subfolder simply has no images. Default: the sorted subfolder names.

    Raises:
        InputError: the folder is missing, has fewer than 2 classes, an unknown or empty class
            folder, or no images at all.
    """
    folders = _class_folders(root)
    require_images_per_class = class_names is None
    if class_names is None:
        class_names = folders
        if len(class_names) < 2:
            found = ", ".join(class_names) or "none"
            raise InputError(
                f"{root} needs one subfolder per class and at least 2 classes; found {len(class_names)} ({found})"
            )
    else:
        unknown = sorted(set(folders) - set(class_names))
        if unknown:
            raise InputError(f"{root} has class folders not among the training classes {list(class_names)}: {unknown}")
    index = {name: i for i, name in enumerate(class_names)}
    paths, labels, relative, sizes, mtimes = [], [], [], [], []
    for name in folders:
        folder = storage.join(root, name)
        entries = storage.list_files(folder, storage.IMAGE_EXTENSIONS)
        if not entries and require_images_per_class:
            raise InputError(f"class folder {folder} holds no images ({', '.join(storage.IMAGE_EXTENSIONS)})")
        prefix = storage.to_location(folder, storage.resolve(folder)[1]).rstrip("/") + "/"
        for entry in entries:
            paths.append(entry.path)
            labels.append(index[name])
            relative.append(name + "/" + entry.path.removeprefix(prefix))
            sizes.append(entry.size)
            mtimes.append(entry.mtime_ns)
    if not paths:
        raise InputError(f"no images ({', '.join(storage.IMAGE_EXTENSIONS)}) found under {root}")
    images = LabelledImages(paths, labels, list(class_names), relative, sizes, mtimes)
    logger.info("Listed %d images in %s: %s", len(images), root, images.class_counts())
    return images


def split_fraction(relative_path: str, seed: int) -> float:
    """A file's position in [0, 1): a hash of its relative path and the seed."""
    digest = hashlib.sha256(f"{seed}:{relative_path}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def split_train_val(images: LabelledImages, val_fraction: float, seed: int) -> tuple[LabelledImages, LabelledImages]:
    """Deterministic stratified split: a file goes to validation when its hash falls below the fraction.

    Each file's side depends only on its relative path and the seed, so the split is the same on
    every machine and stable when files are added; per class the validation share is the fraction
    in expectation. A class with at least 2 images always keeps one image on each side (its
    lowest- or highest-hashed file is moved), so no class is missing from either side.

    Raises:
        InputError: a class has fewer than 2 images, so it cannot appear on both sides.
    """
    positions = [split_fraction(p, seed) for p in images.relative_paths]
    val_flags = [pos < val_fraction for pos in positions]
    for label, name in enumerate(images.class_names):
        members = [i for i, lab in enumerate(images.labels) if lab == label]
        if len(members) < 2:
            raise InputError(f"class {name!r} has {len(members)} image(s); a train/validation split needs at least 2")
        if not any(val_flags[i] for i in members):
            val_flags[min(members, key=positions.__getitem__)] = True
        if all(val_flags[i] for i in members):
            val_flags[max(members, key=positions.__getitem__)] = False
    train = images.subset([i for i, flag in enumerate(val_flags) if not flag])
    val = images.subset([i for i, flag in enumerate(val_flags) if flag])
    logger.info("Split %d images: %d train, %d validation (fraction %.2f, seed %d)", len(images), len(train), len(val), val_fraction, seed)
    return train, val
