"""List the image files under an `s3://bucket/prefix`, page by page and in key order.

S3 lists 1,000 keys a request, in key order, and `StartAfter` starts a listing anywhere in the key
space. The first pages are read here, so the first row comes after one request whatever the prefix
holds. When the prefix holds more, the rest is split by the next character after the prefix into
key ranges; a few ranges are listed at once in threads, each running a bounded number of pages
ahead, and the ranges are drained in order, so rows still come out in key order.

Memory does not grow with the prefix: at most `listers * (pages_ahead + 1) + 1` pages of rows
(plus one split point per character of `SPLIT_CHARACTERS`). Time grows with it: one request per
page, plus a one-key request for each range listed before it was known to hold keys (a finished
range's next key shows which later ranges are empty). Keys that share their first character after
the prefix fall in one range and are listed by one lister, one page at a time.

The client honours the standard AWS variables as pyarrow does (see `catdog.io.storage`).
"""

from __future__ import annotations

import calendar
import os
import queue
import string
import threading
from collections import deque
from dataclasses import dataclass
from datetime import datetime
from typing import Callable, Iterator

from catdog.io import storage
from catdog.io.paths import normalise_path

Row = tuple[str, int, int]  # normalised URI, size in bytes, mtime in ns

PAGE_KEYS = 1_000  # S3 returns at most 1,000 keys a request
LISTERS = 4  # ranges listed at once: list requests are latency-bound, a few overlap well
PAGES_AHEAD = 2  # pages a lister may hold before the consumer takes them
# Split only a prefix that outlasts this many pages: a range costs up to two requests more (its
# one-key start, its last page cut where the next range begins), repaid only by long ranges.
SERIAL_PAGES = 10
# Split points after the prefix: a key whose next character lies between two of them (or
# beyond the last, non-ASCII included) belongs to the range between, so every key has one range.
SPLIT_CHARACTERS = string.digits + string.ascii_uppercase + string.ascii_lowercase


def can_list(location: str) -> bool:
    """True for s3:// URIs that boto3 reaches as pyarrow would (no `?options` or credentials in them)."""
    if not location.lower().startswith("s3://"):
        return False
    bucket = location.split("://", 1)[1].split("/", 1)[0]
    return "?" not in location and "@" not in bucket


def list_images(location: str, listers: int = LISTERS, pages_ahead: int = PAGES_AHEAD, page_keys: int = PAGE_KEYS,
                serial_pages: int = SERIAL_PAGES, on_request: Callable[[dict], None] | None = None) -> Iterator[Row]:
    """Yield each image file under an s3:// prefix (recursively), in key order.

    Args:
        location: `s3://bucket` or `s3://bucket/prefix`; the prefix is taken as a folder.
        listers: key ranges listed at once after the serial pages (1: one range, still read ahead).
        pages_ahead: pages each lister may hold ahead of the consumer.
        page_keys: keys a request asks for (S3's maximum by default; tests use fewer).
        serial_pages: pages listed one after another before the rest is split into key ranges.
        on_request: called with each list request's arguments before it is sent (tests, benchmarks).

    Yields:
        (normalised URI, size, mtime_ns) of each key with an image extension; folder markers skipped.

    Raises:
        OSError: a list request failed (missing bucket, no access, server unreachable).
    """
    bucket, _, prefix = normalise_path(location).split("://", 1)[1].partition("/")
    prefix = f"{prefix}/" if prefix else ""
    lister = _Lister(_client(max(listers, 1)), bucket, prefix, page_keys, on_request)
    after = None
    for _ in range(max(serial_pages, 1)):
        rows, after, _ = lister.page(after)
        yield from rows
        if after is None:
            return
    ranges = _ranges_after(prefix, after) if listers > 1 else [_Range(after, None, probe=False)]
    yield from _drain_in_order(lister, ranges, max(listers, 1), max(pages_ahead, 1))


@dataclass
class _Range:
    """The keys in (after, upto]; `upto` None: to the end of the prefix."""

    after: str
    upto: str | None
    probe: bool = True  # not known to hold a key: ask for one key first, not a page of the next range


@dataclass
class _End:
    """A range's last item: the first key after it, None when the prefix ends there."""

    beyond: str | None


class _Lister:
    """List requests for one bucket and prefix; boto3 clients are safe to share between threads."""

    def __init__(self, client, bucket: str, prefix: str, page_keys: int, on_request: Callable[[dict], None] | None):
        self.client, self.bucket, self.prefix, self.page_keys = client, bucket, prefix, page_keys
        self.on_request = on_request
        self.wanted = tuple(storage.IMAGE_EXTENSIONS)

    def page(self, after: str | None, upto: str | None = None,
             max_keys: int | None = None) -> tuple[list[Row], str | None, str | None]:
        """One page of keys after `after`, up to `upto`.

        Returns:
            (image rows, the key to continue after or None when done, the first key after `upto` if seen).
        """
        from botocore.exceptions import BotoCoreError, ClientError

        request = {"Bucket": self.bucket, "Prefix": self.prefix, "MaxKeys": max_keys or self.page_keys}
        if after is not None:
            request["StartAfter"] = after
        if self.on_request is not None:
            self.on_request(request)
        try:
            response = self.client.list_objects_v2(**request)
        except (BotoCoreError, ClientError) as exc:
            raise OSError(f"could not list s3://{self.bucket}/{self.prefix}: {exc}") from exc
        contents = response.get("Contents", [])
        rows = []
        for item in contents:
            key = item["Key"]
            if upto is not None and key > upto:  # str order is code-point order, as S3's UTF-8 byte order
                return rows, None, key
            if not key.endswith("/") and key.lower().endswith(self.wanted):
                rows.append((normalise_path(f"s3://{self.bucket}/{key}"), int(item["Size"]),
                             _mtime_ns(item["LastModified"])))
        more = response.get("IsTruncated") and contents
        return rows, (contents[-1]["Key"] if more else None), None


def _ranges_after(prefix: str, last_key: str) -> list[_Range]:
    """Ranges that cover every key after `last_key`, split at `SPLIT_CHARACTERS`."""
    points = [prefix + c for c in SPLIT_CHARACTERS if prefix + c > last_key]
    return [_Range(after, upto) for after, upto in zip([last_key, *points], [*points, None])]


def _drain_in_order(lister: _Lister, ranges: list[_Range], listers: int, pages_ahead: int) -> Iterator[Row]:
    """Rows of each range in range order, `listers` ranges listed ahead in threads."""
    stop = threading.Event()
    todo, running = deque(ranges), deque()

    def start_next() -> None:
        if todo:
            pages: queue.Queue = queue.Queue(maxsize=pages_ahead)
            threading.Thread(target=_fill, args=(lister, todo.popleft(), pages, stop), daemon=True,
                             name="s3-lister").start()
            running.append(pages)

    try:
        for _ in range(listers):
            start_next()
        while running:
            pages = running.popleft()
            while not isinstance(item := pages.get(), _End):
                if isinstance(item, BaseException):
                    raise item
                yield from item
            _skip_empty(todo, item.beyond)
            start_next()
    finally:
        stop.set()  # a consumer that stops early releases the listers blocked on full queues


def _skip_empty(todo: deque, beyond: str | None) -> None:
    """Drop the ranges not started yet that hold no key, as the first key after a finished range shows."""
    while todo and (beyond is None or (todo[0].upto is not None and todo[0].upto < beyond)):
        todo.popleft()
    if todo and todo[0].after < beyond:
        todo[0].probe = False  # it holds `beyond`


def _fill(lister: _Lister, keys: _Range, pages: queue.Queue, stop: threading.Event) -> None:
    try:
        after, max_keys, beyond = keys.after, (1 if keys.probe else None), None
        while after is not None:
            rows, after, beyond = lister.page(after, keys.upto, max_keys)
            max_keys = None
            if rows and not _put(pages, rows, stop):
                return
        _put(pages, _End(beyond), stop)
    except BaseException as exc:  # handed to the consumer, which raises it in key order (never a hang)
        _put(pages, exc, stop)


def _put(pages: queue.Queue, item: object, stop: threading.Event) -> bool:
    while not stop.is_set():
        try:
            pages.put(item, timeout=0.1)
            return True
        except queue.Full:
            continue
    return False


def _client(listers: int):
    import boto3
    import botocore.session
    from botocore.config import Config

    session = botocore.session.get_session()
    # botocore's default timestamp parser (dateutil) takes most of the client's time on a page.
    session.get_component("response_parser_factory").set_parser_defaults(timestamp_parser=_parse_timestamp)
    # boto3 reads AWS_DEFAULT_REGION but not AWS_REGION, which pyarrow also accepts.
    region = None if os.environ.get("AWS_DEFAULT_REGION") else os.environ.get("AWS_REGION")
    return boto3.session.Session(botocore_session=session).client(
        "s3", region_name=region, config=Config(max_pool_connections=max(10, listers + 1)))


def _parse_timestamp(text: str) -> datetime:
    try:
        return datetime.fromisoformat(text.replace("Z", "+00:00"))  # S3 sends 2026-01-31T12:00:00.000Z
    except ValueError:
        from botocore.utils import parse_timestamp

        return parse_timestamp(text)  # any other form an S3-compatible server may send


def _mtime_ns(modified: datetime) -> int:
    return calendar.timegm(modified.utctimetuple()) * 1_000_000_000 + modified.microsecond * 1_000
