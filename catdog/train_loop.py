"""The per-worker Ray Train loop: fits the classifier head data-parallel under MultiWorkerMirroredStrategy.

Keras 3 `model.fit` under MultiWorkerMirroredStrategy is broken (ray issue 47464), so this is a
custom loop: `strategy.run(step)` inside a `tf.function`, per-example losses averaged with
`tf.nn.compute_average_loss` over the global batch, and a Keras 3 optimizer whose gradients are
all-reduced across workers.

Cached mode: each worker reads only its own shard of the embeddings from the object store
(`catdog.training.shard_refs`), reshuffled within the shard each epoch, and evaluates its own
contiguous range of the validation rows; loss and accuracy are summed over workers, so all take
the same early-stopping decision on the same numbers, and rank 0 gathers the validation logits
(not the embeddings) at the end. Memory per worker: its 1/N of the embeddings. End-to-end mode:
decoded images come as Ray Data shards; every worker evaluates the whole validation set.

Each epoch every worker calls `ray.train.report` (a barrier) with its metrics and a fingerprint
of its own head weights; rank 0 attaches a small checkpoint (head, best head, optimizer state,
history), from which a restarted worker group resumes at the next epoch.

Rank 0 also writes TensorBoard scalars each epoch (`EpochScalars`): TensorFlow's file writer
into a local folder, copied into RUN/tensorboard/ through catdog.storage, since the run folder may
be an s3:// URI that TensorFlow cannot open without tensorflow-io.

Seeds: the run seed builds the head, so every worker starts from the same weights (MWMS also
broadcasts rank 0's initial values, the dropout seed state included). Then each worker re-seeds
its own randomness, dropout masks and augmentation, from `worker_seed` (run seed, rank, first
epoch it trains), so workers do not repeat each other's masks. Cached-mode shards are disjoint by
construction (dealt out by the driver), so each worker reshuffles its own shard with its own seed.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import resource
import shutil
import tempfile
import time
import uuid
from pathlib import Path

import numpy as np

from catdog import storage
from catdog.tensorflow_setup import configure_tensorflow

logger = logging.getLogger(__name__)

HEAD_WEIGHTS = "head.weights.h5"
BEST_HEAD_WEIGHTS = "best_head.weights.h5"
OPTIMIZER_STATE = "optimizer.npz"
STATE_FILE = "state.json"
VAL_BATCH_SIZE = 256  # forward-only; bounded memory even for flatten features
SHUFFLE_BUFFER = 2048  # end-to-end mode: decoded images mixed locally across Ray Data blocks
TEXT_WIDTH = 64  # bytes gathered per string; a Ray node id is 56 hex characters
# TensorBoard scalars: the history columns plus the optimizer's learning rate, tagged by these names
EPOCH_SCALARS = ("loss", "accuracy", "val_loss", "val_accuracy", "learning_rate", "epoch_time_s")


def head_fingerprint(head) -> str:
    """Hash of a head's weight values: equal on every worker when they are in sync."""
    digest = hashlib.sha256()
    for weight in head.get_weights():
        digest.update(np.ascontiguousarray(weight).tobytes())
    return digest.hexdigest()[:16]


class EpochScalars:
    """Rank 0's TensorBoard event file: one scalar per name of EPOCH_SCALARS per epoch, step = epoch.

    Written with `tf.summary.write` and the scalars plugin's metadata (what `tf.summary.scalar`
    writes; that one lives in the tensorboard package, which TensorFlow 2.21 does not install).
    After each epoch the local event file is copied whole to `destination`; a copy that fails is
    logged and the next epoch's copy catches up: TensorBoard must never stop a training run.
    """

    def __init__(self, destination: str):
        import tensorflow as tf
        from tensorflow.core.framework import summary_pb2

        self.destination = destination
        self._local = tempfile.mkdtemp(prefix="catdog-tensorboard-")
        self._writer = tf.summary.create_file_writer(self._local)
        self._metadata = summary_pb2.SummaryMetadata(
            plugin_data=summary_pb2.SummaryMetadata.PluginData(plugin_name="scalars"),
            data_class=summary_pb2.DATA_CLASS_SCALAR)

    def write(self, step: int, values: dict) -> None:
        import tensorflow as tf

        with self._writer.as_default():
            for name in EPOCH_SCALARS:
                tf.summary.write(name, tf.constant(values[name], tf.float32), step=step, metadata=self._metadata)
        self._writer.flush()
        try:
            for name in os.listdir(self._local):
                storage.write_bytes(storage.join(self.destination, name), Path(self._local, name).read_bytes())
        except OSError as exc:
            logger.warning("Could not copy TensorBoard events to %s (retried next epoch): %s", self.destination, exc)

    def close(self) -> None:
        self._writer.close()
        shutil.rmtree(self._local, ignore_errors=True)


def _fresh_state() -> dict:
    return {"epoch": 0, "history": [], "best_val_loss": None, "best_epoch": 0, "bad_epochs": 0, "stopped_early": False}


def _restore(checkpoint, head, best_head, optimizer) -> dict:
    """Load head, best head, optimizer and loop state from a checkpoint; a fresh state without one."""
    if checkpoint is None:
        best_head.set_weights(head.get_weights())
        return _fresh_state()
    with checkpoint.as_directory() as folder:
        folder = Path(folder)
        head.load_weights(folder / HEAD_WEIGHTS)
        best_head.load_weights(folder / BEST_HEAD_WEIGHTS)
        saved = np.load(folder / OPTIMIZER_STATE)
        for i, variable in enumerate(optimizer.variables):
            variable.assign(saved[f"v{i}"])
        return json.loads((folder / STATE_FILE).read_text())


def _save(folder: Path, head, best_head, optimizer, state: dict) -> None:
    head.save_weights(folder / HEAD_WEIGHTS)
    best_head.save_weights(folder / BEST_HEAD_WEIGHTS)
    np.savez(folder / OPTIMIZER_STATE, **{f"v{i}": np.asarray(v.numpy()) for i, v in enumerate(optimizer.variables)})
    (folder / STATE_FILE).write_text(json.dumps(state))


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


def embedding_arrays(table) -> tuple[np.ndarray, np.ndarray]:
    """Features [n, width] float32 and labels [n] int32 of an embeddings table (converted once)."""
    n = table.num_rows
    features = table.column("features").combine_chunks().flatten().to_numpy().reshape(n, -1)
    return features, table.column("label").to_numpy().astype(np.int32)


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


def worker_seed(run_seed: int, rank: int, epoch: int) -> int:
    """The seed of one worker's own randomness (dropout masks, augmentation) from `epoch` on.

    NumPy's SeedSequence of (run seed, rank, epoch): independent streams per rank, not neighbouring
    integers; the epoch is the first one the worker trains, so a resumed worker group does not
    replay the masks of epoch 1.
    """
    return int(np.random.SeedSequence([run_seed, rank, epoch]).generate_state(1)[0])


def shuffle_seed(run_seed: int, epoch: int) -> int:
    """Seed of cached mode's per-epoch shuffle, before each rank mixes in its own rank (`worker_seed`)."""
    return run_seed * 1000 + epoch


def seed_worker_randomness(models: list, seed: int) -> list[int]:
    """Seed Python, NumPy, TensorFlow and Keras with `seed`, and every random layer of `models`.

    A Keras random layer (Dropout, RandomFlip, ...) draws from its own seed generator, whose state
    was set when the layer was built (and under MWMS broadcast from rank 0), so it is assigned here
    explicitly; weights are not touched. Returns the seeds the layers got, in order.
    """
    import keras

    keras.utils.set_random_seed(seed)
    states = [v for model in models for v in model.variables if v.name == "seed_generator_state"]
    seeds = [int(s) for s in np.random.SeedSequence(seed).generate_state(len(states))]
    for state, value in zip(states, seeds):
        state.assign(np.array([value, 0], dtype=state.dtype))  # the [seed, counter] a SeedGenerator starts from
    return seeds


def cached_batches(features: np.ndarray, labels: np.ndarray, batch_size: int, seed: int | None = None,
                   rows_per_epoch: int | None = None):
    """Batches {"features", "label"} of this worker's own shard.

    With a seed (training) the shard is reshuffled and cut to `rows_per_epoch` rows: every worker
    must run the same number of MultiWorkerMirroredStrategy steps, and shards differ by a row at
    most (the rows left out change every epoch). Without a seed (validation): every row, in order.
    """
    n = len(labels)
    rows = np.arange(n) if seed is None else np.random.default_rng(seed).permutation(n)[:rows_per_epoch]
    for start in range(0, len(rows), batch_size):
        picked = rows[start:start + batch_size]
        yield {"features": features[picked], "label": labels[picked]}


def train_loop_per_worker(config: dict) -> dict | None:
    """Ray Train entry point, run on every worker. `config` is built by catdog.training.

    Returns (rank 0 only) the validation logits of the best head, their labels and file paths,
    for the driver's temperature scaling and validation report, and each rank's dropout seed.
    """
    configure_tensorflow(config["use_gpu"])
    import keras
    import ray.train
    import tensorflow as tf

    from catdog import model as catdog_model

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
    state = _restore(ray.train.get_checkpoint(), head, best_head, optimizer)
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
                _save(Path(folder), head, best_head, optimizer, state)
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
