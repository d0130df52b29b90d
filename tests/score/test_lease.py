"""One writer per output (catdog.score.lease): real lease files in tmp_path and real conditional
writes on the session's local S3 server; no Ray, no mocks, a few seconds in all.

A lease held by "another run" is written by hand, as a crashed run or another host leaves it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import socket
import subprocess
import sys
import threading
import time
import uuid

import pytest

from catdog.score.lease import LEASE_FILE, LeaseLostError, OutputBusyError, OutputLease, _pid_space

LOGGER = "catdog.score.lease"


class Output:
    """An output location and its lease, read and written behind catdog's back."""

    def __init__(self, location: str, read, write):
        self.location, self.read, self.write = location, read, write


def local_output(folder) -> Output:
    lease = folder / LEASE_FILE

    def write(record):
        folder.mkdir(parents=True, exist_ok=True)
        lease.write_text(json.dumps(record))

    return Output(str(folder), lambda: json.loads(lease.read_text()) if lease.exists() else None, write)


def s3_output(s3) -> Output:
    prefix = f"preds-{uuid.uuid4().hex[:8]}"
    key = f"{prefix}/{LEASE_FILE}"

    def read():
        return json.loads(s3.read(key)) if key in s3.keys(prefix) else None

    def write(record):
        s3.client.put_object(Bucket=s3.bucket, Key=key, Body=json.dumps(record).encode())

    return Output(s3.uri(prefix), read, write)


@pytest.fixture(params=["local", "s3"])
def output(request, tmp_path) -> Output:
    if request.param == "local":
        return local_output(tmp_path / "preds")
    return s3_output(request.getfixturevalue("s3_env"))


def other_run(run_id: str, expires_in: float, host: str = "other-host", pid: int = 4242, **extra) -> dict:
    return {"run_id": run_id, "host": host, "pid": pid, "since": "2026-12-01T10:00:00+00:00",
            "expires_at": time.time() + expires_in, "renewals": 3, **extra}


def dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()  # reaped: the pid names no process (until reused, which reads as alive: the safe side)
    return child.pid


def test_a_held_output_refuses_a_second_run_naming_the_holder_until_released(output):
    with OutputLease.acquire(output.location, "run-a") as lease:
        with pytest.raises(OutputBusyError) as busy:
            OutputLease.acquire(output.location, "run-b")
        message = str(busy.value)
        assert "run-a" in message and socket.gethostname() in message and f"pid {os.getpid()}" in message
        assert lease.holder["since"] in message
        assert busy.value.holder == lease.holder and output.read()["run_id"] == "run-a"
        lease.check()
    assert output.read() is None, "released"
    lease.release()  # idempotent
    with pytest.raises(LeaseLostError, match="released"):
        lease.check()
    with OutputLease.acquire(output.location, "run-b") as second:
        assert output.read()["run_id"] == "run-b" and second.holder["run_id"] == "run-b"


def test_an_expired_lease_is_taken_over_with_a_warning_naming_its_run(output, caplog):
    output.write(other_run("crashed", expires_in=-5))
    with caplog.at_level(logging.WARNING, logger=LOGGER), OutputLease.acquire(output.location, "run-new") as lease:
        assert output.read()["run_id"] == "run-new"
        lease.check()
    assert "taking over the lease of run crashed on host other-host since 2026-12-01T10:00:00+00:00: it expired at" \
        in caplog.text


def test_a_local_lease_of_a_gone_process_on_this_host_is_taken_over_at_once(tmp_path, caplog):
    output = local_output(tmp_path / "preds")
    pid = dead_pid()
    output.write(other_run("elsewhere", expires_in=100, pid=pid))  # another host: its pids mean nothing here
    with pytest.raises(OutputBusyError, match="elsewhere"):
        OutputLease.acquire(output.location, "resume")
    output.write(other_run("crashed", expires_in=100, host=socket.gethostname(), pid=pid, pid_space=_pid_space()))
    with caplog.at_level(logging.WARNING, logger=LOGGER), OutputLease.acquire(output.location, "resume"):
        assert output.read()["run_id"] == "resume"
    assert f"taking over the lease of run crashed on host {socket.gethostname()}" in caplog.text
    assert f"its process {pid} on this host is no longer running" in caplog.text


def test_on_s3_only_expiry_frees_a_lease(s3_env):
    output = s3_output(s3_env)  # many hosts share a bucket: a pid is not asked
    gone = other_run("crashed", expires_in=100, host=socket.gethostname(), pid=dead_pid(), pid_space=_pid_space())
    output.write(gone)
    with pytest.raises(OutputBusyError, match="crashed"):
        OutputLease.acquire(output.location, "resume")


def test_runs_racing_for_one_stale_lease_exactly_one_wins(output, caplog):
    caplog.set_level(logging.WARNING, logger=LOGGER)
    for attempt in range(5):
        output.write(other_run(f"stale-{attempt}", expires_in=-1))
        start, outcomes = threading.Barrier(3), {}

        def race(run_id):
            start.wait()
            try:
                outcomes[run_id] = OutputLease.acquire(output.location, run_id)
            except OutputBusyError as error:
                outcomes[run_id] = error

        racers = [threading.Thread(target=race, args=(f"racer-{i}",)) for i in range(3)]
        for racer in racers:
            racer.start()
        for racer in racers:
            racer.join()
        winners = [lease for lease in outcomes.values() if isinstance(lease, OutputLease)]
        assert len(winners) == 1, outcomes
        assert output.read()["run_id"] == winners[0].run_id
        assert caplog.text.count(f"taking over the lease of run stale-{attempt} ") == 1, "named once, by its remover"
        winners[0].check()
        winners[0].release()


def test_renewal_moves_expires_at_forward(output):
    with OutputLease.acquire(output.location, "run-r", ttl_s=1) as lease:
        first = output.read()
        deadline = time.time() + 5
        while output.read()["renewals"] < 2 and time.time() < deadline:
            time.sleep(0.05)
        renewed = output.read()
        assert renewed["renewals"] >= 2 and renewed["expires_at"] > first["expires_at"]
        assert renewed["since"] == first["since"]
        lease.check()


def test_a_stolen_lease_fails_check_and_release_leaves_it(output, caplog):
    lease = OutputLease.acquire(output.location, "victim", ttl_s=1)
    output.write(other_run("thief", expires_in=60, host="thief-host"))
    with caplog.at_level(logging.ERROR, logger=LOGGER):
        deadline = time.time() + 5  # the renewal thread finds out by itself
        while "taken over by run thief" not in caplog.text and time.time() < deadline:
            time.sleep(0.05)
    assert "victim" in caplog.text and "taken over by run thief on host thief-host" in caplog.text
    with pytest.raises(LeaseLostError, match="thief") as lost:
        lease.check()
    assert lost.value.holder["run_id"] == "thief"
    lease.release()
    assert output.read()["run_id"] == "thief", "release never deletes a lease that is not ours"


def test_check_catches_a_stolen_lease_before_the_thread_does(output):
    with OutputLease.acquire(output.location, "victim") as lease:  # default TTL: no renewal in this test
        output.write(other_run("thief", expires_in=60))
        with pytest.raises(LeaseLostError, match="taken over by run thief"):
            lease.check()
    assert output.read()["run_id"] == "thief"


def test_a_run_that_stalled_past_expiry_loses_its_lease_to_the_next(output, caplog):
    slow = OutputLease.acquire(output.location, "slow", ttl_s=0.5)
    slow._stop.set()  # the stall: its renewals stop, as in a frozen driver
    time.sleep(0.6)
    with caplog.at_level(logging.WARNING, logger=LOGGER), OutputLease.acquire(output.location, "next") as nxt:
        assert "taking over the lease of run slow" in caplog.text
        with pytest.raises(LeaseLostError, match="taken over by run next"):
            slow.check()
        slow.release()
        nxt.check()
        assert output.read()["run_id"] == "next"


def test_check_renews_an_expired_lease_that_nobody_took(output):
    lease = OutputLease.acquire(output.location, "late", ttl_s=0.5)
    lease._stop.set()
    time.sleep(0.6)
    lease.check()
    assert output.read()["expires_at"] > time.time() and output.read()["renewals"] == 1
    lease.release()
    assert output.read() is None


def test_an_unreadable_lease_counts_as_held_since_its_mtime(tmp_path, caplog):
    folder = tmp_path / "preds"
    folder.mkdir()
    (folder / LEASE_FILE).write_text("")  # as a run that crashed between create and write leaves it
    with pytest.raises(OutputBusyError, match="unknown"):
        OutputLease.acquire(str(folder), "run")
    long_ago = time.time() - 1000
    os.utime(folder / LEASE_FILE, (long_ago, long_ago))
    with caplog.at_level(logging.WARNING, logger=LOGGER), OutputLease.acquire(str(folder), "run"):
        assert "taking over the lease of run unknown" in caplog.text


def test_a_claim_left_by_a_run_that_died_taking_over_is_stepped_over_once_old(tmp_path, caplog):
    output = local_output(tmp_path / "preds")
    output.write(other_run("crashed", expires_in=-1))
    stale = (tmp_path / "preds" / LEASE_FILE).read_bytes()
    claim = tmp_path / "preds" / f"{LEASE_FILE}.{hashlib.sha256(stale).hexdigest()[:16]}.0.claim"
    claim.touch()  # a run died between claiming the stale lease and replacing it
    with pytest.raises(OutputBusyError):  # a fresh claim: someone is taking it over right now
        OutputLease.acquire(output.location, "next", ttl_s=5)
    os.utime(claim, (time.time() - 10, time.time() - 10))
    with caplog.at_level(logging.WARNING, logger=LOGGER), OutputLease.acquire(output.location, "next", ttl_s=5):
        assert "taking over the lease of run crashed" in caplog.text and output.read()["run_id"] == "next"
    assert os.listdir(tmp_path / "preds") == [], "the abandoned claim is cleaned up with ours"


def test_a_local_output_folder_is_created_and_kept(tmp_path):
    folder = tmp_path / "new" / "preds"
    with OutputLease.acquire(f"file://{folder}", "run") as lease:
        assert (folder / LEASE_FILE).is_file() and lease.holder["pid"] == os.getpid()
    assert folder.is_dir() and os.listdir(folder) == [], "no lease, no scratch files left"


def test_other_schemes_warn_and_guard_nothing(caplog):
    with caplog.at_level(logging.WARNING, logger=LOGGER), OutputLease.acquire("gs://bucket/preds", "run") as lease:
        lease.check()
        assert lease.holder["run_id"] == "run"
    assert "concurrent runs writing it are not guarded" in caplog.text
