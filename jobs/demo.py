"""End-to-end demo on generated data: train (2 workers, local Ray), score, print a summary.

    python -m jobs.demo
    ray job submit --working-dir . -- python -m jobs.demo --workdir /tmp/catdog-demo
"""

from __future__ import annotations

import argparse
import json

from catdog.cli import add_common_arguments, config_from_args, entrypoint
from catdog.demo import DemoConfig, run_demo


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    defaults = DemoConfig()
    parser = argparse.ArgumentParser(prog="python -m jobs.demo", description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", default=defaults.workdir, help="folder for data, run and predictions")
    parser.add_argument("--images-per-class", type=int, default=defaults.images_per_class)
    parser.add_argument("--image-size", type=int, default=defaults.image_size)
    parser.add_argument("--epochs", type=int, default=defaults.epochs)
    parser.add_argument("--num-workers", type=int, default=defaults.num_workers)
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --workdir")
    add_common_arguments(parser)
    return parser.parse_args(argv)


def run(args: argparse.Namespace) -> None:
    summary = run_demo(config_from_args(DemoConfig, args))
    print("\nDemo summary:\n" + json.dumps(summary, indent=2))


main = entrypoint(parse_args, run)


if __name__ == "__main__":
    main()
