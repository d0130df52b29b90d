"""Rank 0's TensorBoard scalars: one event file of per-epoch training metrics, copied into the run folder.

TensorFlow's file writer writes into a local folder, copied into RUN/tensorboard/ through
catdog.io.storage, since the run folder may be an s3:// URI that TensorFlow cannot open without
tensorflow-io.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from pathlib import Path

from catdog.io import storage

logger = logging.getLogger(__name__)

# TensorBoard scalars: the history columns plus the optimizer's learning rate, tagged by these names
EPOCH_SCALARS = ("loss", "accuracy", "val_loss", "val_accuracy", "learning_rate", "epoch_time_s")


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
        """Write one epoch's scalars (`values` holds every name of EPOCH_SCALARS) and copy the file out."""
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
        """Close the writer and delete the local copy of the events."""
        self._writer.close()
        shutil.rmtree(self._local, ignore_errors=True)
