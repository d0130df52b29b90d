"""Score every image of a folder, URI prefix or manifest into Parquet: one row per file, resumable.

    ray job submit --working-dir . -- python -m jobs.score \\
        --model s3://bucket/runs/r1 --input s3://bucket/images/ --output s3://bucket/preds/2026-11-28/ --use-gpu

With --use-gpu the predictor pool is one per GPU present and, on a cluster whose autoscaler can add
GPU nodes, grows up to the GPUs it can add (--num-workers fixes it, --max-workers caps it); with no
GPU node yet it waits up to --wait-for-workers seconds for one, and exits 2 when none can come.
On a cluster of several nodes local paths are refused (exit 2) unless every node mounts them
(--assume-shared-storage).

Locally (starts a local Ray): python -m jobs.score --model runs/r1 --input photos/ --output preds/
Re-running into an existing output needs --resume (skip the files already scored) or --overwrite
(delete catdog's own files there first). The summary in OUTPUT/_SUCCESS.json is printed at the end.
"""

from __future__ import annotations

import argparse
import json

from catdog.cli import add_common_arguments, add_predictor_arguments, config_from_args, entrypoint
from catdog.cluster.checks import SHARED_STORAGE_FLAG, SHARED_STORAGE_HELP
from catdog.score.config import PARTITION_COLUMNS, ScoreConfig


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    defaults = ScoreConfig(model="-", input="-", output="-")
    parser = argparse.ArgumentParser(prog="python -m jobs.score", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="training run folder (model.keras + classes.json), a .keras "
                        "file, or an MLflow models:/NAME@ALIAS, models:/NAME/VERSION or runs:/ID/PATH")
    parser.add_argument("--mlflow-uri", help="MLflow server of a models:/ or runs:/ --model (default: MLFLOW_TRACKING_URI)")
    parser.add_argument("--input", required=True,
                        help="folder or URI searched recursively for images, or a .parquet/.csv manifest with a 'path' column")
    parser.add_argument("--output", required=True, help="predictions folder (path or URI)")
    add_predictor_arguments(parser)
    parser.add_argument("--gpus-per-worker", type=float, default=defaults.gpus_per_worker,
                        help="GPUs per predictor (fractions share a GPU; default %(default)g)")
    parser.add_argument("--min-workers", type=int, default=defaults.min_workers,
                        help="autoscaling pool: fewest predictor actors")
    parser.add_argument("--max-workers", type=int, default=defaults.max_workers,
                        help="autoscaling pool: most predictor actors (alone: from 1 up; default with --use-gpu: "
                             "the GPUs the cluster's autoscaler can add)")
    parser.add_argument("--wait-for-workers", type=float, default=defaults.wait_for_workers_s, metavar="SECONDS",
                        dest="wait_for_workers_s",
                        help="--use-gpu on a cluster with no GPU node yet: wait this long for the autoscaler to add "
                             "one, then exit 2 (default %(default)g)")
    parser.add_argument(SHARED_STORAGE_FLAG, action="store_true", help=SHARED_STORAGE_HELP)
    parser.add_argument("--rows-per-file", type=int, default=defaults.rows_per_file,
                        help="rows per output file, at least (default %(default)d)")
    parser.add_argument("--partition-by", choices=PARTITION_COLUMNS, default=defaults.partition_by,
                        help="write hive folders label=<class>/")
    parser.add_argument("--top-k", type=int, default=defaults.top_k, metavar="K",
                        help="add top_k_labels / top_k_probs: the K best classes and their probabilities")
    parser.add_argument("--embeddings", action="store_true",
                        help="add an 'embedding' column: the pooled backbone features (float32 list), for search")
    parser.add_argument("--max-image-pixels", type=int, default=defaults.max_image_pixels,
                        help="refuse images with more pixels than this (decompression bombs; default %(default)d)")
    parser.add_argument("--max-file-bytes", type=int, default=defaults.max_file_bytes,
                        help="files larger than this become 'too_large' rows without being read (default %(default)d)")
    parser.add_argument("--read-timeout", type=float, default=defaults.read_timeout_s, metavar="SECONDS",
                        dest="read_timeout_s",
                        help="a file whose open + read takes longer becomes a 'read_timeout' row (a hung NFS mount, a "
                             "stalled object-store read; default %(default)g)")
    parser.add_argument("--follow-symlinks", action="store_true", help="follow symlinks that lead outside --input")
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--overwrite", action="store_true", help="delete catdog's files in --output first (others are kept)")
    group.add_argument("--resume", action="store_true",
                       help="score only the files --output does not hold yet, files changed since their row, and rows "
                            "whose read error may pass")
    parser.add_argument("--dry-run", action="store_true",
                        help="check input, model and output, time a short warm-up and print the plan; write nothing")
    parser.add_argument("--drop-unlisted", action="store_true",
                        help="with --resume: remove rows of paths the input no longer lists (default: keep and report)")
    parser.add_argument("--input-moved", action="store_true",
                        help="with --resume: the input moved on purpose; resume from this --input although the output "
                             "was scored from another (default: refused, exit 2)")
    parser.add_argument("--scratch-dir", default=defaults.scratch_dir, metavar="FOLDER",
                        help="local folder for the resume and accounting buckets, about the size of the paths "
                             "(default: the system's temporary folder, often in RAM)")
    add_common_arguments(parser)
    return parser.parse_args(argv)


def run(args: argparse.Namespace) -> None:
    from catdog.score.run import score
    from catdog.tracking import resolve_model

    model, model_uri = resolve_model(args.model, args.mlflow_uri)  # models:/, runs:/: a downloaded copy
    plan_or_score = score
    if args.dry_run:
        from catdog.score.dry_run import plan_score as plan_or_score
    summary = plan_or_score(config_from_args(ScoreConfig, args, model=model, model_uri=model_uri))
    print(json.dumps(summary, indent=2, sort_keys=True, default=str))


main = entrypoint(parse_args, run)


if __name__ == "__main__":
    main()
