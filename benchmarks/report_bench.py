"""How fast is jobs.report, and how much memory does it take, against loading the folder into pandas?

Generates a predictions folder with the real schema (default 1,000,000 rows in 8 files), then runs,
each in its own process, peak RSS from that process's own VmHWM (benchmarks/peak_memory.py):
  - `python -m jobs.report` at two scan batch sizes,
  - the naive alternative: `pandas.read_parquet` of the whole folder and the same counts.

    python benchmarks/report_bench.py --rows 1000000 --files 8
Prints a table and writes benchmarks/results/report_bench.json. Measured here (2 shared cores):
jobs.report peaks at ~240-250 MiB for 1M, 5M and 20M rows alike (2-12 s per 1M-5M run, load-dependent);
pandas peaks at 364 MiB for 1M rows and 1,051 MiB for 5M.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.peak_memory import run_python  # noqa: E402
from catdog.score.predictions_folder import predictions_schema  # noqa: E402

PANDAS_NAIVE = """
import sys, pandas as pd
df = pd.read_parquet(sys.argv[1])
print(len(df), df["label"].value_counts().to_dict(), (df["confidence"] < 0.5).sum(),
      df["error"].dropna().str.split(":").str[0].value_counts().to_dict())
"""


def generate(folder: Path, rows: int, files: int, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    schema = predictions_schema(["cats", "dogs"])
    scored_at = datetime.now(timezone.utc)
    for i, (lo, hi) in enumerate(zip(*[np.linspace(0, rows, files + 1).astype(int)[s] for s in (slice(0, -1), slice(1, None))])):
        n = hi - lo
        p = rng.random(n).astype(np.float32)
        bad = rng.random(n) < 0.001
        table = pa.table({
            "path": [f"s3://bucket/images/{j:09d}.jpg" for j in range(lo, hi)],
            "label": pa.array(np.where(p >= 0.5, "dogs", "cats"), mask=bad),
            "prob_cats": pa.array(1 - p, mask=bad),
            "prob_dogs": pa.array(p, mask=bad),
            "confidence": pa.array(np.maximum(p, 1 - p), mask=bad),
            "error": pa.array(np.full(n, "truncated: image file is truncated"), mask=~bad),
            "width": pa.array(np.full(n, 500, np.int32)),
            "height": pa.array(np.full(n, 375, np.int32)),
            "model_id": ["0123456789abcdef"] * n,
            "scored_at": pa.array([scored_at] * n, pa.timestamp("us", tz="UTC")),
            "file_size": pa.array(np.full(n, 50_000, np.int64)),
            "file_modified": pa.array([scored_at] * n, pa.timestamp("us", tz="UTC")),
        }, schema=schema)
        pq.write_table(table, folder / f"part-{i:05d}.parquet")


def measure(kind: str, target: str, args: list[str]) -> dict:
    """Wall time and peak RSS of one child process (`python -m target` or `python -c target`)."""
    run = run_python(kind, target, args, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=3600)
    if run.returncode != 0:
        raise RuntimeError(f"{target} failed: {run.stderr[-2000:]}")
    return {"wall_s": round(run.wall_s, 2), "peak_rss_mib": round(run.peak_rss_mib, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--files", type=int, default=8)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="catdog-report-bench-") as tmp:
        folder = Path(tmp) / "predictions"
        folder.mkdir()
        t0 = time.perf_counter()
        generate(folder, args.rows, args.files)
        size_mib = sum(f.stat().st_size for f in folder.iterdir()) / 2**20
        print(f"generated {args.rows:,} rows in {args.files} files ({size_mib:.0f} MiB) in {time.perf_counter() - t0:.1f} s")
        runs = {}
        for batch in ("65536", "1000000"):
            runs[f"jobs.report batch_size={batch}"] = measure(
                "-c",
                "import sys; from catdog.analyse.report import ReportConfig, report; "
                f"report(ReportConfig(sys.argv[1], output=sys.argv[2], batch_size={batch}))",
                [str(folder), str(Path(tmp) / f"report-{batch}")],
            )
        runs["jobs.report (CLI, default)"] = measure("-m", "jobs.report", [str(folder), "--output", str(Path(tmp) / "cli")])
        runs["pandas.read_parquet whole folder"] = measure("-c", PANDAS_NAIVE, [str(folder)])
    print(f"{'run':40s} {'wall s':>8s} {'peak RSS MiB':>13s} {'rows/s':>12s}")
    for name, figures in runs.items():
        figures["rows_per_s"] = round(args.rows / figures["wall_s"])
        print(f"{name:40s} {figures['wall_s']:8.2f} {figures['peak_rss_mib']:13.0f} {figures['rows_per_s']:12,d}")
    results = REPO / "benchmarks" / "results"
    results.mkdir(parents=True, exist_ok=True)
    payload = {"rows": args.rows, "files": args.files, "parquet_mib": round(size_mib, 1), "runs": runs,
               "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
               "measured_at": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    (results / "report_bench.json").write_text(json.dumps(payload, indent=2) + "\n")
    print(f"wrote {results / 'report_bench.json'}")


if __name__ == "__main__":
    main()
