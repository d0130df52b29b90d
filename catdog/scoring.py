"""Batch scoring with Ray Data: listed files -> decode (CPU tasks) -> predict (actor pool) -> Parquet.

    paths --from_blocks--> decode: read_and_decode, one row per file, errors kept as rows
          --map_batches(Predictor, ActorPoolStrategy)--> prediction rows (predictions schema)
          --write_parquet(our file names)--> account: rows == files, no duplicates --> _SUCCESS.json

Decoding runs in tasks with fractional CPUs while the predictor actors run the model, so the two
overlap; Ray Data's streaming executor bounds what is in flight. On CPU each predictor runs two
batches at once, each op on half the cores (`catdog.actor_pool.configure_model_actor`). Per-row
Python happens only in decoding (Pillow) -- never in the model call.

Memory, per process: a decode task holds one batch of decoded pixels (batch x size^2 x 3 bytes)
plus one full-size image while decoding it (bounded by --max-image-pixels: 100 MP x 3 B = 0.3 GB at
the default; JPEGs decode at reduced scale). A predictor actor holds TensorFlow, the model and the
activations of the two batches it runs at once on CPU (peak: benchmarks/README.md, Scoring speed).
When the object store fills, Ray Data backpressures the decode stage and Ray spills objects to
disk rather than failing. Decoded pixels in flight are capped per run (`object_store_budget`), so
memory does not grow with the number of images.
"""

from __future__ import annotations

import contextlib
import logging
import math
import re
import time

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

import catdog
from catdog import imaging, inputs, progress
from catdog.actor_pool import model_actor_pool
from catdog.errors import ModelLoadError
from catdog.predictor import ModelInfo
from catdog.predictions_folder import AccountingError, PredictionsFolder, new_run_id, now_iso, plan_resume
from catdog.ray_session import init_ray
from catdog.schema import predictions_schema
from catdog.score_config import ScoreConfig

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


def decode_batch(batch: dict[str, np.ndarray], image_size: int, max_pixels: int, max_bytes: int) -> pa.Table:
    """Read and decode a batch of paths; every path gives one row (pixels, or an error).

    Returns an Arrow table with explicit types, so an all-null `error` column stays a string column.
    """
    from ray.data.extensions import ArrowTensorArray

    decoded = imaging.read_and_decode(list(batch["path"]), image_size, max_pixels, max_bytes)
    columns = {
        "path": pa.array(batch["path"], pa.string()),
        "image": ArrowTensorArray.from_numpy(decoded["image"]),
        "width": pa.array(decoded["width"], pa.int32()),
        "height": pa.array(decoded["height"], pa.int32()),
        "error": pa.array(list(decoded["error"]), pa.string()),
        inputs.SIZE_COLUMN: pa.array(batch[inputs.SIZE_COLUMN], pa.int64()),
        inputs.MODIFIED_COLUMN: pa.array(batch[inputs.MODIFIED_COLUMN], pa.int64()),
    }
    if inputs.TRUE_LABEL_COLUMN in batch:
        columns[inputs.TRUE_LABEL_COLUMN] = pa.array(batch[inputs.TRUE_LABEL_COLUMN], pa.string())
    return pa.table(columns)


def _actor_pool(config: ScoreConfig):
    """The predictor pool: fixed, autoscaling, or one per GPU; on CPU each actor runs two batches at once."""
    import ray

    if config.num_workers is not None:
        size = {"size": config.num_workers}
    elif config.min_workers is not None:
        size = {"min_size": config.min_workers, "max_size": config.max_workers}
    elif config.use_gpu:
        size = {"size": max(1, int(ray.cluster_resources().get("GPU", 0) // config.gpus_per_worker))}
    else:
        size = {"size": 1}
    return model_actor_pool(config.use_gpu, **size)


def _block_rows(total: int, batch_size: int) -> int:
    rows = max(batch_size, min(MAX_PATHS_PER_BLOCK, math.ceil(total / TARGET_BLOCKS)))
    return math.ceil(rows / batch_size) * batch_size


def _blocks(table: pa.Table, batch_size: int) -> list[pa.Table]:
    rows = _block_rows(table.num_rows, batch_size)
    return [table.slice(start, rows) for start in range(0, table.num_rows, rows)]


def object_store_budget(total: int, batch_size: int, image_size: int, predictors: int) -> int:
    """Bytes of object store one run may fill: 8 decoded blocks, 32 batches per predictor, 512 MiB
    at least -- independent of how many images there are."""
    image_bytes = image_size * image_size * 3
    block = _block_rows(total, batch_size) * image_bytes
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


def _pipeline_columns(todo: pa.Table) -> pa.Table:
    """The listing as the pipeline carries it: file size and time as int64, -1 where unknown."""
    size = pc.fill_null(todo[inputs.SIZE_COLUMN], -1)
    modified = pc.fill_null(todo[inputs.MODIFIED_COLUMN].cast(pa.int64()), -1)
    return (todo.set_column(todo.schema.get_field_index(inputs.SIZE_COLUMN), inputs.SIZE_COLUMN, size)
            .set_column(todo.schema.get_field_index(inputs.MODIFIED_COLUMN), inputs.MODIFIED_COLUMN, modified))


def run_pipeline(todo: pa.Table, config: ScoreConfig, info: ModelInfo, run_id: str) -> None:
    """Score the `todo` paths into new part files of `config.output`."""
    import ray

    from catdog.predictor import Predictor

    batch_size = config.effective_batch_size
    with_true_label = inputs.TRUE_LABEL_COLUMN in todo.column_names
    schema = predictions_schema(info.class_names, with_true_label=with_true_label)
    predictor_resources = {"num_cpus": PREDICTOR_CPUS}
    if config.use_gpu:
        predictor_resources["num_gpus"] = config.gpus_per_worker
    pool = _actor_pool(config)
    budget = object_store_budget(todo.num_rows, batch_size, info.image_size, pool.max_size)
    counter = progress.start_counter()
    with _object_store_budget(budget), progress.logging_progress(counter, todo.num_rows, config.progress_interval_s):
        # from_blocks, not from_arrow: from_arrow runs a remote metadata task per block, which on a
        # fresh local Ray waits for worker processes to boot before the first decode.
        ds = ray.data.from_blocks(_blocks(_pipeline_columns(todo), batch_size))
        ds = ds.map_batches(
            decode_batch,
            fn_kwargs={"image_size": info.image_size, "max_pixels": config.max_image_pixels,
                       "max_bytes": config.max_file_bytes},
            batch_size=batch_size,
            batch_format="numpy",
            num_cpus=DECODE_CPUS,
        )
        ds = ds.map_batches(
            Predictor,
            fn_constructor_kwargs={"info": info, "precision": config.precision, "use_gpu": config.use_gpu,
                                   "with_true_label": with_true_label, "progress": counter},
            compute=pool,
            batch_size=batch_size,
            batch_format="numpy",
            **predictor_resources,
        )
        folder = PredictionsFolder(config.output)
        ds.write_parquet(
            folder.root,
            filesystem=folder.fs,
            filename_provider=folder.filename_provider(run_id),
            partition_cols=[config.partition_by] if config.partition_by else None,
            min_rows_per_file=config.rows_per_file,
            ray_remote_args={"num_cpus": WRITE_CPUS},
            schema=schema,
        )


def _run_reporting_model_errors(todo: pa.Table, config: ScoreConfig, info: ModelInfo, run_id: str) -> None:
    """Run the pipeline; a model the actors cannot load is the user's ModelLoadError (exit 2).

    The driver checks the artifact without loading it; what only loading can find (corrupt
    weights, shapes that do not fit classes.json) surfaces here as an actor that died in __init__.
    """
    from ray.exceptions import RayActorError

    try:
        run_pipeline(todo, config, info, run_id)
    except RayActorError as exc:
        found = re.search(r"ModelLoadError: (.+)", str(exc))
        if exc.actor_init_failed and found:
            raise ModelLoadError(found.group(1).strip()) from exc
        raise


def score(config: ScoreConfig) -> dict:
    """Score every image of `config.input` into `config.output`; return the _SUCCESS.json summary.

    Raises:
        InputError: missing or empty input (nothing is written).
        ModelLoadError: missing, unsafe or inconsistent model (nothing is written).
        OutputExistsError: output not empty and neither overwrite nor resume asked, or an output
            that is a root, the home folder, or overlaps the input (nothing is written).
        AccountingError: the written rows do not match the listed files (exit 1).
    """
    started = time.monotonic()
    folder = PredictionsFolder(config.output)
    folder.refuse_unsafe(config.input)
    folder.refuse_existing(overwrite=config.overwrite, resume=config.resume)
    listing = inputs.list_inputs(config.input, follow_symlinks=config.follow_symlinks)
    return score_listing(config, listing, started)


def score_listing(config: ScoreConfig, listing: inputs.InputListing, started: float | None = None) -> dict:
    """Score an already listed input (see `score`); files may change between listing and reading."""
    from catdog.predictor import describe_model

    started = time.monotonic() if started is None else started
    folder = PredictionsFolder(config.output)
    folder.refuse_unsafe(config.input)
    run_id = new_run_id()
    info = describe_model(config.model)
    schema = predictions_schema(info.class_names, with_true_label=listing.has_true_label)
    run_info = {
        "run_id": run_id, "started_at": now_iso(), "model": config.model, "model_id": info.model_id,
        "class_names": list(info.class_names), "partition_by": config.partition_by,
        "with_true_label": listing.has_true_label, "input": config.input, "catdog_version": catdog.__version__,
    }
    state = folder.prepare(overwrite=config.overwrite, resume=config.resume, run_info=run_info, schema=schema)
    plan = plan_resume(listing.table, state.done)
    _report_changed_input(plan, config)
    replaced = folder.remove_rows(pa.concat_arrays([plan.changed, plan.unlisted]) if config.drop_unlisted
                                  else plan.changed, run_id, schema)
    todo = plan.todo
    logger.info("Run %s: scoring %d of %d files from %s into %s (%s, batch %d)", run_id, todo.num_rows,
                listing.num_files, config.input, config.output, config.precision, config.effective_batch_size)
    if todo.num_rows:
        init_ray(config.ray_address)
        try:
            _run_reporting_model_errors(todo, config, info, run_id)
        except ModelLoadError:
            folder.discard_if_empty(state.created)  # no trace of a run that wrote no row
            raise
    listed = listing.table["path"].combine_chunks()
    kept_unlisted = None if config.drop_unlisted else plan.unlisted
    try:
        counts = folder.account(listed, kept_unlisted)
    except AccountingError:
        if not folder.drop_superseded_files(run_id):
            raise
        counts = folder.account(listed, kept_unlisted)
    wall = time.monotonic() - started
    summary = {
        **run_info,
        "output": config.output,
        "precision": config.precision,
        "files_listed": listing.num_files,
        "skipped_while_listing": listing.skipped,
        **counts,
        "rows_scored_this_run": todo.num_rows,
        "rows_from_earlier_runs": listing.num_files - todo.num_rows,
        "rescored_changed_files": len(plan.changed),
        "rows_removed": replaced,
        "quarantined_files": state.quarantined,
        "finished_at": now_iso(),
        "wall_time_s": round(wall, 3),
        "images_per_s": round(todo.num_rows / wall, 3) if wall > 0 else None,
        "schema": {f.name: str(f.type) for f in schema},
    }
    folder.write_success(summary)
    logger.info("Run %s done: %d rows (%d errors %s) in %.1f s, %.1f images/s", run_id, summary["rows_written"],
                summary["errors"], summary["errors_by_kind"], wall, summary["images_per_s"] or 0.0)
    return summary


def _report_changed_input(plan, config: ScoreConfig) -> None:
    if len(plan.changed):
        logger.warning("--resume: %d files changed since they were scored (size or time); scoring them again",
                       len(plan.changed))
    if len(plan.unlisted):
        action = "removing their rows (--drop-unlisted)" if config.drop_unlisted else (
            "their rows are kept and left out of the check (pass --drop-unlisted to remove them)")
        logger.warning("--resume: %d paths with rows are no longer listed in %s (e.g. %s); %s", len(plan.unlisted),
                       config.input, plan.unlisted[0].as_py(), action)
