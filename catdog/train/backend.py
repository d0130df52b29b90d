"""Ray Train's TensorFlow backend, set up without TensorFlow in the Train controller.

Ray's `TensorflowConfig` lives in `ray.train.tensorflow`, whose package import loads TensorFlow; the
controller unpickles the backend config, so it imported TensorFlow before it could start the
workers (a few seconds of CPU on every fit's critical path, and a larger controller). This config
does what Ray's does, from a module that imports no TensorFlow: each worker gets its `TF_CONFIG`
(the worker addresses and its rank) before the training loop runs.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

from ray.train.backend import Backend, BackendConfig


@dataclass
class TensorflowWorkersConfig(BackendConfig):
    """`ray.train.tensorflow.TensorflowConfig`, minus the TensorFlow import; pass it as
    `TensorflowTrainer(tensorflow_config=...)`."""

    @property
    def backend_cls(self):
        return _TensorflowWorkersBackend

    @property
    def framework(self):
        from ray.train.v2._internal.util import TrainingFramework

        return TrainingFramework.TENSORFLOW  # Ray's run state records the TensorFlow and Keras versions


def _set_tf_config(worker_addresses: list[str], index: int) -> None:
    """On a worker: the cluster MultiWorkerMirroredStrategy reads, as Ray's backend writes it."""
    os.environ["TF_CONFIG"] = json.dumps({"cluster": {"worker": worker_addresses},
                                          "task": {"type": "worker", "index": index}})
    os.environ["TF_USE_LEGACY_KERAS"] = "1"  # as Ray's backend sets it: the workers' environment stays Ray's


class _TensorflowWorkersBackend(Backend):
    def on_start(self, worker_group, backend_config: TensorflowWorkersConfig) -> None:
        import ray
        from ray._common.network_utils import build_address
        from ray.train._internal.utils import get_address_and_port

        def worker_address() -> str:
            return build_address(*get_address_and_port())

        addresses = worker_group.execute(worker_address)
        ray.get([worker_group.execute_single_async(rank, _set_tf_config, worker_addresses=addresses, index=rank)
                 for rank in range(len(worker_group))])
