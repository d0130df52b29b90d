"""Row-level progress of a scoring run: one concise log line every ~10 s, in any log.

Predictor actors report each batch they scored (rows, errors by kind) to one `ProgressCounter`
actor, fire-and-forget; a thread in the driver reads its totals and logs

    Scored 12,288 / 100,000 files (12.3%), 84.1 images/s, ETA 17m24s; errors: truncated 3
    Scored 4,096 files, 160,000 listed so far, 84.1 images/s; errors: truncated 1   (while listing)

which reads the same under `ray job submit`, in a file or on a terminal. Ray Data's own block
counts say little about rows, so its progress bars are switched off for the run.

Decode tasks also report each file whose read has been waiting long (`catdog.io.imaging`). When no
row has finished for a while, the line says so and names them:

    Scored 8 / 16 files (50.0%), 0.4 images/s, ETA 20s; nothing finished for 1m20s; waiting on: /x/pipe.jpg (1m15s)

Memory: counters only (one integer per error kind), and at most MAX_SLOW_READS paths waiting.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time

logger = logging.getLogger(__name__)

DEFAULT_INTERVAL_S = 10.0
# Slow reads the counter names: hung files beyond these are only counted (a hung mount may hold thousands).
MAX_SLOW_READS = 20
# Slow reads named in one line, the longest waiting first; the rest are "N more".
SHOWN_SLOW_READS = 5
# Seconds without a finished row (or 3 intervals, if longer) before the line says what it waits on: less
# would flag the model load at the start of every run.
QUIET_AFTER_S = 30.0


class ProgressCounter:
    """Totals of rows scored and errors by kind; a Ray actor with no CPU of its own."""

    def __init__(self):
        self.rows = 0
        self.errors: dict[str, int] = {}
        self.files_listed: int | None = None  # set by a streaming listing
        self.listing_done = False
        self.skipped: dict[str, int] = {}
        self.slow_reads: dict[str, float] = {}  # path -> time.time() its read began
        self.slow_reads_more = 0  # slow reads beyond MAX_SLOW_READS, counted only

    def add(self, rows: int, errors: dict[str, int]) -> None:
        self.rows += rows
        for kind, count in errors.items():
            self.errors[kind] = self.errors.get(kind, 0) + count

    def listed(self, files: int, done: bool, skipped: dict[str, int]) -> None:
        self.files_listed, self.listing_done, self.skipped = files, done, dict(skipped)

    def reading_slowly(self, path: str, since: float) -> None:
        if path in self.slow_reads or len(self.slow_reads) < MAX_SLOW_READS:
            self.slow_reads[path] = since
        else:
            self.slow_reads_more += 1

    def done_reading(self, path: str) -> None:
        if self.slow_reads.pop(path, None) is None and self.slow_reads_more:
            self.slow_reads_more -= 1

    def totals(self) -> dict:
        return {"rows": self.rows, "errors": dict(self.errors), "files_listed": self.files_listed,
                "listing_done": self.listing_done, "skipped": dict(self.skipped),
                "slow_reads": dict(self.slow_reads), "slow_reads_more": self.slow_reads_more}


def start_counter():
    """A `ProgressCounter` actor on this driver's node: a worker node lost mid-run must not reset it."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    return ray.remote(num_cpus=0)(ProgressCounter).options(max_restarts=-1, scheduling_strategy=here).remote()


def format_line(rows: int, total: int | None, elapsed_s: float, errors: dict[str, int],
                listed_so_far: int | None = None, *, quiet_s: float | None = None,
                waiting: dict[str, float] | None = None, waiting_more: int = 0) -> str:
    """The progress line for `rows` of `total` scored after `elapsed_s` seconds; `total` is None
    while a streaming listing goes on (`listed_so_far` files so far).

    `quiet_s`: seconds since a row last finished, given only once that is long enough to say so;
    then `waiting` (path -> seconds its read has waited) and `waiting_more` (further slow reads)
    name what the run is waiting on.
    """
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
    if quiet_s is not None:
        line += f"; nothing finished for {_duration(quiet_s)}"
        longest = sorted((waiting or {}).items(), key=lambda item: (-item[1], item[0]))
        named = [f"{path} ({_duration(age)})" for path, age in longest[:SHOWN_SLOW_READS]]
        more = len(longest) - len(named) + waiting_more
        if more:
            named.append(f"{more:,} more")
        if named:
            line += "; waiting on: " + ", ".join(named)
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
    quiet_after_s = max(QUIET_AFTER_S, 3 * interval_s)
    last_change = {"rows": 0, "at": started}

    def report() -> None:
        try:
            now = ray.get(counter.totals.remote(), timeout=interval_s)
        except Exception as exc:  # noqa: BLE001 - progress is best effort, never the job's failure
            logger.debug("No progress this time: %s", exc)
            return
        at = time.monotonic()
        if now["rows"] != last_change["rows"]:
            last_change.update(rows=now["rows"], at=at)
        quiet_s = at - last_change["at"]
        wall = time.time()  # decode tasks stamp reads with wall time: monotonic clocks differ between nodes
        known = total if total is not None else now["files_listed"] if now["listing_done"] else None
        logger.info(format_line(
            now["rows"], known, at - started, now["errors"], now["files_listed"],
            quiet_s=quiet_s if quiet_s >= quiet_after_s else None,
            waiting={path: max(0.0, wall - since) for path, since in now["slow_reads"].items()},
            waiting_more=now["slow_reads_more"]))

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
