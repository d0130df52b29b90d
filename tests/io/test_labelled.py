"""Labelled folder listing and the train/validation split (no Ray, no TensorFlow)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from catdog.errors import InputError
from catdog.io.labelled import list_labelled_images, split_train_val


def _touch(path: Path, data: bytes = b"not decoded when listing") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def _folder(root: Path, counts: dict[str, int]) -> Path:
    for name, count in counts.items():
        for i in range(count):
            _touch(root / name / f"{name}_{i:03d}.jpg")
    return root


def _sides(images) -> dict[str, str]:
    return {rel: side for side, part in zip(("train", "val"), split_train_val(images, 0.2, 123)) for rel in part.relative_paths}


def test_classes_are_sorted_subfolders_searched_recursively(tmp_path):
    _touch(tmp_path / "zebra" / "a.JPG")
    _touch(tmp_path / "zebra" / "deeper" / "still" / "b.webp")
    _touch(tmp_path / "apple" / "c.png")
    _touch(tmp_path / "apple" / "notes.txt")  # not an image extension
    _touch(tmp_path / "apple" / "d.jpeg")
    _touch(tmp_path / ".hidden" / "e.jpg")  # hidden folders are not classes
    _touch(tmp_path / "loose.jpg")  # files beside the class folders belong to no class

    images = list_labelled_images(str(tmp_path))

    assert images.class_names == ["apple", "zebra"]
    by_rel = dict(zip(images.relative_paths, images.labels))
    assert by_rel == {"apple/c.png": 0, "apple/d.jpeg": 0, "zebra/a.JPG": 1, "zebra/deeper/still/b.webp": 1}
    assert all(Path(p).is_absolute() and Path(p).exists() for p in images.paths)
    assert images.sizes == [len(b"not decoded when listing")] * 4
    assert all(m > 0 for m in images.mtimes)
    assert images.class_counts() == {"apple": 2, "zebra": 2}


@pytest.mark.parametrize(
    "layout, message",
    [
        ({}, "not found"),
        ({"cats": 3}, "at least 2 classes"),
        ({"cats": 3, "dogs": 0}, "holds no images"),
    ],
)
def test_unusable_folders_raise_input_error(tmp_path, layout, message):
    root = tmp_path / "data"
    if layout:
        _folder(root, layout)
        for name, count in layout.items():
            (root / name).mkdir(parents=True, exist_ok=True)
    with pytest.raises(InputError, match=message):
        list_labelled_images(str(root))


def test_a_file_is_not_a_data_folder(tmp_path):
    _touch(tmp_path / "file.jpg")
    with pytest.raises(InputError, match="not a folder"):
        list_labelled_images(str(tmp_path / "file.jpg"))


def test_no_images_at_all_raises(tmp_path):
    _touch(tmp_path / "cats" / "readme.txt")
    _touch(tmp_path / "dogs" / "readme.txt")
    with pytest.raises(InputError, match="no images"):
        list_labelled_images(str(tmp_path))


def test_split_is_deterministic_stratified_and_independent_of_location(tmp_path):
    root = _folder(tmp_path / "a", {"cats": 250, "dogs": 250})
    first = _sides(list_labelled_images(str(root)))
    assert first == _sides(list_labelled_images(str(root)))
    moved = shutil.copytree(root, tmp_path / "elsewhere" / "b")
    assert _sides(list_labelled_images(str(moved))) == first  # hashes the path relative to the root

    train, val = split_train_val(list_labelled_images(str(root)), 0.2, 123)
    for name in ("cats", "dogs"):
        share = val.class_counts()[name] / 250
        assert 0.12 < share < 0.28, share  # stratified: each class near the fraction
    assert set(train.paths).isdisjoint(val.paths) and len(train) + len(val) == 500
    other_seed = split_train_val(list_labelled_images(str(root)), 0.2, 7)[1]
    assert set(other_seed.paths) != set(val.paths)


def test_adding_files_never_moves_existing_ones(tmp_path):
    root = _folder(tmp_path, {"cats": 60, "dogs": 60})
    before = _sides(list_labelled_images(str(root)))
    for i in range(60, 120):
        _touch(root / "cats" / f"cats_{i:03d}.jpg")
        _touch(root / "dogs" / f"new_{i:03d}.jpg")
    after = _sides(list_labelled_images(str(root)))
    assert len(after) == 240
    assert {rel: after[rel] for rel in before} == before


def test_every_class_gets_both_sides_even_when_tiny(tmp_path):
    root = _folder(tmp_path, {"cats": 2, "dogs": 2, "owls": 3})
    train, val = split_train_val(list_labelled_images(str(root)), 0.2, 123)
    assert all(count >= 1 for count in train.class_counts().values())
    assert all(count >= 1 for count in val.class_counts().values())
    lonely = _folder(tmp_path / "lonely", {"cats": 5, "dogs": 1})
    with pytest.raises(InputError, match="'dogs' has 1 image"):
        split_train_val(list_labelled_images(str(lonely)), 0.2, 123)


def test_validation_folder_uses_the_training_classes(tmp_path):
    train_root = _folder(tmp_path / "train", {"cats": 3, "dogs": 3, "owls": 3})
    val_root = _folder(tmp_path / "val", {"dogs": 2, "cats": 1})  # no owls: allowed
    classes = list_labelled_images(str(train_root)).class_names
    val = list_labelled_images(str(val_root), classes)
    assert val.class_names == ["cats", "dogs", "owls"]
    assert sorted(zip(val.relative_paths, val.labels)) == [("cats/cats_000.jpg", 0), ("dogs/dogs_000.jpg", 1), ("dogs/dogs_001.jpg", 1)]
    _folder(val_root, {"ferrets": 1})
    with pytest.raises(InputError, match="ferrets"):
        list_labelled_images(str(val_root), classes)
