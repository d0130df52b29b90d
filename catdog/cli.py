"""What every job entrypoint shares: logging set-up and mapping errors to exit codes."""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
from typing import Callable

from catdog.errors import CatdogError
from catdog.process import LOG_DATE_FORMAT, LOG_FORMAT
from catdog.process import quiet_environment

EXIT_USER_ERROR = 2  # bad argument, missing or empty input, output already there, unloadable model
EXIT_FAILURE = 1  # anything unexpected; the traceback is kept


def configure_logging(verbose: bool = False) -> None:
    """Concise `time level message` lines for catdog; TensorFlow and Ray kept quiet."""
    quiet_environment()
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format=LOG_FORMAT,
        datefmt=LOG_DATE_FORMAT,
        force=True,
    )
    for noisy in ("ray", "tensorflow", "absl", "h5py", "matplotlib", "PIL", "botocore", "urllib3"):
        logging.getLogger(noisy).setLevel(logging.WARNING if verbose else logging.ERROR)
    logging.getLogger("ray.data").setLevel(logging.WARNING)


def config_from_args(config_class: type, args: argparse.Namespace, **values):
    """`config_class` (a job's config dataclass) from the parsed flags named like its fields; `values`
    set the fields the job works out itself (a downloaded model, say). Flags that are no field
    (--verbose, --dry-run) stay out: every job turns its flags into its config this one way."""
    names = {field.name for field in dataclasses.fields(config_class)}
    return config_class(**{k: v for k, v in vars(args).items() if k in names and k not in values}, **values)


def add_common_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--verbose", action="store_true", help="debug logging, including Ray's and TensorFlow's")


def add_predictor_arguments(parser: argparse.ArgumentParser) -> None:
    """Where and how the model runs: the flags jobs.score and jobs.evaluate share."""
    from catdog.model.options import PRECISIONS
    from catdog.score.config import DEFAULT_CPU_BATCH_SIZE, DEFAULT_GPU_BATCH_SIZE, ScoreConfig

    defaults = ScoreConfig(model="-", input="-", output="-")
    parser.add_argument("--precision", default=defaults.precision, choices=PRECISIONS,
                        help="bfloat16 is faster on AMX/AVX512-BF16 CPUs; float16 for GPUs")
    parser.add_argument("--use-gpu", action="store_true", help="run predictors on GPUs")
    parser.add_argument("--num-workers", type=int, default=None,
                        help="a fixed number of predictor actors (default: 1 on CPU; with --use-gpu one per GPU, "
                             "growing with the GPU nodes an autoscaler adds)")
    parser.add_argument("--batch-size", type=int, default=None, help=f"images per predictor call (default {DEFAULT_CPU_BATCH_SIZE} CPU, {DEFAULT_GPU_BATCH_SIZE} GPU)")
    parser.add_argument("--ray-address", default=None, help="Ray cluster to join (default: RAY_ADDRESS or a local Ray)")


def entrypoint(parse_args: Callable[[list[str] | None], argparse.Namespace],
               run: Callable[[argparse.Namespace], object]) -> Callable[[list[str] | None], None]:
    """A job's `main(argv)`: parse, configure logging from --verbose, `run(args)`, exit with its code."""

    def main(argv: list[str] | None = None) -> None:
        args = parse_args(argv)
        configure_logging(args.verbose)
        run_job(lambda: run(args))

    return main


def run_job(job: Callable[[], object]) -> None:
    """Run a job's main function and exit: 0 on success, 2 on a user mistake, 1 otherwise."""
    try:
        job()
    except CatdogError as exc:
        logging.getLogger("catdog").error("%s", exc)
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(EXIT_USER_ERROR)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    sys.exit(0)
