"""Listing the scoring input (catdog.io.inputs): folders, symlink policy, manifests, user mistakes."""

from __future__ import annotations

import os
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from catdog.errors import InputError
from catdog.io.inputs import list_inputs, normalise_path
from support.hostile_corpus import write_corpus


def _touch(path: Path, data: bytes = b"x") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def _paths(listing) -> list[str]:
    return listing.table["path"].to_pylist()


def test_folder_is_searched_recursively_for_image_extensions(tmp_path):
    expected = write_corpus(tmp_path)
    listing = list_inputs(str(tmp_path))
    assert listing.source == "folder" and not listing.has_true_label
    assert _paths(listing) == sorted(str(tmp_path / name) for name in expected)
    assert str(tmp_path / "notes.txt") not in _paths(listing)
    assert str(tmp_path / "folder.jpg") not in _paths(listing)  # a directory named like an image is walked
    assert len(set(_paths(listing))) == listing.num_files


def test_paths_are_absolute_and_normalised(tmp_path, monkeypatch):
    _touch(tmp_path / "a" / "b.jpg")
    monkeypatch.chdir(tmp_path)
    assert _paths(list_inputs("a/../a//")) == [str(tmp_path / "a" / "b.jpg")]
    assert _paths(list_inputs(f"file://{tmp_path}/a")) == [str(tmp_path / "a" / "b.jpg")]
    assert normalise_path("S3://bucket//x/./y.jpg") == "s3://bucket/x/y.jpg"
    assert normalise_path("y.jpg", base="gs://b/dir/") == "gs://b/dir/y.jpg"
    assert normalise_path("../y.jpg", base="/data/m") == "/data/y.jpg"
    assert normalise_path("file:///data/x.jpg") == "/data/x.jpg"


def test_symlinks_outside_the_input_are_skipped_unless_followed(tmp_path):
    inside, outside = tmp_path / "in", tmp_path / "out"
    _touch(inside / "real.jpg")
    _touch(outside / "elsewhere.jpg")
    _touch(outside / "sub" / "deep.png")
    os.symlink(outside / "elsewhere.jpg", inside / "link_file.jpg")
    os.symlink(outside / "sub", inside / "link_dir")
    os.symlink(inside / "real.jpg", inside / "alias.jpg")  # inside -> inside: listed (its own path)
    os.symlink(tmp_path / "nowhere.jpg", inside / "dangling_out.jpg")
    os.symlink(inside / "gone.jpg", inside / "dangling_in.jpg")  # listed: scoring gives it a read error

    listing = list_inputs(str(inside))
    assert _paths(listing) == [str(inside / n) for n in ("alias.jpg", "dangling_in.jpg", "real.jpg")]
    assert listing.skipped == {"symlink_outside_input": 3}

    followed = list_inputs(str(inside), follow_symlinks=True)
    assert _paths(followed) == [str(inside / n) for n in (
        "alias.jpg", "dangling_in.jpg", "dangling_out.jpg", "link_dir/deep.png", "link_file.jpg", "real.jpg")]


def test_symlink_loops_end_and_aliased_folders_are_listed_once(tmp_path):
    _touch(tmp_path / "a" / "x.jpg")
    os.symlink(tmp_path, tmp_path / "a" / "loop")  # a/loop -> root -> a -> ...
    os.symlink(tmp_path / "a", tmp_path / "b")  # a second name for a/
    for follow in (False, True):
        listing = list_inputs(str(tmp_path), follow_symlinks=follow)
        assert _paths(listing) == [str(tmp_path / "a" / "x.jpg")]
        assert listing.skipped["repeated_folder"] >= 1


def test_very_long_and_non_ascii_names(tmp_path):
    name = ("é" * 125) + ".jpeg"  # 255 bytes: the longest name Linux allows
    assert len(name.encode()) == 255
    _touch(tmp_path / name)
    _touch(tmp_path / "猫 cat" / "ü b.JPG")
    assert _paths(list_inputs(str(tmp_path))) == sorted([str(tmp_path / name), str(tmp_path / "猫 cat" / "ü b.JPG")])


def test_parquet_manifest_with_true_label_relative_paths_and_duplicates(tmp_path):
    manifest = tmp_path / "lists" / "m.parquet"
    manifest.parent.mkdir()
    pq.write_table(pa.table({
        "path": ["../img/a.jpg", str(tmp_path / "img" / "b.jpg"), "../img/a.jpg", None, "  ", "s3://bkt/c.jpg"],
        "true_label": ["cats", "dogs", "dogs", "cats", "cats", "dogs"],
        "other": [1, 2, 3, 4, 5, 6],
    }), manifest)
    listing = list_inputs(str(manifest))
    assert listing.source == "manifest" and listing.has_true_label
    assert listing.table.column_names == ["path", "true_label", "file_size", "file_modified"]
    assert _paths(listing) == [str(tmp_path / "img" / "a.jpg"), str(tmp_path / "img" / "b.jpg"), "s3://bkt/c.jpg"]
    assert listing.table["true_label"].to_pylist() == ["cats", "dogs", "dogs"]  # first occurrence kept
    assert listing.skipped == {"empty_path": 2, "duplicate_path": 1}


def test_csv_manifest_paths_need_not_exist(tmp_path):
    (tmp_path / "m.csv").write_text("path,score\nmissing/one.jpg,1\n/abs/two.png,2\n")
    listing = list_inputs(str(tmp_path / "m.csv"))
    assert _paths(listing) == [str(tmp_path / "missing" / "one.jpg"), "/abs/two.png"]
    assert not listing.has_true_label


@pytest.mark.parametrize("case", ["empty_folder", "only_other_files", "missing", "zero_byte_parquet",
                                  "zero_byte_csv", "no_path_column", "manifest_without_rows", "not_a_manifest"])
def test_user_mistakes_raise_input_error(tmp_path, case):
    target = tmp_path / "input"
    if case == "empty_folder":
        (target / "sub").mkdir(parents=True)
    elif case == "only_other_files":
        _touch(target / "readme.txt")
        (target / "dir.png").mkdir()
    elif case == "zero_byte_parquet":
        target = _touch(tmp_path / "m.parquet", b"")
    elif case == "zero_byte_csv":
        target = _touch(tmp_path / "m.csv", b"")
    elif case == "no_path_column":
        target = tmp_path / "m.parquet"
        pq.write_table(pa.table({"file": ["a.jpg"]}), target)
    elif case == "manifest_without_rows":
        target = _touch(tmp_path / "m.csv", b"path\n")
    elif case == "not_a_manifest":
        target = _touch(tmp_path / "photo.jpg")
    with pytest.raises(InputError) as info:
        list_inputs(str(target))
    message = str(info.value)
    assert str(target) in message or target.name in message, message
