"""What a Ray Train fit costs before and after the training loop: Ray's TensorFlow backend config
against catdog's (`catdog.train.backend`), side by side.

    python benchmarks/fit_start_bench.py [--rounds 3] [--workers 1]

Each round runs, in ABBA order, each on a fresh local Ray, a fit whose loop only sleeps 1 s, once with
`ray.train.tensorflow.TensorflowConfig` (its controller unpickles it and so imports TensorFlow)
and once with `catdog.train.backend.TensorflowWorkersConfig`, through catdog's own trainer class.
Records the wall time of each `fit()`, and the Train controller's peak RSS (VmHWM) and CPU
seconds, read from /proc while the fit runs. Writes benchmarks/results/fit_start_bench.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO)]
RESULTS = REPO / "benchmarks" / "results" / "fit_start_bench.json"

from benchmarks.process_stats import cpu_seconds, peak_rss_bytes  # noqa: E402


def _watch_controller(stop: threading.Event, found: dict) -> None:
    """Poll /proc for the live Train controller: its largest VmHWM and CPU seconds seen."""
    found.update(peak_rss_mib=0.0, cpu_s=0.0)
    while not stop.is_set():
        for pid in _controller_pids():  # both readers answer 0 for a process that has gone
            found["peak_rss_mib"] = max(found["peak_rss_mib"], peak_rss_bytes(pid) / 2**20)
            found["cpu_s"] = max(found["cpu_s"], cpu_seconds(pid))
        time.sleep(0.1)


def _controller_pids() -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and (entry / "cmdline").read_bytes().startswith(b"ray::TrainController"):
                pids.append(int(entry.name))
        except OSError:
            pass
    return pids


def one_fit(backend: str, workers: int, storage: str) -> dict:
    from ray.train import RunConfig, ScalingConfig

    from catdog.train.backend import TensorflowWorkersConfig
    from catdog.train.fit import trainer_class

    def loop() -> None:
        time.sleep(1)

    config = TensorflowWorkersConfig() if backend == "catdog" else None  # None: Ray's TensorflowConfig
    deadline = time.monotonic() + 60
    while _controller_pids() and time.monotonic() < deadline:  # the last fit's controller is still exiting
        time.sleep(0.1)
    stop, controller = threading.Event(), {}
    watcher = threading.Thread(target=_watch_controller, args=(stop, controller), daemon=True)
    watcher.start()
    started = time.perf_counter()
    trainer_class()(loop, tensorflow_config=config,
                    scaling_config=ScalingConfig(num_workers=workers, resources_per_worker={"CPU": 0.5}),
                    run_config=RunConfig(storage_path=storage, name=f"{backend}-{time.time_ns()}")).fit()
    wall = time.perf_counter() - started
    stop.set()
    watcher.join()
    return {"backend": backend, "fit_s": round(wall, 2), "controller_peak_rss_mib": round(controller["peak_rss_mib"], 1),
            "controller_cpu_s": round(controller["cpu_s"], 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--workers", type=int, default=1)
    args = parser.parse_args()

    from catdog.process import quiet_environment

    quiet_environment()
    from catdog.cluster.session import init_ray

    import ray

    runs = []
    with tempfile.TemporaryDirectory(prefix="fit-bench-") as storage:
        for round_number in range(args.rounds):
            order = ["ray", "catdog"] if round_number % 2 == 0 else ["catdog", "ray"]
            for backend in order:
                # A fresh local Ray per fit: Ray may place a controller in a worker process an
                # earlier actor left, TensorFlow already loaded.
                init_ray()
                runs.append(one_fit(backend, args.workers, storage))
                ray.shutdown()
                print(json.dumps(runs[-1]), flush=True)
    summary = {}
    for backend in ("ray", "catdog"):
        mine = [r for r in runs if r["backend"] == backend]
        summary[backend] = {key + "_median": statistics.median(r[key] for r in mine)
                            for key in ("fit_s", "controller_peak_rss_mib", "controller_cpu_s")}
    summary["fit_ratio_catdog_vs_ray"] = round(summary["catdog"]["fit_s_median"] / summary["ray"]["fit_s_median"], 2)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({"workers": args.workers, "rounds": args.rounds, "runs": runs, "summary": summary},
                                  indent=2))
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
