"""The per-worker Ray Train loop: fits the classifier head data-parallel under MultiWorkerMirroredStrategy.

Keras 3 `model.fit` under MultiWorkerMirroredStrategy is broken (ray issue 47464), so this is a
custom loop: `strategy.run(step)` inside a `tf.function`, per-example losses averaged with
`tf.nn.compute_average_loss` over the global batch, and a Keras 3 optimizer whose gradients are
all-reduced across workers.

Cached mode: each worker reads only its own shard of the embeddings from the object store
(`catdog.train.data.shard_refs`), reshuffled within the shard each epoch (`catdog.train.embedding_shards`),
and evaluates its own contiguous range of the validation rows; loss and accuracy are summed over
workers, so all take the same early-stopping decision on the same numbers, and rank 0 gathers the
validation logits (not the embeddings) at the end. Memory per worker: its 1/N of the embeddings.
End-to-end mode: decoded images come as Ray Data shards; every worker evaluates the whole
validation set.

Each epoch every worker calls `ray.train.report` (a barrier) with its metrics and a fingerprint
of its own head weights; rank 0 attaches a small checkpoint (`catdog.train.checkpoints`), from
which a restarted worker group resumes at the next epoch, and writes TensorBoard scalars
(`catdog.train.tensorboard`). Seeds: see `catdog.train.seeds`.

The loop's steps, in the order every worker runs them (collectives must come in the same order on
every rank): `build_models` (head, best copy, optimizer; end-to-end: backbone and augmenter),
`restore_and_seed` (the latest checkpoint, then each rank's own seeds), `DistributedSteps` (the
tf.functions: training step, forward pass, all-reduce and gather), `record_worker_group` (dropout
seeds and nodes by rank), the input pipeline (`CachedInputs` or `EndToEndInputs`), `run_epochs`
(`train_epoch`, `keep_best`, `report_epoch`) and `collect_results`. The TensorFlow side
(`DistributedSteps`, the input pipelines) is `catdog.train.worker_steps`, imported on the workers
only: this module loads no TensorFlow. Its settings: `catdog.train.loop_config.WorkerLoopConfig`.
"""

from __future__ import annotations

import hashlib
import logging
import resource
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from catdog.model.tensorflow_setup import configure_tensorflow
from catdog.train.checkpoints import restore_checkpoint, save_checkpoint
from catdog.train.loop_config import WorkerLoopConfig
from catdog.train.seeds import seed_worker_randomness, worker_seed
from catdog.train.tensorboard import EpochScalars

if TYPE_CHECKING:
    from catdog.model.build import ModelSpec
    from catdog.train.worker_steps import CachedInputs, DistributedSteps, EndToEndInputs

logger = logging.getLogger(__name__)

TEXT_WIDTH = 64  # bytes gathered per string; a Ray node id is 56 hex characters


def head_fingerprint(head) -> str:
    """Hash of a head's weight values: equal on every worker when they are in sync."""
    digest = hashlib.sha256()
    for weight in head.get_weights():
        digest.update(np.ascontiguousarray(weight).tobytes())
    return digest.hexdigest()[:16]


def _build_augmenter(image_size: int):
    """Random flip, rotation and crop (90% of the side, resized back); identity when not training."""
    import keras

    crop = max(32, int(image_size * 0.9))
    return keras.Sequential(
        [
            keras.layers.RandomFlip("horizontal"),
            keras.layers.RandomRotation(0.1, fill_mode="reflect"),
            keras.layers.RandomCrop(crop, crop),
            keras.layers.Resizing(image_size, image_size),
        ],
        name="augment",
    )


def encode_text(text: str) -> np.ndarray:
    """A short ASCII string (a node id) as TEXT_WIDTH float64 byte codes, zero-padded: collectives
    move numbers, and float64 keeps every byte exact."""
    raw = text.encode("ascii")
    if len(raw) > TEXT_WIDTH:
        raise ValueError(f"{text!r} is longer than {TEXT_WIDTH} bytes")
    codes = np.zeros(TEXT_WIDTH, np.float64)
    codes[:len(raw)] = np.frombuffer(raw, np.uint8)
    return codes


def decode_text(codes: np.ndarray) -> str:
    return bytes(np.asarray(codes)[np.asarray(codes) > 0].astype(np.uint8)).decode("ascii")


def train_loop_per_worker(train_loop_config: dict) -> dict | None:
    """Ray Train entry point, run on every worker: the steps of the module docstring, in order.

    Args:
        train_loop_config: `WorkerLoopConfig.as_train_loop_config()`, built by catdog.train.run.

    Returns:
        On rank 0: the validation logits of the best head, their labels and file paths, for the
        driver's temperature scaling and validation report, the loop state, each rank's dropout
        seed and memory. None on the other ranks.
    """
    config = WorkerLoopConfig.from_train_loop_config(train_loop_config)
    configure_tensorflow(config.use_gpu)
    import ray.train
    import tensorflow as tf

    from catdog.model import build as catdog_model
    from catdog.train.worker_steps import CachedInputs, DistributedSteps, EndToEndInputs

    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    spec = catdog_model.ModelSpec(**config.model_spec)
    strategy = tf.distribute.MultiWorkerMirroredStrategy()
    models = build_models(config, spec, strategy, rank)
    state, resumed_from = restore_and_seed(models, config.seed, rank)
    steps = DistributedSteps(strategy, models, world, config.end_to_end)
    dropout_seeds = record_worker_group(steps, models.head, state, resumed_from)
    inputs = EndToEndInputs(config, rank, world) if config.end_to_end else CachedInputs(config, rank, steps)
    run_epochs(config, rank, resumed_from, models, steps, inputs, state)
    return collect_results(rank, models, steps, inputs, state, dropout_seeds)


# ---- model and optimizer ---------------------------------------------------------------------------
@dataclass
class Models:
    """A worker's Keras objects. The head and the optimizer are mirrored (built in the strategy's scope)."""

    spec: ModelSpec
    head: Any  # the head being trained
    logits_model: Any  # the head up to its logits: what the loss and the validation take
    optimizer: Any  # Keras 3 Adam, built on the head's trainable variables
    best_head: Any  # a plain (not mirrored) copy of the best weights so far
    best_logits_model: Any
    extractor: Any = None  # end-to-end: the frozen backbone
    augmenter: Any = None  # end-to-end with augment


def build_models(config: WorkerLoopConfig, spec: ModelSpec, strategy, rank: int) -> Models:
    """The head (from the run seed: the same on every worker), its best copy and the optimizer; end to
    end also the backbone, refused unless its weights are the driver's, and the augmenter."""
    import keras

    from catdog.model import build as catdog_model

    keras.utils.set_random_seed(config.seed)  # same initial head everywhere (MWMS broadcasts too)
    with strategy.scope():
        head = catdog_model.build_head(spec)
        logits_model = keras.Model(head.input, head.get_layer("logits").output)
        optimizer = keras.optimizers.Adam(config.learning_rate)
        optimizer.build(head.trainable_variables)
    best_head = catdog_model.build_head(spec)
    models = Models(spec, head, logits_model, optimizer, best_head,
                    keras.Model(best_head.input, best_head.get_layer("logits").output))
    if config.end_to_end:
        models.extractor = catdog_model.build_feature_extractor(spec, config.weights, config.backbone_seed)
        found = catdog_model.weights_fingerprint(models.extractor)
        if found != config.backbone_fingerprint:
            raise RuntimeError(f"worker {rank} built backbone {found}, the driver {config.backbone_fingerprint}")
        if config.augment:
            models.augmenter = _build_augmenter(spec.image_size)
    return models


# ---- checkpoint and seeds --------------------------------------------------------------------------
def restore_and_seed(models: Models, run_seed: int, rank: int) -> tuple[dict, int]:
    """Load the latest checkpoint into the models, then seed this rank's own randomness.

    Returns:
        The loop state (catdog.train.checkpoints) and the epoch it resumes after (0: a fresh start).
    """
    import ray.train

    state = restore_checkpoint(ray.train.get_checkpoint(), models.head, models.best_head, models.optimizer)
    resumed_from = state["epoch"]
    if resumed_from:
        logger.info("Worker %d resumes after epoch %d", rank, resumed_from)
    # weights are equal everywhere by now; from here on each rank draws its own masks
    own_seed = worker_seed(run_seed, rank, resumed_from + 1)
    seed_worker_randomness([models.head] + ([models.augmenter] if models.augmenter is not None else []), own_seed)
    return state, resumed_from


def record_worker_group(steps: DistributedSteps, head, state: dict, resumed_from: int) -> list[int]:
    """Each rank's dropout seed, for metrics.json (-1: no dropout), returned; each rank's node, appended
    to the checkpointed state's attempts (metrics.json lists the restarts)."""
    import ray

    # the seed each rank's dropout holds now (exact in float64: 32-bit); no state when dropout is 0
    dropout_state = next((v for v in head.variables if v.name == "seed_generator_state"), None)
    own_dropout_seed = [float(dropout_state.numpy()[0]) if dropout_state is not None else -1.0]
    dropout_seeds = [int(v) for v in steps.gather_over_workers(own_dropout_seed)[:, 0]]
    own_node = encode_text(ray.get_runtime_context().get_node_id())
    node_ids = [decode_text(row) for row in steps.gather_over_workers(own_node)]
    state.setdefault("attempts", []).append({"resumed_from": resumed_from, "node_ids": node_ids})
    return dropout_seeds


# ---- epochs: train, validate, keep the best head, report with a checkpoint --------------------------
def run_epochs(config: WorkerLoopConfig, rank: int, resumed_from: int, models: Models, steps: DistributedSteps,
               inputs: CachedInputs | EndToEndInputs, state: dict) -> None:
    """Train from the epoch after `state`'s to `config.epochs` or early stopping, updating `state`.

    Each epoch every worker reports (a barrier) its metrics and its head's fingerprint; rank 0 attaches
    the checkpoint, then writes TensorBoard scalars and logs the epoch.
    """
    import keras

    scalars = EpochScalars(config.tensorboard_dir) if rank == 0 and config.tensorboard_dir else None
    for epoch in range(state["epoch"] + 1, config.epochs + 1):
        if state["stopped_early"]:
            break
        row = train_epoch(epoch, steps, inputs, models.logits_model)
        keep_best(state, row, models, config.patience)
        metrics = dict(row, weights_fingerprint=head_fingerprint(models.head), rank=rank, resumed_from=resumed_from)
        report_epoch(epoch, metrics, models, state, rank)
        if scalars is not None:  # after the checkpoint: a restarted group resumes after the last epoch written
            learning_rate = float(keras.ops.convert_to_numpy(models.optimizer.learning_rate))
            scalars.write(epoch, {**row, "learning_rate": learning_rate})
        if rank == 0:
            logger.info("Epoch %d/%d: %s", epoch, config.epochs, {k: round(v, 4) for k, v in row.items()})
    if scalars is not None:
        scalars.close()


def train_epoch(epoch: int, steps: DistributedSteps, inputs: CachedInputs | EndToEndInputs, logits_model) -> dict:
    """One pass over this worker's training batches, then the validation: the epoch's history row."""
    started = time.perf_counter()
    totals = np.zeros(3)
    for batch in inputs.train_batches(epoch):
        totals += np.array([float(v) for v in steps.train_step(batch)])
    val_loss, val_accuracy = inputs.validation_metrics(steps, logits_model)
    return {
        "epoch": epoch,
        "loss": float(totals[0] / max(totals[2], 1.0)),
        "accuracy": float(totals[1] / max(totals[2], 1.0)),
        "val_loss": val_loss,
        "val_accuracy": val_accuracy,
        "epoch_time_s": round(time.perf_counter() - started, 3),
    }


def keep_best(state: dict, row: dict, models: Models, patience: int) -> None:
    """Record the epoch in `state`; keep the head if its val_loss is the best so far, else count
    towards early stopping (patience 0: never)."""
    state["history"].append(row)
    state["epoch"] = row["epoch"]
    if state["best_val_loss"] is None or row["val_loss"] < state["best_val_loss"]:
        state.update(best_val_loss=row["val_loss"], best_epoch=row["epoch"], bad_epochs=0)
        models.best_head.set_weights(models.head.get_weights())
    else:
        state["bad_epochs"] += 1
        state["stopped_early"] = 0 < patience <= state["bad_epochs"]


def report_epoch(epoch: int, metrics: dict, models: Models, state: dict, rank: int) -> None:
    """`ray.train.report` of this worker's metrics; rank 0 attaches the checkpoint a restarted group resumes from."""
    import ray.train

    with tempfile.TemporaryDirectory(prefix="catdog-ckpt-") as folder:
        checkpoint = None
        if rank == 0:
            save_checkpoint(Path(folder), models.head, models.best_head, models.optimizer, state)
            checkpoint = ray.train.Checkpoint.from_directory(folder)
        ray.train.report(metrics, checkpoint=checkpoint,
                         checkpoint_dir_name=f"epoch-{epoch:04d}-{uuid.uuid4().hex[:8]}")


# ---- best head on the validation set, for temperature scaling ----------------------------------------
def collect_results(rank: int, models: Models, steps: DistributedSteps, inputs: CachedInputs | EndToEndInputs,
                    state: dict, dropout_seeds: list[int]) -> dict | None:
    """The best head's validation logits and what each rank held; every rank takes part in the gathers."""
    logits, labels, paths = inputs.all_validation_logits(steps, models.best_logits_model)
    # what each rank held: its embeddings (cached mode) and its process's peak memory, in MiB
    own = [inputs.embeddings_mib, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024]
    held = steps.gather_over_workers(own)
    if rank != 0:
        return None
    return {"val_logits": logits.astype(np.float32), "val_labels": labels, "val_paths": paths, "state": state,
            "dropout_seeds": dropout_seeds,
            "memory_by_rank": [{"rank": r, "embeddings_mib": round(float(e), 2), "peak_rss_mib": round(float(m))}
                               for r, (e, m) in enumerate(held)]}
