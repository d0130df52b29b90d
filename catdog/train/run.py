"""The training driver: data, features, Ray Train fit, temperature scaling, the run folder.

    list + split -> embeddings (cached mode, catdog.train.features) or decoded images (end-to-end)
      -> TensorflowTrainer(catdog.train.loop.train_loop_per_worker) with fault tolerance
      -> best head + temperature (fitted on half the validation rows, judged on the other half,
         catdog.train.calibration.calibrate) + frozen extractor -> model.keras and run files
      -> with a tracking URI: the run logged to MLflow and registered (catdog.tracking)

In cached mode the embeddings are computed while Ray Train starts (the workers wait for them at a
FeatureHandoff actor) whenever the cluster holds the workers and the embedding actors together.

Everything a user can get wrong (arguments, data folder, output already there, an output that
overlaps the data or is a root or the home folder, --overwrite of a folder that holds no run) is
checked before Ray or TensorFlow start and before anything is written, so those mistakes fail in
about a second with exit code 2. The run's marker is the first thing written (catdog.model.run_folder).
"""

from __future__ import annotations

import logging
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

import catdog
from catdog.analyse.metrics import label_scores
from catdog.errors import ModelLoadError
from catdog.io.labelled import LabelledImages, list_labelled_images, split_train_val
from catdog.model.run_folder import RunFolder, train_run_name
from catdog.tracking import data_fingerprint, git_commit, library_versions, open_tracking
from catdog.train.config import TrainConfig
from catdog.train.data import TrainingData, cached_features, decoded_datasets
from catdog.train.fit import embedding_overlaps_fit, fit, fit_while_embedding

logger = logging.getLogger(__name__)

BACKBONE_SEED = 0  # fixed, not --seed: the random-init backbone (and its cache) is the same for every seed


@dataclass
class TrainResult:
    """Where the run folder is and what metrics.json holds."""

    output: str
    metrics: dict
    tracking: dict | None = None  # where the MLflow run went (catdog.tracking.TrainingTracker.log_run)


def _refuse_node_local_storage(config: TrainConfig) -> None:
    """On a cluster of several machines, local --output/--cache-dir paths exit 2 (catdog.cluster.checks)."""
    from catdog.cluster.checks import refuse_local_paths_on_cluster

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


def _load_backbone(config: TrainConfig, num_classes: int):
    """TensorFlow, the model spec, the frozen feature extractor, the same folded for inference
    (cached mode's embedding actors compute with it) and its weights fingerprint.

    Raises:
        ModelLoadError: an unloadable weights file, or no internet for the ImageNet weights.
    """
    from catdog.model.tensorflow_setup import configure_tensorflow

    configure_tensorflow(config.use_gpu)
    from catdog.model import build as catdog_model
    from catdog.model.inference import inference_model

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
    from catdog.model import build as catdog_model
    from catdog.train.checkpoints import BEST_HEAD_WEIGHTS

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
        CatdogError: a bad setting, missing/empty data, an output folder that already holds a run
            (without `overwrite`) or holds files but no run, or an output that is a root, the home
            folder, or inside or around --data or --val-data.
    """
    # ---- checks that need neither Ray nor TensorFlow --------------------------------------------
    started, started_at = time.perf_counter(), time.time()
    config.validate()
    run = RunFolder(config.output)
    run.refuse_unsafe(config.data, config.val_data)
    clear_output = run.refuse_existing(config.overwrite)
    tracker = open_tracking(config.tracking_uri, config.mlflow_experiment, config.register_as)
    train_images, val_images = _list_data(config)
    run_id = uuid.uuid4().hex[:12]
    timings = {"listing_s": time.perf_counter() - started}
    logger.info("Run %s: %d train / %d validation images -> %s", run_id, len(train_images), len(val_images), config.output)

    # ---- backbone and Ray, side by side; then the training data ------------------------------------
    from catdog.cluster.session import init_ray

    # TensorFlow's import and the backbone build are CPU work in this process, Ray's start-up is
    # mostly its own processes booting: overlapped, the cold run's set-up shrinks (train_bench).
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="catdog-backbone") as pool:
        loading = pool.submit(_load_backbone, config, len(train_images.class_names))
        init_ray()
        _refuse_node_local_storage(config)  # needs the cluster; before anything is written
        spec, extractor, fast_extractor, fingerprint = loading.result()
    if clear_output:
        run.delete_run_files()
    run_name = train_run_name(run_id)
    run.write_marker({"run_id": run_id, "catdog_version": catdog.__version__, "started_at": started_at,
                      "checkpoints": run.checkpoints(run_name)})
    from catdog.train import calibration

    timings["setup_s"] = time.perf_counter() - started - timings["listing_s"]
    from catdog.train.worker_log import drop_worker_log_noise, read_worker_reports, summarise_worker_reports

    drop_worker_log_noise()

    from catdog.train.loop_config import WorkerLoopConfig

    # the workers' settings; cached mode adds the embeddings' refs (or the handoff actor) below
    loop_config = WorkerLoopConfig.from_train_config(config, spec.to_dict(), backbone_seed=BACKBONE_SEED,
                                                     backbone_fingerprint=fingerprint,
                                                     tensorboard_dir=run.tensorboard_dir())
    step = time.perf_counter()

    def embed() -> TrainingData:
        return cached_features(train_images, val_images, config, spec, fast_extractor, fingerprint)

    overlapped = config.mode == "cached" and embedding_overlaps_fit(config)
    if overlapped:
        # ---- embeddings and the data-parallel fit's start-up, side by side ------------------------
        logger.info("Computing embeddings while Ray Train starts its workers")
        result, worker_log, data, timings["data_s"] = fit_while_embedding(config, loop_config, run_name, embed)
        timings["training_s"] = time.perf_counter() - step
    else:
        data = embed() if config.mode == "cached" else decoded_datasets(train_images, val_images, config)
        timings["data_s"] = time.perf_counter() - step
        data.check_enough(config.num_workers)
        # ---- data-parallel fit --------------------------------------------------------------------
        step = time.perf_counter()
        result, worker_log = fit(config, loop_config.with_features(data.feature_refs), data.datasets, run_name)
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
    from catdog.model.build import save_model

    save_model(model, run.model_file)
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
        "checkpoints": run.checkpoints(run_name),
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
