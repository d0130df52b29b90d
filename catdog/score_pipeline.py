"""The scoring pipeline on Ray Data: listed paths -> decode (CPU tasks) -> predict (actor pool) -> Parquet.

    source (catdog.score_sources: the listing as it streams, or planned _todo/ files)
          --map_batches(decode_batch)--> one row per file, pixels or an error
          --map_batches(Predictor, ActorPoolStrategy)--> prediction rows (predictions schema)
          --write_parquet(our file names)

Decoding runs in tasks with fractional CPUs while the predictor actors run the model, so the two
overlap; Ray Data's streaming executor bounds what is in flight. On CPU each predictor runs two
batches at once, each op on half the cores (`catdog.actor_pool`). Per-row Python happens only in
decoding (Pillow) -- never in the model call.

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

import pyarrow as pa
import pyarrow.compute as pc

from catdog import imaging, inputs, progress
from catdog.actor_pool import model_actor_pool
from catdog.errors import ModelLoadError
from catdog.predictions_folder import PredictionsFolder, predictions_schema
from catdog.run_folder import ModelInfo
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


def decode_batch(batch: pa.Table, image_size: int, max_pixels: int, max_bytes: int) -> pa.Table:
    """Read and decode a batch of listed paths; every path gives one row (pixels, or an error).

    Returns an Arrow table with explicit types, so an all-null `error` column stays a string column.
    File size and time travel on as int64 with -1 for unknown: the predictor gets numpy batches,
    which hold no nulls.
    """
    from ray.data.extensions import ArrowTensorArray

    decoded = imaging.read_and_decode(batch[inputs.PATH_COLUMN].to_pylist(), image_size, max_pixels, max_bytes)
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


def run_pipeline(source, total: int, with_true_label: bool, config: ScoreConfig, info: ModelInfo, run_id: str,
                 counter, total_known: bool = True, read_args: dict | None = None) -> None:
    """Score the paths a Ray Data `source` yields into new part files of `config.output`.

    `total`: files to score (for block sizes and progress); with `total_known` False a streaming
    listing reports them to the progress `counter` as it goes. `read_args`: Ray options of the
    source's read tasks.
    """
    import ray

    from catdog.predictor import Predictor

    batch_size = config.effective_batch_size
    schema = predictions_schema(info.class_names, with_true_label=with_true_label)
    predictor_resources = {"num_cpus": PREDICTOR_CPUS}
    if config.use_gpu:
        predictor_resources["num_gpus"] = config.gpus_per_worker
    pool = _actor_pool(config)
    budget = object_store_budget(total, batch_size, info.image_size, pool.max_size)
    with _object_store_budget(budget), progress.logging_progress(counter, total if total_known else None,
                                                                 config.progress_interval_s):
        ds = ray.data.read_datasource(source, ray_remote_args={"num_cpus": DECODE_CPUS, **(read_args or {})})
        ds = ds.map_batches(
            decode_batch,
            fn_kwargs={"image_size": info.image_size, "max_pixels": config.max_image_pixels,
                       "max_bytes": config.max_file_bytes},
            batch_size=batch_size,
            batch_format="pyarrow",
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


def run_reporting_model_errors(*args, **kwargs) -> None:
    """`run_pipeline`; a model the actors cannot load is the user's ModelLoadError (exit 2).

    The driver checks the artifact without loading it; what only loading can find (corrupt
    weights, shapes that do not fit classes.json) surfaces here as an actor that died in __init__.
    """
    from ray.exceptions import RayActorError

    try:
        run_pipeline(*args, **kwargs)
    except RayActorError as exc:
        found = re.search(r"ModelLoadError: (.+)", str(exc))
        if exc.actor_init_failed and found:
            raise ModelLoadError(found.group(1).strip()) from exc
        raise
