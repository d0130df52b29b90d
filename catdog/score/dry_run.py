"""`jobs.score --dry-run`: check everything a scoring run would, time a short warm-up, print the plan.

Nothing is written and no Ray job runs (a cluster is joined only to read its GPU capacity for
`--use-gpu`). The plan: files listed (a streaming count: memory stays flat), rows already in the
output for a resume, batches, the predictor pool and the resources each part asks for, and an
estimate of the wall time from decoding and predicting a sample of the input in this process.
The estimate is rough: it assumes the sample is typical and that decoding and the model overlap,
as they do in the pipeline, and leaves out start-up.
"""

from __future__ import annotations

import logging
import os
import time

from catdog.io import imaging, inputs
from catdog.model.run_folder import RunFolder
from catdog.score.config import ScoreConfig
from catdog.score.pipeline import DECODE_CPUS, PREDICTOR_CPUS, plan_pool
from catdog.score.run import check_before_work

logger = logging.getLogger(__name__)

SAMPLE_FILES = 32  # files decoded and predicted for the estimate


def plan_score(config: ScoreConfig, sample_files: int = SAMPLE_FILES) -> dict:
    """The plan of `score(config)`, checked as the run would check it; writes nothing.

    Raises:
        InputError, ModelLoadError, OutputExistsError, CatdogError: as `catdog.score.run.score` would.
    """
    folder, source = check_before_work(config)
    info = RunFolder(config.model).describe()
    columns = config.output_columns(info)
    files, sample = 0, []
    for chunk in source.chunks():
        files += chunk.num_rows
        sample += chunk[inputs.PATH_COLUMN].to_pylist()[: sample_files - len(sample)]
    inputs.check_not_empty(source, files)
    done = folder.count_rows() if config.resume and folder.exists() else 0
    to_score = max(files - done, 0)
    if config.use_gpu:
        from catdog.cluster.session import init_ray

        init_ray(config.ray_address)  # the GPU capacity of the cluster decides the pool
    pool = plan_pool(config)
    warm_up = _time_sample(sample, info, config)
    decode_slots = max(1.0, (os.cpu_count() or 1) - PREDICTOR_CPUS * pool.min_size) / DECODE_CPUS
    per_image = max(warm_up["decode_s_per_image"] / decode_slots,
                    warm_up["predict_s_per_image"] / max(pool.min_size, 1))
    batch = config.effective_batch_size
    plan = {
        "writes_nothing": True,
        "input": config.input, "input_kind": source.kind, "files_listed": files,
        "skipped_while_listing": {k: v for k, v in source.skipped.items() if v},
        "output": config.output, "output_exists": folder.exists(), "rows_already_written": done,
        "files_to_score": to_score, "batch_size": batch, "batches": -(-to_score // batch),
        "model": config.model, "model_id": info.model_id, "image_size": info.image_size,
        "classes": list(info.class_names), "precision": config.precision, "extra_columns": columns,
        "predictors": pool.as_dict(),
        "resources": {"predictor": {"CPU": PREDICTOR_CPUS, **({"GPU": config.gpus_per_worker} if config.use_gpu else {})},
                      "decode_task": {"CPU": DECODE_CPUS}},
        "warm_up": warm_up,
        "estimate_s": round(to_score * per_image, 1),
    }
    logger.info("Dry run: %d files to score in %d batches, %s predictors; about %.0f s (no start-up)",
                to_score, plan["batches"], pool.as_dict(), plan["estimate_s"])
    return plan


def _time_sample(paths: list[str], info, config: ScoreConfig) -> dict:
    """Seconds per image to decode, and to predict at the run's precision, on `paths` in this process."""
    from catdog.model.tensorflow_setup import configure_tensorflow

    configure_tensorflow(False)
    from catdog.model.inference import load_inference_model

    started = time.perf_counter()
    decoded = imaging.read_and_decode(paths, info.image_size, config.max_image_pixels, config.max_file_bytes)
    decode_s = (time.perf_counter() - started) / len(paths)
    model = load_inference_model(info.location, config.precision)
    pixels = decoded["image"].astype("float32")
    model(pixels[:1], training=False)  # build and trace once, outside the timing
    started = time.perf_counter()
    model(pixels, training=False)
    predict_s = (time.perf_counter() - started) / len(paths)
    errors = sum(error is not None for error in decoded["error"])
    return {"sample_files": len(paths), "sample_errors": errors, "decode_s_per_image": round(decode_s, 5),
            "predict_s_per_image": round(predict_s, 5)}
