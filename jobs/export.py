"""Export a trained model as a TensorFlow SavedModel for TF Serving (encoded image bytes or uint8 pixels in).

    python -m jobs.export --model runs/r1 --output exports/catdog/1

On a cluster: ray job submit --working-dir . -- python -m jobs.export --model s3://bucket/runs/r1 \\
    --output s3://bucket/serving/catdog/1
Signatures, decoding differences and a TF Serving command: docs/serving.md.
"""

from __future__ import annotations

import argparse

from catdog.cli import add_common_arguments, config_from_args, entrypoint


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m jobs.export", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True,
                        help="training run folder (model.keras + classes.json) or a .keras file")
    parser.add_argument("--output", required=True,
                        help="SavedModel folder (path or URI); for TF Serving a numbered version folder: .../catdog/1")
    parser.add_argument("--overwrite", action="store_true", help="replace the SavedModel in an existing --output")
    add_common_arguments(parser)
    return parser.parse_args(argv)


def run(args: argparse.Namespace) -> None:
    from catdog.model.export import ExportConfig, export_model

    export_model(config_from_args(ExportConfig, args))


main = entrypoint(parse_args, run)


if __name__ == "__main__":
    main()
