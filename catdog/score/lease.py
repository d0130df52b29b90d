"""One writer per output: a lease file that a scoring run holds while it writes the output.

Without it two `--overwrite` runs on one output both succeed, the second deleting the first's part
files. A run takes `<output>/_catdog_lease.json` before it touches the output, a daemon thread
renews it every TTL/4, the run calls `check()` before each step it cannot undo (deleting rows,
writing `_SUCCESS.json`), and `release()` removes it. The lease of a crashed run expires after its
TTL and is then taken over; on this host, the lease of a process that is gone is taken over at once.

How each store makes taking the lease atomic:
- Local folders (NFS too): the lease appears whole, by `os.link` of a written temporary file, which
  fails when the name exists (`O_CREAT | O_EXCL` where hard links are not supported). Renewal,
  take-over and release first take an exclusive claim named after the exact bytes they read, read
  again, then swap the file with `os.replace` (or remove it): of racers on one lease one wins, and
  the name never disappears, so a starting run never slips in under a live holder.
- S3: conditional writes, `IfNoneMatch="*"` to create, `IfMatch=<etag>` to renew, take over and
  delete; the server picks one winner. A server that ignores them is reported at acquire.
- Other schemes (gs://, ...): pyarrow has no atomic create; a warning and a lease that holds nothing.

Limits: a taker compares the holder's `expires_at` with its own clock (NTP keeps hosts far closer
than a TTL). A holder that stalls past its expiry may be taken over and learns it at its next
renewal or `check()`; that is why a run checks before anything it cannot undo. A local claim
older than the TTL counts as abandoned, so only a writer stalled that long inside a claim (a few
system calls) can race the next one.

The lease file is one JSON object: run_id, host, pid, since (ISO), expires_at (epoch s), renewals,
lease_id (tells this acquisition from a later one of the same run id, such as its --resume) and
pid_space (boot and pid namespace: where `pid` can be asked whether it still runs).

Memory and IO: a JSON file of a few hundred bytes; one small write every TTL/4, one small read per
`check()`; one daemon thread per lease.

Over 300 lines on purpose: the lease protocol leans on the exact semantics of each store's atomic
steps, so they are read together; the stores could move to a private module if either grows.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import hashlib
import json
import logging
import math
import os
import random
import socket
import threading
import time
import uuid
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from catdog.errors import CatdogError, OutputExistsError

logger = logging.getLogger(__name__)

LEASE_FILE = "_catdog_lease.json"
# Renewed every 30 s, a lease survives a stall of over a minute (a busy driver, a slow S3 call with
# retries); a run that crashed on another host blocks its output for at most 2 minutes.
DEFAULT_TTL_S = 120.0
# Rounds of create / read / take over before giving up when other runs keep taking the lease first.
_ATTEMPTS = 8
# link(2) errors meaning "this filesystem has no hard links" (FAT, some FUSE and SMB mounts).
_NO_HARD_LINKS = {errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.ENOSYS}
# Claims on one lease's bytes that writers which died holding them may leave before it is taken over.
_CLAIM_GENERATIONS = 8
_HOLDER_KEYS = ("run_id", "host", "pid", "since", "expires_at")


class OutputBusyError(CatdogError):
    """Another live run holds the output's lease (jobs exit 2); `holder` is its record."""

    def __init__(self, message: str, holder: dict):
        super().__init__(message)
        self.holder = holder


class LeaseLostError(CatdogError):
    """This run's lease was taken over or removed: stop before deleting rows or writing _SUCCESS.json.

    `holder` is the record of whoever holds it now (empty when the lease file is gone)."""

    def __init__(self, message: str, holder: dict | None = None):
        super().__init__(message)
        self.holder = holder or {}


@dataclass(frozen=True)
class _Seen:
    """One read (or write) of the lease: its bytes, a tag that changes with them, its mtime."""

    data: bytes
    tag: str  # S3: the ETag; local: a hash of the bytes
    modified: float


def _tag(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class _LocalStore:
    """The lease as a file in a local or NFS-mounted folder.

    Whoever changes an existing lease (renewal, take-over, release) first takes the one claim on the
    exact bytes it read: an exclusive create of a name made from their hash. It then reads again and
    swaps the file with `os.replace`, so the name never disappears under anyone.
    """

    takes_over_dead_processes = True  # a pid on this host can be asked whether it still runs

    def __init__(self, folder: Path, claim_stale_s: float):
        self.path = str(folder / LEASE_FILE)
        self.where = self.path
        self.claim_stale_s = claim_stale_s  # a claim is held for a few system calls; older, its writer died

    def read(self, path: str | None = None) -> _Seen | None:
        try:
            with open(path or self.path, "rb") as file:
                data = file.read()
                return _Seen(data, _tag(data), os.fstat(file.fileno()).st_mtime)
        except FileNotFoundError:
            return None

    def create(self, data: bytes) -> str | None:
        """Put the lease there whole unless one exists; its tag, or None when one exists."""
        temp = self._write_temporary(data)
        try:
            os.link(temp, self.path)
        except FileExistsError:
            # NFS retries a link whose reply was lost, and the retry fails: the link count tells.
            return _tag(data) if os.stat(temp).st_nlink > 1 else None
        except OSError as error:
            if error.errno not in _NO_HARD_LINKS:
                raise
            try:  # readers may see it empty for a moment: they take it for a lease held since its mtime
                fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                return None
            with os.fdopen(fd, "wb") as file:
                file.write(data)
        finally:
            os.unlink(temp)
        return _tag(data)

    def replace_if(self, data: bytes, seen: _Seen, removed=lambda: None) -> str | None:
        """Replace the lease if it is still exactly `seen` (of racers on one `seen`, one wins); calls
        `removed` once `seen` is gone. Returns the new tag, or None when `seen` is no longer there."""
        claim = self._claim(seen.tag)
        if claim is None:
            return None
        try:
            current = self.read()
            if current is None or current.tag != seen.tag:
                return None
            os.replace(self._write_temporary(data), self.path)
            removed()
            return _tag(data)
        finally:
            self._unclaim(claim)

    def delete_if(self, ours: _Seen) -> bool:
        claim = self._claim(ours.tag)
        if claim is None:
            return False
        try:
            current = self.read()
            if current is None or current.tag != ours.tag:
                return False
            os.unlink(self.path)
            return True
        finally:
            self._unclaim(claim)

    def _write_temporary(self, data: bytes) -> str:
        temp = f"{self.path}.{uuid.uuid4().hex[:12]}.tmp"  # `_` first: readers of the output skip it
        with open(temp, "wb") as file:  # no fsync: after a power loss its run is gone anyway
            file.write(data)
        return temp

    def _claim(self, tag: str) -> str | None:
        """Take the claim on the lease bytes with this tag; None while another writer holds it.

        A claim left by a writer that died holding it is stepped over: the next generation's
        exclusive create decides between the writers that found it abandoned."""
        for generation in range(_CLAIM_GENERATIONS):
            claim = f"{self.path}.{tag[:16]}.{generation}.claim"
            try:
                os.close(os.open(claim, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644))
                return claim
            except FileExistsError:
                try:
                    if time.time() - os.stat(claim).st_mtime < self.claim_stale_s:
                        return None
                except FileNotFoundError:
                    return None  # its writer just finished: the lease has changed
        return None

    def _unclaim(self, claim: str) -> None:
        """Remove our claim and any abandoned ones below it (their bytes are gone for good)."""
        stem, generation, _ = claim.rsplit(".", 2)
        for below in range(int(generation) + 1):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(f"{stem}.{below}.claim")


class _S3Store:
    """The lease as an object, written with S3 conditional requests (boto3: pyarrow has none)."""

    takes_over_dead_processes = False  # many hosts write one bucket: only expiry is trusted

    def __init__(self, bucket: str, key: str):
        from botocore.config import Config

        region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
        # Short timeouts: a renewal stuck for longer than the TTL is a lease lost.
        config = Config(connect_timeout=5, read_timeout=15, retries={"max_attempts": 3, "mode": "standard"})
        with _SESSION_LOCK:  # clients are thread-safe; creating them from one session is not
            self.client = _boto3_session().client("s3", region_name=region, config=config)
        self.bucket, self.key = bucket, key
        self.where = f"s3://{bucket}/{key}"

    def read(self) -> _Seen | None:
        try:
            reply = self.client.get_object(Bucket=self.bucket, Key=self.key)
        except self.client.exceptions.NoSuchKey:
            return None
        return _Seen(reply["Body"].read(), reply["ETag"], reply["LastModified"].timestamp())

    def create(self, data: bytes) -> str | None:
        return self._put(data, IfNoneMatch="*")

    def replace_if(self, data: bytes, seen: _Seen, removed=lambda: None) -> str | None:
        tag = self._put(data, IfMatch=seen.tag)
        if tag is not None:
            removed()
        return tag

    def delete_if(self, ours: _Seen) -> bool:
        current = self.read()
        if current is None or current.tag != ours.tag:
            return False
        try:
            self.client.delete_object(Bucket=self.bucket, Key=self.key, IfMatch=ours.tag)
        except self.client.exceptions.ClientError as error:
            if _status(error) in (404, 412):
                return False
            if _status(error) != 501:
                raise
            self.client.delete_object(Bucket=self.bucket, Key=self.key)  # no conditional delete: read above
        return True

    def honours_conditions(self, data: bytes) -> bool:
        """Whether a second create of our own lease is refused, as it must be (one extra request)."""
        try:
            self.client.put_object(Bucket=self.bucket, Key=self.key, Body=data, IfNoneMatch="*")
        except self.client.exceptions.ClientError as error:
            return _status(error) in (409, 412)
        return False

    def _put(self, data: bytes, **condition: str) -> str | None:
        try:
            return self.client.put_object(Bucket=self.bucket, Key=self.key, Body=data,
                                          ContentType="application/json", **condition)["ETag"]
        except self.client.exceptions.ClientError as error:
            if _status(error) not in (404, 409, 412):  # 409: a concurrent conditional write; retried
                raise
        # Refused, or a retry of a request that had succeeded before its reply was lost: the bytes tell.
        current = self.read()
        return current.tag if current is not None and current.data == data else None


_SESSION_LOCK = threading.Lock()


@functools.cache
def _boto3_session():
    """One boto3 session per process: a new one reads the S3 model again (~0.2 s of CPU)."""
    import boto3  # only runs with S3 outputs need it

    return boto3.session.Session()


def _status(error: Exception) -> int | None:
    return getattr(error, "response", {}).get("ResponseMetadata", {}).get("HTTPStatusCode")


def _store_for(location: str, ttl_s: float) -> _LocalStore | _S3Store | None:
    """The store of an output location (local folders are created); None where no atomic create exists."""
    if "://" in location and not location.startswith("file://"):
        scheme, rest = location.split("://", 1)
        if scheme.lower() != "s3":
            return None
        bucket, _, prefix = rest.split("?", 1)[0].partition("/")
        prefix = prefix.strip("/")
        return _S3Store(bucket, f"{prefix}/{LEASE_FILE}" if prefix else LEASE_FILE)
    folder = Path(location.removeprefix("file://")).expanduser().resolve()
    if folder.is_file():
        raise OutputExistsError(f"output {location} is a file; give a folder")
    folder.mkdir(parents=True, exist_ok=True)
    return _LocalStore(folder, claim_stale_s=ttl_s)


class OutputLease:
    """This run's lease on one output: take it with `acquire`, `check()` it, `release()` it.

    Use it as a context manager around everything the run does to the output.
    """

    def __init__(self, location: str, run_id: str, ttl_s: float, store: _LocalStore | _S3Store | None):
        self.location, self.run_id, self.ttl_s = location, run_id, ttl_s
        self._store = store
        now = time.time()
        self._record = {"run_id": run_id, "host": socket.gethostname(), "pid": os.getpid(),
                        "pid_space": _pid_space(), "lease_id": uuid.uuid4().hex, "since": _iso(now),
                        "expires_at": now + ttl_s, "renewals": 0}
        self._ours: _Seen | None = None  # what this run last wrote
        self._lock = threading.Lock()  # one writer of the lease at a time: renewals, check, release
        self._stop = threading.Event()
        self._lost: tuple[str, dict] | None = None  # why, and who holds it now
        self._released = False

    @property
    def holder(self) -> dict:
        """This run's record: run_id, host, pid, since (ISO) and expires_at (epoch s)."""
        return {key: self._record[key] for key in _HOLDER_KEYS}

    @classmethod
    def acquire(cls, location: str, run_id: str, ttl_s: float = DEFAULT_TTL_S) -> OutputLease:
        """Take the output's lease and start renewing it; creates a local output folder if needed.

        Takes over a lease that expired, or (local folders) one of a process on this host that is gone,
        with a warning naming its run.

        Raises:
            OutputBusyError: another live run holds it.
            OutputExistsError: a local output that is a file.
        """
        if ttl_s <= 0:
            raise ValueError(f"ttl_s must be positive, not {ttl_s}")
        lease = cls(location, run_id, ttl_s, _store_for(location, ttl_s))
        if lease._store is None:
            logger.warning("output %s: no atomic create on this storage, so concurrent runs writing it are "
                           "not guarded; make sure only one run writes it", location)
            return lease
        lease._take()
        if isinstance(lease._store, _S3Store) and not lease._store.honours_conditions(lease._ours.data):
            logger.warning("%s: this S3 server ignores conditional writes, so concurrent runs writing this output "
                           "are not guarded", lease._store.where)
            lease._ours = lease._store.read() or lease._ours  # the probe rewrote it: keep its ETag
        threading.Thread(target=lease._renew_forever, name=f"catdog-lease-{run_id}", daemon=True).start()
        logger.info("run %s holds the lease %s (renewed every %.0f s)", run_id, lease._store.where, ttl_s / 4)
        return lease

    def _take(self) -> None:
        for _ in range(_ATTEMPTS):
            self._record["expires_at"] = time.time() + self.ttl_s
            data = _encode(self._record)
            tag = self._store.create(data)
            if tag is None:
                seen = self._store.read()
                if seen is None:
                    continue  # released between our create and our read
                other = _decode(seen, self.ttl_s)
                why = self._stale_reason(other)
                if why is None:
                    raise OutputBusyError(_busy_message(self.location, self._store.where, other), _holder(other))
                tag = self._store.replace_if(data, seen, removed=functools.partial(
                    logger.warning, "taking over the lease of run %s on host %s since %s: %s", other["run_id"],
                    other["host"], other["since"], why))  # logged once, by the run that removed it
            if tag is not None:
                self._ours = _Seen(data, tag, time.time())
                return
            time.sleep(random.uniform(0.01, 0.05))  # another run got there first: look again
        raise OutputBusyError(f"output {self.location}: other runs kept taking its lease first "
                              f"({_ATTEMPTS} attempts); is another run starting on it?", {})

    def _stale_reason(self, other: dict) -> str | None:
        now = time.time()
        if other["expires_at"] <= now:
            return f"it expired at {_iso(other['expires_at'])} ({now - other['expires_at']:.0f} s ago)"
        if self._store.takes_over_dead_processes and _process_gone(other):
            return f"its process {other['pid']} on this host is no longer running (not waiting for it to expire)"
        return None

    def _renew_forever(self) -> None:
        while not self._stop.wait(self.ttl_s / 4):
            try:
                with self._lock:
                    if self._released or self._lost:
                        return
                    self._renew()
            except Exception as error:  # a network blip: the next try comes well before expiry
                logger.warning("could not renew the lease %s (will retry): %s", self._store.where, error)

    def _renew(self) -> None:
        """Move expires_at forward; marks the lease lost when it is no longer ours. Hold the lock."""
        now = time.time()
        record = dict(self._record, expires_at=now + self.ttl_s, renewals=self._record["renewals"] + 1)
        data = _encode(record)
        tag = self._store.replace_if(data, self._ours)  # as a take-over does: a taker may be at work
        if tag is None:
            self._mark_lost()
        else:
            self._record, self._ours = record, _Seen(data, tag, now)

    def _mark_lost(self, seen: _Seen | None = None) -> None:
        seen = seen or self._store.read()
        if seen is None:
            self._lost = (f"run {self.run_id}: its lease {self._store.where} was removed by another", {})
        else:
            other = _decode(seen, self.ttl_s)
            self._lost = (f"run {self.run_id}: its lease {self._store.where} was taken over by run {other['run_id']} "
                          f"on host {other['host']} (pid {other['pid']}) since {other['since']}", _holder(other))
        logger.error("%s; this run must stop before it deletes rows or writes its summary", self._lost[0])

    def check(self) -> None:
        """Confirm this run still holds the lease (one small read); renews it now if it has expired.

        Raises:
            LeaseLostError: taken over, removed, released, or expired and not renewable.
        """
        if self._store is None:
            return
        with self._lock:
            if self._released:
                raise LeaseLostError(f"run {self.run_id}: its lease {self._store.where} was released")
            if self._lost is None:
                seen = self._store.read()
                if seen is None or seen.tag != self._ours.tag:
                    self._mark_lost(seen)
                elif time.time() >= self._record["expires_at"]:  # renewals stalled, and nobody took over yet
                    try:
                        self._renew()
                    except Exception as error:
                        raise LeaseLostError(f"run {self.run_id}: its lease {self._store.where} expired and "
                                             f"could not be renewed: {error}") from error
            if self._lost is not None:
                raise LeaseLostError(*self._lost)

    def release(self) -> None:
        """Stop renewing and remove the lease if it is still ours; idempotent.

        Logs rather than raises on IO errors: it runs on the way out of failures, and an unremoved
        lease expires by itself.
        """
        self._stop.set()
        with self._lock:
            if self._released or self._store is None:
                self._released = True
                return
            self._released = True
            if self._lost is not None:
                return
            try:
                if not self._store.delete_if(self._ours):
                    logger.warning("left the lease %s alone: it is no longer run %s's", self._store.where, self.run_id)
            except Exception as error:
                logger.warning("could not remove the lease %s (it expires at %s): %s", self._store.where,
                               _iso(self._record["expires_at"]), error)

    def __enter__(self) -> OutputLease:
        return self

    def __exit__(self, *exc_info) -> None:
        self.release()


def _encode(record: dict) -> bytes:
    return (json.dumps(record, sort_keys=True) + "\n").encode("utf-8")


def _decode(seen: _Seen, ttl_s: float) -> dict:
    """A lease's record; one that cannot be read (being written, damaged) counts as held since its mtime."""
    try:
        record = json.loads(seen.data)
        if not math.isfinite(float(record["expires_at"])):
            raise ValueError("expires_at is not a time")
    except (ValueError, TypeError, KeyError):
        record = {"run_id": "unknown (unreadable lease)", "since": _iso(seen.modified),
                  "expires_at": seen.modified + ttl_s}
    return {"host": "?", "pid": "?", "since": "?", "run_id": "?", **record,
            "expires_at": float(record["expires_at"])}


def _holder(record: dict) -> dict:
    return {key: record[key] for key in _HOLDER_KEYS}


def _busy_message(location: str, where: str, other: dict) -> str:
    return (f"output {location} is being written by run {other['run_id']} on host {other['host']} (pid "
            f"{other['pid']}) since {other['since']}; wait for it to finish, or choose another output. Its lease "
            f"{where} expires at {_iso(other['expires_at'])} unless that run renews it")


@functools.cache
def _pid_space() -> str | None:
    """Where this process's pid means something: this boot of this machine and this pid namespace
    (two containers may share a host name); None where /proc does not tell (host name only)."""
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
        return f"{boot}/{os.readlink('/proc/self/ns/pid')}"
    except OSError:
        return None


def _process_gone(record: dict) -> bool:
    """True when the lease's process ran where this one runs and has ended; a reused pid reads as alive."""
    pid = record.get("pid")
    if record.get("host") != socket.gethostname() or record.get("pid_space") != _pid_space():
        return False
    if not isinstance(pid, int) or isinstance(pid, bool) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except OSError:  # PermissionError: alive, another user's
        return False
    return False


def _iso(epoch_s: float) -> str:
    return datetime.fromtimestamp(epoch_s, timezone.utc).isoformat(timespec="seconds")
