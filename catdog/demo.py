"""The built-in end-to-end demo: generate a labelled folder, train on local Ray, score, summarise.

Needs no download: the images are synthetic and the backbone is randomly initialised, so it shows
the whole pipeline (feature cache, data-parallel training, Ray Data scoring into Parquet) on a laptop.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from catdog.errors import OutputExistsError
from catdog.io.sample_data import generate_sample_dataset, remove_sample_dataset

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class DemoConfig:
    """Settings of the demo; small defaults so it runs in a couple of minutes on 2 cores."""

    workdir: str = "demo-output"
    images_per_class: int = 60
    image_size: int = 64
    epochs: int = 8
    num_workers: int = 2
    overwrite: bool = False


def run_demo(config: DemoConfig) -> dict:
    """Train on a generated folder and score a second generated folder; return a summary dict."""
    from catdog.score.config import ScoreConfig
    from catdog.score.run import score
    from catdog.train.config import TrainConfig
    from catdog.train.run import train

    workdir = Path(config.workdir).resolve()
    if workdir.exists() and any(workdir.iterdir()) and not config.overwrite:
        raise OutputExistsError(f"{workdir} already exists; pass --overwrite to replace the demo's output")
    # --overwrite replaces only what the demo makes: its generated images here, and the run and
    # predictions through the jobs' own --overwrite, which delete only catdog's files.
    for generated in (workdir / "data" / "train", workdir / "data" / "unlabelled"):
        remove_sample_dataset(generated)
    train_data = generate_sample_dataset(workdir / "data" / "train", images_per_class=config.images_per_class, seed=1)
    score_data = generate_sample_dataset(workdir / "data" / "unlabelled", images_per_class=20, seed=2)
    logger.info("Generated %s (training) and %s (to score)", train_data, score_data)

    result = train(
        TrainConfig(
            data=str(train_data),
            output=str(workdir / "run"),
            weights="none",
            image_size=config.image_size,
            epochs=config.epochs,
            num_workers=config.num_workers,
            cache_dir=str(workdir / "feature-cache"),
            overwrite=config.overwrite,
        )
    )
    summary = score(ScoreConfig(model=result.output, input=str(score_data), output=str(workdir / "predictions"),
                                overwrite=config.overwrite))

    import pyarrow.compute as pc

    from catdog.score.predictions_folder import PredictionsFolder

    table = PredictionsFolder(str(workdir / "predictions")).read(columns=["path", "label"])
    truth = pc.if_else(pc.match_substring(table["path"], "/cats/"), "cats", "dogs")
    accuracy = pc.mean(pc.cast(pc.equal(truth, table["label"]), "int8")).as_py()
    final = result.metrics.get("final", result.metrics)
    report = {
        "run": result.output,
        "val_accuracy": final.get("val_accuracy"),
        "predictions": str(workdir / "predictions"),
        "rows_written": summary["rows_written"],
        "errors": summary["errors"],
        "accuracy_on_scored_folder": round(accuracy, 4),
        "images_per_s": summary["images_per_s"],
    }
    return report
