"""`ray job submit` end to end on a real local Ray head with token authentication (issue #4).

The test owns its head: `ray start --head --block` in the background, bound to 127.0.0.1, free
non-default ports (other sessions' clusters run on this machine too), session files in a private
temp folder, a token it generates. It submits the training job, then the scoring job, with the
working_dir = this repository, as the README's cluster section shows: data, the backbone weights
file, the feature cache, the run folder and the predictions are s3:// URIs on a local
S3-compatible server (moto, 127.0.0.1). The endpoint reaches the job's driver and every worker
through the job's runtime_env env_vars; credentials come from the head's environment (on AWS: the
instance profile). The head is stopped through the one process the test started.
"""

from __future__ import annotations

import io
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from support.netinfo import listeners, process_tree
from support.s3local import weights_file

pytestmark = [pytest.mark.slow, pytest.mark.ray]

REPO = Path(__file__).resolve().parents[2]
VENV_BIN = Path(sys.executable).parent
TERMINAL = {"SUCCEEDED", "FAILED", "STOPPED"}
HEAD_START_TIMEOUT_S = 90
JOB_TIMEOUT_S = 300
# `ray start --block` exits on SIGTERM in ~3 s after small jobs, but after Ray Data jobs its graceful
# shutdown waited >15 s (measured); SIGKILL of that one process takes the GCS, raylet and dashboard
# with it at once. Its agents then linger up to a minute: they are SIGKILLed by pid.
STOP_GRACE_S = 5


def _free_ports(count: int) -> list[int]:
    """Distinct free loopback ports (held open together so they differ)."""
    sockets = []
    try:
        for _ in range(count):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            sockets.append(s)
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


class LocalHead:
    """A Ray head started by this test, and the only thing this test stops."""

    def __init__(self, root: Path, extra_env: dict[str, str]):
        self.root = root
        self.token = secrets.token_hex(32)
        token_file = root / "auth_token"
        token_file.write_text(self.token)
        token_file.chmod(0o600)
        (gcs, dashboard, node_manager, object_manager, agent_http, agent_grpc, runtime_env_agent, metrics,
         client) = _free_ports(9)
        self.dashboard_port = dashboard
        self.agent_port = agent_http
        self.address = f"http://127.0.0.1:{dashboard}"
        self.env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "AWS_"))}
        self.env.update(
            PATH=f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}",  # jobs run `python` from the venv
            RAY_AUTH_MODE="token",
            RAY_AUTH_TOKEN_PATH=str(token_file),
            RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0",  # keep 127.0.0.1 (see catdog.cluster.session)
            RAY_USAGE_STATS_ENABLED="0",
            **extra_env,
        )
        command = [
            str(VENV_BIN / "ray"), "start", "--head", "--block",
            "--node-ip-address=127.0.0.1", "--dashboard-host=127.0.0.1",
            f"--port={gcs}", f"--dashboard-port={dashboard}", f"--node-manager-port={node_manager}",
            f"--object-manager-port={object_manager}", f"--dashboard-agent-listen-port={agent_http}",
            f"--dashboard-agent-grpc-port={agent_grpc}", f"--runtime-env-agent-port={runtime_env_agent}",
            f"--metrics-export-port={metrics}", f"--ray-client-server-port={client}",
            "--min-worker-port=0", "--max-worker-port=0",  # OS-assigned worker ports
            f"--temp-dir={root / 'ray'}", "--num-cpus=2", "--num-gpus=0",
            "--object-store-memory=800000000", "--disable-usage-stats",
        ]
        self.log = open(root / "head.log", "w")
        self.process = subprocess.Popen(command, env=self.env, stdout=self.log, stderr=subprocess.STDOUT,
                                        start_new_session=True)

    def request(self, path: str, token: str | None) -> int:
        """HTTP status of a GET on the dashboard, with an optional bearer token."""
        headers = {"Authorization": f"Bearer {token}"} if token is not None else {}
        try:
            with urllib.request.urlopen(urllib.request.Request(self.address + path, headers=headers), timeout=5) as r:
                return r.status
        except urllib.error.HTTPError as exc:
            return exc.code

    def wait_until_ready(self) -> None:
        deadline = time.monotonic() + HEAD_START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"ray start exited {self.process.returncode}: {self.head_log()}")
            try:
                dashboard_up = self.request("/api/version", self.token) == 200
            except OSError:
                dashboard_up = False
            # The dashboard answers before the raylet and its agent (which run jobs) are up.
            if dashboard_up and self.agent_port in {item.port for item in listeners(process_tree(self.process.pid))}:
                return
            time.sleep(0.5)
        raise TimeoutError(f"dashboard not answering after {HEAD_START_TIMEOUT_S}s: {self.head_log()}")

    def head_log(self) -> str:
        return (self.root / "head.log").read_text()[-3000:]

    def stop(self) -> list[str]:
        """Terminate the `ray start --block` process, the one process this test started.

        SIGTERM, then SIGKILL after STOP_GRACE_S. Returns the processes of its tree still alive
        STOP_GRACE_S later, which are then SIGKILLed by pid (see STOP_GRACE_S).
        """
        tree = [pid for pid in process_tree(self.process.pid) if pid != self.process.pid]
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=STOP_GRACE_S)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)
        self.log.close()
        deadline = time.monotonic() + STOP_GRACE_S
        alive = tree
        while alive and time.monotonic() < deadline:
            time.sleep(0.5)
            alive = [pid for pid in alive if _alive(pid)]
        leftovers = [f"{pid} {_cmdline(pid)}" for pid in alive]
        for pid in alive:  # only processes of the head this test started
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        return leftovers


def _cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace")[:160]
    except OSError:
        return "?"


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


@pytest.fixture(scope="module")
def ray_head(s3):
    root = Path(tempfile.mkdtemp(prefix="cdjob-", dir="/tmp"))  # AF_UNIX paths must stay short
    head = LocalHead(root, extra_env=s3.credentials)
    try:
        head.wait_until_ready()
        yield head
    finally:
        leftovers = head.stop()
        shutil.rmtree(root, ignore_errors=True)
    core = [p for p in leftovers if any(name in p for name in ("gcs_server", "raylet", "dashboard.py"))]
    assert core == [], f"Ray's core outlived the stopped head: {core}"


@pytest.fixture(scope="module")
def client(ray_head):
    from ray.job_submission import JobSubmissionClient

    return JobSubmissionClient(ray_head.address, headers={"Authorization": f"Bearer {ray_head.token}"})


def test_head_requires_the_token_and_listens_on_loopback_only(ray_head):
    assert ray_head.request("/api/jobs/", None) == 401
    assert ray_head.request("/api/jobs/", "0" * 64) == 403
    assert ray_head.request("/api/jobs/", ray_head.token) == 200
    found = listeners(process_tree(ray_head.process.pid))
    names = " ".join(item.process for item in found)
    assert "gcs_server" in names and "raylet" in names and ray_head.dashboard_port in {i.port for i in found}
    exposed = [item for item in found if not item.loopback]
    assert exposed == [], f"the test head listens beyond loopback: {exposed}"


def run_job(client, entrypoint: str, env_vars: dict[str, str]) -> tuple[str, str, str]:
    """Submit with working_dir = the repo; wait for a terminal state; return (status, message, logs)."""
    runtime_env = {"working_dir": str(REPO), "excludes": ["photos/", "runs/", "preds/"], "env_vars": env_vars}
    job_id = client.submit_job(entrypoint=entrypoint, runtime_env=runtime_env)
    deadline = time.monotonic() + JOB_TIMEOUT_S
    info = client.get_job_info(job_id)
    while str(info.status.value) not in TERMINAL and time.monotonic() < deadline:
        time.sleep(1)
        info = client.get_job_info(job_id)
    if str(info.status.value) not in TERMINAL:
        client.stop_job(job_id)
    return str(info.status.value), info.message or "", client.get_job_logs(job_id)


def test_train_then_score_jobs_on_s3_succeed_and_write_parquet(ray_head, client, s3, tmp_path):
    from catdog.io.sample_data import generate_sample_dataset

    data = generate_sample_dataset(tmp_path / "photos", images_per_class=8, size=(48, 40))
    image_keys = s3.upload_folder(data, "images")
    s3.client.upload_file(str(weights_file(tmp_path)), s3.bucket, "weights/resnet50_notop.weights.h5")
    # The endpoint settings as a user passes them (--runtime-env-json), plus a variable that
    # overlaps catdog's own quiet defaults: the job's value must win, not a merge conflict.
    env_vars = {**s3.settings, "TF_CPP_MIN_LOG_LEVEL": "3"}

    status, message, logs = run_job(client, (
        f"python -m jobs.train --data {s3.uri('images')} --output {s3.uri('runs/r1')} "
        f"--weights {s3.uri('weights/resnet50_notop.weights.h5')} --cache-dir {s3.uri('cache')} "
        "--image-size 32 --epochs 2 --num-workers 1"
    ), env_vars)
    assert status == "SUCCEEDED", f"{message}\n{logs[-6000:]}"
    assert {"runs/r1/model.keras", "runs/r1/classes.json"} <= set(s3.keys("runs/r1/"))
    assert json.loads(s3.read("runs/r1/classes.json")) == ["cats", "dogs"]
    assert s3.keys("cache/"), "the feature cache went to the bucket"

    status, message, logs = run_job(client, (
        f"python -m jobs.score --model {s3.uri('runs/r1')} --input {s3.uri('images')} --output {s3.uri('preds/p1')}"
    ), env_vars)
    assert status == "SUCCEEDED", f"{message}\n{logs[-6000:]}"
    parts = [key for key in s3.keys("preds/p1/") if key.endswith(".parquet")]
    assert parts
    table = pa.concat_tables([pq.read_table(io.BytesIO(s3.read(key))) for key in parts])
    assert sorted(table.column("path").to_pylist()) == [s3.uri(key) for key in image_keys]  # rows == files
    assert table.column("error").null_count == table.num_rows
    assert set(table.column("label").to_pylist()) <= {"cats", "dogs"}
    summary = json.loads(s3.read("preds/p1/_SUCCESS.json"))
    assert summary["rows_written"] == summary["files_listed"] == len(image_keys)


def test_a_user_mistake_fails_the_job_with_exit_code_2(ray_head, client):
    status, message, logs = run_job(client, (
        f"python -m jobs.score --model {ray_head.root / 'no-such-run'} --input {ray_head.root / 'nothing'} "
        f"--output {ray_head.root / 'never'}"
    ), {})
    assert status == "FAILED"
    assert "exit code 2" in message, message
    assert "error:" in logs
    assert not (ray_head.root / "never").exists()
