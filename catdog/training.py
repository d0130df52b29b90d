"""The training driver: data, features, Ray Train fit, temperature scaling, the run folder.

    list + split -> embeddings (cached mode, catdog.features) or decoded images (end-to-end)
      -> TensorflowTrainer(catdog.train_loop.train_loop_per_worker) with fault tolerance
      -> best head + temperature (fitted on half the validation rows, judged on the other half,
         catdog.calibration.calibrate) + frozen extractor -> model.keras and run files
      -> with a tracking URI: the run logged to MLflow and registered (catdog.tracking)

In cached mode the embeddings are computed while Ray Train starts (the workers wait for them at a
FeatureHandoff actor) whenever the cluster holds the workers and the embedding actors together.

Everything a user can get wrong (arguments, data folder, output already there) is checked before
Ray or TensorFlow start, so those mistakes fail in about a second with exit code 2.
"""

from __future__ import annotations

import logging
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pyarrow as pa

import catdog
from catdog.dataset import LabelledImages, list_labelled_images, split_train_val
from catdog.errors import InputError, ModelLoadError
from catdog.metrics import label_scores
from catdog.run_folder import RunFolder
from catdog.tracking import data_fingerprint, git_commit, library_versions, open_tracking
from catdog.train_config import TrainConfig

logger = logging.getLogger(__name__)

BACKBONE_SEED = 0  # fixed, not --seed: the random-init backbone (and its cache) is the same for every seed
DECODE_BATCH = 32


@dataclass
class TrainResult:
    """Where the run folder is and what metrics.json holds."""

    output: str
    metrics: dict
    tracking: dict | None = None  # where the MLflow run went (catdog.tracking.TrainingTracker.log_run)


def _refuse_node_local_storage(config: TrainConfig) -> None:
    """On a cluster of several machines, local --output/--cache-dir paths exit 2 (catdog.cluster_checks)."""
    from catdog.cluster_checks import refuse_local_paths_on_cluster

    cache_flag = "--cache-dir" if config.cache_dir else "--cache-dir (default)"
    refuse_local_paths_on_cluster(
        {"--output": config.output, cache_flag: config.feature_cache_dir if config.mode == "cached" else None},
        assume_shared=config.assume_shared_storage,
    )


def _list_data(config: TrainConfig) -> tuple[LabelledImages, LabelledImages]:
    images = list_labelled_images(config.data)
    if config.val_data is None:
        return split_train_val(images, config.val_fraction, config.seed)
    return images, list_labelled_images(config.val_data, images.class_names)


@dataclass
class _TrainingData:
    """What the fit reads (embedding refs or decoded datasets) and what metrics.json reports of it."""

    skipped: list[dict]
    n_train: int
    n_val: int
    feature_refs: dict | None = None  # cached mode: object refs of the train/val embeddings
    datasets: dict | None = None  # end-to-end mode: Ray Datasets of decoded images
    cache: dict | None = None

    def check_enough(self, num_workers: int) -> None:
        if self.n_train < num_workers or self.n_val == 0:
            raise InputError(f"too few readable images: {self.n_train} train (need >= {num_workers} workers), "
                             f"{self.n_val} validation")


def _decoded_datasets(train: LabelledImages, val: LabelledImages, config: TrainConfig) -> _TrainingData:
    """End-to-end mode: decoded pixels for the workers, and the files that could not be decoded."""
    import ray

    from catdog.imaging import read_and_decode

    def decode(batch: dict) -> dict:
        out = read_and_decode(list(batch["path"]), config.image_size)
        # an explicit flag: an all-None error column becomes NaNs in numpy batches downstream
        readable = np.array([error is None for error in out["error"]], dtype=bool)
        return {"path": batch["path"], "label": batch["label"], "image": out["image"],
                "readable": readable, "error": np.array([e or "" for e in out["error"]], dtype=object)}

    def decodable(batch: dict, keep_path: bool) -> dict:
        columns = ["image", "label"] + (["path"] if keep_path else [])  # validation paths: calibration halves
        return {name: batch[name][batch["readable"]] for name in columns}

    def load(images: LabelledImages, keep_path: bool):
        table = pa.table({"path": images.paths, "label": pa.array(images.labels, pa.int32())})
        blocks = [table.slice(i, DECODE_BATCH * 2) for i in range(0, table.num_rows, DECODE_BATCH * 2)]
        decoded = ray.data.from_blocks(blocks).map_batches(
            decode, batch_size=DECODE_BATCH, batch_format="numpy", num_cpus=config.cpus_per_worker
        ).materialize()
        outcomes = decoded.select_columns(["path", "readable", "error"]).take_all()
        errors = [{"path": row["path"], "error": row["error"]} for row in outcomes if not row["readable"]]
        kept = decoded.map_batches(decodable, batch_format="numpy", fn_kwargs={"keep_path": keep_path})
        return kept.materialize(), errors

    (train_ds, train_errors), (val_ds, val_errors) = load(train, keep_path=False), load(val, keep_path=True)
    skipped = sorted(({"path": e["path"], "error": e["error"]} for e in train_errors + val_errors), key=lambda e: e["path"])
    return _TrainingData(skipped, train_ds.count(), val_ds.count(), datasets={"train": train_ds, "val": val_ds})


def _cached_features(train: LabelledImages, val: LabelledImages, config: TrainConfig, spec, fast_extractor,
                     fingerprint: str) -> _TrainingData:
    """Cached mode: embeddings (reused or computed), as object refs of the train/val tables."""
    import ray

    from catdog.features import build_features

    features = build_features(
        train, val, spec.to_dict(), fast_extractor, fingerprint, config.feature_cache_dir,
        use_gpu=config.use_gpu, actors=config.num_workers, cpus_per_actor=config.cpus_per_worker,
    )
    # Each worker reads only its own shard of the embeddings from the object store (no Ray Data
    # split coordinator to start); rank 0 also gets the validation paths, for the calibration halves.
    refs = shard_refs(features.train.select(["label", "features"]), features.val.select(["label", "features"]),
                      config.num_workers, config.seed)
    refs["val_paths"] = ray.put(features.val["path"].combine_chunks())
    cache = {"location": features.location, "reused": features.reused, "computed": features.computed}
    return _TrainingData(features.skipped, features.train.num_rows, features.val.num_rows, feature_refs=refs,
                         cache=cache)


def shard_refs(train, val, workers: int, seed: int) -> dict:
    """Object refs of each worker's shard: train rows dealt out after a seeded shuffle (classes mix),
    validation rows in contiguous ranges (rank order = table order, for reassembling logits)."""
    import ray

    order = np.random.default_rng(seed).permutation(train.num_rows)
    bounds = np.linspace(0, val.num_rows, workers + 1).astype(int)
    return {"train": [ray.put(train.take(np.sort(order[rank::workers]))) for rank in range(workers)],
            "val": [ray.put(val.slice(bounds[rank], bounds[rank + 1] - bounds[rank])) for rank in range(workers)]}


def _embedding_overlaps_fit(config: TrainConfig) -> bool:
    """Whether the cluster holds the Train workers and a full embedding actor pool at once.

    Then the embeddings are computed while Ray Train boots its controller and workers (each
    imports TensorFlow: ~13 s before the first epoch on 2 cores, measured), instead of before.
    On a smaller cluster the two run one after the other: overlapped, the workers would hold
    the resources the embedding actors wait for.
    """
    import ray

    total = ray.cluster_resources()
    both = 2 * config.num_workers  # the workers, and at most as many embedding actors
    if total.get("CPU", 0.0) < both * config.cpus_per_worker:
        return False
    return not config.use_gpu or total.get("GPU", 0.0) >= both


def _fit_while_embedding(config: TrainConfig, loop_config: dict, run_name: str, embed) -> tuple:
    """Start the fit at once and compute the embeddings meanwhile, in a thread of this driver.

    The workers wait for the embeddings at a `FeatureHandoff` actor. When `embed` fails, the
    workers fail with it and the embedding error (an InputError: exit 2) is what is raised.

    Returns:
        (Ray Train result, worker log path, _TrainingData, seconds the embeddings took).
    """
    import threading

    import ray

    from catdog.features import FeatureHandoff

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
        result, worker_log = _fit(config, {**loop_config, "feature_handoff": handoff}, None, run_name)
    except Exception:
        thread.join()
        if "error" in outcome:
            raise outcome["error"] from None
        raise
    thread.join()  # the fit ended, so the workers got the embeddings: the thread has put them
    return result, worker_log, outcome["data"], outcome["seconds"]


def trainer_class():
    """`TensorflowTrainer` without the Ray Train V2 callbacks that only cost time here.

    - PlacementGroupCleaner: in Ray 2.60 it stalls every fit for ~15 s at shutdown ("Failed to
      stop PlacementGroupCleaner gracefully", a GetTimeoutError; measured: a 3-report no-op fit
      takes 27 s with it, 12.5 s without). It only matters when the Train controller dies while
      its driver lives on; then the driver's `fit()` fails, the job ends, and Ray removes the
      job's placement groups anyway.
    - Datasets, when the trainer has no datasets (cached mode reads its embeddings from the object
      store): it still starts a DatasetManager actor, one more Python process to boot (~2 s of
      CPU) before the first epoch.
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


def _fit(config: TrainConfig, loop_config: dict, datasets: dict | None, run_name: str):
    from ray.train import CheckpointConfig, DataConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.v2.api.config import LoggingConfig

    from catdog.ray_session import worker_runtime_env
    from catdog.train_config import PLACEMENTS
    from catdog.train_loop import train_loop_per_worker
    from catdog.worker_log import WorkerReportLog

    run = RunFolder(config.output)
    resources = {"CPU": config.cpus_per_worker, **({"GPU": 1} if config.use_gpu else {})}
    trainer = trainer_class()(
        train_loop_per_worker,
        train_loop_config=loop_config,
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


def _load_backbone(config: TrainConfig, num_classes: int):
    """TensorFlow, the model spec, the frozen feature extractor, the same folded for inference
    (cached mode's embedding actors compute with it) and its weights fingerprint.

    Raises:
        ModelLoadError: an unloadable weights file, or no internet for the ImageNet weights.
    """
    from catdog.tensorflow_setup import configure_tensorflow

    configure_tensorflow(config.use_gpu)
    from catdog import model as catdog_model
    from catdog.inference import inference_model

    spec = catdog_model.ModelSpec(num_classes=num_classes, image_size=config.image_size, head=config.head,
                                  hidden_units=config.hidden_units, dropout=config.dropout)
    try:
        extractor = catdog_model.build_feature_extractor(spec, config.weights_arg, BACKBONE_SEED)
    except Exception as exc:
        if config.weights_arg != "imagenet" or isinstance(exc, ModelLoadError):
            raise
        # Keras raises a bare Exception when the download fails (no internet on this machine)
        raise ModelLoadError(
            f"could not download the ImageNet weights ({exc}); without internet pass --weights PATH "
            "(a ResNet50 notop .weights.h5 file, local or URI) or --weights none"
        ) from exc
    fast = inference_model(extractor) if config.mode == "cached" else None
    return spec, extractor, fast, catdog_model.weights_fingerprint(extractor)


def _final_model(extractor, spec, checkpoint, temperature: float):
    """Extractor + best head (from the latest checkpoint) with the fitted temperature."""
    from catdog import model as catdog_model
    from catdog.train_checkpoint import BEST_HEAD_WEIGHTS

    head = catdog_model.build_head(replace(spec, temperature=temperature))
    with checkpoint.as_directory() as folder:
        head.load_weights(Path(folder) / BEST_HEAD_WEIGHTS)
    return catdog_model.build_model(extractor, head)


def _worker_attempts(state: dict) -> list[dict]:
    """Each worker group that reached a checkpoint: the epoch it resumed after, its ranks' nodes."""
    return [{"resumed_from_epoch": attempt["resumed_from"],
             "nodes": [{"rank": rank, "node_id": node} for rank, node in enumerate(attempt["node_ids"])]}
            for attempt in state.get("attempts", [])]


def train(config: TrainConfig) -> TrainResult:
    """Train a classifier head on a frozen ResNet50 with Ray Train and write the run folder.

    Raises:
        CatdogError: a bad setting, missing/empty data, or an output folder that already holds a run.
    """
    # ---- checks that need neither Ray nor TensorFlow --------------------------------------------
    started, started_at = time.perf_counter(), time.time()
    config.validate()
    run = RunFolder(config.output)
    clear_output = run.refuse_existing(config.overwrite)
    tracker = open_tracking(config.tracking_uri, config.mlflow_experiment, config.register_as)
    train_images, val_images = _list_data(config)
    run_id = uuid.uuid4().hex[:12]
    timings = {"listing_s": time.perf_counter() - started}
    logger.info("Run %s: %d train / %d validation images -> %s", run_id, len(train_images), len(val_images), config.output)

    # ---- backbone and Ray, side by side; then the training data ------------------------------------
    from catdog.ray_session import init_ray

    # TensorFlow's import and the backbone build are CPU work in this process, Ray's start-up is
    # mostly its own processes booting: overlapped, the cold run's set-up shrinks (train_bench).
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="catdog-backbone") as pool:
        loading = pool.submit(_load_backbone, config, len(train_images.class_names))
        init_ray()
        _refuse_node_local_storage(config)  # needs the cluster; before anything is written
        spec, extractor, fast_extractor, fingerprint = loading.result()
    if clear_output:
        run.delete_run_files()
    from catdog import calibration

    timings["setup_s"] = time.perf_counter() - started - timings["listing_s"]
    from catdog.worker_log import drop_worker_log_noise, read_worker_reports, summarise_worker_reports

    drop_worker_log_noise()

    loop_config = {
        "model_spec": spec.to_dict(), "mode": config.mode, "weights": config.weights_arg, "seed": config.seed,
        "backbone_seed": BACKBONE_SEED, "backbone_fingerprint": fingerprint, "epochs": config.epochs,
        "learning_rate": config.learning_rate, "patience": config.patience, "augment": config.augment, "use_gpu": config.use_gpu,
        "per_worker_batch_size": config.per_worker_batch_size, "tensorboard_dir": run.tensorboard_dir(),
        "feature_refs": None,  # cached mode: object refs of the train/val embeddings (or "feature_handoff")
    }
    run_name = f"train-{run_id}"
    step = time.perf_counter()

    def embed() -> _TrainingData:
        return _cached_features(train_images, val_images, config, spec, fast_extractor, fingerprint)

    overlapped = config.mode == "cached" and _embedding_overlaps_fit(config)
    if overlapped:
        # ---- embeddings and the data-parallel fit's start-up, side by side ------------------------
        logger.info("Computing embeddings while Ray Train starts its workers")
        result, worker_log, data, timings["data_s"] = _fit_while_embedding(config, loop_config, run_name, embed)
        timings["training_s"] = time.perf_counter() - step
    else:
        data = embed() if config.mode == "cached" else _decoded_datasets(train_images, val_images, config)
        timings["data_s"] = time.perf_counter() - step
        data.check_enough(config.num_workers)
        # ---- data-parallel fit --------------------------------------------------------------------
        step = time.perf_counter()
        result, worker_log = _fit(config, {**loop_config, "feature_refs": data.feature_refs}, data.datasets, run_name)
        timings["training_s"] = time.perf_counter() - step
    if data.cache is not None:
        data.cache["alongside_ray_train_start"] = overlapped
    skipped, n_train, n_val = data.skipped, data.n_train, data.n_val
    if skipped:
        logger.warning("Skipped %d unreadable image(s), listed in metrics.json", len(skipped))

    # ---- temperature, final model, run files ------------------------------------------------------
    step = time.perf_counter()
    returned = result.return_value
    logits, labels, state = returned["val_logits"], returned["val_labels"], returned["state"]
    relative = dict(zip(val_images.paths, val_images.relative_paths))
    temperature, calibration_report = calibration.calibrate(
        logits, labels, [relative[path] for path in returned["val_paths"]], config.seed)
    if not calibration_report["fitted"]:
        logger.warning("Temperature %s", calibration_report["note"])
    model = _final_model(extractor, spec, result.checkpoint, temperature)
    run.write_model(model)
    history = state["history"]
    workers = summarise_worker_reports(read_worker_reports(worker_log), config.num_workers)
    attempts = _worker_attempts(state)
    workers.update(placement=config.placement, nodes=attempts[-1]["nodes"] if attempts else [])
    best = next(row for row in history if row["epoch"] == state["best_epoch"])
    class_names = train_images.class_names
    metrics = {
        "run_id": run_id,
        "catdog_version": catdog.__version__,
        "final": history[-1],
        "best": best,
        "epochs_run": len(history),
        "stopped_early": state["stopped_early"],
        "validation": {**label_scores(labels, np.argmax(logits, axis=1), class_names),
                       "confusion_matrix_labels": list(class_names)},
        "calibration": calibration_report,
        # per rank: dropout (and augmentation) seeds differ, the initial weights do not
        "seeds": {"run": config.seed, "dropout_by_rank": returned["dropout_seeds"]},
        "data": {
            "classes": class_names,
            "train_listed": train_images.class_counts(), "val_listed": val_images.class_counts(),
            "train_images": n_train, "val_images": n_val,
            # every worker trains on as many rows as the shortest shard holds, each epoch
            "train_images_per_epoch": n_train // config.num_workers * config.num_workers,
            "skipped": len(skipped), "skipped_files": skipped,
        },
        "cache": data.cache,
        "workers": {**workers, "memory_by_rank": returned["memory_by_rank"]},
        # each failure the Train controller saw was followed by a restart from the latest checkpoint
        "restarts": {"count": len(workers["failures"]), "attempts": attempts},
        "backbone_fingerprint": fingerprint,
    }
    run_config = {
        **config.to_dict(), "run_id": run_id, "model_spec": replace(spec, temperature=temperature).to_dict(),
        "weights": config.weights, "backbone_fingerprint": fingerprint, "class_names": class_names,
        "checkpoints": run.checkpoints(f"train-{run_id}"),
    }
    timings["finalize_s"] = time.perf_counter() - step
    timings["wall_time_s"] = time.perf_counter() - started
    metrics["timings"] = {k: round(v, 3) for k, v in timings.items()}
    metrics["wall_time_s"] = metrics["timings"]["wall_time_s"]
    run.write_run_files(train_images.class_names, run_config, metrics, history)
    logger.info("Run %s done in %.1f s: best epoch %d val_accuracy %.4f, temperature %.3f -> %s", run_id,
                metrics["wall_time_s"], best["epoch"], best["val_accuracy"], temperature, config.output)
    if tracker is None:
        return TrainResult(config.output, metrics)
    summary = {"best_epoch": best["epoch"], "best_val_loss": best["val_loss"], "best_val_accuracy": best["val_accuracy"],
               "temperature": temperature, "wall_time_s": metrics["wall_time_s"]}
    logged = tracker.log_run(run, run_id, _tracked_params(run_config, train_images, val_images), history, summary,
                             started_at)
    return TrainResult(config.output, metrics, logged)


def _tracked_params(run_config: dict, train: LabelledImages, val: LabelledImages) -> dict:
    """What MLflow records of a run: its config.json, the data listing's fingerprint, git, libraries."""
    if run_config["val_data"] is None:  # the validation rows were split from --data
        data = {"data_fingerprint": data_fingerprint(train.relative_paths + val.relative_paths, train.sizes + val.sizes)}
    else:
        data = {"data_fingerprint": data_fingerprint(train.relative_paths, train.sizes),
                "val_data_fingerprint": data_fingerprint(val.relative_paths, val.sizes)}
    return {**run_config, **data, "data_files": len(train) + len(val), "git_commit": git_commit(),
            "versions": library_versions()}
