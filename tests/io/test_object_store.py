"""catdog's URI handling against a local S3-compatible server (moto, on 127.0.0.1), no AWS.

The training and scoring jobs themselves run against s3:// URIs in tests/cluster/test_job_submit.py,
submitted to a real Ray head as on a cluster. Here: the storage and decoding functions those jobs
use, in this process, checked with boto3 (an S3 client independent of catdog's pyarrow code), and
a job's user mistake on S3 mapped to exit code 2.
"""

from __future__ import annotations

import pytest

from support import run_job_module


def test_storage_round_trip_on_s3(s3_env, tmp_path):
    from catdog.io import storage
    from catdog.io.sample_data import generate_sample_dataset

    s3 = s3_env
    data = generate_sample_dataset(tmp_path / "data", images_per_class=3, size=(40, 32))
    keys = s3.upload_folder(data, "storage/images")
    (tmp_path / "data" / "notes.txt").write_text("not an image")
    s3.client.upload_file(str(tmp_path / "data" / "notes.txt"), s3.bucket, "storage/images/notes.txt")

    root = s3.uri("storage/images")
    assert storage.exists(root) and storage.is_dir(root) and not storage.exists(s3.uri("storage/nothing"))
    listed = storage.list_files(root, storage.IMAGE_EXTENSIONS)
    assert [entry.path for entry in listed] == [s3.uri(key) for key in keys]  # URIs keep their scheme
    assert listed[0].size == (data / keys[0].split("images/", 1)[1]).stat().st_size

    storage.write_json(storage.join(s3.uri("storage/run"), "meta", "info.json"), {"classes": ["cats", "dogs"]})
    assert storage.read_json(s3.uri("storage/run/meta/info.json")) == {"classes": ["cats", "dogs"]}
    assert s3.keys("storage/run") == ["storage/run/meta/info.json"], "no folder-marker objects"
    local = storage.copy_to_local(s3.uri("storage/run/meta/info.json"), tmp_path / "copy" / "info.json")
    assert local.read_bytes() == s3.read("storage/run/meta/info.json")
    storage.delete_file(s3.uri("storage/run/meta/info.json"))
    assert "storage/run/meta/info.json" not in s3.keys("storage/run")  # pyarrow may keep a folder marker
    with pytest.raises(FileNotFoundError):
        storage.list_files(s3.uri("storage/nothing"))


def test_decoding_reads_s3_uris_and_records_missing_objects(s3_env, tmp_path):
    from catdog.io import imaging
    from catdog.io.sample_data import generate_sample_dataset

    s3 = s3_env
    data = generate_sample_dataset(tmp_path / "data", images_per_class=2, size=(40, 32))
    keys = s3.upload_folder(data, "decode")
    paths = [s3.uri(key) for key in keys] + [s3.uri("decode/cats/gone.jpg")]
    decoded = imaging.read_and_decode(paths, image_size=32)
    assert list(decoded["error"][:-1]) == [None] * len(keys)
    assert decoded["image"][: len(keys)].reshape(len(keys), -1).max(axis=1).min() > 0
    assert (decoded["width"][: len(keys)] == 40).all() and (decoded["height"][: len(keys)] == 32).all()
    assert imaging.error_kind(decoded["error"][-1]) == "read_error"


def test_a_job_with_a_missing_s3_input_exits_2_and_writes_nothing(s3_env, tmp_path, monkeypatch, capsys):
    s3 = s3_env
    monkeypatch.chdir(tmp_path)  # a URI taken for a local path would land here
    code = run_job_module("jobs.score", "--model", s3.uri("runs/none"), "--input", s3.uri("no-such-prefix"),
                          "--output", s3.uri("preds/never"))
    err = capsys.readouterr().err
    assert code == 2, err[-4000:]
    assert "error:" in err
    assert s3.keys("preds/") == []
    assert list(tmp_path.iterdir()) == [], "a URI was treated as a local path"
