"""How model actors run in Ray Data (scoring's predictors, training's feature embedders).

On CPU a model actor runs CPU_CONCURRENT_BATCHES batches at once, each TensorFlow op on its share
of the cores: TensorFlow's intra-op threads meet at the end of every op and wait for the slowest,
while batches on fewer threads each do not wait for each other (see benchmarks/README.md, What
these figures rest on). GPUs run one batch at a time.
"""

from __future__ import annotations

from catdog.model.tensorflow_setup import configure_tensorflow, set_tensorflow_op_threads, visible_cores
from catdog.process import log_from_actor

CPU_CONCURRENT_BATCHES = 2  # more batches at once, or one on a single thread, gained nothing


def concurrent_batches(use_gpu: bool) -> int:
    """Batches one model actor runs at once: CPU_CONCURRENT_BATCHES on CPU, 1 on a GPU."""
    return 1 if use_gpu else CPU_CONCURRENT_BATCHES


def model_actor_pool(use_gpu: bool, **size):
    """Ray Data ActorPoolStrategy(**size) whose actors run `concurrent_batches(use_gpu)` calls at once.

    Ray Data otherwise runs an actor's calls one at a time (a lock around the UDF), whatever
    `max_concurrent_calls_per_actor` says, unless the pool enables true multi-threading.
    """
    import ray

    calls = concurrent_batches(use_gpu)
    if calls > 1:
        size.update(max_concurrent_calls_per_actor=calls, enable_true_multi_threading=True)
    return ray.data.ActorPoolStrategy(**size)


def configure_model_actor(use_gpu: bool) -> int:
    """Set up a process that runs a model for Ray Data; returns the batches it runs at once.

    Quiet TensorFlow, catdog's log lines shown in the driver, and on CPU each op on
    visible_cores() // CPU_CONCURRENT_BATCHES threads. Call before TensorFlow runs any op.
    """
    log_from_actor()
    configure_tensorflow(use_gpu)
    batches = concurrent_batches(use_gpu)
    if batches > 1:
        set_tensorflow_op_threads(max(1, visible_cores() // batches))
    return batches
