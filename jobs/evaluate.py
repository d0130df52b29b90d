"""Evaluate a trained model on a labelled folder (one subfolder of images per class).

Scores the folder with the jobs.score pipeline into OUTPUT/predictions (with a true_label column),
then writes OUTPUT/metrics.json (accuracy, per-class precision/recall/F1, confusion matrix, ROC and
PR AUC, log loss, ECE) and confusion.png, roc.png, reliability.png, confidence.png, mistakes.png.

    ray job submit --working-dir . -- python -m jobs.evaluate \\
        --model runs/my-run --data s3://bucket/labelled-holdout --output s3://bucket/eval/my-run

`--model models:/catdog@champion` (with --mlflow-uri or MLFLOW_TRACKING_URI) evaluates a registered model.
"""

from __future__ import annotations

import argparse

from catdog.analyse.evaluation import EvaluateConfig
from catdog.cli import add_common_arguments, add_predictor_arguments, config_from_args, entrypoint


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    defaults = EvaluateConfig(model="-", data="-", output="-")
    parser = argparse.ArgumentParser(prog="python -m jobs.evaluate", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="training run folder (model.keras + classes.json), or an MLflow "
                        "models:/NAME@ALIAS, models:/NAME/VERSION or runs:/ID/PATH")
    parser.add_argument("--mlflow-uri", help="MLflow server of a models:/ or runs:/ --model (default: MLFLOW_TRACKING_URI)")
    parser.add_argument("--data", required=True, help="labelled folder: <class>/<image> (path or URI)")
    parser.add_argument("--output", required=True, help="evaluation folder (path or URI)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing evaluation folder")
    parser.add_argument("--bins", type=int, default=defaults.bins, help="calibration bins for ECE (default %(default)d)")
    parser.add_argument("--mistakes", type=int, default=defaults.mistakes,
                        help="images on the mistakes contact sheet (default %(default)d)")
    add_predictor_arguments(parser)
    add_common_arguments(parser)
    return parser.parse_args(argv)


def run(args: argparse.Namespace) -> None:
    from catdog.analyse.evaluation import evaluate
    from catdog.tracking import resolve_model

    model, model_uri = resolve_model(args.model, args.mlflow_uri)  # models:/, runs:/: a downloaded copy
    evaluate(config_from_args(EvaluateConfig, args, model=model, model_uri=model_uri))


main = entrypoint(parse_args, run)


if __name__ == "__main__":
    main()
