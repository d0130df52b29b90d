"""How should catdog read whole objects from S3: pyarrow input stream or random-access file?

Starts moto's S3 server on 127.0.0.1 (no AWS), puts objects of image and model sizes, and reads
each whole, side by side: `open_input_stream().read()`, `open_input_file().read()` (what
catdog.io.storage.read_bytes and catdog.io.imaging.read_file use), and boto3 `get_object` as a reference.

    python benchmarks/s3_read_bench.py
Prints a table and writes benchmarks/results/s3_read_bench.json. Measured here (2 shared cores,
load 13): 16 KB 0.011 s stream vs 0.011 s file; 5 MB 0.20 s vs 0.019 s; 94 MB (a ResNet50
model.keras) 36.9 s vs 0.51 s (boto3 0.57 s); an earlier, quieter run: 28.6 s vs 0.26 s at 94 MB.
The stream's cost grows much faster than the object's size.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import time
from pathlib import Path

SIZES = (16_000, 300_000, 5_000_000, 94_000_000)  # JPEG, large JPEG, camera JPEG, ResNet50 .keras


def _timed(read, repeats: int) -> float:
    start = time.perf_counter()
    for _ in range(repeats):
        read()
    return (time.perf_counter() - start) / repeats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=list(SIZES))
    args = parser.parse_args()

    from moto.server import ThreadedMotoServer

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    os.environ.update(AWS_ENDPOINT_URL=f"http://127.0.0.1:{port}", AWS_ACCESS_KEY_ID="bench",
                      AWS_SECRET_ACCESS_KEY="bench", AWS_DEFAULT_REGION="us-east-1", AWS_EC2_METADATA_DISABLED="true")
    import boto3
    import pyarrow.fs as pafs

    client = boto3.client("s3")
    client.create_bucket(Bucket="bench")
    fs, _ = pafs.FileSystem.from_uri("s3://bench")
    rows = []
    try:
        for size in args.sizes:
            key = f"object-{size}"
            client.put_object(Bucket="bench", Key=key, Body=os.urandom(size))
            repeats = 20 if size < 1_000_000 else (3 if size < 50_000_000 else 1)

            def stream():
                with fs.open_input_stream(f"bench/{key}") as f:
                    return f.read()

            def random_access():
                with fs.open_input_file(f"bench/{key}") as f:
                    return f.read()

            row = {
                "bytes": size,
                "stream_s": _timed(stream, repeats),
                "file_s": _timed(random_access, repeats),
                "boto3_s": _timed(lambda: client.get_object(Bucket="bench", Key=key)["Body"].read(), repeats),
            }
            rows.append(row)
            print(f"{size:>12,} B  stream {row['stream_s']:8.3f} s  file {row['file_s']:8.3f} s  "
                  f"boto3 {row['boto3_s']:8.3f} s", flush=True)
    finally:
        server.stop()
    out = Path(__file__).resolve().parent / "results" / "s3_read_bench.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"load_avg_1m": os.getloadavg()[0], "rows": rows}, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
