"""How soon does the first image come, and how much memory does listing take, for a large flat S3 prefix?

Starts moto's S3 server on 127.0.0.1 (tests/support/s3local.py; no AWS), fills two flat prefixes of tiny
objects (hex names, as content-addressed stores use), each in a bucket of its own, and lists each
in a fresh subprocess, so that its peak RSS is the listing's own, side by side:
- one call: pyarrow `FileSelector(prefix, recursive=True)`, sorted, then rows (what
  `catdog.io.folder_walk.walk_uri` did);
- paged: `catdog.io.bucket_listing.list_images`, pages of 1,000 keys, key ranges listed ahead in
  threads (what `walk_uri` does now for s3://);
- paged_1: the same with one lister (no key ranges, one page read ahead in a thread).

    python benchmarks/listing_bench.py                          # 10,000 and 100,000 keys
    python benchmarks/listing_bench.py --counts 20000 200000    # the question's sizes: far slower on moto
Prints a table and ratios, and writes benchmarks/results/listing_bench.json. Objects are put
straight into the server's in-process store: HTTP puts to moto are far too slow for 200,000 keys.
moto sorts the whole bucket for every list request and is CPU-bound beside the client on the
same cores, so its listing time per key grows with the bucket and extra requests (key-range starts
and ends) cost as much as pages; compare the contenders within one count.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tests")]

from benchmarks.peak_memory import run_python  # noqa: E402

CONTENDERS = ("one_call", "paged_1", "paged")

# Runs in a fresh interpreter: argv = contender, prefix URI, listers. Prints one JSON line.
_LISTING = """
import json, sys, time
contender, uri, listers = sys.argv[1], sys.argv[2], int(sys.argv[3])
import boto3, pyarrow.fs as pafs  # both contenders import the same modules before the baseline
from catdog.io import bucket_listing, storage
from catdog.io.paths import normalise_path

def rss_mib():
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmRSS:")) / 1024

def one_call(location):
    fs, root = storage.resolve(location)
    wanted = tuple(storage.IMAGE_EXTENSIONS)
    infos = sorted(fs.get_file_info(pafs.FileSelector(root, recursive=True, allow_not_found=True)),
                   key=lambda info: info.path)
    for info in infos:
        if info.type == pafs.FileType.File and info.path.lower().endswith(wanted):
            yield normalise_path(storage.to_location(location, info.path)), int(info.size or 0), info.mtime_ns

requests = []
before = rss_mib()
start = time.perf_counter()
if contender == "one_call":
    rows = one_call(uri)
else:
    rows = bucket_listing.list_images(uri, listers, on_request=requests.append)
first_s, count = None, 0
for row in rows:
    if first_s is None:
        first_s = time.perf_counter() - start
    count += 1
total_s = time.perf_counter() - start
print(json.dumps({"rows": count, "first_row_s": first_s, "total_s": total_s, "rss_before_mib": before,
                  "requests": len(requests) if contender != "one_call" else None}))
"""


def fill(server, count: int) -> tuple:
    """A new bucket (tests/s3local.LocalS3) holding `count` one-byte images under flat/, and that prefix's URI."""
    from moto.core import DEFAULT_ACCOUNT_ID
    from moto.s3.models import s3_backends

    bucket = server.new_bucket()
    store = s3_backends[DEFAULT_ACCOUNT_ID]["aws"]  # the store the server in this process serves
    for i in range(count):
        store.put_object(bucket.bucket, f"flat/{hashlib.md5(str(i).encode()).hexdigest()[:20]}.jpg", b"x")
    return bucket, bucket.uri("flat")


def measure(contender: str, uri: str, env: dict, listers: int) -> dict:
    run = run_python("-c", _LISTING, [contender, uri, str(listers)], cwd=REPO, env=env, timeout=3600)
    if run.returncode != 0:
        raise RuntimeError(f"{contender} failed:\n{run.stderr[-3000:]}")
    result = json.loads(run.stdout.strip().splitlines()[-1])
    result.update(contender=contender, peak_rss_mib=run.peak_rss_mib, wall_s=run.wall_s,
                  keys_per_s=result["rows"] / result["total_s"])
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--counts", type=int, nargs=2, default=[10_000, 100_000], metavar=("SMALL", "LARGE"))
    parser.add_argument("--listers", type=int, default=None, help="key ranges listed at once (default: catdog's)")
    args = parser.parse_args()

    from catdog.io import bucket_listing
    from support.s3local import LocalS3Server

    listers = args.listers or bucket_listing.LISTERS
    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one log line per request otherwise
    server = LocalS3Server()
    results = []
    try:
        for count in args.counts:
            started = time.perf_counter()
            bucket, uri = fill(server, count)
            print(f"filled {count:,} keys in {time.perf_counter() - started:.1f} s", flush=True)
            env = {**{k: v for k, v in os.environ.items() if not k.startswith("AWS_")}, **bucket.env,
                   "PYTHONPATH": str(REPO)}
            for contender in CONTENDERS:
                row = {"keys": count, **measure(contender, uri, env, 1 if contender == "paged_1" else listers)}
                assert row["rows"] == count, row
                results.append(row)
                print(f"{count:>9,} keys  {contender:<8}  first row {row['first_row_s']:8.2f} s  "
                      f"all {row['total_s']:8.1f} s  {row['keys_per_s']:8.0f} keys/s  "
                      f"peak RSS {row['peak_rss_mib']:7.1f} MiB (+{row['peak_rss_mib'] - row['rss_before_mib']:.1f} "
                      f"listing)" + (f"  {row['requests']} requests" if row["requests"] else ""), flush=True)
    finally:
        server.stop()

    by = {(r["keys"], r["contender"]): r for r in results}
    small, large = args.counts
    ratios = {}
    for contender in CONTENDERS:
        a, b = by[small, contender], by[large, contender]
        ratios[contender] = {"peak_rss": b["peak_rss_mib"] / a["peak_rss_mib"],
                             "first_row_s": b["first_row_s"] / a["first_row_s"]}
        print(f"{contender:<8} {large:,} vs {small:,} keys: peak RSS {ratios[contender]['peak_rss']:.2f}x, "
              f"time to first row {ratios[contender]['first_row_s']:.2f}x")
    for count in args.counts:
        old = by[count, "one_call"]
        for contender in CONTENDERS[1:]:
            new = by[count, contender]
            r = ratios[f"{contender}_vs_one_call_{count}"] = {
                "first_row_s": new["first_row_s"] / old["first_row_s"],
                "peak_rss": new["peak_rss_mib"] / old["peak_rss_mib"],
                "keys_per_s": new["keys_per_s"] / old["keys_per_s"]}
            print(f"{contender} vs one call at {count:,} keys: time to first row {r['first_row_s']:.3f}x, "
                  f"peak RSS {r['peak_rss']:.2f}x, keys/s {r['keys_per_s']:.2f}x")
    out = REPO / "benchmarks" / "results" / "listing_bench.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"load_avg_1m": os.getloadavg()[0], "listers": listers, "results": results,
                               "ratios": ratios}, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
