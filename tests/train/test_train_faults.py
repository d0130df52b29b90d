"""Training survives the loss of a worker process: SIGKILL one real Ray Train worker mid-run.

The worker's PID comes from Ray's own actor table (the GCS; the HTTP state API needs a dashboard,
which a local catdog Ray does not start). The run must restart the worker group, resume after the
latest reported epoch rather than from zero, and end with every artifact and a history that has
each epoch exactly once.
"""

from __future__ import annotations

import csv
import json
import os
import signal
import threading
import time
from pathlib import Path

import pytest

from catdog.train.config import TrainConfig

EPOCHS = 12  # short epochs (~0.3 s each): the kill lands mid-run with a margin of several seconds
KILL_AFTER_EPOCH = 2


def _alive_train_workers() -> dict[str, int]:
    """actor id -> PID of every live Ray Train worker actor, from the GCS actor table."""
    import ray

    return {
        actor_id: info["Pid"]
        for actor_id, info in ray._private.state.actors().items()
        if info["ActorClassName"] == "RayTrainWorker" and info["State"] == "ALIVE" and info.get("Pid")
    }


def _reported_epochs(output: Path) -> list[int]:
    logs = list(output.glob("checkpoints/train-*/worker_reports.json"))
    if not logs:
        return []
    try:
        events = json.loads(logs[0].read_text())
    except (json.JSONDecodeError, OSError):  # being rewritten right now
        return []
    return [e["workers"][0]["epoch"] for e in events if e["event"] == "report"]


@pytest.mark.slow
def test_killed_worker_process_resumes_from_the_latest_checkpoint(ray_cluster, sample_images, feature_cache, tmp_path):
    from catdog.train.run import train

    output = tmp_path / "run"
    config = TrainConfig(data=str(sample_images), output=str(output), weights="none", image_size=32, epochs=EPOCHS,
                         patience=0, num_workers=2, max_failures=2, keep_checkpoints=2,
                         cache_dir=str(feature_cache))  # the session's: embeddings other runs made are reused
    outcome: dict = {}

    def run():
        try:
            outcome["result"] = train(config)
        except BaseException as exc:  # noqa: BLE001 - reported by the assertions below
            outcome["error"] = exc

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 400
    while time.monotonic() < deadline and thread.is_alive():
        if len(_reported_epochs(output)) >= KILL_AFTER_EPOCH:
            break
        time.sleep(0.05)
    reported_before_kill = _reported_epochs(output)
    assert len(reported_before_kill) >= KILL_AFTER_EPOCH, f"training never reached epoch {KILL_AFTER_EPOCH}: {outcome}"
    workers = _alive_train_workers()
    assert len(workers) == 2, workers
    victim = max(workers.values())
    os.kill(victim, signal.SIGKILL)
    killed_at = time.monotonic()

    thread.join(timeout=600)
    assert not thread.is_alive(), "training did not finish after the worker was killed"
    assert "error" not in outcome, repr(outcome.get("error"))
    assert max(reported_before_kill) < EPOCHS, "the kill came after the last epoch: nothing was tested"

    metrics = json.loads((output / "metrics.json").read_text())
    with open(output / "history.csv") as f:
        epochs = [int(row["epoch"]) for row in csv.DictReader(f)]
    assert epochs == list(range(1, EPOCHS + 1))  # no repeated or missing epochs
    assert metrics["epochs_run"] == EPOCHS
    workers_summary = metrics["workers"]
    resumed = workers_summary["resumed_from_epochs"]
    assert len(resumed) == 1 and KILL_AFTER_EPOCH <= resumed[0] < EPOCHS, workers_summary
    # what the workers reported, in order: 1..k before the kill, then k+1..EPOCHS after the restart
    reported = workers_summary["reported_epochs"]
    cut = reported.index(resumed[0]) + 1
    assert reported[:cut] == list(range(1, resumed[0] + 1))
    assert reported[cut:] == list(range(resumed[0] + 1, EPOCHS + 1))
    assert workers_summary["weights_in_sync"] is True
    assert len(workers_summary["failures"]) >= 1  # the Train controller saw the worker group fail
    assert victim not in _alive_train_workers().values()
    for name in ("model.keras", "classes.json", "config.json", "curves.png"):
        assert (output / name).stat().st_size > 0, name
    print(f"killed worker pid {victim} after epoch {max(reported_before_kill)}; resumed after epoch {resumed[0]}; "
          f"recovery and remaining epochs took {time.monotonic() - killed_at:.1f} s; failures seen: "
          f"{len(workers_summary['failures'])}")
