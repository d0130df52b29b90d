"""Row-level progress of a scoring run: one concise log line every ~10 s, in any log.

Predictor actors report each batch they scored (rows, errors by kind) to one `ProgressCounter`
actor, fire-and-forget; a thread in the driver reads its totals and logs

    Scored 12,288 / 100,000 files (12.3%), 84.1 images/s, ETA 17m24s; errors: truncated 3
    Scored 4,096 files, 160,000 listed so far, 84.1 images/s; errors: truncated 1   (while listing)

which reads the same under `ray job submit`, in a file or on a terminal. Ray Data's own block
counts say little about rows, so its progress bars are switched off for the run.

Memory: counters only (one integer per error kind), whatever the size of the input.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time

logger = logging.getLogger(__name__)

DEFAULT_INTERVAL_S = 10.0


class ProgressCounter:
    """Totals of rows scored and errors by kind; a Ray actor with no CPU of its own."""

    def __init__(self):
        self.rows = 0
        self.errors: dict[str, int] = {}
        self.files_listed: int | None = None  # set by a streaming listing
        self.listing_done = False
        self.skipped: dict[str, int] = {}

    def add(self, rows: int, errors: dict[str, int]) -> None:
        self.rows += rows
        for kind, count in errors.items():
            self.errors[kind] = self.errors.get(kind, 0) + count

    def listed(self, files: int, done: bool, skipped: dict[str, int]) -> None:
        self.files_listed, self.listing_done, self.skipped = files, done, dict(skipped)

    def totals(self) -> dict:
        return {"rows": self.rows, "errors": dict(self.errors), "files_listed": self.files_listed,
                "listing_done": self.listing_done, "skipped": dict(self.skipped)}


def start_counter():
    """A `ProgressCounter` actor on this driver's node: a worker node lost mid-run must not reset it."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    return ray.remote(num_cpus=0)(ProgressCounter).options(max_restarts=-1, scheduling_strategy=here).remote()


def format_line(rows: int, total: int | None, elapsed_s: float, errors: dict[str, int],
                listed_so_far: int | None = None) -> str:
    """The progress line for `rows` of `total` scored after `elapsed_s` seconds; `total` is None
    while a streaming listing goes on (`listed_so_far` files so far)."""
    rate = rows / elapsed_s if elapsed_s > 0 else 0.0
    if total is None:
        line = f"Scored {rows:,} files, {listed_so_far or 0:,} listed so far, {rate:.1f} images/s"
    else:
        shown = min(rows, total)  # a batch retried after an actor restart is counted twice
        line = f"Scored {shown:,} / {total:,} files ({100.0 * shown / total if total else 100.0:.1f}%), {rate:.1f} images/s"
        if rate > 0 and shown < total:
            line += f", ETA {_duration((total - shown) / rate)}"
    if errors:
        line += "; errors: " + ", ".join(f"{kind} {count:,}" for kind, count in sorted(errors.items()))
    return line


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, seconds = divmod(rest, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{seconds:02d}s" if minutes else f"{seconds}s"


@contextlib.contextmanager
def logging_progress(counter, total: int | None, interval_s: float = DEFAULT_INTERVAL_S):
    """Log the counter's totals every `interval_s` while the block runs (Ray Data's bars off).

    `total`: files to score, or None when a streaming listing reports them to the counter.
    """
    import ray
    from ray.data import DataContext

    context = DataContext.get_current()
    bars = context.enable_progress_bars
    context.enable_progress_bars = False
    started = time.monotonic()
    stop = threading.Event()

    def report() -> None:
        try:
            now = ray.get(counter.totals.remote(), timeout=interval_s)
        except Exception as exc:  # noqa: BLE001 - progress is best effort, never the job's failure
            logger.debug("No progress this time: %s", exc)
            return
        known = total if total is not None else now["files_listed"] if now["listing_done"] else None
        logger.info(format_line(now["rows"], known, time.monotonic() - started, now["errors"], now["files_listed"]))

    def report_every_interval() -> None:
        while not stop.wait(interval_s):
            report()

    thread = threading.Thread(target=report_every_interval, name="catdog-progress", daemon=True)
    thread.start()
    try:
        yield
        report()  # the last line shows where the run ended
    finally:
        stop.set()
        thread.join(timeout=interval_s)
        context.enable_progress_bars = bars
