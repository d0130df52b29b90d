"""Huge inputs: does the scoring driver's memory stay flat as the number of files grows?

Three measurements, each a fresh `python -m jobs.score` child whose own peak RSS is read
(`benchmarks/peak_memory.py`), side by side in one run:

- `bookkeeping`: listing + resume plan + accounting alone on N paths. A synthetic manifest of N
  paths and an output already holding a row for each (written here, not timed); the child runs
  `--resume`, finds nothing to score, and only lists, plans and accounts.
- `resume`: `--resume --drop-unlisted` of an output of N rows whose manifest lists half of them
  (N/2 rows to remove) and a plain `--resume` of the same output listing all N (nothing to do),
  side by side: the driver's peak RSS must not grow with the rows it replaces.
- `folder`: listing alone of a folder of N entries (empty files: the walk, not the reads).
- `train`: training (cached mode) on the real photos with 1 and 2 workers: each worker's
  embeddings (MiB) and peak RSS, from metrics.json.
- `score`: scoring N real photos (hard links to ../shared/data/catdog-dev, so N can exceed 500)
  with a 32-pixel model: driver peak RSS, steady images/s (from `scored_at`), time to the first
  written row.

    python benchmarks/scale_bench.py --bookkeeping 1000000 10000000 --resume 2000000 --folder 1000000 \
        --train 1 2 --score 10000 100000

Writes benchmarks/results/scale_bench.json and prints the figures.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tests")]

from benchmarks.peak_memory import run_python  # noqa: E402

PHOTOS = REPO.parent / "shared" / "data" / "catdog-dev"
ROWS_PER_PART = 200_000


def _env() -> dict:
    return {**os.environ, "PYTHONPATH": str(REPO), "CATDOG_TEST_CPUS": "2"}


def _model(work: Path) -> Path:
    from support import write_model_run

    run = work / "model"
    if not (run / "model.keras").exists():
        run.mkdir(parents=True, exist_ok=True)
        write_model_run(run, image_size=32)
    return run


def _fake_output(out: Path, paths: pa.Array, model_id: str) -> None:
    """An output as a finished run leaves it: part files, run marker, listing (not timed)."""
    from catdog.score.predictions_folder import RUN_MARKER, PartFilenameProvider, predictions_schema

    out.mkdir(parents=True)
    schema = predictions_schema(["cats", "dogs"])
    for task, start in enumerate(range(0, len(paths), ROWS_PER_PART)):
        chunk = paths.slice(start, ROWS_PER_PART)
        n = len(chunk)
        table = pa.table({
            "path": chunk, "label": pa.array(["cats"] * n), "prob_cats": pa.array(np.full(n, 0.9, np.float32)),
            "prob_dogs": pa.array(np.full(n, 0.1, np.float32)), "confidence": pa.array(np.full(n, 0.9, np.float32)),
            "error": pa.nulls(n, pa.string()), "width": pa.array(np.full(n, 500, np.int32)),
            "height": pa.array(np.full(n, 375, np.int32)), "model_id": pa.array([model_id] * n),
            "scored_at": pa.array(np.zeros(n, np.int64)).cast(pa.timestamp("us", tz="UTC")),
            "file_size": pa.nulls(n, pa.int64()), "file_modified": pa.nulls(n, pa.timestamp("us", tz="UTC")),
        }, schema=schema)
        name = PartFilenameProvider("0" * 12).get_filename_for_task("f" * 32, task).replace(".parquet", "-0.parquet")
        pq.write_table(table, out / name)
    (out / RUN_MARKER).write_text(json.dumps({"model_id": model_id, "class_names": ["cats", "dogs"],
                                              "partition_by": None, "with_true_label": False}))


def bookkeeping(n: int, work: Path) -> dict:
    from catdog.model.run_folder import describe_model

    model = _model(work)
    paths = pa.array([f"/data/images/{i // 10000:05d}/{i:010d}.jpg" for i in range(n)], pa.string())
    manifest, out = work / f"manifest-{n}.parquet", work / f"out-{n}"
    pq.write_table(pa.table({"path": paths}), manifest)
    _fake_output(out, paths, describe_model(str(model)).model_id)
    del paths
    run = run_python("-m", "jobs.score", ["--model", str(model), "--input", str(manifest), "--output", str(out),
                                          "--resume"], cwd=REPO, env=_env(), timeout=7200)
    if run.returncode != 0:
        raise RuntimeError(run.stderr[-3000:])
    summary = json.loads((out / "_SUCCESS.json").read_text())
    assert summary["rows_written"] == n and summary["rows_scored_this_run"] == 0
    shutil.rmtree(out)
    manifest.unlink()
    return {"paths": n, "wall_s": round(run.wall_s, 1), "driver_peak_rss_mib": round(run.peak_rss_mib),
            "us_per_path": round(run.wall_s / n * 1e6, 2)}


def resume(n: int, work: Path) -> dict:
    """Plain resume (nothing to do) against --drop-unlisted removing n/2 rows, same output size."""
    from catdog.model.run_folder import describe_model

    model = _model(work)
    model_id = describe_model(str(model)).model_id
    paths = pa.array([f"/data/images/{i // 10000:05d}/{i:010d}.jpg" for i in range(n)], pa.string())
    figures = {"rows": n}
    for name, listed, flags in (("plain", paths, []), ("drop_unlisted", paths.slice(0, n // 2), ["--drop-unlisted"])):
        manifest, out = work / f"manifest-{name}-{n}.parquet", work / f"out-{name}-{n}"
        pq.write_table(pa.table({"path": listed}), manifest)
        _fake_output(out, paths, model_id)
        run = run_python("-m", "jobs.score", ["--model", str(model), "--input", str(manifest), "--output", str(out),
                                              "--resume", "--scratch-dir", str(work), *flags],
                         cwd=REPO, env=_env(), timeout=7200)
        if run.returncode != 0:
            raise RuntimeError(run.stderr[-3000:])
        summary = json.loads((out / "_SUCCESS.json").read_text())
        assert summary["rows_written"] == len(listed) and summary["rows_removed"] == n - len(listed)
        figures[name] = {"rows_removed": summary["rows_removed"], "wall_s": round(run.wall_s, 1),
                         "driver_peak_rss_mib": round(run.peak_rss_mib)}
        shutil.rmtree(out)
        manifest.unlink()
    figures["drop_to_plain_rss_ratio"] = round(figures["drop_unlisted"]["driver_peak_rss_mib"]
                                               / figures["plain"]["driver_peak_rss_mib"], 3)
    return figures


_LIST_FOLDER = """
import sys
from catdog.io.inputs import open_input
chunks = rows = 0
for chunk in open_input(sys.argv[1]).chunks():
    chunks += 1
    rows += chunk.num_rows
print(rows, chunks)
"""


def folder(n: int, work: Path) -> dict:
    root = work / f"folder-{n}"
    for i in range(n):
        sub = root / f"{i // 10000:04d}"
        if i % 10000 == 0:
            sub.mkdir(parents=True)
        (sub / f"{i:08d}.jpg").touch()
    run = run_python("-c", _LIST_FOLDER, [str(root)], cwd=REPO, env=_env(), timeout=7200)
    rows, chunks = map(int, run.stdout.split())
    assert rows == n
    shutil.rmtree(root)
    return {"entries": n, "chunks": chunks, "wall_s": round(run.wall_s, 1), "peak_rss_mib": round(run.peak_rss_mib)}


def score(n: int, work: Path) -> dict:
    photos = sorted(p for p in PHOTOS.rglob("*") if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
    root = work / f"photos-{n}"
    for i in range(n):
        sub = root / f"{i // 5000:03d}"
        if i % 5000 == 0:
            sub.mkdir(parents=True)
        os.link(photos[i % len(photos)], sub / f"{i:07d}{photos[i % len(photos)].suffix}")
    out = work / f"scored-{n}"
    started = time.time()
    run = run_python("-m", "jobs.score", ["--model", str(_model(work)), "--input", str(root), "--output", str(out)],
                     cwd=REPO, env=_env(), timeout=7200)
    if run.returncode != 0:
        raise RuntimeError(run.stderr[-3000:])
    from catdog.score.predictions_folder import PredictionsFolder

    stamps = np.sort(PredictionsFolder(str(out)).read(columns=["scored_at"])["scored_at"].cast("int64").to_numpy())
    first, last = stamps[0] / 1e6, stamps[-1] / 1e6
    steady = int((stamps > stamps[0]).sum()) / (last - first) if last > first else None
    shutil.rmtree(out)
    shutil.rmtree(root)
    return {"files": n, "wall_s": round(run.wall_s, 1), "driver_peak_rss_mib": round(run.peak_rss_mib),
            "first_row_after_s": round(first - started, 1), "steady_images_per_s": round(steady, 1) if steady else None}


def train(workers: int, work: Path) -> dict:
    out = work / f"run-{workers}"
    run = run_python("-m", "jobs.train", ["--data", str(PHOTOS), "--output", str(out), "--weights", "none",
                                          "--image-size", "64", "--epochs", "2", "--num-workers", str(workers),
                                          "--cache-dir", str(work / "feature-cache"), "--overwrite"],
                     cwd=REPO, env=_env(), timeout=7200)
    if run.returncode != 0:
        raise RuntimeError(run.stderr[-3000:])
    memory = json.loads((out / "metrics.json").read_text())["workers"]["memory_by_rank"]
    shutil.rmtree(out)
    return {"workers": workers, "embeddings_mib_per_worker": [m["embeddings_mib"] for m in memory],
            "worker_peak_rss_mib": [m["peak_rss_mib"] for m in memory]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bookkeeping", type=int, nargs="*", default=[])
    parser.add_argument("--resume", type=int, nargs="*", default=[], help="output rows")
    parser.add_argument("--folder", type=int, nargs="*", default=[])
    parser.add_argument("--train", type=int, nargs="*", default=[], help="worker counts")
    parser.add_argument("--score", type=int, nargs="*", default=[])
    parser.add_argument("--work", default=None, help="scratch folder (default: a temporary one)")
    args = parser.parse_args()
    work = Path(args.work or tempfile.mkdtemp(prefix="catdog-scale-"))
    target = REPO / "benchmarks" / "results" / "scale_bench.json"
    # Kinds not measured in this run keep their figures from an earlier run.
    results: dict = json.loads(target.read_text()) if target.exists() else {}
    for kind, sizes in (("bookkeeping", args.bookkeeping), ("resume", args.resume), ("folder", args.folder),
                        ("train", args.train), ("score", args.score)):
        if sizes or kind not in results:
            results[kind] = []
    target.parent.mkdir(exist_ok=True)
    measures = (("bookkeeping", bookkeeping, args.bookkeeping), ("resume", resume, args.resume),
                ("folder", folder, args.folder),
                ("train", train, args.train), ("score", score, args.score))
    for kind, measure, sizes in measures:
        for n in sizes:
            results[kind].append(measure(n, work))
            print(kind, results[kind][-1], flush=True)
            target.write_text(json.dumps(results, indent=2) + "\n")  # what is measured survives a later failure
    for kind, key in (("bookkeeping", "driver_peak_rss_mib"), ("score", "driver_peak_rss_mib")):
        rows = results[kind]
        if len(rows) >= 2:
            results[f"{kind}_rss_ratio_largest_to_smallest"] = round(rows[-1][key] / rows[0][key], 3)
    if len(results.get("train", [])) >= 2:
        per_worker = [max(r["embeddings_mib_per_worker"]) for r in results["train"]]
        results["train_embeddings_ratio_most_to_fewest_workers"] = round(per_worker[-1] / per_worker[0], 3)
    if len(results["score"]) >= 2 and all(r["steady_images_per_s"] for r in results["score"]):
        results["score_rate_ratio_largest_to_smallest"] = round(
            results["score"][-1]["steady_images_per_s"] / results["score"][0]["steady_images_per_s"], 3)
    target.write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
