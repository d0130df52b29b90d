"""Evaluate a trained model on a labelled folder: score it like jobs.score, then measure.

    labelled folder -> manifest (path, true_label) -> catdog.score.run.score -> DIR/predictions
                    -> metrics.json, confusion.png, roc.png, reliability.png, confidence.png, mistakes.png

Scoring goes through the very pipeline users run at scale, so what is measured here is what they
get. The predictions of an evaluation set fit in memory (one row per labelled image); only the
columns needed are read back.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from catdog.analyse import metrics, plots
from catdog.errors import CatdogError, InputError, OutputExistsError
from catdog.io import storage
from catdog.model.run_folder import RunFolder
from catdog.score.predictions_folder import PredictionsFolder, error_kinds, prob_column

logger = logging.getLogger(__name__)

MANIFEST_FILE = "manifest.parquet"
PREDICTIONS_DIR = "predictions"
METRICS_FILE = "metrics.json"
PLOTS = ("confusion.png", "roc.png", "reliability.png", "confidence.png", "mistakes.png")
LOG_EPS = 1e-12  # floor for probabilities before taking logs to undo a temperature


@dataclass(frozen=True)
class EvaluateConfig:
    """What `jobs.evaluate` asks for; scoring options are passed on to ScoreConfig."""

    model: str  # training run folder (model.keras + classes.json) or a .keras file beside classes.json
    data: str  # labelled folder: one subfolder of images per class
    output: str  # evaluation folder; predictions go to OUTPUT/predictions
    overwrite: bool = False
    bins: int = metrics.DEFAULT_BINS  # calibration bins
    mistakes: int = 20  # images on the contact sheet
    batch_size: int | None = None
    num_workers: int | None = None
    precision: str = "float32"
    use_gpu: bool = False
    ray_address: str | None = None
    model_uri: str | None = None  # an MLflow --model (catdog.tracking): the version evaluated; model is its download

    def __post_init__(self):
        if self.bins < 1:
            raise CatdogError(f"--bins must be >= 1, got {self.bins}")
        if self.mistakes < 0:
            raise CatdogError(f"--mistakes must be >= 0, got {self.mistakes}")


def undo_temperature(probs: np.ndarray, temperature: float) -> np.ndarray:
    """Probabilities the model gave before its logits were divided by `temperature`.

    softmax(z / T) = p gives z / T = log p + c, so softmax(T * log p) = softmax(z).
    """
    logits = temperature * np.log(np.clip(probs.astype(np.float64), LOG_EPS, 1.0))
    logits -= logits.max(axis=1, keepdims=True)
    exp = np.exp(logits)
    return exp / exp.sum(axis=1, keepdims=True)


def _prepare_output(config: EvaluateConfig) -> None:
    storage.refuse_unsafe_output(config.output, config.data)
    if storage.is_dir(config.output) and storage.list_files(config.output) and not config.overwrite:
        raise OutputExistsError(f"{config.output} already holds results; pass --overwrite to replace them")
    if storage.exists(config.output) and not storage.is_dir(config.output):
        raise OutputExistsError(f"{config.output} exists and is a file")


def write_manifest(config: EvaluateConfig, class_names: list[str]) -> tuple[str, int]:
    """List the labelled folder and write OUTPUT/manifest.parquet (path, true_label)."""
    from catdog.io.labelled import list_labelled_images

    # The model's classes give the label order; a class folder the model does not know is an error.
    images = list_labelled_images(config.data, class_names=class_names)
    true_labels = [images.class_names[i] for i in images.labels]
    table = pa.table({"path": pa.array(list(images.paths), pa.string()), "true_label": pa.array(true_labels, pa.string())})
    location = storage.join(config.output, MANIFEST_FILE)
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    storage.write_bytes(location, sink.getvalue().to_pybytes())
    logger.info("Evaluating %d labelled images from %s: %s", table.num_rows, config.data, images.class_counts())
    return location, table.num_rows


def score_manifest(config: EvaluateConfig, manifest: str) -> dict:
    """Score the manifest into OUTPUT/predictions with the jobs.score pipeline."""
    from catdog.score.run import ScoreConfig, score

    score_config = ScoreConfig(
        model=config.model,
        model_uri=config.model_uri,
        input=manifest,
        output=storage.join(config.output, PREDICTIONS_DIR),
        overwrite=config.overwrite,
        batch_size=config.batch_size,
        num_workers=config.num_workers,
        precision=config.precision,
        use_gpu=config.use_gpu,
        ray_address=config.ray_address,
    )
    return score(score_config)


def read_predictions(location: str, class_names: list[str]) -> pa.Table:
    """The columns an evaluation needs from a predictions folder."""
    columns = ["path", "label", "true_label", "confidence", "error"] + [prob_column(c) for c in class_names]
    dataset = PredictionsFolder(location).scan()
    missing = [c for c in columns if c not in dataset.schema.names]
    if missing:
        raise InputError(f"{location} lacks column(s) {missing}: not scored from a labelled manifest by this model?")
    return dataset.to_table(columns=columns)


def compute_metrics(table: pa.Table, class_names: list[str], bins: int = metrics.DEFAULT_BINS) -> tuple[dict, dict]:
    """Metrics of the scored rows, and the arrays the plots need."""
    errors = table.column("error").to_pylist()
    scored = np.array([e is None for e in errors], dtype=bool)
    index = {name: i for i, name in enumerate(class_names)}
    true_names = np.array(table.column("true_label").to_pylist(), dtype=object)[scored]
    y_true = np.array([index[name] for name in true_names], dtype=np.int64)
    probs = np.stack([table.column(prob_column(c)).to_numpy(zero_copy_only=False) for c in class_names], axis=1)
    probs = probs[scored].astype(np.float64)
    if not y_true.size:
        raise InputError("no image of the labelled folder could be scored; see the errors in the predictions")
    result = metrics.classification_report(y_true, probs, class_names, bins=bins)
    result["unscored"] = int((~scored).sum())
    result["errors_by_kind"] = error_kinds(errors)
    arrays = {"y_true": y_true, "probs": probs, "paths": np.array(table.column("path").to_pylist())[scored]}
    return result, arrays


def _add_calibration_comparison(result: dict, probs: np.ndarray, y_true: np.ndarray, model: str, bins: int) -> None:
    """ECE as scored and, when training fitted a temperature, ECE with that temperature undone."""
    info = RunFolder(model).temperature()
    result["ece"] = result["calibration"]["ece"]
    if info is None:
        result["temperature"] = None
        return
    before = metrics.reliability(y_true, undo_temperature(probs, info["temperature"]), bins)
    result.update(temperature=info["temperature"], ece_before_temperature=before.ece, ece_after_temperature=result["ece"])
    if info["training_calibration"]:
        result["training_calibration"] = info["training_calibration"]


def _mistakes(arrays: dict, class_names: list[str], limit: int) -> list[plots.Mistake]:
    predicted = arrays["probs"].argmax(axis=1)
    confidence = arrays["probs"].max(axis=1)
    wrong = np.flatnonzero(predicted != arrays["y_true"])
    worst = wrong[np.argsort(-confidence[wrong], kind="stable")][:limit]
    return [
        plots.Mistake(str(arrays["paths"][i]), class_names[arrays["y_true"][i]], class_names[predicted[i]], float(confidence[i]))
        for i in worst
    ]


def write_plots(output: str, result: dict, arrays: dict, class_names: list[str], mistakes: int, bins: int) -> None:
    """confusion.png, roc.png, reliability.png, confidence.png and mistakes.png into `output`."""
    probs, y_true = arrays["probs"], arrays["y_true"]
    plots.plot_confusion(np.array(result["confusion_matrix"]), class_names, storage.join(output, "confusion.png"))
    plots.plot_roc(y_true, probs, class_names, storage.join(output, "roc.png"))
    plots.plot_reliability(metrics.reliability(y_true, probs, bins), storage.join(output, "reliability.png"))
    edges = np.linspace(0.0, 1.0, 21)
    plots.plot_confidence(np.histogram(probs.max(axis=1), bins=edges)[0], edges, storage.join(output, "confidence.png"))
    plots.plot_mistakes(_mistakes(arrays, class_names, mistakes), storage.join(output, "mistakes.png"))


def evaluate(config: EvaluateConfig) -> dict:
    """Score a labelled folder, write metrics.json and the plots to `config.output`; return the metrics.

    Raises:
        CatdogError: missing/empty data, classes the model lacks, output already there, bad model.
    """
    started = time.perf_counter()
    class_names = list(RunFolder(config.model).class_names())
    _prepare_output(config)
    manifest, listed = write_manifest(config, class_names)
    scoring = score_manifest(config, manifest)
    predictions = storage.join(config.output, PREDICTIONS_DIR)
    result, arrays = compute_metrics(read_predictions(predictions, class_names), class_names, config.bins)
    _add_calibration_comparison(result, arrays["probs"], arrays["y_true"], config.model, config.bins)
    result.update(model=config.model, model_uri=config.model_uri, data=config.data, predictions=predictions,
                  images=listed, scoring=scoring)
    write_plots(config.output, result, arrays, class_names, config.mistakes, config.bins)
    result["seconds"] = round(time.perf_counter() - started, 1)
    storage.write_json(storage.join(config.output, METRICS_FILE), result)
    logger.info(
        "Accuracy %.4f, ROC AUC %s, log loss %.4f, ECE %.4f on %d images; results in %s",
        result["accuracy"], result["roc_auc"], result["log_loss"], result["ece"], result["rows"], config.output,
    )
    return result
