"""The Ray Train fit: the trainer, its fault tolerance and checkpoints, started while embeddings compute.

`fit` runs `catdog.train.loop.train_loop_per_worker` data-parallel under `TensorflowTrainer`; with
enough cluster resources `fit_while_embedding` starts it before the embeddings are ready, and the
workers wait for them at a `catdog.train.features.FeatureHandoff` actor.
"""

from __future__ import annotations

import time

from catdog.model.run_folder import RunFolder
from catdog.train.config import TrainConfig
from catdog.train.loop_config import WorkerLoopConfig


def embedding_overlaps_fit(config: TrainConfig) -> bool:
    """Whether the cluster holds the Train workers and a full embedding actor pool at once.

    Then the embeddings are computed while Ray Train boots its controller and workers (each
    imports TensorFlow before its first epoch; see benchmarks/README.md), instead of before.
    On a smaller cluster the two run one after the other: overlapped, the workers would hold
    the resources the embedding actors wait for.
    """
    import ray

    total = ray.cluster_resources()
    both = 2 * config.num_workers  # the workers, and at most as many embedding actors
    if total.get("CPU", 0.0) < both * config.cpus_per_worker:
        return False
    return not config.use_gpu or total.get("GPU", 0.0) >= both


def fit_while_embedding(config: TrainConfig, loop_config: WorkerLoopConfig, run_name: str, embed) -> tuple:
    """Start the fit at once and compute the embeddings meanwhile, in a thread of this driver.

    The workers wait for the embeddings at a `FeatureHandoff` actor. When `embed` fails, the
    workers fail with it and the embedding error (an InputError: exit 2) is what is raised.

    Returns:
        (Ray Train result, worker log path, TrainingData, seconds the embeddings took).
    """
    import threading

    import ray

    from catdog.train.features import FeatureHandoff

    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    # On the driver's node: a worker node lost mid-fit must not take the handoff with it.
    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    handoff = ray.remote(num_cpus=0)(FeatureHandoff).options(scheduling_strategy=here).remote()
    outcome: dict = {}

    def embed_and_hand_off() -> None:
        step = time.perf_counter()
        try:
            data = embed()
            data.check_enough(config.num_workers)
        except BaseException as exc:  # noqa: BLE001 - re-raised by the main thread below
            outcome["error"] = exc
            handoff.fail.remote(f"{type(exc).__name__}: {exc}")
            return
        outcome["data"], outcome["seconds"] = data, time.perf_counter() - step
        handoff.put.remote(data.feature_refs)  # refs nested in a dict travel as refs

    # A daemon thread: Ctrl-C during the fit must not wait for the embedding pass to finish.
    thread = threading.Thread(target=embed_and_hand_off, name="catdog-embeddings", daemon=True)
    thread.start()
    try:
        result, worker_log = fit(config, loop_config.with_features(handoff=handoff), None, run_name)
    except Exception:
        thread.join()
        if "error" in outcome:
            raise outcome["error"] from None
        raise
    thread.join()  # the fit ended, so the workers got the embeddings: the thread has put them
    return result, worker_log, outcome["data"], outcome["seconds"]


def trainer_class():
    """`TensorflowTrainer` without the Ray Train V2 callbacks that only cost time here.

    - PlacementGroupCleaner: in Ray 2.60 it stalls every fit at shutdown until a timeout ("Failed
      to stop PlacementGroupCleaner gracefully", a GetTimeoutError; pinned by
      tests/train/test_train.py). It only matters when the Train controller dies while
      its driver lives on; then the driver's `fit()` fails, the job ends, and Ray removes the
      job's placement groups anyway.
    - Datasets, when the trainer has no datasets (cached mode reads its embeddings from the object
      store): it still starts a DatasetManager actor, one more Python process to boot before
      the first epoch.
    Falls back to the stock trainer if Ray's internals move.
    """
    from ray.train.tensorflow import TensorflowTrainer

    try:
        from ray.train.v2._internal.callbacks.datasets import DatasetsCallback
        from ray.train.v2._internal.callbacks.placement_group_callback import PlacementGroupCleanerCallback
    except ImportError:
        return TensorflowTrainer
    if not hasattr(TensorflowTrainer, "_create_default_callbacks"):
        return TensorflowTrainer

    class CatdogTensorflowTrainer(TensorflowTrainer):
        def _create_default_callbacks(self):
            unwanted = (PlacementGroupCleanerCallback,) + (() if self.datasets else (DatasetsCallback,))
            return [callback for callback in super()._create_default_callbacks() if not isinstance(callback, unwanted)]

    return CatdogTensorflowTrainer


def fit(config: TrainConfig, loop_config: WorkerLoopConfig, datasets: dict | None, run_name: str):
    """Run `train_loop_per_worker` on `config.num_workers` workers with `loop_config`; returns the
    Ray Train result and the path of the worker report log."""
    from ray.train import CheckpointConfig, DataConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.v2.api.config import LoggingConfig

    from catdog.cluster.session import worker_runtime_env
    from catdog.train.backend import TensorflowWorkersConfig
    from catdog.train.config import PLACEMENTS
    from catdog.train.loop import train_loop_per_worker
    from catdog.train.worker_log import WorkerReportLog

    run = RunFolder(config.output)
    resources = {"CPU": config.cpus_per_worker, **({"GPU": 1} if config.use_gpu else {})}
    trainer = trainer_class()(
        train_loop_per_worker,
        train_loop_config=loop_config.as_train_loop_config(),  # Ray wants a dict: {"loop": loop_config}
        tensorflow_config=TensorflowWorkersConfig(),
        scaling_config=ScalingConfig(num_workers=config.num_workers, use_gpu=config.use_gpu, resources_per_worker=resources,
                                     placement_strategy=PLACEMENTS[config.placement]),
        run_config=RunConfig(
            name=run_name,
            storage_path=run.checkpoint_storage(),
            checkpoint_config=CheckpointConfig(
                num_to_keep=config.keep_checkpoints, checkpoint_score_attribute="val_loss", checkpoint_score_order="min"
            ),
            failure_config=FailureConfig(max_failures=config.max_failures),
            callbacks=[WorkerReportLog(run.worker_log(run_name))],
            worker_runtime_env=worker_runtime_env(),
            logging_config=LoggingConfig(log_level="WARNING"),  # no per-report "Checkpoint created" lines
        ),
        datasets=datasets,
        dataset_config=DataConfig(datasets_to_split=["train"]) if datasets else None,
    )
    return trainer.fit(), run.worker_log(run_name)
