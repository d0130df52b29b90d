"""What training workers say: a record of every worker's reports and failures, and a filter for
the worker output a user does not need.

`ray.train.report` attaches only rank 0's metrics to a checkpoint; this Ray Train callback runs in
the Train controller, sees every worker's metrics after each report, and rewrites one JSON file
with all events. The driver summarises it into metrics.json: per-epoch head-weight fingerprints of
each worker (identical when data parallelism kept the replicas in sync), failures and resumes.
"""

from __future__ import annotations

import re
import time

from ray.train import UserCallback

from catdog.io import storage

REPORTED_KEYS = ("epoch", "rank", "weights_fingerprint", "resumed_from", "loss", "val_loss", "val_accuracy")


class WorkerReportLog(UserCallback):
    """Keeps every report and failure event and writes them to `location` (JSON list) each time."""

    def __init__(self, location: str):
        self.location = location
        self.events: list[dict] = []

    def _write(self) -> None:
        storage.write_json(self.location, self.events)

    def after_report(self, run_context, metrics: list[dict], checkpoint) -> None:
        workers = [{key: m.get(key) for key in REPORTED_KEYS} for m in metrics]
        self.events.append({"event": "report", "time": time.time(), "workers": workers,
                            "checkpoint": checkpoint is not None})
        self._write()

    def after_exception(self, run_context, worker_exceptions: dict) -> None:
        self.events.append({
            "event": "failure",
            "time": time.time(),
            "ranks": sorted(int(rank) for rank in worker_exceptions),
            "errors": {str(rank): f"{type(exc).__name__}: {str(exc)[:300]}" for rank, exc in worker_exceptions.items()},
        })
        self._write()


def read_worker_reports(location: str) -> list[dict]:
    """The events written by WorkerReportLog, or none if it never wrote (no report at all)."""
    return storage.read_json(location) if storage.exists(location) else []


def summarise_worker_reports(events: list[dict], num_workers: int) -> dict:
    """Per-epoch fingerprints by rank (the last report of an epoch wins), sync check, failures, resumes."""
    by_epoch: dict[int, list[str]] = {}
    resumed_from = set()
    reports = 0
    for event in events:
        if event["event"] != "report":
            continue
        reports += 1
        workers = sorted(event["workers"], key=lambda w: w["rank"])
        by_epoch[workers[0]["epoch"]] = [w["weights_fingerprint"] for w in workers]
        resumed_from.update(w["resumed_from"] for w in workers if w["resumed_from"])
    in_sync = bool(by_epoch) and all(len(fps) == num_workers and len(set(fps)) == 1 for fps in by_epoch.values())
    return {
        "num_workers": num_workers,
        "weights_in_sync": in_sync,
        "weight_fingerprints_by_epoch": {str(epoch): fps for epoch, fps in sorted(by_epoch.items())},
        "reports": reports,
        "reported_epochs": [w["epoch"] for e in events if e["event"] == "report" for w in e["workers"][:1]],
        "failures": [e for e in events if e["event"] == "failure"],
        "resumed_from_epochs": sorted(resumed_from),
    }


# Lines forwarded from Ray workers that say nothing to a user: TensorFlow's C++ start-up lines in
# each worker (written before any log level applies); Ray Train's per-report echo of every metric
# (catdog's rank 0 logs one line per epoch instead) and Ray Data's per-epoch start/finish lines of
# each worker's shard. (Train V2's placement-group cleaner, which warned with tracebacks on a local
# Ray without a dashboard, is not started at all: catdog.train.fit.trainer_class.)
_WORKER_NOISE = re.compile(
    r"^(I0000 00:00|E0000 00:00|W0000 00:00|WARNING: All log messages before absl)"
    r"|has constructor arguments in the object store and max_restarts > 0"
    r"|Reporting training result \d+: TrainingReport|Checkpoint successfully created at"
    r"|Dataset (train|val)_\w+ execution finished|(Starting execution|Execution plan) of Dataset (train|val)_"
    r"|A new progress UI is available"
)


def drop_worker_log_noise() -> None:
    """Filter the known-noise lines out of the worker output Ray prints in this driver.

    Uses Ray's internal stdout dispatcher; if its shape changes, the lines are simply printed.
    """
    try:
        from ray._private.ray_logging import global_worker_stdstream_dispatcher as dispatcher
    except ImportError:
        return
    for name, handler in list(dispatcher.handlers):
        if name != "ray_print_logs" or getattr(handler, "catdog_filtered", False):
            continue

        def filtered(data, _inner=handler):
            lines = [line for line in data.get("lines", []) if not _WORKER_NOISE.search(line)]
            if lines:
                _inner({**data, "lines": lines})

        filtered.catdog_filtered = True
        dispatcher.remove_handler(name)
        dispatcher.add_handler(name, filtered)
