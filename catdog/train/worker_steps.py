"""The TensorFlow side of a Ray Train worker (catdog.train.loop): the step functions and collectives it
runs under MultiWorkerMirroredStrategy, and the two input pipelines that feed them.

A module of its own so that catdog.train.loop, which tests and the driver import, loads no
TensorFlow; only `train_loop_per_worker` imports this, on a worker, after
`configure_tensorflow(use_gpu)`.
"""

from __future__ import annotations

from functools import partial

import numpy as np

from catdog.model.tensorflow_setup import configure_tensorflow
from catdog.train.embedding_shards import cached_batches, embedding_arrays
from catdog.train.loop_config import WorkerLoopConfig
from catdog.train.seeds import shuffle_seed, worker_seed

configure_tensorflow()

import keras  # noqa: E402
import ray  # noqa: E402
import ray.train  # noqa: E402
import tensorflow as tf  # noqa: E402

VAL_BATCH_SIZE = 256  # forward-only; bounded memory even for flatten features
SHUFFLE_BUFFER = 2048  # end-to-end mode: decoded images mixed locally across Ray Data blocks


# ---- step functions and collectives --------------------------------------------------------------------
class DistributedSteps:
    """The tf.functions every worker runs in step with the others: the training step, the forward pass
    and the collectives (each on a float64 vector). Collectives must come in the same order on every rank."""

    def __init__(self, strategy, models, world: int, end_to_end: bool):  # models: catdog.train.loop.Models
        self.strategy, self.models, self.world, self.end_to_end = strategy, models, world, end_to_end
        self.loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True, reduction=None)
        self.train_step = tf.function(self._train_step, reduce_retracing=True)
        self.forward = tf.function(self._forward, reduce_retracing=True)  # (model, batch) -> logits
        self._mean = tf.function(partial(self._all_reduce, op=tf.distribute.ReduceOp.MEAN))
        self._sum = tf.function(partial(self._all_reduce, op=tf.distribute.ReduceOp.SUM))
        self._gather = tf.function(self._gather_in_rank_order)

    def _inputs(self, batch, training):
        if not self.end_to_end:
            return tf.reshape(batch["features"], (-1, *self.models.spec.feature_shape))
        pixels = tf.cast(batch["image"], tf.float32)
        if self.models.augmenter is not None and training:
            pixels = self.models.augmenter(pixels, training=True)
        return self.models.extractor(pixels, training=False)

    def _replica_step(self, batch):
        head = self.models.head
        labels = tf.cast(batch["label"], tf.int32)
        x = self._inputs(batch, training=True)
        with tf.GradientTape() as tape:
            logits = self.models.logits_model(x, training=True)
            per_example = self.loss_fn(labels, logits)
            loss = tf.nn.compute_average_loss(per_example, global_batch_size=tf.shape(labels)[0] * self.world)
        gradients = tape.gradient(loss, head.trainable_variables)
        self.models.optimizer.apply_gradients(zip(gradients, head.trainable_variables))
        correct = tf.cast(tf.equal(tf.argmax(logits, axis=-1, output_type=tf.int32), labels), tf.float32)
        count = tf.cast(tf.shape(labels)[0], tf.float32)
        return tf.reduce_sum(per_example), tf.reduce_sum(correct), count

    def _train_step(self, batch):
        """Loss sum, correct predictions and examples of one global batch, summed over the workers."""
        sums = self.strategy.run(self._replica_step, args=(batch,))
        return [self.strategy.reduce(tf.distribute.ReduceOp.SUM, value, axis=None) for value in sums]

    def _forward(self, model, batch):
        return model(self._inputs(batch, training=False), training=False)

    def _all_reduce(self, values, op):
        per_replica = self.strategy.run(lambda: tf.identity(values))
        return self.strategy.reduce(op, per_replica, axis=None)

    def _gather_in_rank_order(self, values):  # [k] on each rank -> [world, k] in rank order
        per_replica = self.strategy.run(lambda: tf.identity(values)[tf.newaxis])
        return self.strategy.gather(per_replica, axis=0)

    def _collective(self, function, values) -> np.ndarray:
        return np.asarray(function(tf.constant(values, tf.float64)))

    def mean_over_workers(self, values) -> np.ndarray:
        return self._collective(self._mean, values)

    def sum_over_workers(self, values) -> np.ndarray:
        return self._collective(self._sum, values)

    def gather_over_workers(self, values) -> np.ndarray:
        """[k] values on each rank -> [world, k], in rank order."""
        return self._collective(self._gather, values)

    def evaluate(self, model, batches) -> tuple[np.ndarray, np.ndarray, list[str]]:
        """Logits, labels (and end-to-end: paths) of these validation batches."""
        logits, labels, paths = [], [], []
        for batch in batches:
            model_inputs = {key: value for key, value in batch.items() if key != "path"}
            logits.append(np.asarray(self.forward(model, model_inputs)))
            labels.append(np.asarray(batch["label"]))
            paths.extend(str(path) for path in batch.get("path", ()))
        if not logits:
            return np.zeros((0, self.models.spec.num_classes)), np.zeros(0, np.int64), paths
        return np.concatenate(logits).astype(np.float64), np.concatenate(labels).astype(np.int64), paths


# ---- input pipelines: cached embeddings from the object store, or Ray Data shards of decoded images ----
class CachedInputs:
    """This worker's own shard of the embeddings: train rows reshuffled each epoch and cut to the
    shortest shard's length, and its contiguous range of the validation rows."""

    def __init__(self, config: WorkerLoopConfig, rank: int, steps: DistributedSteps):
        # refs in the config, or from the driver's handoff actor once it has computed them
        refs = config.feature_refs or ray.get(config.feature_handoff.get.remote())
        self.train = embedding_arrays(ray.get(refs["train"][rank]))  # this worker's shard only
        self.val = embedding_arrays(ray.get(refs["val"][rank]))
        self.rows_per_epoch = int(steps.gather_over_workers([float(len(self.train[1]))])[:, 0].min())
        self.val_paths, self.rank = refs["val_paths"], rank
        self.batch_size, self.run_seed = config.per_worker_batch_size, config.seed

    @property
    def embeddings_mib(self) -> float:
        return (sum(a.nbytes for a in self.train) + sum(a.nbytes for a in self.val)) / 2**20

    def train_batches(self, epoch: int):
        return cached_batches(*self.train, self.batch_size, rows_per_epoch=self.rows_per_epoch,
                              seed=worker_seed(shuffle_seed(self.run_seed, epoch), self.rank, epoch))

    def validation_metrics(self, steps: DistributedSteps, model) -> tuple[float, float]:
        """Validation loss and accuracy over every worker's rows (sums all-reduced)."""
        logits, labels, _ = steps.evaluate(model, cached_batches(*self.val, VAL_BATCH_SIZE))
        sums = [float(np.sum(steps.loss_fn(labels, logits))) if len(labels) else 0.0,
                float(np.sum(np.argmax(logits, -1) == labels)), float(len(labels))]
        total_loss, correct, count = (float(v) for v in steps.sum_over_workers(sums))
        return total_loss / max(count, 1.0), correct / max(count, 1.0)

    def all_validation_logits(self, steps: DistributedSteps, model) -> tuple[np.ndarray, np.ndarray, list[str]]:
        """Every validation row's logits, label and (rank 0) path, in table order, gathered from the ranks."""
        logits, labels, _ = steps.evaluate(model, cached_batches(*self.val, VAL_BATCH_SIZE))
        classes = steps.models.spec.num_classes
        longest = int(steps.gather_over_workers([float(len(labels))])[:, 0].max())
        padded = np.full((longest, classes + 2), -1.0)
        padded[:len(labels), :classes] = logits
        padded[:len(labels), classes] = labels
        padded[:len(labels), classes + 1] = 1.0  # a real row, not padding
        rows = steps.gather_over_workers(padded.ravel()).reshape(-1, classes + 2)  # [world * longest, ...]
        rows = rows[rows[:, -1] == 1.0]
        paths = ray.get(self.val_paths).to_pylist() if self.rank == 0 else []
        return rows[:, :classes], rows[:, classes].astype(np.int64), paths


class EndToEndInputs:
    """Decoded images: this worker's Ray Data shard of the training set; every worker evaluates the
    whole validation set."""

    embeddings_mib = 0.0  # no embeddings held

    def __init__(self, config: WorkerLoopConfig, rank: int, world: int):
        self.train_shard = ray.train.get_dataset_shard("train")
        self.batch_size, self.run_seed = config.per_worker_batch_size, config.seed
        self.rank, self.world = rank, world

    def train_batches(self, epoch: int):
        seed = self.run_seed * 1000 + epoch * self.world + self.rank
        return self.train_shard.iter_tf_batches(batch_size=self.batch_size, local_shuffle_buffer_size=SHUFFLE_BUFFER,
                                                local_shuffle_seed=seed)

    def _val_batches(self):  # NumPy batches: the path column stays Python strings
        return ray.train.get_dataset_shard("val").iter_batches(batch_size=VAL_BATCH_SIZE, batch_format="numpy")

    def validation_metrics(self, steps: DistributedSteps, model) -> tuple[float, float]:
        """Validation loss and accuracy: every worker evaluated the whole set, so the mean over workers."""
        logits, labels, _ = steps.evaluate(model, self._val_batches())
        loss, accuracy = float(np.mean(steps.loss_fn(labels, logits))), float(np.mean(np.argmax(logits, -1) == labels))
        return tuple(float(v) for v in steps.mean_over_workers([loss, accuracy]))

    def all_validation_logits(self, steps: DistributedSteps, model) -> tuple[np.ndarray, np.ndarray, list[str]]:
        """Every validation row's logits, label and path, in table order."""
        return steps.evaluate(model, self._val_batches())
