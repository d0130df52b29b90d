"""catdog.io.bucket_listing against the local S3 server (moto on 127.0.0.1): pages, key ranges, order."""

from __future__ import annotations

import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

# First characters after the prefix: below, between and beyond the split points (non-ASCII last).
FIRSTS = "!-0123456789ABCMXYZ_abcdkmxyz~é"
IMAGES = 2_500
DENSE = 200


@pytest.fixture(scope="module")
def bucket(s3):
    """The module's bucket holding `IMAGES` tiny images under flat/, and keys that are not images."""
    with pytest.MonkeyPatch.context() as patch:
        for key in [k for k in os.environ if k.startswith("AWS_")]:
            patch.delenv(key)
        for key, value in s3.env.items():
            patch.setenv(key, value)
        images = {f"flat/{FIRSTS[i % len(FIRSTS)]}{i:05d}{('.jpg', '.PNG', '.jpeg')[i % 3]}": b"x" * (1 + i % 7)
                  for i in range(IMAGES - 2)}
        images.update({"flat/sub/deep/a.webp": b"deep", "flat/x.jpg/inside.gif": b"gif"})
        dense = {f"dense/{i:04d}.jpg": b"d" for i in range(DENSE)}  # one first character: one range
        others = {"flat/notes.txt": b"n", "flat/a.jpg.txt": b"t", "flat/sub/": b"", "flat/x.jpg/": b"",
                  "flat/b": b"split point", "flat2/outside.jpg": b"o", "flatter.jpg": b"o"}
        with ThreadPoolExecutor(8) as pool:
            list(pool.map(lambda item: s3.client.put_object(Bucket=s3.bucket, Key=item[0], Body=item[1]),
                          [*images.items(), *dense.items(), *others.items()]))
        yield s3, images


def _list(uri: str, **kwargs) -> tuple[list, list]:
    from catdog.io.bucket_listing import list_images

    requests = []
    rows = list(list_images(uri, on_request=requests.append, **kwargs))
    return rows, requests


def test_pages_give_every_image_once_in_key_order_with_sizes(bucket):
    s3, images = bucket
    rows, requests = _list(s3.uri("flat"), listers=1)
    assert [path for path, _, _ in rows] == [s3.uri(key) for key in sorted(images)]  # str order = S3's UTF-8 order
    assert [size for _, size, _ in rows] == [len(images[key]) for key in sorted(images)]
    assert len(requests) == 3, "2,500 keys and a few more: three pages of 1,000"


def test_rows_match_the_pyarrow_listing_sizes_and_times(bucket):
    from catdog.io import storage
    from catdog.io.folder_walk import walk_uri

    s3, _ = bucket
    rows = list(walk_uri(s3.uri("flat/")))  # the default listers, over key ranges
    assert rows == sorted(rows)
    old = storage.list_files(s3.uri("flat"), storage.IMAGE_EXTENSIONS)
    assert rows == [(entry.path, entry.size, entry.mtime_ns) for entry in old]  # resume compares size and mtime


def test_key_range_listers_give_the_same_rows_as_one_lister(bucket):
    s3, _ = bucket
    one, _ = _list(s3.uri("flat"), listers=1)
    # pages of 97 keys end inside ranges; the rest split after the first page
    rows, requests = _list(s3.uri("flat"), listers=3, pages_ahead=1, page_keys=97, serial_pages=1)
    assert rows == one
    probes = {request["StartAfter"] for request in requests if request["MaxKeys"] == 1}
    assert {"flat/0", "flat/9", "flat/A", "flat/Z", "flat/a", "flat/z"} <= probes, "one range per split point"


def test_ranges_after_the_last_key_are_skipped_without_requests(bucket):
    s3, _ = bucket
    one, _ = _list(s3.uri("dense"), listers=1, page_keys=10)
    rows, requests = _list(s3.uri("dense"), listers=4, page_keys=10, serial_pages=3)
    assert rows == one and len(rows) == DENSE
    # 20 pages, the one-key start of the range holding them, and of the 3 others started blind: not 62
    assert len(requests) <= DENSE // 10 + 1 + 4, len(requests)


def test_the_first_row_comes_after_one_request(bucket):
    from catdog.io.bucket_listing import list_images

    s3, images = bucket
    requests = []
    rows = list_images(s3.uri("flat"), page_keys=100, on_request=requests.append)
    assert next(rows)[0] == s3.uri(min(images))
    assert len(requests) == 1
    rows.close()


def test_listers_run_a_bounded_number_of_pages_ahead_and_stop_with_the_consumer(bucket):
    from catdog.io.bucket_listing import list_images

    s3, _ = bucket
    requests = []
    rows = list_images(s3.uri("flat"), listers=2, pages_ahead=1, page_keys=10, serial_pages=1,
                       on_request=requests.append)
    for _ in range(11):  # past the first page: the key-range listers are running
        next(rows)
    time.sleep(1.0)  # time enough to list far ahead, were the listers not bounded
    assert len(requests) <= 1 + 2 * (1 + 2), len(requests)  # first page; per lister: taken, queued, in hand
    rows.close()
    deadline = time.monotonic() + 5
    while any(t.name.startswith("s3-lister") for t in threading.enumerate()) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not any(t.name.startswith("s3-lister") for t in threading.enumerate())


def test_a_missing_bucket_is_an_os_error(bucket):
    from catdog.io.bucket_listing import list_images

    with pytest.raises(OSError, match="could not list"):
        next(list_images("s3://catdog-no-such-bucket/images"))


def test_only_plain_s3_uris_are_listed_page_by_page():
    from catdog.io.bucket_listing import can_list

    assert can_list("s3://bucket/images") and can_list("S3://bucket")
    assert not can_list("gs://bucket/images") and not can_list("file:///data")
    assert not can_list("s3://bucket/images?endpoint_override=localhost:9000")  # options boto3 would ignore
    assert not can_list("s3://key:secret@bucket/images")


def test_timestamps_in_other_forms_are_still_read():
    from datetime import datetime, timezone

    from catdog.io.bucket_listing import _parse_timestamp

    expected = datetime(2026, 1, 31, 12, 0, 0, 250_000, tzinfo=timezone.utc)
    assert _parse_timestamp("2026-01-31T12:00:00.250Z") == expected  # what S3 sends, read without dateutil
    assert _parse_timestamp("Sat, 31 Jan 2026 12:00:00.250 GMT") == expected  # botocore's parser
