"""Reads that must not wait for ever (catdog.io.imaging) and the progress line that names them, without Ray.

Real files, a real FIFO and device, and a real S3 server behind a proxy that never answers some
reads (tests/support/stalling_s3.py). Each read that could hang runs under a join timeout of its own, so
a regression fails here instead of hanging the suite.
"""

from __future__ import annotations

import os
import threading
import time

import pyarrow as pa
import pytest
from PIL import Image

from catdog.io.file_reads import _open_regular
from catdog.io.imaging import error_kind, read_and_decode
from catdog.io.paths import escape_local_path
from catdog.score.progress import MAX_SLOW_READS, ProgressCounter, format_line

SIZE = 32
GUARD_S = 20.0  # far above any expected time here, far below "hangs for ever"


def _guarded(fn, *args, **kwargs):
    """fn(*args) in a daemon thread; fails the test if it has not returned after GUARD_S."""
    out: dict = {}

    def run() -> None:
        try:
            out["value"] = fn(*args, **kwargs)
        except BaseException as exc:  # noqa: BLE001 - re-raised in the test's thread
            out["error"] = exc

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(GUARD_S)
    assert not thread.is_alive(), f"{getattr(fn, '__name__', fn)} still blocked after {GUARD_S:g} s"
    if "error" in out:
        raise out["error"]
    return out["value"]


def _timed_decode(paths, **kwargs) -> tuple[list, float]:
    started = time.monotonic()
    out = _guarded(read_and_decode, [str(p) for p in paths], SIZE, **kwargs)
    pa.array(list(out["error"]), pa.string())  # every message fits the Arrow `error` column
    return list(out["error"]), time.monotonic() - started


def test_fifo_named_like_an_image_is_a_row_at_once_never_opened(tmp_path):
    fifo = tmp_path / "pipe.jpg"
    os.mkfifo(fifo)
    Image.new("RGB", (8, 8)).save(tmp_path / "ok.jpg")
    errors, took = _timed_decode([fifo, tmp_path / "ok.jpg"])
    assert errors == ["not_a_regular_file: a FIFO (named pipe)", None]
    assert took < 5


def test_a_fifo_swapped_in_after_stat_does_not_block_the_open(tmp_path):
    fifo = tmp_path / "swapped.jpg"
    os.mkfifo(fifo)
    with pytest.raises(Exception) as refused:
        _guarded(_open_regular, str(fifo))  # what read_file opens with, after its own stat said "regular"
    assert error_kind(str(refused.value)) == "not_a_regular_file"


def test_devices_and_sockets_are_rows_without_being_read(tmp_path):
    import socket
    import tempfile

    (tmp_path / "zero.jpg").symlink_to("/dev/zero")  # endless: reading it would fill memory
    (tmp_path / "null.jpg").symlink_to("/dev/null")
    (tmp_path / "folder.jpg").mkdir()
    short = tempfile.mkdtemp(prefix="catdog-sock-")  # AF_UNIX paths are limited to ~108 bytes
    try:
        with socket.socket(socket.AF_UNIX) as sock:
            sock.bind(os.path.join(short, "s.jpg"))
            errors, _ = _timed_decode([tmp_path / "zero.jpg", tmp_path / "null.jpg", os.path.join(short, "s.jpg"),
                                       tmp_path / "folder.jpg"])
    finally:
        os.unlink(os.path.join(short, "s.jpg"))
        os.rmdir(short)
    assert errors[:3] == ["not_a_regular_file: a character device"] * 2 + ["not_a_regular_file: a socket"]
    assert error_kind(errors[3]) == "read_error" and "directory" in errors[3]  # as before


def test_latin1_named_jpeg_is_read_through_its_escaped_spelling(tmp_path):
    name = os.path.join(os.fsencode(tmp_path), b"caf\xe9.jpg")
    with open(name, "wb") as f:
        Image.new("RGB", (40, 24), (200, 30, 30)).save(f, format="JPEG")
    escaped = escape_local_path(os.fsdecode(name))
    assert escaped.endswith("caf\\xe9.jpg")
    missing = escape_local_path(os.fsdecode(os.path.join(os.fsencode(tmp_path), b"gon\xe9.jpg")))
    out = _guarded(read_and_decode, [escaped, missing], SIZE)
    assert out["error"][0] is None and (out["width"][0], out["height"][0]) == (40, 24)
    assert out["image"][0].mean() > 0
    assert error_kind(out["error"][1]) == "read_error" and "FileNotFoundError" in out["error"][1]
    pa.array(list(out["error"]), pa.string())  # no lone surrogates in the message


class _Watcher:
    """A ReadWatcher that records what it is told."""

    def __init__(self):
        self.slow: list[str] = []
        self.done: list[str] = []

    def reading_slowly(self, path: str, since: float) -> None:
        assert since <= time.time()
        self.slow.append(path)

    def done_reading(self, path: str) -> None:
        self.done.append(path)


@pytest.fixture
def stalling_bucket(s3_server, monkeypatch):
    """A bucket of its own (so `file_reads._filesystem_for` makes a new filesystem, through the proxy)
    on the session's S3 server, read through a proxy that never answers GETs of keys with "stall"."""
    from support.stalling_s3 import StallingS3Proxy

    bucket = s3_server.new_bucket()
    with StallingS3Proxy(s3_server.endpoint, stall="stall") as proxy:
        for key in [k for k in os.environ if k.startswith("AWS_")]:
            monkeypatch.delenv(key)
        for key, value in {**bucket.env, "AWS_ENDPOINT_URL": proxy.endpoint}.items():
            monkeypatch.setenv(key, value)
        yield bucket, proxy


def test_stalled_object_store_read_times_out_and_the_batch_moves_on(stalling_bucket, tmp_path):
    bucket, proxy = stalling_bucket
    Image.new("RGB", (40, 32), (10, 120, 10)).save(tmp_path / "a.jpg")
    for key in ("in/stall.jpg", "in/ok.jpg"):
        bucket.client.upload_file(str(tmp_path / "a.jpg"), bucket.bucket, key)
    paths = [bucket.uri("in/ok.jpg"), bucket.uri("in/stall.jpg"), bucket.uri("in/ok.jpg")]
    watcher = _Watcher()
    limit = 2.0
    errors, took = _timed_decode(paths, read_timeout_s=limit, watcher=watcher)
    assert errors == [None, f"read_timeout: no data after {limit:g} s", None]  # the read after it is not stuck behind
    assert proxy.held >= 1, "the GET went through the proxy and was held"
    assert limit <= took < limit + 10
    assert watcher.slow == [bucket.uri("in/stall.jpg")]  # a quarter of the limit: reported as slow
    assert watcher.done == watcher.slow


def test_progress_line_names_what_a_quiet_run_waits_on():
    waiting = {f"/x/{i}.jpg": 40.0 + i for i in range(7)} | {"/x/pipe.jpg": 75.0}
    line = format_line(8, 16, 100.0, {}, quiet_s=80.0, waiting=waiting, waiting_more=3)
    assert line == ("Scored 8 / 16 files (50.0%), 0.1 images/s, ETA 1m40s; nothing finished for 1m20s; waiting on: "
                    "/x/pipe.jpg (1m15s), /x/6.jpg (46s), /x/5.jpg (45s), /x/4.jpg (44s), /x/3.jpg (43s), 6 more")
    assert format_line(8, 16, 100.0, {}, quiet_s=45.0).endswith("; nothing finished for 45s")
    assert format_line(8, 16, 100.0, {}, waiting=waiting) == format_line(8, 16, 100.0, {})  # rows still finishing


def test_counter_keeps_a_bounded_list_of_slow_reads():
    counter = ProgressCounter()
    for i in range(MAX_SLOW_READS + 5):
        counter.reading_slowly(f"/x/{i}.jpg", 100.0 + i)
    totals = counter.totals()
    assert len(totals["slow_reads"]) == MAX_SLOW_READS and totals["slow_reads_more"] == 5
    counter.done_reading("/x/0.jpg")
    counter.done_reading(f"/x/{MAX_SLOW_READS + 1}.jpg")  # one only counted
    totals = counter.totals()
    assert "/x/0.jpg" not in totals["slow_reads"] and len(totals["slow_reads"]) == MAX_SLOW_READS - 1
    assert totals["slow_reads_more"] == 4
