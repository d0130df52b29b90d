"""A local S3-compatible server for tests: moto's server mode on a free 127.0.0.1 port.

Jobs reach it the way a user reaches MinIO or any S3-compatible store, through the standard AWS
variables in `env`; the test checks the bucket with boto3, independent of catdog's pyarrow code.
"""

from __future__ import annotations

import socket
import uuid
from pathlib import Path


class LocalS3Server:
    """One moto server for the whole test session (moto keeps its state per process, shared by all servers)."""

    def __init__(self):
        from moto.server import ThreadedMotoServer

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        self._server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
        self._server.start()
        self.endpoint = f"http://127.0.0.1:{port}"

    def new_bucket(self) -> LocalS3:
        return LocalS3(self.endpoint)

    def stop(self) -> None:
        self._server.stop()


class LocalS3:
    """One fresh bucket on a running server, and the variables a job needs to reach it."""

    def __init__(self, endpoint: str):
        self.endpoint = endpoint
        self.credentials = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing"}
        self.settings = {  # non-secret: what a job's --runtime-env-json may carry
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_REGION": "us-east-1",
            "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_EC2_METADATA_DISABLED": "true",  # never ask an instance-metadata service
        }
        self.env = {**self.credentials, **self.settings}
        import boto3

        self.client = boto3.client("s3", endpoint_url=self.endpoint, region_name="us-east-1",
                                   aws_access_key_id="testing", aws_secret_access_key="testing")
        self.bucket = f"catdog-test-{uuid.uuid4().hex[:8]}"
        self.client.create_bucket(Bucket=self.bucket)

    def uri(self, key: str) -> str:
        return f"s3://{self.bucket}/{key}"

    def keys(self, prefix: str) -> list[str]:
        pages = self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=prefix)
        return sorted(item["Key"] for page in pages for item in page.get("Contents", []))

    def read(self, key: str) -> bytes:
        return self.client.get_object(Bucket=self.bucket, Key=key)["Body"].read()

    def upload_folder(self, folder: Path, prefix: str) -> list[str]:
        keys = []
        for path in sorted(p for p in folder.rglob("*") if p.is_file()):
            key = f"{prefix}/{path.relative_to(folder).as_posix()}"
            self.client.upload_file(str(path), self.bucket, key)
            keys.append(key)
        return keys

def weights_file(folder: Path) -> Path:
    """A ResNet50 no-top weights file as the README has users prepare for clusters without
    internet, with random weights here (no download)."""
    from catdog.model.tensorflow_setup import configure_tensorflow

    configure_tensorflow()
    import keras

    path = folder / "resnet50_notop.weights.h5"
    backbone = keras.applications.ResNet50(include_top=False, weights=None, input_shape=(32, 32, 3), pooling="avg")
    backbone.save_weights(path)
    return path
