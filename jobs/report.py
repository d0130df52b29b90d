"""Summarise a predictions folder: rows, errors by kind, label counts, confidence, throughput.

Scans the Parquet in batches (never loads it whole), prints a summary and writes report.json
and confidence.png to --output (default: a sibling folder "<PREDICTIONS_DIR>-report").

    ray job submit --working-dir . -- python -m jobs.report s3://bucket/predictions --threshold 0.8

Runs without Ray too: python -m jobs.report runs/predictions --output runs/predictions-report
"""

from __future__ import annotations

import argparse

from catdog.analyse.report import ReportConfig, format_report, report
from catdog.cli import add_common_arguments, config_from_args, entrypoint


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    defaults = ReportConfig("-")
    parser = argparse.ArgumentParser(prog="python -m jobs.report", description=__doc__.split("\n\n")[0])
    parser.add_argument("predictions", help="predictions folder written by jobs.score or jobs.evaluate (path or URI)")
    parser.add_argument("--threshold", type=float, default=defaults.threshold,
                        help="confidence below this is low (default %(default)g)")
    parser.add_argument("--output", default=defaults.output, help="folder for report.json and confidence.png")
    parser.add_argument("--bins", type=int, default=defaults.bins, help="confidence histogram bins (default %(default)d)")
    add_common_arguments(parser)
    return parser.parse_args(argv)


def run(args: argparse.Namespace) -> None:
    print(format_report(report(config_from_args(ReportConfig, args))))


main = entrypoint(parse_args, run)


if __name__ == "__main__":
    main()
