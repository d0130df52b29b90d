"""Scoring on real multi-node and autoscaling Ray clusters, every node on 127.0.0.1 (no mocks of Ray).

- The `multinode` fixture (tests/support/multinode.py): a head that takes no tasks and three 1-CPU worker
  nodes. Local paths are refused there unless --assume-shared-storage says every node mounts them
  (here they do: one machine); --use-gpu exits 2 at once (no GPU, no autoscaler); and a node is
  removed for real (its raylet, object store and workers SIGKILLed) while it runs a predictor,
  decode tasks or part-file writes: each job finishes by itself with one row per file.
- `FakeAutoscalingCluster` (below): a head with 2 CPUs and no GPU, and Ray's fake multi-node
  autoscaler with a node type of {CPU: 2, GPU: 1}, 0 to 2 nodes. "GPU" is a resource label there
  (TensorFlow finds no GPU and runs on CPU). --use-gpu waits for the first GPU node, and the
  predictor pool grows to 2 as the autoscaler adds the second. Two CPUs per GPU node, as real GPU
  nodes have several: with one, Ray Data's CPU budget never fits a second 1-CPU predictor.

Where a task runs is read from /proc: a Ray worker's process title names the task it executes
(`ray::MapBatches(decode_batch)`, `ray::Write`) and its parent is its node's raylet, whose command
line holds the node id. Jobs run as subprocesses joined through RAY_ADDRESS, as a submitted job does.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from catdog.cluster.checks import SHARED_STORAGE_FLAG
from catdog.score.predictions_folder import PredictionsFolder
from support import REAL_PHOTOS, write_model_run
from support.multinode import LOCAL_ONLY_ENV, LOOPBACK, REPO

PHOTOS = 160
PREDICTOR_CLASS = "MapWorker(MapBatches(Predictor))"
# What a node runs when it is removed: a worker process title, as Ray Data names its tasks.
STAGES = {"predictor": f"{PREDICTOR_CLASS}.submit", "decode": "MapBatches(decode_batch)", "write": "ray::Write"}
JOB_TIMEOUT_S = 480


# ---- data and models -------------------------------------------------------------------------------


def _photos(target: Path, count: int, repeat: int = 1) -> Path:
    """`count` photos (real when ../shared/data/catdog-dev exists, else generated), each linked
    `repeat` times under its own name, into target/cats and target/dogs."""
    if (REAL_PHOTOS / "cats").is_dir():
        for kind in ("cats", "dogs"):
            (target / kind).mkdir(parents=True)
            for source in sorted((REAL_PHOTOS / kind).iterdir())[: count // 2]:
                for copy in range(repeat):
                    shutil.copyfile(source, target / kind / f"{source.stem}-{copy}{source.suffix}")
        return target
    from catdog.io.sample_data import generate_sample_dataset

    return generate_sample_dataset(target, images_per_class=count * repeat // 2, size=(320, 240))


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Path:
    return _photos(tmp_path_factory.mktemp("photos"), PHOTOS)


@pytest.fixture(scope="module")
def model64(tmp_path_factory) -> Path:
    return write_model_run(tmp_path_factory.mktemp("run64"), image_size=64)


# ---- running jobs and reading their output ---------------------------------------------------------


def _score_args(model: Path, data: Path, output: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "jobs.score", "--model", str(model), "--input", str(data), "--output", str(output),
            *extra]


def _run(args: list[str], env: dict, timeout: float = JOB_TIMEOUT_S) -> subprocess.CompletedProcess:
    return subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


def _image_files(data: Path) -> set[str]:
    return {str(p.resolve()) for p in data.rglob("*") if p.is_file()}


def _assert_exact(output: Path, data: Path) -> dict:
    """One row per input file, no path twice in any part file, `_SUCCESS.json` agreeing; returns it."""
    folder = PredictionsFolder(str(output))
    paths = folder.read(["path"])["path"].to_pylist()
    assert len(paths) == len(set(paths)), "a path has more than one row"
    assert set(paths) == _image_files(data)
    per_file = [pq.read_metadata(f).num_rows for f in folder.part_files()]
    assert sum(per_file) == len(paths)
    summary = json.loads((output / "_SUCCESS.json").read_text())
    assert summary["rows_written"] == summary["files_listed"] == len(paths)
    return summary


# ---- where Ray runs what (from /proc) --------------------------------------------------------------


def _proc_text(pid: int | str, name: str) -> str:
    try:
        return Path(f"/proc/{pid}/{name}").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def _raylets(temp_dir: str) -> dict[int, str]:
    """raylet pid -> node id, for the raylets of the cluster whose session lives under `temp_dir`."""
    found = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            cmd = _proc_text(entry.name, "cmdline")
            if "raylet/raylet " in cmd and temp_dir in cmd and "--node_id=" in cmd:
                found[int(entry.name)] = cmd.split("--node_id=", 1)[1].split()[0]
    return found


def _running(raylets: dict[int, str], needle: str) -> dict[str, int]:
    """node id -> worker processes whose title contains `needle` (the task they execute now)."""
    counts: dict[str, int] = {}
    for pid, node in raylets.items():
        children = _proc_text(pid, f"task/{pid}/children").split()
        for child in children:
            if needle in _proc_text(child, "cmdline"):
                counts[node] = counts.get(node, 0) + 1
    return counts


# ---- the multi-node cluster: refusals --------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.ray
def test_local_paths_on_a_multi_node_cluster_exit_2_before_any_work(multinode, tiny_model_run, photos, tmp_path):
    multinode.ensure_worker_nodes()
    output = tmp_path / "preds"
    result = _run(_score_args(tiny_model_run, photos, output), multinode.job_env(), timeout=300)
    assert result.returncode == 2, result.stderr[-3000:]
    for expected in (f"--model {tiny_model_run}", f"--output {output}", f"--input {photos}",
                     "Ray cluster of 4 nodes", "s3://", SHARED_STORAGE_FLAG):
        assert expected in result.stderr, (expected, result.stderr[-2000:])
    assert "Traceback" not in result.stderr and not output.exists()


@pytest.mark.slow
@pytest.mark.ray
def test_use_gpu_on_a_cluster_with_no_gpu_and_no_autoscaler_exits_2_at_once(multinode, tiny_model_run, photos,
                                                                              tmp_path):
    output = tmp_path / "preds"
    started = time.monotonic()
    result = _run(_score_args(tiny_model_run, photos, output, "--use-gpu", SHARED_STORAGE_FLAG),
                  multinode.job_env(), timeout=300)
    assert result.returncode == 2, result.stderr[-3000:]
    message = result.stderr.strip().splitlines()[-1]
    assert "--use-gpu" in message and "no GPU" in message and "cannot get one" in message, message
    assert "no autoscaler" in message and "GPU 0" in message, message
    assert "waiting" not in result.stderr and "Traceback" not in result.stderr and not output.exists()
    print(f"{message} ({time.monotonic() - started:.1f} s)")


# ---- the multi-node cluster: a node lost mid-run ---------------------------------------------------


@pytest.mark.slow
@pytest.mark.ray
@pytest.mark.parametrize("stage", list(STAGES))
def test_a_node_lost_mid_run_the_job_finishes_with_one_row_per_file(multinode, model64, photos, tmp_path, stage):
    """Remove the node running the predictor / decode tasks / part-file writes, as soon as it runs
    them; the job finishes by itself with exact rows, and no part file is written twice."""
    multinode.ensure_worker_nodes()
    output = tmp_path / "preds"
    # Small batches and files: 20 of each, so every stage runs for a while and writes go on throughout.
    args = _score_args(model64, photos, output, SHARED_STORAGE_FLAG, "--batch-size", "8", "--rows-per-file", "8")
    raylets = _raylets(multinode.temp_dir)
    assert len(raylets) == 4, raylets
    log_path = tmp_path / "score.log"
    started = time.monotonic()
    with open(log_path, "w") as log:
        job = subprocess.Popen(args, cwd=REPO, env=multinode.job_env(), stdout=log, stderr=subprocess.STDOUT)
        try:
            victim, seen = None, {}
            while victim is None and job.poll() is None and time.monotonic() - started < JOB_TIMEOUT_S:
                seen = _running(raylets, STAGES[stage])
                predictor_nodes = _running(raylets, PREDICTOR_CLASS) if stage != "predictor" else {}
                candidates = sorted(n for n in seen if n not in predictor_nodes and n != multinode.head_node_id)
                victim = candidates[0] if candidates else None
                time.sleep(0.01)
            assert victim is not None, f"no node ran {STAGES[stage]}: " + log_path.read_text()[-3000:]
            at = time.monotonic() - started
            noticed_after = multinode.remove_node(victim)
            job.wait(timeout=JOB_TIMEOUT_S)
        finally:
            if job.poll() is None:
                job.kill()
                job.wait()
            multinode.ensure_worker_nodes()  # three again for the next test
    wall = time.monotonic() - started
    text = log_path.read_text()
    assert job.returncode == 0, text[-5000:]
    summary = _assert_exact(output, photos)
    assert summary["predictors_peak"] == 1
    pool = [int(line.split("Predictor pool: ")[1].split()[0]) for line in text.splitlines() if " alive (" in line]
    if stage == "predictor":  # the actor died with its node and Ray restarted it on another
        while pool and pool[-1] == 0:
            pool.pop()  # the watcher may see the pool shut down at the end of the run
        # the first poll may come after the node is gone: [0, 1] or [1, 0, 1]
        assert pool[-2:] == [0, 1], pool
    print(f"{stage}: removed node {victim[:8]} ({seen[victim]} x {STAGES[stage]}) at {at:.1f} s, "
          f"GCS noticed after {noticed_after:.1f} s; job exit 0 after {wall:.1f} s, "
          f"{summary['rows_written']} rows in {len(summary['output_files'])} part files")


# ---- an autoscaling cluster with fake GPU nodes ----------------------------------------------------


class FakeAutoscalingCluster:
    """Ray's fake multi-node autoscaler, owned by this process, on 127.0.0.1 and its own port.

    `ray.cluster_utils.AutoscalingCluster` starts with `ray stop --force` (every Ray of this
    machine, other users' included) and reads an example.yaml the 2.60 wheel lacks, so this starts
    `ray start --head --block` itself with a complete config (Ray's fake_multi_node/example.yaml
    fields). Worker nodes are started by the autoscaler's monitor; `stop` ends the head, then
    SIGKILLs, one pid at a time, whatever is left of this cluster (processes naming its temp dir).
    """

    def __init__(self, head_cpus: int, worker_types: dict):
        self.head_cpus, self.worker_types = head_cpus, worker_types
        self.temp_dir = tempfile.mkdtemp(prefix="catdog-as-", dir="/tmp")  # short: socket paths
        with socket.socket() as probe:
            probe.bind((LOOPBACK, 0))
            self.port = probe.getsockname()[1]
        self.address = f"{LOOPBACK}:{self.port}"
        self.config_path = Path(self.temp_dir) / "autoscaling.json"
        self._head: subprocess.Popen | None = None

    def config(self) -> dict:
        head = {"resources": {"CPU": self.head_cpus, "GPU": 0}, "node_config": {}, "max_workers": 0}
        return {
            "cluster_name": "catdog-fake", "max_workers": sum(t["max_workers"] for t in self.worker_types.values()),
            "provider": {"type": "fake_multinode", "use_node_id_as_ip": True, "disable_node_updaters": True,
                         "disable_launch_config_check": True, "gcs_address": self.address},
            "available_node_types": {"ray.head.default": head, **self.worker_types},
            "head_node_type": "ray.head.default", "upscaling_speed": 1.0, "idle_timeout_minutes": 5,
            "auth": {}, "docker": {}, "initialization_commands": [], "setup_commands": [], "head_setup_commands": [],
            "worker_setup_commands": [], "head_start_ray_commands": [], "worker_start_ray_commands": [],
            "file_mounts": {}, "cluster_synced_files": [], "file_mounts_sync_continuously": False,
            "rsync_exclude": [], "rsync_filter": [],
        }

    def start(self, timeout_s: float = 120) -> FakeAutoscalingCluster:
        self.config_path.write_text(json.dumps(self.config()))
        env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
        # Token auth off for this throwaway cluster: a token in ~/.ray would turn it on otherwise.
        env.update({LOCAL_ONLY_ENV: "0", "RAY_TMPDIR": self.temp_dir, "RAY_FAKE_CLUSTER": "1",
                    "AUTOSCALER_UPDATE_INTERVAL_S": "1", "RAY_AUTH_MODE": "disabled"})
        ray_cli = str(Path(sys.executable).with_name("ray"))
        with open(Path(self.temp_dir) / "head.log", "wb") as log:
            self._head = subprocess.Popen(
                [ray_cli, "start", "--head", "--block", f"--port={self.port}", f"--node-ip-address={LOOPBACK}",
                 f"--num-cpus={self.head_cpus}", "--num-gpus=0", f"--autoscaling-config={self.config_path}",
                 f"--temp-dir={self.temp_dir}", "--include-dashboard=false", "--disable-usage-stats",
                 "--object-store-memory=200000000"], env=env, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout_s
        while not list(Path(self.temp_dir).glob("session_*/logs/monitor*")):
            if self._head.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"the autoscaling head did not start: {self.temp_dir}/head.log")
            time.sleep(0.5)
        return self

    def job_env(self, **extra: str) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
        env.update({"RAY_ADDRESS": self.address, LOCAL_ONLY_ENV: "0", "PYTHONPATH": str(REPO), **extra})
        return env

    def _own_pids(self) -> list[int]:
        return [int(e.name) for e in Path("/proc").iterdir()
                if e.name.isdigit() and int(e.name) != os.getpid() and self.temp_dir in _proc_text(e.name, "cmdline")]

    def stop(self) -> None:
        if self._head is not None and self._head.poll() is None:
            self._head.send_signal(signal.SIGTERM)  # `ray start --block` stops its node on SIGTERM,
            try:  # after draining it for up to 30 s: not worth waiting for in a test
                self._head.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self._head.kill()
                self._head.wait()
        for pid in self._own_pids():  # worker nodes the monitor started, and their workers
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        shutil.rmtree(self.temp_dir, ignore_errors=True)


@pytest.fixture(scope="module")
def autoscaling():
    """A head (2 CPUs, no GPU) and 0-2 fake GPU nodes of {CPU: 2, GPU: 1}, launched on demand."""
    gpu_node = {"resources": {"CPU": 2, "GPU": 1, "object_store_memory": 150 * 2**20}, "node_config": {},
                "min_workers": 0, "max_workers": 2}
    cluster = FakeAutoscalingCluster(head_cpus=2, worker_types={"ray.worker.gpu": gpu_node}).start()
    yield cluster
    cluster.stop()


@pytest.mark.slow
@pytest.mark.ray
def test_use_gpu_waits_for_a_fitting_gpu_node_then_exits_2(autoscaling, tiny_model_run, photos, tmp_path):
    """Two GPUs per predictor: the autoscaler has GPU nodes, but none with two; the job says it
    waits, then gives up after --wait-for-workers and exits 2 before writing anything."""
    output = tmp_path / "preds"
    result = _run(_score_args(tiny_model_run, photos, output, "--use-gpu", "--gpus-per-worker", "2",
                              "--wait-for-workers", "5", SHARED_STORAGE_FLAG), autoscaling.job_env(), timeout=300)
    assert result.returncode == 2, result.stderr[-3000:]
    assert "waiting up to 5 s (--wait-for-workers) for the autoscaler to add a GPU node" in result.stderr
    message = result.stderr.strip().splitlines()[-1]
    assert "joined within 5 s" in message and "--wait-for-workers" in message, message
    assert "Traceback" not in result.stderr and not output.exists()


@pytest.mark.slow
@pytest.mark.ray
def test_the_gpu_pool_grows_as_the_autoscaler_adds_gpu_nodes(autoscaling, tmp_path):
    """No GPU node at start: the job waits for the first, then its pool (max: the autoscaler's 2
    GPUs) grows to two predictors as Ray Data has the autoscaler add the second; exact rows.

    Ray Data adds a predictor only while the predictors are the bottleneck (work queued for them):
    a 128 px model keeps them slower than decoding. It asks the autoscaler for nodes at most every
    10 s by default; 2 s here (RAY_DATA_MIN_GAP_BETWEEN_AUTOSCALING_REQUESTS) to keep the test short.
    """
    model = write_model_run(tmp_path / "run128", image_size=128)
    data = _photos(tmp_path / "photos", 500, repeat=3)
    output = tmp_path / "preds"
    started = time.monotonic()
    result = _run(_score_args(model, data, output, "--use-gpu", "--batch-size", "16", SHARED_STORAGE_FLAG),
                  autoscaling.job_env(RAY_DATA_MIN_GAP_BETWEEN_AUTOSCALING_REQUESTS="2"))
    wall = time.monotonic() - started
    assert result.returncode == 0, result.stderr[-5000:]
    log = result.stderr
    assert "no GPU in the cluster yet" in log and "a GPU node joined" in log, log[-3000:]
    assert f"the autoscaler config {autoscaling.config_path}" in log
    assert "Predictor pool: min 1, max 2 (grows with GPU nodes up to 2 GPUs" in log, log[-3000:]
    assert "Predictor pool: 2 alive" in log, log[-3000:]
    summary = _assert_exact(output, data)
    assert summary["predictors_peak"] == 2 and summary["predictor_pool"]["max"] == 2, summary["predictor_pool"]
    lines = [line for line in log.splitlines() if "catdog.cluster.capacity" in line or "Predictor pool" in line]
    print("\n".join(lines) + f"\n{summary['rows_written']} rows, {wall:.1f} s")
