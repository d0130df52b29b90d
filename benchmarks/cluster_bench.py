"""The cost of distribution: the same photos scored on one node and on two, and the cost of losing one.

    python benchmarks/cluster_bench.py --n 2000            # ~10 min on 2 shared cores

Side by side in one run (--rounds pairs in ABBA order, both clusters up throughout), each `python -m jobs.score` joined to its own real Ray cluster on this
machine (tests/support/multinode.py: a head that takes no tasks, like cluster.yaml's, and worker nodes,
each its own raylet on 127.0.0.1), the same 2 cores and object store in total:
- one_node: one worker node with 2 CPUs (300 MB object store);
- two_nodes: two worker nodes with 1 CPU each (150 MB each): decoded pixels cross nodes;
- node_loss: two_nodes again, run between the two-node runs, and halfway through the first one's
  steady state the predictor's node is removed for real (SIGKILL of its raylet, object store and workers) and a fresh 1-CPU node
  added at once, as an autoscaler replaces a preempted node (a real one takes minutes more).
Reported: images/s end to end (N / job process wall time) and steady (`scored_at` stamps after the
first batch), CPU seconds of the job and of every process of its cluster (steadier than wall time
on a shared host), the two-node/one-node ratios (target >= 0.85x), and what the loss cost: the
extra wall and CPU time against the two-node runs, and how long no predictor was alive (GCS actor
table, polled).
N images are hard links to the real photos of ../shared/data/catdog-dev (500, cycled); the model
is ResNet50 with random weights at --image-size. Writes benchmarks/results/cluster_bench.json.
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
RESULTS = ROOT / "benchmarks" / "results"
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from benchmarks import score_bench  # noqa: E402 - after the path set-up
from benchmarks.process_stats import child_pids, cpu_seconds  # noqa: E402
from support.multinode import MultiNodeCluster  # noqa: E402

PREDICTOR_CLASS = "MapWorker(MapBatches(Predictor))"
TARGET_RATIO = 0.85


def make_input(folder: Path, n: int) -> Path:
    """N distinct files: hard links to the real photos, cycled, in cats/ and dogs/."""
    return score_bench.make_input(folder, n, link=os.link)


def build_model(run: Path, image_size: int) -> Path:
    """A run folder with a random-weight ResNet50 (in a subprocess: TensorFlow stays out of here)."""
    code = ("import sys; from pathlib import Path; from support import write_model_run; "
            f"Path({str(run)!r}).mkdir(parents=True); write_model_run(Path({str(run)!r}), image_size={image_size})")
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, env={**os.environ, "PYTHONPATH": f"{ROOT}:{ROOT / 'tests'}"},
                   check=True, capture_output=True)
    return run


def steady_state(out: Path) -> dict:
    """Images/s between the first and the last predictor batch, from the scored_at stamps."""
    from catdog.score.predictions_folder import PredictionsFolder

    stamps = PredictionsFolder(str(out)).read(columns=["scored_at"])["scored_at"].cast("int64").to_numpy()
    after_first = int((stamps > stamps.min()).sum())
    seconds = (stamps.max() - stamps.min()) / 1e6
    return {"steady_images": after_first, "steady_s": round(seconds, 2),
            "steady_images_per_s": round(after_first / seconds, 2) if seconds > 0 else None}


class CpuMeter(threading.Thread):
    """CPU seconds used during a run by the job's process tree and every process of one cluster
    (those naming its temp dir, and their descendants: Ray workers retitle themselves), sampled
    every 0.5 s: steadier than wall time on a shared host."""

    def __init__(self, job_pid: int, temp_dir: str):
        super().__init__(daemon=True)
        self.job_pid, self.temp_dir = job_pid, temp_dir.encode()
        self.first: dict[int, float] = {}
        self.last: dict[int, float] = {}
        self.stop = threading.Event()
        self._sample(baseline=True)

    def _pids(self) -> list[int]:
        roots = [self.job_pid]
        for entry in os.listdir("/proc"):
            if entry.isdigit():
                try:
                    with open(f"/proc/{entry}/cmdline", "rb") as f:
                        if self.temp_dir in f.read():
                            roots.append(int(entry))
                except OSError:
                    pass
        seen, todo = set(), roots
        while todo:
            pid = todo.pop()
            if pid not in seen:
                seen.add(pid)
                todo += child_pids(pid)
        return list(seen)

    def _sample(self, baseline: bool = False) -> None:
        for pid in self._pids():
            cpu = cpu_seconds(pid)
            self.first.setdefault(pid, cpu if baseline else 0.0)
            self.last[pid] = max(self.last.get(pid, 0.0), cpu)

    def run(self) -> None:
        while not self.stop.wait(0.5):
            self._sample()

    def used(self) -> float:
        self.stop.set()
        self.join()
        self._sample()
        return round(sum(self.last[pid] - self.first.get(pid, 0.0) for pid in self.last), 1)


def _predictor_executing(cluster: MultiNodeCluster) -> bool:
    return any(a["state"] == "ALIVE" for a in cluster.actors(PREDICTOR_CLASS))


def score(cluster: MultiNodeCluster, run: Path, photos: Path, out: Path, lose_after_s: float | None = None) -> dict:
    """`jobs.score` on `cluster`; with `lose_after_s`, remove the predictor's node that many seconds
    after the predictor came up, add a replacement node, and time the gap without a predictor."""
    command = [sys.executable, "-m", "jobs.score", "--model", str(run), "--input", str(photos), "--output", str(out),
               "--assume-shared-storage"]
    log = out.with_suffix(".log")
    loss: dict = {}
    started = time.monotonic()
    with open(log, "w") as sink:
        job = subprocess.Popen(command, cwd=ROOT, env=cluster.job_env(), stdout=subprocess.PIPE, stderr=sink, text=True)
        meter = CpuMeter(job.pid, cluster.temp_dir)
        meter.start()
        if lose_after_s is not None:
            loss = _lose_the_predictors_node(cluster, job, lose_after_s, started)
        stdout, _ = job.communicate()
    wall = time.monotonic() - started
    cpu = meter.used()
    if job.returncode != 0 or not stdout.strip():
        raise RuntimeError(f"jobs.score failed ({job.returncode}): {log.read_text()[-4000:]}")
    summary = _summary(stdout)
    result = {"wall_s": round(wall, 2), "images": summary["rows_written"], "errors": summary["errors"],
              "images_per_s": round(summary["rows_written"] / wall, 2), "predictors_peak": summary["predictors_peak"],
              "cpu_s": cpu, "cpu_ms_per_image": round(1000 * cpu / summary["rows_written"], 1),
              **steady_state(out), **loss}
    shutil.rmtree(out)
    return result


def _summary(stdout: str) -> dict:
    """The _SUCCESS.json summary jobs.score prints (indented JSON); Ray may print lines around it."""
    lines = stdout.splitlines()
    start = max(i for i, line in enumerate(lines) if line == "{" and i + 1 < len(lines) and lines[i + 1].startswith('  "'))
    summary, _ = json.JSONDecoder().raw_decode("\n".join(lines[start:]))
    return summary


def _lose_the_predictors_node(cluster: MultiNodeCluster, job: subprocess.Popen, after_s: float, started: float) -> dict:
    while job.poll() is None and not _predictor_executing(cluster):
        time.sleep(0.2)
    up_at = time.monotonic()
    while job.poll() is None and time.monotonic() - up_at < after_s:
        time.sleep(0.2)
    if job.poll() is not None:
        raise RuntimeError("the job ended before the node loss: lower the delay")
    victim = cluster.actors(PREDICTOR_CLASS)[0]["node_id"]
    removed_at = time.monotonic()
    noticed = cluster.remove_node(victim)
    replacement = cluster.add_worker_node()
    replaced_after = time.monotonic() - removed_at
    while job.poll() is None and not _predictor_executing(cluster):
        time.sleep(0.2)
    return {"loss_at_s": round(removed_at - started, 2), "gcs_noticed_after_s": noticed,
            "replacement_node_after_s": round(replaced_after, 2), "replacement_node": replacement[:8],
            "no_predictor_for_s": round(time.monotonic() - removed_at, 2)}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=2000, help="images (hard links to the 500 real photos, cycled)")
    parser.add_argument("--image-size", type=int, default=180)
    parser.add_argument("--rounds", type=int, default=2, help="one-node/two-node pairs, in ABBA order (default 2)")
    parser.add_argument("--output", default=str(RESULTS / "cluster_bench.json"))
    args = parser.parse_args(argv)

    results: dict = {"n": args.n, "image_size": args.image_size, "rounds": args.rounds,
                     "started_at": time.strftime("%Y-%m-%d %H:%M:%S"), "one_node": [], "two_nodes": []}
    with tempfile.TemporaryDirectory(prefix="catdog-cluster-bench-") as scratch:
        work = Path(scratch)
        photos = make_input(work / "photos", args.n)
        run = build_model(work / "run", args.image_size)
        with MultiNodeCluster(worker_nodes=1, cpus_per_node=2, object_store_mb=300) as one, \
                MultiNodeCluster(worker_nodes=2, cpus_per_node=1, object_store_mb=150) as two:
            clusters = {"one_node": one, "two_nodes": two}
            order = [("one_node", "two_nodes") if r % 2 == 0 else ("two_nodes", "one_node") for r in range(args.rounds)]
            for round_, names in enumerate(order):  # ABBA...: drift of the shared host hits both alike
                for name in names:
                    results[name].append(score(clusters[name], run, photos, work / name))
                    _report(name, results[name][-1])
                    if round_ == 0 and name == "two_nodes":  # between two-node runs, as they drift
                        halfway = results["two_nodes"][0]["steady_s"] / 2
                        results["node_loss"] = score(two, run, photos, work / "loss", lose_after_s=halfway)
                        _report("node_loss", results["node_loss"])
    loss = results["node_loss"]
    results["ratios"] = {
        "two_nodes_vs_one_end_to_end": round(_mean(results["two_nodes"], "images_per_s")
                                             / _mean(results["one_node"], "images_per_s"), 3),
        "two_nodes_vs_one_steady": round(_mean(results["two_nodes"], "steady_images_per_s")
                                         / _mean(results["one_node"], "steady_images_per_s"), 3),
        "per_round_end_to_end": [round(b["images_per_s"] / a["images_per_s"], 3)
                                 for a, b in zip(results["one_node"], results["two_nodes"])],
        "cpu_per_image_one_vs_two": round(_mean(results["one_node"], "cpu_ms_per_image")
                                          / _mean(results["two_nodes"], "cpu_ms_per_image"), 3),
        "target": TARGET_RATIO,
    }
    results["node_loss_cost_s"] = round(loss["wall_s"] - _mean(results["two_nodes"], "wall_s"), 2)
    results["node_loss_cost_cpu_s"] = round(loss["cpu_s"] - _mean(results["two_nodes"], "cpu_s"), 1)
    ratios = results["ratios"]
    print(f"two nodes / one node: {ratios['two_nodes_vs_one_end_to_end']}x end to end "
          f"(rounds: {ratios['per_round_end_to_end']}), {ratios['two_nodes_vs_one_steady']}x steady, "
          f"{ratios['cpu_per_image_one_vs_two']}x in CPU per image (target >= {TARGET_RATIO}x)")
    print(f"losing the predictor's node: +{results['node_loss_cost_s']} s wall, +{results['node_loss_cost_cpu_s']} CPU s "
          f"({loss['no_predictor_for_s']} s without a predictor; GCS noticed after {loss['gcs_noticed_after_s']} s)")
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(results, indent=2))
    print(f"wrote {args.output}")


def _mean(runs: list[dict], key: str) -> float:
    return sum(r[key] for r in runs) / len(runs)


def _report(name: str, result: dict) -> None:
    print(f"{name}: {result['images']} images in {result['wall_s']} s = {result['images_per_s']} images/s end to end, "
          f"{result['steady_images_per_s']} steady; " + json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
