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
"""

from __future__ import annotations

import hashlib
import logging
import resource
import tempfile
import time
import uuid
from pathlib import Path

import numpy as np

from catdog.model.tensorflow_setup import configure_tensorflow
from catdog.train.checkpoints import restore_checkpoint, save_checkpoint
from catdog.train.embedding_shards import cached_batches, embedding_arrays
from catdog.train.seeds import seed_worker_randomness, shuffle_seed, worker_seed
from catdog.train.tensorboard import EpochScalars

logger = logging.getLogger(__name__)

VAL_BATCH_SIZE = 256  # forward-only; bounded memory even for flatten features
SHUFFLE_BUFFER = 2048  # end-to-end mode: decoded images mixed locally across Ray Data blocks
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


def train_loop_per_worker(config: dict) -> dict | None:
    """Ray Train entry point, run on every worker. `config` is built by catdog.train.run.

    Returns (rank 0 only) the validation logits of the best head, their labels and file paths,
    for the driver's temperature scaling and validation report, and each rank's dropout seed.
    """
    configure_tensorflow(config["use_gpu"])
    import keras
    import ray.train
    import tensorflow as tf

    from catdog.model import build as catdog_model

    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    spec = catdog_model.ModelSpec(**config["model_spec"])
    end_to_end = config["mode"] == "end-to-end"
    strategy = tf.distribute.MultiWorkerMirroredStrategy()

    # ---- model and optimizer -------------------------------------------------------------------
    keras.utils.set_random_seed(config["seed"])  # same initial head everywhere (MWMS broadcasts too)
    with strategy.scope():
        head = catdog_model.build_head(spec)
        logits_model = keras.Model(head.input, head.get_layer("logits").output)
        optimizer = keras.optimizers.Adam(config["learning_rate"])
        optimizer.build(head.trainable_variables)
    best_head = catdog_model.build_head(spec)  # a plain (not mirrored) copy of the best weights so far
    best_logits_model = keras.Model(best_head.input, best_head.get_layer("logits").output)
    extractor = augmenter = None
    if end_to_end:
        extractor = catdog_model.build_feature_extractor(spec, config["weights"], config["backbone_seed"])
        found = catdog_model.weights_fingerprint(extractor)
        if found != config["backbone_fingerprint"]:
            raise RuntimeError(f"worker {rank} built backbone {found}, the driver {config['backbone_fingerprint']}")
        if config["augment"]:
            augmenter = _build_augmenter(spec.image_size)
    state = restore_checkpoint(ray.train.get_checkpoint(), head, best_head, optimizer)
    resumed_from = state["epoch"]
    if resumed_from:
        logger.info("Worker %d resumes after epoch %d", rank, resumed_from)
    # weights are equal everywhere by now; from here on each rank draws its own masks
    own_seed = worker_seed(config["seed"], rank, resumed_from + 1)
    seed_worker_randomness([head] + ([augmenter] if augmenter is not None else []), own_seed)
    # None when dropout is 0 (Keras then makes no seed generator)
    dropout_state = next((v for v in head.variables if v.name == "seed_generator_state"), None)

    # ---- steps ---------------------------------------------------------------------------------
    loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True, reduction=None)

    def inputs(batch, training):
        if not end_to_end:
            return tf.reshape(batch["features"], (-1, *spec.feature_shape))
        pixels = tf.cast(batch["image"], tf.float32)
        if augmenter is not None and training:
            pixels = augmenter(pixels, training=True)
        return extractor(pixels, training=False)

    def replica_step(batch):
        labels = tf.cast(batch["label"], tf.int32)
        x = inputs(batch, training=True)
        with tf.GradientTape() as tape:
            logits = logits_model(x, training=True)
            per_example = loss_fn(labels, logits)
            loss = tf.nn.compute_average_loss(per_example, global_batch_size=tf.shape(labels)[0] * world)
        gradients = tape.gradient(loss, head.trainable_variables)
        optimizer.apply_gradients(zip(gradients, head.trainable_variables))
        correct = tf.cast(tf.equal(tf.argmax(logits, axis=-1, output_type=tf.int32), labels), tf.float32)
        count = tf.cast(tf.shape(labels)[0], tf.float32)
        return tf.reduce_sum(per_example), tf.reduce_sum(correct), count

    @tf.function(reduce_retracing=True)
    def train_step(batch):
        sums = strategy.run(replica_step, args=(batch,))
        return [strategy.reduce(tf.distribute.ReduceOp.SUM, value, axis=None) for value in sums]

    @tf.function(reduce_retracing=True)
    def forward(model, batch):
        return model(inputs(batch, training=False), training=False)

    @tf.function
    def mean_over_workers(values):
        per_replica = strategy.run(lambda: tf.identity(values))
        return strategy.reduce(tf.distribute.ReduceOp.MEAN, per_replica, axis=None)

    @tf.function
    def sum_over_workers(values):
        per_replica = strategy.run(lambda: tf.identity(values))
        return strategy.reduce(tf.distribute.ReduceOp.SUM, per_replica, axis=None)

    @tf.function
    def gather_over_workers(values):  # [k] on each rank -> [world, k] in rank order
        per_replica = strategy.run(lambda: tf.identity(values)[tf.newaxis])
        return strategy.gather(per_replica, axis=0)

    # the seed each rank's dropout actually holds now (exact in float64: 32-bit), for metrics.json
    own_dropout_seed = tf.constant([float(dropout_state.numpy()[0]) if dropout_state is not None else -1.0], tf.float64)
    dropout_seeds = [int(v) for v in np.asarray(gather_over_workers(own_dropout_seed))[:, 0]]  # -1: no dropout
    # each worker group's nodes, by rank, kept in the checkpointed state: metrics.json lists the restarts
    own_node = tf.constant(encode_text(ray.get_runtime_context().get_node_id()), tf.float64)
    node_ids = [decode_text(row) for row in np.asarray(gather_over_workers(own_node))]
    state.setdefault("attempts", []).append({"resumed_from": resumed_from, "node_ids": node_ids})

    # ---- data: cached embeddings from the object store, or Ray Data shards of decoded images ------
    if end_to_end:
        train_shard = ray.train.get_dataset_shard("train")

        def train_batches(epoch: int):
            return train_shard.iter_tf_batches(batch_size=config["per_worker_batch_size"],
                                               local_shuffle_buffer_size=SHUFFLE_BUFFER,
                                               local_shuffle_seed=config["seed"] * 1000 + epoch * world + rank)

        def val_batches():  # NumPy batches: the path column stays Python strings
            return ray.train.get_dataset_shard("val").iter_batches(batch_size=VAL_BATCH_SIZE, batch_format="numpy")
    else:
        # refs in the config, or from the driver's handoff actor once it has computed them
        refs = config["feature_refs"] or ray.get(config["feature_handoff"].get.remote())
        train_arrays = embedding_arrays(ray.get(refs["train"][rank]))  # this worker's shard only
        val_arrays = embedding_arrays(ray.get(refs["val"][rank]))
        sizes = np.asarray(gather_over_workers(tf.constant([float(len(train_arrays[1]))], tf.float64)))[:, 0]
        rows_per_epoch = int(sizes.min())

        def train_batches(epoch: int):
            return cached_batches(*train_arrays, config["per_worker_batch_size"],
                                  seed=worker_seed(shuffle_seed(config["seed"], epoch), rank, epoch),
                                  rows_per_epoch=rows_per_epoch)

        def val_batches():
            return cached_batches(*val_arrays, VAL_BATCH_SIZE)

    def evaluate(model) -> tuple[np.ndarray, np.ndarray, list[str]]:
        """Logits, labels (and end-to-end: paths) of the validation rows this worker evaluates."""
        logits, labels, paths = [], [], []
        for batch in val_batches():
            model_inputs = {key: value for key, value in batch.items() if key != "path"}
            logits.append(np.asarray(forward(model, model_inputs)))
            labels.append(np.asarray(batch["label"]))
            paths.extend(str(path) for path in batch.get("path", ()))
        if not logits:
            return np.zeros((0, spec.num_classes)), np.zeros(0, np.int64), paths
        return np.concatenate(logits).astype(np.float64), np.concatenate(labels).astype(np.int64), paths

    def validation_metrics(model) -> tuple[float, float]:
        """Validation loss and accuracy over every worker's rows (sums all-reduced; end-to-end: mean)."""
        logits, labels, _ = evaluate(model)
        if end_to_end:  # every worker evaluated the whole set
            loss, accuracy = float(np.mean(loss_fn(labels, logits))), float(np.mean(np.argmax(logits, -1) == labels))
            return tuple(float(v) for v in mean_over_workers(tf.constant([loss, accuracy], tf.float64)))
        sums = [float(np.sum(loss_fn(labels, logits))) if len(labels) else 0.0,
                float(np.sum(np.argmax(logits, -1) == labels)), float(len(labels))]
        total_loss, correct, count = (float(v) for v in sum_over_workers(tf.constant(sums, tf.float64)))
        return total_loss / max(count, 1.0), correct / max(count, 1.0)

    def all_validation_logits(model) -> tuple[np.ndarray, np.ndarray, list[str]]:
        """Every validation row's logits, label and path, in table order (cached: gathered from the ranks)."""
        logits, labels, paths = evaluate(model)
        if end_to_end:
            return logits, labels, paths
        longest = int(np.asarray(gather_over_workers(tf.constant([float(len(labels))], tf.float64)))[:, 0].max())
        padded = np.full((longest, spec.num_classes + 2), -1.0)
        padded[:len(labels), :spec.num_classes] = logits
        padded[:len(labels), spec.num_classes] = labels
        padded[:len(labels), spec.num_classes + 1] = 1.0  # a real row, not padding
        every = np.asarray(gather_over_workers(tf.constant(padded.ravel(), tf.float64))).reshape(world, longest, -1)
        rows = every.reshape(-1, spec.num_classes + 2)
        rows = rows[rows[:, -1] == 1.0]
        paths = ray.get(refs["val_paths"]).to_pylist() if rank == 0 else []
        return rows[:, :spec.num_classes], rows[:, spec.num_classes].astype(np.int64), paths

    # ---- epochs --------------------------------------------------------------------------------
    scalars = EpochScalars(config["tensorboard_dir"]) if rank == 0 and config.get("tensorboard_dir") else None
    for epoch in range(state["epoch"] + 1, config["epochs"] + 1):
        if state["stopped_early"]:
            break
        started = time.perf_counter()
        totals = np.zeros(3)
        for batch in train_batches(epoch):
            totals += np.array([float(v) for v in train_step(batch)])
        val_loss, val_accuracy = validation_metrics(logits_model)
        row = {
            "epoch": epoch,
            "loss": float(totals[0] / max(totals[2], 1.0)),
            "accuracy": float(totals[1] / max(totals[2], 1.0)),
            "val_loss": val_loss,
            "val_accuracy": val_accuracy,
            "epoch_time_s": round(time.perf_counter() - started, 3),
        }
        state["history"].append(row)
        state["epoch"] = epoch
        if state["best_val_loss"] is None or val_loss < state["best_val_loss"]:
            state.update(best_val_loss=val_loss, best_epoch=epoch, bad_epochs=0)
            best_head.set_weights(head.get_weights())
        else:
            state["bad_epochs"] += 1
            state["stopped_early"] = 0 < config["patience"] <= state["bad_epochs"]
        metrics = dict(row, weights_fingerprint=head_fingerprint(head), rank=rank, resumed_from=resumed_from)
        with tempfile.TemporaryDirectory(prefix="catdog-ckpt-") as folder:
            checkpoint = None
            if rank == 0:
                save_checkpoint(Path(folder), head, best_head, optimizer, state)
                checkpoint = ray.train.Checkpoint.from_directory(folder)
            ray.train.report(metrics, checkpoint=checkpoint, checkpoint_dir_name=f"epoch-{epoch:04d}-{uuid.uuid4().hex[:8]}")
        if scalars is not None:  # after the checkpoint: a restarted group resumes after the last epoch written
            scalars.write(epoch, {**row, "learning_rate": float(keras.ops.convert_to_numpy(optimizer.learning_rate))})
        if rank == 0:
            logger.info("Epoch %d/%d: %s", epoch, config["epochs"], {k: round(v, 4) for k, v in row.items()})
    if scalars is not None:
        scalars.close()

    # ---- best head on the validation set, for temperature scaling --------------------------------
    logits, labels, paths = all_validation_logits(best_logits_model)  # every rank takes part in the gather
    # what each rank held: its embeddings (cached mode) and its process's peak memory, in MiB
    own = [0.0 if end_to_end else (sum(a.nbytes for a in train_arrays) + sum(a.nbytes for a in val_arrays)) / 2**20,
           resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024]
    held = np.asarray(gather_over_workers(tf.constant(own, tf.float64)))
    if rank != 0:
        return None
    return {"val_logits": logits.astype(np.float32), "val_labels": labels, "val_paths": paths, "state": state,
            "dropout_seeds": dropout_seeds,
            "memory_by_rank": [{"rank": r, "embeddings_mib": round(float(e), 2), "peak_rss_mib": round(float(m))}
                               for r, (e, m) in enumerate(held)]}
