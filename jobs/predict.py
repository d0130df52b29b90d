"""Classify one image in this process (no Ray), like the tutorial's last step.

    python -m jobs.predict photo.jpg --model /runs/r1

On a cluster: ray job submit --working-dir . -- python -m jobs.predict s3://bucket/photo.jpg --model s3://bucket/runs/r1
Prints the most likely class with its probability, then every class probability.
"""

from __future__ import annotations

import argparse

from catdog.cli import add_common_arguments, entrypoint
from catdog.model.options import PRECISIONS
from catdog.score.config import ScoreConfig


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    defaults = ScoreConfig(model="-", input="-", output="-")  # one image is scored as a scoring run scores it
    parser = argparse.ArgumentParser(prog="python -m jobs.predict", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("image", help="image file (path or URI)")
    parser.add_argument("--model", required=True, help="training run folder (model.keras + classes.json) or a .keras file")
    parser.add_argument("--precision", default=defaults.precision, choices=PRECISIONS)
    parser.add_argument("--max-image-pixels", type=int, default=defaults.max_image_pixels,
                        help="refuse larger images (default %(default)d)")
    add_common_arguments(parser)
    return parser.parse_args(argv)


def format_prediction(result: dict) -> str:
    """The tutorial's sentence, then one line per class."""
    lines = [f"This image is {result['confidence']:.2%} {result['label']}."]
    lines += [f"  {name}: {p:.4f}" for name, p in result["probabilities"].items()]
    return "\n".join(lines)


def run(args: argparse.Namespace) -> None:
    from catdog.score.predictor import predict_image

    print(format_prediction(predict_image(args.model, args.image, args.precision, args.max_image_pixels)))


main = entrypoint(parse_args, run)


if __name__ == "__main__":
    main()
