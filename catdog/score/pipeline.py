"""The scoring pipeline on Ray Data: listed paths -> decode (CPU tasks) -> predict (actor pool) -> Parquet.

    source (catdog.score.sources: the listing as it streams, or planned _todo/ files)
          --map_batches(decode_batch)--> one row per file, pixels or an error
          --map_batches(Predictor, ActorPoolStrategy)--> prediction rows (predictions schema)
          --write_parquet(our file names)

Decoding runs in tasks with fractional CPUs while the predictor actors run the model, so the two
overlap; Ray Data's streaming executor bounds what is in flight. On CPU each predictor runs two
batches at once, each op on half the cores (`catdog.cluster.actor_pool`). Per-row Python happens only in
decoding (Pillow) -- never in the model call.

The predictor pool (`plan_pool`): the flags, else one CPU predictor, else with --use-gpu one per
GPU present -- growing up to the GPUs an autoscaler can add (`catdog.cluster.capacity`), as Ray
Data adds actors when work queues and nodes join. `PoolWatcher` logs its size as it changes.

Memory, per process: a decode task holds one batch of decoded pixels (batch x size^2 x 3 bytes)
plus one full-size image while decoding it (bounded by --max-image-pixels and --max-file-bytes).
A predictor actor holds TensorFlow, the model and the activations of the batches it runs at once
(figures: benchmarks/README.md). Decoded pixels in flight are capped per run
(`object_store_budget`), so memory does not grow with the number of images; when the object store
fills, Ray Data backpressures the decode stage and Ray spills rather than failing.
"""

from __future__ import annotations

import contextlib
import logging
import math
import re
import threading
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.compute as pc

from catdog.cluster.actor_pool import model_actor_pool
from catdog.errors import ModelLoadError
from catdog.io import file_reads, imaging, inputs
from catdog.model.run_folder import ModelInfo
from catdog.score import progress
from catdog.score.config import ScoreConfig
from catdog.score.predictions_folder import PredictionsFolder

logger = logging.getLogger(__name__)

# Ray resources: on 2 CPUs one predictor (1 CPU; TensorFlow uses every core anyway) leaves room for
# two decode tasks and a writer. Whole CPUs for all three stages deadlock a small machine.
PREDICTOR_CPUS = 1.0
DECODE_CPUS = 0.5
WRITE_CPUS = 0.25
# Paths per input block: the unit of decode parallelism and of retry. Small inputs get one
# predictor batch per block (fast start); large ones up to this many paths per block.
MAX_PATHS_PER_BLOCK = 1024
TARGET_BLOCKS = 200
# Object-store budget of one scoring run. Decoding outpaces the model on CPU, so by default Ray
# Data lets decoded pixels pile up to half the object store and peak memory grew with the input. A
# fixed budget of a few blocks and batches ahead keeps memory flat and the predictors fed
# (benchmarks/README.md, Scoring memory against input size).
MIN_OBJECT_STORE_BUDGET = 512 * 2**20
# Seconds between counts of alive predictors: a GCS read, cheap; GPU nodes take minutes to join.
POOL_POLL_S = 2.0


class _SlowReadsToCounter:
    """An `file_reads.ReadWatcher` that tells the run's `ProgressCounter` actor, fire-and-forget."""

    def __init__(self, counter):
        self.counter = counter

    def reading_slowly(self, path: str, since: float) -> None:
        self.counter.reading_slowly.remote(path, since)

    def done_reading(self, path: str) -> None:
        self.counter.done_reading.remote(path)


def decode_batch(batch: pa.Table, image_size: int, max_pixels: int, max_bytes: int,
                 read_timeout_s: float | None = file_reads.DEFAULT_READ_TIMEOUT_S, counter=None) -> pa.Table:
    """Read and decode a batch of listed paths; every path gives one row (pixels, or an error).

    A file whose read takes over `read_timeout_s` is a `read_timeout` row; reads that wait long
    are reported to the progress `counter` (a `ProgressCounter` actor) while they wait.

    Returns an Arrow table with explicit types, so an all-null `error` column stays a string column.
    File size and time travel on as int64 with -1 for unknown: the predictor gets numpy batches,
    which hold no nulls.
    """
    from ray.data.extensions import ArrowTensorArray

    watcher = _SlowReadsToCounter(counter) if counter is not None else None
    decoded = imaging.read_and_decode(batch[inputs.PATH_COLUMN].to_pylist(), image_size, max_pixels, max_bytes,
                                      read_timeout_s=read_timeout_s, watcher=watcher)
    columns = {
        "path": batch[inputs.PATH_COLUMN],
        "image": ArrowTensorArray.from_numpy(decoded["image"]),
        "width": pa.array(decoded["width"], pa.int32()),
        "height": pa.array(decoded["height"], pa.int32()),
        "error": pa.array(list(decoded["error"]), pa.string()),
        inputs.SIZE_COLUMN: pc.fill_null(batch[inputs.SIZE_COLUMN], -1),
        inputs.MODIFIED_COLUMN: pc.fill_null(batch[inputs.MODIFIED_COLUMN].cast(pa.int64()), -1),
    }
    if inputs.TRUE_LABEL_COLUMN in batch.column_names:
        columns[inputs.TRUE_LABEL_COLUMN] = batch[inputs.TRUE_LABEL_COLUMN]
    return pa.table(columns)


@dataclass(frozen=True)
class PoolPlan:
    """Predictor pool bounds and why; Ray Data grows a pool with min < max as work queues and
    resources (nodes an autoscaler adds) allow."""

    min_size: int
    max_size: int
    why: str

    def as_dict(self) -> dict:
        return {"min": self.min_size, "max": self.max_size, "why": self.why}


def plan_pool(config: ScoreConfig) -> PoolPlan:
    """Pool bounds: the flags; else 1 on CPU; with --use-gpu every GPU present, growing up to the
    GPUs the autoscaler can add when it can add some (`catdog.cluster.capacity`)."""
    if config.num_workers is not None:
        return PoolPlan(config.num_workers, config.num_workers, "--num-workers")
    if config.max_workers is not None:
        low = config.min_workers if config.min_workers is not None else 1
        return PoolPlan(low, config.max_workers, "--min-workers/--max-workers")
    if not config.use_gpu:
        return PoolPlan(1, 1, "one CPU predictor (default)")
    from catdog.cluster.capacity import GPU, capacity

    found = capacity(GPU)
    per_actor = config.gpus_per_worker
    now = max(1, int(found.present // per_actor))
    if found.autoscaling:
        most = max(now, int(found.most // per_actor))
        return PoolPlan(now, most, f"grows with GPU nodes up to {found.most:g} GPUs ({found.source})")
    if found.most is None:
        logger.info("Predictor pool: %d, one per GPU present; the autoscaler's limits are %s: pass --max-workers "
                    "for a pool that grows as GPU nodes join", now, found.source)
    return PoolPlan(now, now, f"one per GPU present ({found.present:g})")


def _actor_pool(config: ScoreConfig, plan: PoolPlan | None = None):
    """The predictor pool (`plan_pool`); on CPU each actor runs two batches at once."""
    plan = plan or plan_pool(config)
    if plan.min_size == plan.max_size:
        return model_actor_pool(config.use_gpu, size=plan.min_size)
    return model_actor_pool(config.use_gpu, min_size=plan.min_size, max_size=plan.max_size)


class PoolWatcher:
    """Counts this job's alive predictor actors every POOL_POLL_S in a thread; logs each change and
    keeps the peak. Reads the GCS actor table (no dashboard needed); best effort."""

    def __init__(self, plan: PoolPlan, interval_s: float = POOL_POLL_S):
        self.plan, self.interval_s, self.peak, self._last = plan, interval_s, 0, None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="catdog-pool", daemon=True)

    def __enter__(self) -> PoolWatcher:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=self.interval_s + 5)

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.poll()

    def poll(self) -> int | None:
        alive = alive_predictors()
        if alive is None:
            return None
        self.peak = max(self.peak, alive)
        if alive != self._last:
            logger.info("Predictor pool: %d alive (min %d, max %d: %s)", alive, self.plan.min_size,
                        self.plan.max_size, self.plan.why)
            self._last = alive
        return alive


def alive_predictors() -> int | None:
    """Alive predictor actors of this job (Ray Data names the actor class after the UDF)."""
    import ray
    import ray._private.state

    try:
        job = ray.JobID.from_hex(ray.get_runtime_context().get_job_id())
        table = ray._private.state.state.actor_table(None, job_id=job, actor_state_name="ALIVE")
    except Exception as exc:  # noqa: BLE001 - a private Ray API; the pool size is only reported
        logger.debug("Could not read the actor table: %s", exc)
        return None
    return sum(1 for actor in table.values() if "Predictor" in actor.get("ActorClassName", ""))


def block_rows(total: int, batch_size: int) -> int:
    """Paths per block for `total` files: whole batches, about TARGET_BLOCKS blocks, capped."""
    rows = max(batch_size, min(MAX_PATHS_PER_BLOCK, math.ceil(total / TARGET_BLOCKS)))
    return math.ceil(rows / batch_size) * batch_size


def object_store_budget(total: int, batch_size: int, image_size: int, predictors: int) -> int:
    """Bytes of object store one run may fill: 8 decoded blocks, 32 batches per predictor, 512 MiB
    at least -- independent of how many images there are."""
    image_bytes = image_size * image_size * 3
    block = block_rows(total, batch_size) * image_bytes
    return max(MIN_OBJECT_STORE_BUDGET, 8 * block, 32 * batch_size * image_bytes * predictors)


@contextlib.contextmanager
def _object_store_budget(budget: int):
    """Limit Ray Data's object-store use in this driver for the duration of one run."""
    from ray.data import DataContext

    options = DataContext.get_current().execution_options
    saved = options.resource_limits
    options.resource_limits = saved.copy(object_store_memory=min(budget, saved.object_store_memory))
    try:
        yield
    finally:
        options.resource_limits = saved


def run_pipeline(source, folder: PredictionsFolder, schema: pa.Schema, config: ScoreConfig, info: ModelInfo,
                 run_id: str, counter, total: int, total_known: bool = True, read_args: dict | None = None) -> dict:
    """Score the paths a Ray Data `source` yields into new part files of `folder`, in `schema`.

    `total`: files to score (for block sizes and progress); with `total_known` False a streaming
    listing reports them to the progress `counter` as it goes. `read_args`: Ray options of the
    source's read tasks. Returns the predictor pool: {min, max, why, peak} (peak: most alive at once).

    Raises:
        ModelLoadError: a model the actors cannot load (exit 2). The driver checks the artifact
            without loading it; what only loading can find (corrupt weights, shapes that do not
            fit classes.json) surfaces as an actor that died in __init__.
    """
    from ray.exceptions import RayActorError

    try:
        return _run(source, folder, schema, config, info, run_id, counter, total, total_known, read_args)
    except RayActorError as exc:
        found = re.search(r"ModelLoadError: (.+)", str(exc))
        if exc.actor_init_failed and found:
            raise ModelLoadError(found.group(1).strip()) from exc
        raise


def _run(source, folder: PredictionsFolder, schema: pa.Schema, config: ScoreConfig, info: ModelInfo, run_id: str,
         counter, total: int, total_known: bool, read_args: dict | None) -> dict:
    import ray

    from catdog.score.predictor import Predictor

    batch_size = config.effective_batch_size
    predictor_resources = {"num_cpus": PREDICTOR_CPUS}
    if config.use_gpu:
        predictor_resources["num_gpus"] = config.gpus_per_worker
    plan = plan_pool(config)
    pool = _actor_pool(config, plan)
    budget = object_store_budget(total, batch_size, info.image_size, pool.max_size)
    logger.info("Predictor pool: min %d, max %d (%s)", plan.min_size, plan.max_size, plan.why)
    with _object_store_budget(budget), PoolWatcher(plan) as watcher, progress.logging_progress(
            counter, total if total_known else None, config.progress_interval_s):
        ds = ray.data.read_datasource(source, ray_remote_args={"num_cpus": DECODE_CPUS, **(read_args or {})})
        ds = ds.map_batches(
            decode_batch,
            fn_kwargs={"image_size": info.image_size, "max_pixels": config.max_image_pixels,
                       "max_bytes": config.max_file_bytes, "read_timeout_s": config.read_timeout_s,
                       "counter": counter},
            batch_size=batch_size,
            batch_format="pyarrow",
            num_cpus=DECODE_CPUS,
        )
        ds = ds.map_batches(
            Predictor,
            fn_constructor_kwargs={"info": info, "precision": config.precision, "use_gpu": config.use_gpu,
                                   "schema": schema, "progress": counter},
            compute=pool,
            batch_size=batch_size,
            batch_format="numpy",
            **predictor_resources,
        )
        ds.write_parquet(
            folder.root,
            filesystem=folder.fs,
            filename_provider=folder.filename_provider(run_id),
            partition_cols=[config.partition_by] if config.partition_by else None,
            min_rows_per_file=config.rows_per_file,
            ray_remote_args={"num_cpus": WRITE_CPUS},
            schema=schema,
        )
    return {**plan.as_dict(), "peak": watcher.peak}
