"""Train a classifier head on a frozen ResNet50, data-parallel with Ray Train.

On a cluster:

    ray job submit --working-dir . -- python -m jobs.train \\
        --data /data/train --output s3://bucket/runs/r1 --num-workers 4 --use-gpu --cpus-per-worker 4

On a cluster of several nodes, local --output and --cache-dir paths are refused (exit 2) unless
every node mounts them (NFS and the like: pass --assume-shared-storage); use s3:// or gs:// URIs.
`--placement spread` puts the workers on different nodes.

On a laptop (a local Ray starts by itself):

    python -m jobs.train --data data/train --output runs/r1 --weights none

`--data` holds one subfolder per class. The run folder gets model.keras, classes.json,
config.json, metrics.json, history.csv, curves.png and tensorboard/. Exit code 2 on a user mistake.

With MLflow (pip install 'catdog[mlflow]'): --mlflow-uri http://mlflow:5000 --register-as catdog logs
the run (parameters, per-epoch metrics, the run folder) and registers it as a model version.
"""

from __future__ import annotations

import argparse

from catdog.cli import add_common_arguments, config_from_args, entrypoint
from catdog.cluster.checks import SHARED_STORAGE_FLAG, SHARED_STORAGE_HELP
from catdog.model.options import HEADS
from catdog.train.config import MODES, PLACEMENTS, TrainConfig


def build_parser() -> argparse.ArgumentParser:
    defaults = TrainConfig(data="", output="")
    p = argparse.ArgumentParser(prog="python -m jobs.train", description=__doc__.split("\n\n")[0])
    p.add_argument("--data", required=True, help="folder or URI with one subfolder of images per class")
    p.add_argument("--output", required=True, help="run folder (local path or s3://, gs://, file:// URI)")
    p.add_argument("--val-data", help="separate validation folder (same class subfolders); default: split --data")
    p.add_argument("--val-fraction", type=float, default=defaults.val_fraction, help="share of --data held out (default %(default)s)")
    p.add_argument("--seed", type=int, default=defaults.seed, help="split and head initialisation seed (default %(default)s)")
    p.add_argument("--image-size", type=int, default=defaults.image_size, help="square input size in pixels (default %(default)s)")
    p.add_argument("--head", choices=HEADS, default=defaults.head, help="gap: pooled features; flatten: the tutorial's head")
    p.add_argument("--weights", default=defaults.weights, help="imagenet, none (random init) or a path/URI of a Keras weights file")
    p.add_argument("--mode", choices=MODES, default=defaults.mode, help="cached: fit on cached backbone features (default); end-to-end: decode images every epoch")
    p.add_argument("--augment", action="store_true", help="random flip, rotation and crop (end-to-end mode)")
    p.add_argument("--epochs", type=int, default=defaults.epochs)
    p.add_argument("--batch-size", type=int, default=defaults.batch_size, help="global batch size, split over workers (default %(default)s)")
    p.add_argument("--learning-rate", type=float, default=defaults.learning_rate)
    p.add_argument("--patience", type=int, default=defaults.patience, help="early stopping: epochs without a better val_loss; 0 = off (default %(default)s)")
    p.add_argument("--num-workers", type=int, default=defaults.num_workers, help="Ray Train workers (default %(default)s)")
    p.add_argument("--placement", choices=PLACEMENTS, default=defaults.placement,
                   help="pack: workers on as few nodes as fit; spread: on different nodes where possible, "
                        "so one lost node takes one worker (default %(default)s)")
    p.add_argument("--use-gpu", action="store_true", help="one GPU per worker and per feature actor")
    p.add_argument("--cpus-per-worker", type=float, default=defaults.cpus_per_worker, help="CPUs per worker and feature actor; fractions allowed (default %(default)s)")
    p.add_argument("--cache-dir", help="feature cache folder or URI (default ~/.cache/catdog/features; shared storage on clusters)")
    p.add_argument("--keep-checkpoints", type=int, default=defaults.keep_checkpoints, help="best checkpoints kept by val_loss (default %(default)s)")
    p.add_argument("--max-failures", type=int, default=defaults.max_failures, help="worker-group restarts from the latest checkpoint; -1 = unlimited (default %(default)s)")
    p.add_argument("--overwrite", action="store_true", help="replace the run files of an existing --output")
    p.add_argument(SHARED_STORAGE_FLAG, action="store_true", help=SHARED_STORAGE_HELP)
    p.add_argument("--mlflow-uri", help="log the run to this MLflow tracking server (default: MLFLOW_TRACKING_URI; "
                                        "needs pip install 'catdog[mlflow]')")
    p.add_argument("--mlflow-experiment", help="MLflow experiment (default: MLFLOW_EXPERIMENT_NAME, else catdog)")
    p.add_argument("--register-as", metavar="NAME", help="register the run folder as a new version of this MLflow model")
    add_common_arguments(p)
    return p


def run(args: argparse.Namespace) -> None:
    from catdog.train.run import train

    train(config_from_args(TrainConfig, args))


main = entrypoint(lambda argv: build_parser().parse_args(argv), run)


if __name__ == "__main__":
    main()
