"""Training on a real multi-node Ray cluster: a head that takes no tasks and three 1-CPU worker
nodes, each its own raylet on 127.0.0.1 (the `multinode` fixture, tests/support/multinode.py).

`python -m jobs.train` runs as a subprocess joined to that cluster through RAY_ADDRESS, as a
submitted job does; the test process asks the cluster's GCS where the Train workers run and
removes a node for real (every process of its raylet SIGKILLed). Every node sits on this one
machine, so local paths are in fact shared: the runs say so with --assume-shared-storage, and
without it a local --output is refused.
"""

from __future__ import annotations

import csv
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from catdog.cluster.checks import SHARED_STORAGE_FLAG, is_node_local
from support.multinode import REPO, MultiNodeCluster

ARTIFACTS = ["model.keras", "classes.json", "config.json", "metrics.json", "history.csv", "curves.png"]
NODE_LOSS_EPOCHS = 30  # short epochs (~0.3 s): the node goes with a margin of many epochs
REMOVE_AFTER_EPOCH = 2


def _train_args(data: Path, output: Path, cache: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "jobs.train", "--data", str(data), "--output", str(output), "--weights", "none",
            "--image-size", "32", "--num-workers", "2", "--cache-dir", str(cache), *extra]


def _run(args: list[str], env: dict, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


def _read(run: Path, name: str):
    return json.loads((run / name).read_text())


def _history_epochs(run: Path) -> list[int]:
    with open(run / "history.csv") as f:
        return [int(row["epoch"]) for row in csv.DictReader(f)]


def _reported_epochs(run: Path) -> list[int]:
    """Epochs the workers reported so far (catdog.train.worker_log's file, rewritten after each report)."""
    logs = list(run.glob("checkpoints/train-*/worker_reports.json"))
    try:
        events = json.loads(logs[0].read_text()) if logs else []
    except (json.JSONDecodeError, OSError):  # being rewritten right now
        return []
    return [e["workers"][0]["epoch"] for e in events if e["event"] == "report"]


# ---- fast: no Ray -----------------------------------------------------------------------------------


def test_only_object_store_uris_count_as_shared():
    assert is_node_local("/data/runs/r1") and is_node_local("runs/r1") and is_node_local("file:///mnt/nfs/r1")
    assert not is_node_local("s3://bucket/runs/r1") and not is_node_local("gs://bucket/cache")


def test_placement_and_shared_storage_flags_reach_the_config():
    from catdog.errors import CatdogError
    from catdog.train.config import TrainConfig
    from jobs.train import build_parser

    args = vars(build_parser().parse_args(["--data", "d", "--output", "o", "--placement", "spread", SHARED_STORAGE_FLAG]))
    args.pop("verbose")
    config = TrainConfig(**args)
    assert config.placement == "spread" and config.assume_shared_storage is True
    with pytest.raises(CatdogError, match="--placement"):
        TrainConfig(data="d", output="o", placement="scatter").validate()


# ---- slow: the multi-node cluster -----------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.ray
def test_local_output_on_a_multi_node_cluster_exits_2_naming_the_fix(multinode, sample_images, tmp_path):
    multinode.ensure_worker_nodes()
    output = tmp_path / "run"
    result = _run(_train_args(sample_images, output, tmp_path / "cache", "--epochs", "1"), multinode.job_env(),
                  timeout=300)
    assert result.returncode == 2, result.stderr[-3000:]
    message = result.stderr
    for expected in (f"--output {output}", f"--cache-dir {tmp_path / 'cache'}", "Ray cluster of 4 nodes",
                     "s3://", SHARED_STORAGE_FLAG):
        assert expected in message, (expected, message[-2000:])
    assert "Traceback" not in message
    assert not output.exists() and not (tmp_path / "cache").exists()  # refused before anything was written
    print(message.strip().splitlines()[-1])


@pytest.mark.slow
@pytest.mark.ray
def test_local_paths_on_a_head_that_takes_no_tasks_exit_2(sample_images, tmp_path):
    """cluster.yaml's shape before its autoscaler adds workers: one node, the head, with no CPUs."""
    with MultiNodeCluster(worker_nodes=0) as head_only:
        result = _run(_train_args(sample_images, tmp_path / "run", tmp_path / "cache", "--epochs", "1"),
                      head_only.job_env(), timeout=300)
    assert result.returncode == 2, result.stderr[-3000:]
    assert "a Ray head that takes no tasks" in result.stderr and SHARED_STORAGE_FLAG in result.stderr


@pytest.mark.slow
@pytest.mark.ray
def test_spread_puts_the_two_workers_on_different_nodes_in_sync(multinode, sample_images, tmp_path):
    worker_nodes = set(multinode.ensure_worker_nodes())
    output = tmp_path / "run"
    started = time.monotonic()
    result = _run(_train_args(sample_images, output, tmp_path / "cache", "--epochs", "3", "--patience", "0",
                              "--placement", "spread", SHARED_STORAGE_FLAG), multinode.job_env())
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    for name in ARTIFACTS:
        assert (output / name).stat().st_size > 0, name
    metrics = _read(output, "metrics.json")
    workers = metrics["workers"]
    nodes = workers["nodes"]
    assert workers["placement"] == "spread" and [w["rank"] for w in nodes] == [0, 1]
    node_ids = [w["node_id"] for w in nodes]
    assert len(set(node_ids)) == 2 and set(node_ids) <= worker_nodes, (node_ids, worker_nodes)  # never the head
    assert workers["weights_in_sync"] is True
    fingerprints = workers["weight_fingerprints_by_epoch"]
    assert sorted(fingerprints, key=int) == ["1", "2", "3"]
    assert all(len(pair) == 2 and pair[0] == pair[1] for pair in fingerprints.values()), fingerprints
    assert _history_epochs(output) == [1, 2, 3]
    assert metrics["restarts"] == {"count": 0, "attempts": [{"resumed_from_epoch": 0, "nodes": nodes}]}
    assert _read(output, "config.json")["placement"] == "spread"
    print(f"spread run: ranks on nodes {[n[:8] for n in node_ids]} of {sorted(n[:8] for n in worker_nodes)}; "
          f"{time.monotonic() - started:.1f} s")


@pytest.mark.slow
@pytest.mark.ray
def test_losing_a_workers_node_restarts_from_the_latest_checkpoint_on_the_others(multinode, sample_images, tmp_path):
    multinode.ensure_worker_nodes()
    output = tmp_path / "run"
    args = _train_args(sample_images, output, tmp_path / "cache", "--epochs", str(NODE_LOSS_EPOCHS), "--patience",
                       "0", "--placement", "spread", "--max-failures", "2", SHARED_STORAGE_FLAG)
    log = open(tmp_path / "train.log", "w")  # noqa: SIM115 - closed below
    job = subprocess.Popen(args, cwd=REPO, env=multinode.job_env(), stdout=log, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 400
        while time.monotonic() < deadline and job.poll() is None:
            if len(_reported_epochs(output)) >= REMOVE_AFTER_EPOCH and list(output.glob("checkpoints/train-*/epoch-*")):
                break
            time.sleep(0.05)
        reported_before = _reported_epochs(output)
        assert len(reported_before) >= REMOVE_AFTER_EPOCH, (tmp_path / "train.log").read_text()[-3000:]
        train_workers = multinode.actors("RayTrainWorker")
        assert len(train_workers) == 2, train_workers
        first_nodes = {w["node_id"] for w in train_workers}
        handoff = {a["node_id"] for a in multinode.actors("FeatureHandoff")}
        # the driver, the Train controller and the embeddings' handoff actor sit on the head
        assert handoff == {multinode.head_node_id}, handoff
        victim = sorted(first_nodes)[0]
        assert victim != multinode.head_node_id
        noticed_after = multinode.remove_node(victim)
        removed_at = time.monotonic()
        job.wait(timeout=600)
    finally:
        if job.poll() is None:
            job.kill()
            job.wait()
        log.close()
        multinode.ensure_worker_nodes()  # three again for the next test
    output_log = (tmp_path / "train.log").read_text()
    assert job.returncode == 0, output_log[-4000:]
    assert max(reported_before) < NODE_LOSS_EPOCHS, "the node went after the last epoch: nothing was tested"

    metrics = _read(output, "metrics.json")
    restarts = metrics["restarts"]
    assert restarts["count"] >= 1, restarts
    first, last = restarts["attempts"][0], restarts["attempts"][-1]
    assert first["resumed_from_epoch"] == 0 and {w["node_id"] for w in first["nodes"]} == first_nodes
    assert max(reported_before) <= last["resumed_from_epoch"] < NODE_LOSS_EPOCHS, (reported_before, restarts)
    last_nodes = [w["node_id"] for w in last["nodes"]]
    assert victim not in last_nodes and len(set(last_nodes)) == 2, (victim, last_nodes)  # still spread
    assert metrics["workers"]["nodes"] == last["nodes"]
    assert _history_epochs(output) == list(range(1, NODE_LOSS_EPOCHS + 1))  # each epoch once
    assert metrics["epochs_run"] == NODE_LOSS_EPOCHS and metrics["workers"]["weights_in_sync"] is True
    reported = metrics["workers"]["reported_epochs"]
    cut = reported.index(last["resumed_from_epoch"]) + 1
    assert reported[cut:] == list(range(last["resumed_from_epoch"] + 1, NODE_LOSS_EPOCHS + 1))
    for name in ARTIFACTS:
        assert (output / name).stat().st_size > 0, name
    print(f"removed node {victim[:8]} (workers on {sorted(n[:8] for n in first_nodes)}, handoff on "
          f"{sorted(n[:8] for n in handoff)}) after epoch {max(reported_before)}; GCS noticed in {noticed_after} s; "
          f"{restarts['count']} restart(s), resumed after epoch {last['resumed_from_epoch']} on "
          f"{[n[:8] for n in last_nodes]}; recovery and remaining epochs {time.monotonic() - removed_at:.1f} s")
