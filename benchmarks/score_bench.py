"""Scoring throughput and memory, side by side in one run, on N real photos.

    python benchmarks/score_bench.py --n 2000                  # ceiling, tutorial, jobs.score fp32/bf16
    python benchmarks/score_bench.py --rss-sizes 1000,10000 --only score_bfloat16   # memory growth

Measured, each in its own fresh process (peak RSS summed over the whole process tree, Ray's
processes included, sampled every 0.2 s):
- ceiling_<precision>: the predictor's own forward (catdog.score.predictor.Predictor.predict) on
  pre-decoded uint8 batches, no I/O, run as the scoring actor runs it (Predictor.concurrent_batches
  batches at once): the most scoring can reach on this machine;
- tutorial: keras image_dataset_from_directory + model.predict + pandas to_parquet, one process;
  its end-to-end rate is images / process wall time (start to exit), the clock jobs.score gets;
- score_<precision>: `python -m jobs.score` end to end (process start to exit), and its
  steady state, from the `scored_at` stamps of the output (rows after the first batch / time).
Also CPU seconds of each whole process tree: on a shared machine wall times swing with other
people's load, CPU per image much less; `marginal_cpu_ms_per_image` (a run of N minus a run of
3 batches, per extra image) is the pipeline's steady-state cost, to compare with the ceiling's.
N images are made by symlinking the real photos repeatedly into a temporary folder (distinct
paths, no copies; jobs.score gets --follow-symlinks). The model is a ResNet50 with random weights
(no download here) at --image-size, unless --model names a run folder. Writes
benchmarks/results/score_bench.json.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.process_stats import cpu_seconds, process_tree, rss_bytes  # noqa: E402 - after the path set-up

PHOTOS = ROOT.parent / "shared" / "data" / "catdog-dev"
RESULTS = ROOT / "benchmarks" / "results"
PRECISIONS = ("float32", "bfloat16")
TUTORIAL_BATCH_SIZE = 32  # the tutorial's image_dataset_from_directory default


def run_measured(command: list[str], env: dict | None = None, timeout: float = 3600) -> dict:
    """Run a command; return wall seconds, peak tree RSS, tree CPU seconds and its stdout.

    CPU seconds (last value seen per process, sampled every 0.2 s) barely depend on what else
    the machine runs, unlike wall time: on a shared machine they are the steadier figure.
    """
    started = time.monotonic()
    process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True, start_new_session=True)
    peak, cpu = 0, {}
    while process.poll() is None:
        tree = process_tree(process.pid)
        peak = max(peak, sum(rss_bytes(p) for p in tree))
        for pid in tree:
            cpu[pid] = max(cpu.get(pid, 0.0), cpu_seconds(pid))
        if time.monotonic() - started > timeout:
            process.kill()
        time.sleep(0.2)
    wall = time.monotonic() - started
    stdout, stderr = process.communicate()
    if process.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed ({process.returncode}):\n{stderr[-4000:]}")
    try:  # stop what the run left behind (Ray's agents linger after a local driver exits)
        os.killpg(process.pid, 9)
    except (ProcessLookupError, PermissionError):
        pass
    return {"wall_s": round(wall, 2), "peak_rss_mb": round(peak / 2**20, 1), "cpu_s": round(sum(cpu.values()), 1),
            "stdout": stdout}


def _last_json(stdout: str) -> dict:
    return json.loads(stdout.strip().splitlines()[-1])


# ---- the measured workers (run in their own processes) ------------------------------------

def worker_build(run: str, image_size: int) -> None:
    sys.path.insert(0, str(ROOT / "tests"))
    from support import write_model_run

    Path(run).mkdir(parents=True, exist_ok=True)
    write_model_run(Path(run), image_size=image_size)
    print(json.dumps({"run": run}))


def worker_ceiling(run: str, precision: str, images: int, batch_size: int) -> None:
    import numpy as np

    from catdog.io.imaging import decode_image
    from catdog.model.run_folder import describe_model
    from catdog.score.predictor import Predictor

    info = describe_model(run)
    files = sorted(PHOTOS.rglob("*.jpg"))[:batch_size]
    batch = np.stack([decode_image(f.read_bytes(), info.image_size)[0] for f in files])
    predictor = Predictor(info, precision)
    streams = predictor.concurrent_batches  # as the scoring actor runs it: this many batches at once
    batches_per_stream = max(1, images // batch_size // streams)

    def in_parallel(batches: int) -> None:
        threads = [threading.Thread(target=lambda: [predictor.predict(batch) for _ in range(batches)])
                   for _ in range(streams)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()

    in_parallel(2)  # warm-up: oneDNN primitive creation, allocator
    started, cpu_started = time.perf_counter(), time.process_time()
    in_parallel(batches_per_stream)
    seconds, cpu = time.perf_counter() - started, time.process_time() - cpu_started
    n = batches_per_stream * streams * batch_size
    print(json.dumps({"images": n, "seconds": seconds, "images_per_s": n / seconds, "cpu_ms_per_image": 1000 * cpu / n,
                      "concurrent_batches": streams}))


def worker_tutorial(run: str, folder: str, out: str, batch_size: int) -> None:
    started = time.perf_counter()
    from catdog.model import build as catdog_model

    import keras
    import pandas as pd

    loaded = catdog_model.load_model(run)
    size = loaded.input_shape[1]
    dataset = keras.utils.image_dataset_from_directory(folder, labels=None, image_size=(size, size),
                                                       batch_size=batch_size, shuffle=False)
    predict_started = time.perf_counter()
    probs = loaded.predict(dataset, verbose=0)
    predict_seconds = time.perf_counter() - predict_started
    classes = json.loads((Path(run) / "classes.json").read_text())
    frame = pd.DataFrame({"path": dataset.file_paths, "label": [classes[i] for i in probs.argmax(1)]})
    for k, name in enumerate(classes):
        frame[f"prob_{name}"] = probs[:, k]
    frame.to_parquet(out)
    seconds = time.perf_counter() - started
    print(json.dumps({"images": len(frame), "seconds": seconds, "images_per_s": len(frame) / seconds,
                      "predict_images_per_s": len(frame) / predict_seconds}))


# ---- the driver ---------------------------------------------------------------------------

def make_input(folder: Path, n: int, link=os.symlink) -> Path:
    """N distinct paths (links to the real photos, cycled) in cats/ and dogs/ subfolders."""
    photos = sorted(PHOTOS.rglob("*.jpg"))
    if not photos:
        raise SystemExit(f"no photos under {PHOTOS}")
    for i in range(n):
        source = photos[i % len(photos)]
        target = folder / source.parent.name / f"{source.stem}.r{i // len(photos):03d}.jpg"
        target.parent.mkdir(parents=True, exist_ok=True)
        link(source, target)
    return folder


def steady_state(out: Path) -> dict:
    """Images/s between the first and the last predictor batch, from the scored_at stamps."""
    import pyarrow.compute as pc

    sys.path.insert(0, str(ROOT))
    from catdog.score.predictions_folder import PredictionsFolder

    table = PredictionsFolder(str(out)).read(columns=["scored_at"])
    stamps = table["scored_at"].cast("int64").to_numpy()
    first, last = stamps.min(), stamps.max()
    after_first = int((stamps > first).sum())
    seconds = (last - first) / 1e6
    return {"steady_images": after_first, "steady_seconds": round(seconds, 2),
            "steady_images_per_s": round(after_first / seconds, 2) if seconds > 0 else None,
            "batches": int(len(pc.unique(table["scored_at"])))}


def bench_score(run: str, folder: Path, out: Path, precision: str, batch_size: int | None) -> dict:
    command = [sys.executable, "-m", "jobs.score", "--model", run, "--input", str(folder), "--output", str(out),
               "--precision", precision, "--follow-symlinks"]
    if batch_size:
        command += ["--batch-size", str(batch_size)]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    measured = run_measured(command, env=env)
    summary = json.loads(measured.pop("stdout"))
    result = {**measured, "images": summary["rows_written"], "errors": summary["errors"],
              "images_per_s": round(summary["rows_written"] / measured["wall_s"], 2),
              "job_images_per_s": summary["images_per_s"], **steady_state(out)}
    shutil.rmtree(out)
    return result


def bench_score_marginal(run: str, folder: Path, small: Path, out: Path, precision: str, batch_size: int) -> dict:
    """jobs.score on N images, plus the CPU cost of one more image: (CPU(N) - CPU(small)) / (N - small),
    which leaves out start-up (imports, Ray, model load) -- the steady state in CPU terms."""
    result = bench_score(run, folder, out, precision, batch_size)
    baseline = bench_score(run, small, out, precision, batch_size)
    extra = result["images"] - baseline["images"]
    result["startup_cpu_s"] = baseline["cpu_s"]
    result["marginal_cpu_ms_per_image"] = round(1000 * (result["cpu_s"] - baseline["cpu_s"]) / extra, 1)
    result["cpu_ms_per_image"] = round(1000 * result["cpu_s"] / result["images"], 1)
    return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=2000, help="images for the tutorial and jobs.score runs")
    parser.add_argument("--image-size", type=int, default=180)
    parser.add_argument("--batch-size", type=int, default=None,
                        help="ceiling and jobs.score batch (default: jobs.score's CPU default); the tutorial keeps its 32")
    parser.add_argument("--ceiling-images", type=int, default=640, help="images timed for each ceiling")
    parser.add_argument("--model", default=None, help="a run folder (default: a random-weight ResNet50)")
    parser.add_argument("--only", default=None, help="comma list: ceiling_float32,ceiling_bfloat16,tutorial,"
                                                     "score_float32,score_bfloat16")
    parser.add_argument("--rss-sizes", default=None, help="e.g. 1000,10000: jobs.score peak RSS at each size")
    parser.add_argument("--output", default=str(RESULTS / "score_bench.json"))
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--args", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.batch_size is None and not args.worker:
        sys.path.insert(0, str(ROOT))
        from catdog.score.config import DEFAULT_CPU_BATCH_SIZE

        args.batch_size = DEFAULT_CPU_BATCH_SIZE
    if args.worker:
        sys.path.insert(0, str(ROOT))
        {"build": worker_build, "ceiling": worker_ceiling, "tutorial": worker_tutorial}[args.worker](
            **json.loads(args.args))
        return

    def worker(name: str, **kwargs) -> list[str]:
        return [sys.executable, __file__, "--worker", name, "--args", json.dumps(kwargs)]

    wanted = set(args.only.split(",")) if args.only else None
    workdir = Path(tempfile.mkdtemp(prefix="score-bench-"))
    results: dict = {"n": args.n, "image_size": args.image_size, "batch_size": args.batch_size,
                     "cpus": os.cpu_count(), "load_average_before": os.getloadavg()}
    try:
        run = args.model or str(workdir / "run")
        if not args.model:
            run_measured(worker("build", run=run, image_size=args.image_size))
        folder = make_input(workdir / "input", args.n)
        small = make_input(workdir / "small", 3 * args.batch_size)
        # Each pipeline between two ceilings of the same precision, and the ratio taken against
        # their mean: on a shared machine the speed of a core drifts (seen: 33 then 21 img/s for
        # the same ceiling within minutes), and the two ceilings show how much it drifted.
        def ceiling(precision: str) -> dict:
            measured = run_measured(worker("ceiling", run=run, precision=precision,
                                           images=args.ceiling_images, batch_size=args.batch_size))
            return {**_last_json(measured.pop("stdout")), **measured, "load_average": os.getloadavg()[0]}

        for precision in PRECISIONS:
            name = f"ceiling_{precision}"
            with_pipeline = wanted is None or f"score_{precision}" in wanted
            if wanted is None or name in wanted or with_pipeline:
                before = ceiling(precision)
                _report(name + " (before)", before)
            if with_pipeline:
                score_name = f"score_{precision}"
                results[score_name] = bench_score_marginal(run, folder, small, workdir / f"out-{precision}",
                                                           precision, args.batch_size)
                results[score_name]["load_average"] = os.getloadavg()[0]
                _report(score_name, results[score_name])
                after = ceiling(precision)
                _report(name + " (after)", after)
                results[name] = {
                    "images_per_s": (before["images_per_s"] + after["images_per_s"]) / 2,
                    "cpu_ms_per_image": (before["cpu_ms_per_image"] + after["cpu_ms_per_image"]) / 2,
                    "drift": round(after["images_per_s"] / before["images_per_s"], 3),
                    "before": before, "after": after,
                }
            elif wanted is None or name in wanted:
                results[name] = before
        if wanted is None or "tutorial" in wanted:
            measured = run_measured(worker("tutorial", run=run, folder=str(folder), out=str(workdir / "t.parquet"),
                                           batch_size=TUTORIAL_BATCH_SIZE))
            results["tutorial"] = {**_last_json(measured.pop("stdout")), **measured, "load_average": os.getloadavg()[0]}
            results["tutorial"]["cpu_ms_per_image"] = round(1000 * measured["cpu_s"] / results["tutorial"]["images"], 1)
            # The same clock as jobs.score's end-to-end rate: images / process wall time.
            results["tutorial"]["process_images_per_s"] = round(results["tutorial"]["images"] / measured["wall_s"], 2)
            _report("tutorial", results["tutorial"])
        if args.rss_sizes:
            results["rss"] = _rss_growth(run, workdir, [int(s) for s in args.rss_sizes.split(",")], args.batch_size)
        results["ratios"] = _ratios(results)
        results["load_average_after"] = os.getloadavg()
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    print(json.dumps(results["ratios"], indent=2))
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {args.output}")


def _rss_growth(run: str, workdir: Path, sizes: list[int], batch_size: int) -> dict:
    growth = {}
    for n in sizes:
        folder = make_input(workdir / f"rss-{n}", n)
        growth[n] = bench_score(run, folder, workdir / f"rss-out-{n}", "bfloat16", batch_size)
        _report(f"score_bfloat16 n={n}", growth[n])
        shutil.rmtree(folder)
    low, high = growth[sizes[0]]["peak_rss_mb"], growth[sizes[-1]]["peak_rss_mb"]
    return {"by_size": growth, "peak_rss_growth": round(high / low - 1, 3)}


def _ratios(results: dict) -> dict:
    def rate(name: str, key: str = "images_per_s"):
        return (results.get(name) or {}).get(key)

    ratios = {}
    for precision in PRECISIONS:
        ceiling, steady = rate(f"ceiling_{precision}"), rate(f"score_{precision}", "steady_images_per_s")
        if ceiling and steady:
            ratios[f"score_{precision}_steady_over_ceiling"] = round(steady / ceiling, 3)
        tutorial = rate("tutorial", "process_images_per_s")
        if tutorial and rate(f"score_{precision}"):  # both: images / process wall time, start to exit
            ratios[f"score_{precision}_end_to_end_over_tutorial"] = round(rate(f"score_{precision}") / tutorial, 3)
        ceiling_cpu = rate(f"ceiling_{precision}", "cpu_ms_per_image")
        marginal_cpu = rate(f"score_{precision}", "marginal_cpu_ms_per_image")
        if ceiling_cpu and marginal_cpu:  # load-independent form of steady-state over ceiling
            ratios[f"score_{precision}_cpu_efficiency"] = round(ceiling_cpu / marginal_cpu, 3)
        tutorial_cpu, score_cpu = rate("tutorial", "cpu_ms_per_image"), rate(f"score_{precision}", "cpu_ms_per_image")
        if tutorial_cpu and score_cpu:  # end-to-end CPU cost per image, tutorial over jobs.score
            ratios[f"score_{precision}_cpu_advantage_over_tutorial"] = round(tutorial_cpu / score_cpu, 3)
    if rate("ceiling_float32") and rate("ceiling_bfloat16"):
        ratios["ceiling_bfloat16_over_float32"] = round(rate("ceiling_bfloat16") / rate("ceiling_float32"), 3)
    if "rss" in results:
        ratios["peak_rss_growth"] = results["rss"]["peak_rss_growth"]
    return ratios


def _report(name: str, result: dict) -> None:
    figures = ", ".join(f"{k}={v}" for k, v in result.items() if isinstance(v, (int, float)))
    print(f"{name}: {figures}", flush=True)


if __name__ == "__main__":
    main()
