"""Train and score against s3:// URIs on a local S3-compatible server (moto), no AWS (issue #4).

moto's server mode listens on 127.0.0.1 only. The jobs run as the user runs them, as processes with
the standard AWS variables set (AWS_ENDPOINT_URL, credentials, region), each starting its own local
Ray, which inherits them; data, the backbone weights file, the feature cache, the run folder and
the predictions all live in the bucket. The test checks the bucket with boto3, an S3 client
independent of catdog's pyarrow code.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

pytestmark = [pytest.mark.slow, pytest.mark.ray]

REPO = Path(__file__).resolve().parents[1]
BUCKET = "catdog-test"
JOB_TIMEOUT_S = 420
IMAGES_PER_CLASS = 8


@pytest.fixture(scope="module")
def s3_env():
    """A moto S3 server on a free loopback port; the environment a job needs to use it."""
    moto_server = pytest.importorskip("moto.server")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    env = {
        "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}",
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_REGION": "us-east-1",
        "AWS_EC2_METADATA_DISABLED": "true",  # never ask an instance-metadata service for credentials
    }
    try:
        yield env
    finally:
        server.stop()


@pytest.fixture(scope="module")
def s3(s3_env):
    import boto3

    client = boto3.client(
        "s3", endpoint_url=s3_env["AWS_ENDPOINT_URL"], region_name=s3_env["AWS_REGION"],
        aws_access_key_id="testing", aws_secret_access_key="testing",
    )
    client.create_bucket(Bucket=BUCKET)
    return client


def _keys(s3, prefix: str) -> list[str]:
    pages = s3.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix)
    return sorted(item["Key"] for page in pages for item in page.get("Contents", []))


def _upload_folder(s3, folder: Path, prefix: str) -> list[str]:
    keys = []
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        key = f"{prefix}/{path.relative_to(folder).as_posix()}"
        s3.upload_file(str(path), BUCKET, key)
        keys.append(key)
    return keys


def _weights_file(folder: Path) -> Path:
    """A ResNet50 no-top weights file, as a user prepares one for a cluster without internet
    (README), with random weights here: no download."""
    from catdog.runtime import configure_tensorflow

    configure_tensorflow()
    import keras

    path = folder / "resnet50_notop.weights.h5"
    keras.applications.ResNet50(include_top=False, weights=None, input_shape=(32, 32, 3), pooling="avg").save_weights(path)
    return path


@pytest.fixture
def job_env(s3_env):
    ray_tmp = tempfile.mkdtemp(prefix="cds3-", dir="/tmp")  # Ray's socket paths must stay short
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "AWS_"))}
    env.update(s3_env, RAY_TMPDIR=ray_tmp, PYTHONPATH=str(REPO), CATDOG_TEST_CPUS="2")
    yield env
    shutil.rmtree(ray_tmp, ignore_errors=True)


def run_job(module: str, args: list[str], env: dict, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", module, *args], env=env, cwd=cwd,
                          capture_output=True, text=True, timeout=JOB_TIMEOUT_S)


def _explain(proc: subprocess.CompletedProcess) -> str:
    return f"exit {proc.returncode}\nstdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-6000:]}"


def test_train_and_score_with_s3_uris(s3, job_env, tmp_path):
    from catdog.sample_data import generate_sample_dataset

    data = generate_sample_dataset(tmp_path / "data", images_per_class=IMAGES_PER_CLASS, size=(48, 40))
    image_keys = _upload_folder(s3, data, "images")
    s3.upload_file(str(_weights_file(tmp_path)), BUCKET, "weights/resnet50_notop.weights.h5")
    workdir = tmp_path / "cwd"  # the jobs run here; nothing may be written here
    workdir.mkdir()
    root = f"s3://{BUCKET}"

    train = run_job("jobs.train", [
        "--data", f"{root}/images", "--output", f"{root}/runs/r1",
        "--weights", f"{root}/weights/resnet50_notop.weights.h5", "--cache-dir", f"{root}/cache",
        "--image-size", "32", "--epochs", "2", "--num-workers", "1",
    ], job_env, workdir)
    assert train.returncode == 0, _explain(train)
    run_keys = _keys(s3, "runs/r1/")
    assert "runs/r1/model.keras" in run_keys and "runs/r1/classes.json" in run_keys, run_keys
    assert json.loads(s3.get_object(Bucket=BUCKET, Key="runs/r1/classes.json")["Body"].read()) == ["cats", "dogs"]
    assert _keys(s3, "cache/"), "the feature cache was written to the bucket"

    score = run_job("jobs.score", [
        "--model", f"{root}/runs/r1", "--input", f"{root}/images", "--output", f"{root}/preds/p1",
    ], job_env, workdir)
    assert score.returncode == 0, _explain(score)
    pred_keys = _keys(s3, "preds/p1/")
    assert "preds/p1/_SUCCESS.json" in pred_keys
    parts = [k for k in pred_keys if k.endswith(".parquet")]
    assert parts
    table = pa.concat_tables(
        [pq.read_table(io.BytesIO(s3.get_object(Bucket=BUCKET, Key=k)["Body"].read())) for k in parts]
    )
    paths = table.column("path").to_pylist()
    assert sorted(paths) == sorted(f"{root}/{key}" for key in image_keys)  # rows == files, no duplicates
    assert table.column("error").null_count == table.num_rows
    assert set(table.column("label").to_pylist()) <= {"cats", "dogs"}
    summary = json.loads(s3.get_object(Bucket=BUCKET, Key="preds/p1/_SUCCESS.json")["Body"].read())
    assert summary["rows_written"] == summary["files_listed"] == len(image_keys)

    assert list(workdir.iterdir()) == [], "a URI was treated as a local path somewhere"


def test_missing_s3_input_is_a_user_error(s3, job_env, tmp_path):
    proc = run_job("jobs.score", [
        "--model", f"s3://{BUCKET}/runs/none", "--input", f"s3://{BUCKET}/no-such-prefix",
        "--output", f"s3://{BUCKET}/preds/never",
    ], job_env, tmp_path)
    assert proc.returncode == 2, _explain(proc)
    assert "error:" in proc.stderr
    assert _keys(s3, "preds/never") == []
