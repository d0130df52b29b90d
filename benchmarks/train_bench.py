"""Training speed: the tutorial's single-process way vs `jobs.train --mode cached`, side by side.

    python benchmarks/train_bench.py [--data ../shared/data/catdog-dev] [--epochs 10] [--image-size 180]

1. Tutorial (one process): `keras.utils.image_dataset_from_directory` 80/20 split with seed 123,
   frozen ResNet50 (weights none) + Flatten + Dense(384, relu) + Dense(2, softmax), Adam,
   `model.fit` for all epochs, no preprocess_input. The backbone runs on every image every epoch.
2. catdog: `python -m jobs.train --mode cached` with its default head, on exactly the tutorial's
   train/validation files (symlinked into two folders, passed as --data and --val-data), with a
   cold feature cache (then once more with the warm cache, reported separately). catdog runs
   first, so a failure there costs no tutorial run.

Each side runs as its own subprocess and is timed from process start to exit, imports and Ray
start-up included. Writes benchmarks/results/train_bench.json. Timings on a shared machine vary;
only the side-by-side ratio of one run means much.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO.parent / "shared" / "data" / "catdog-dev"
RESULTS = REPO / "benchmarks" / "results" / "train_bench.json"


def _tutorial_datasets(data: str, image_size: int):
    import keras

    common = dict(validation_split=0.2, seed=123, image_size=(image_size, image_size), batch_size=32)
    train_ds = keras.utils.image_dataset_from_directory(data, subset="training", **common)
    val_ds = keras.utils.image_dataset_from_directory(data, subset="validation", **common)
    return train_ds, val_ds


def write_split(data: str, image_size: int, split_file: str) -> None:
    """Child process: the tutorial's train/validation file lists, written as JSON."""
    train_ds, val_ds = _tutorial_datasets(data, image_size)
    Path(split_file).write_text(json.dumps({"train": train_ds.file_paths, "val": val_ds.file_paths}))


def tutorial(data: str, epochs: int, image_size: int) -> None:
    """The tutorial's training, run in a child process; prints one JSON line of results."""
    started = time.perf_counter()
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import keras

    train_ds, val_ds = _tutorial_datasets(data, image_size)
    backbone = keras.applications.ResNet50(include_top=False, weights=None, input_shape=(image_size, image_size, 3))
    backbone.trainable = False
    model = keras.Sequential([
        keras.Input((image_size, image_size, 3)),
        backbone,
        keras.layers.Flatten(),
        keras.layers.Dense(384, activation="relu"),
        keras.layers.Dense(len(train_ds.class_names), activation="softmax"),
    ])
    model.compile(optimizer=keras.optimizers.Adam(), loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    fit_started = time.perf_counter()
    history = model.fit(train_ds, validation_data=val_ds, epochs=epochs, verbose=2).history
    print(json.dumps({
        "fit_s": time.perf_counter() - fit_started,
        "in_process_s": time.perf_counter() - started,
        "final_val_accuracy": history["val_accuracy"][-1],
        "best_val_accuracy": max(history["val_accuracy"]),
        "val_accuracy_by_epoch": history["val_accuracy"],
    }))


def _timed(command: list[str]) -> tuple[float, subprocess.CompletedProcess]:
    started = time.perf_counter()
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True)
    wall = time.perf_counter() - started
    if done.returncode != 0:
        sys.exit(f"{' '.join(command)} failed ({done.returncode}):\n{done.stdout[-4000:]}\n{done.stderr[-4000:]}")
    return wall, done


def _link_split(split: dict, root: Path) -> tuple[Path, Path]:
    """Symlink the tutorial's train and validation files into <root>/train/<class>/ and <root>/val/<class>/."""
    for side in ("train", "val"):
        for path in split[side]:
            link = root / side / Path(path).parent.name / Path(path).name
            link.parent.mkdir(parents=True, exist_ok=True)
            link.symlink_to(path)
    return root / "train", root / "val"


def _catdog(train_dir: Path, val_dir: Path, output: Path, cache: Path, epochs: int, image_size: int) -> dict:
    wall, _ = _timed([sys.executable, "-m", "jobs.train", "--data", str(train_dir), "--val-data", str(val_dir),
                      "--output", str(output), "--weights", "none", "--mode", "cached", "--epochs", str(epochs),
                      "--image-size", str(image_size), "--cache-dir", str(cache), "--overwrite"])
    metrics = json.loads((output / "metrics.json").read_text())
    return {
        "wall_s": wall,
        "final_val_accuracy": metrics["final"]["val_accuracy"],
        "best_val_accuracy": metrics["best"]["val_accuracy"],
        "saved_model_val_accuracy": metrics["validation"]["accuracy"],
        "epochs_run": metrics["epochs_run"],
        "timings": metrics["timings"],
        "cache": metrics["cache"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default=str(DEFAULT_DATA))
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--image-size", type=int, default=180)
    parser.add_argument("--tutorial", action="store_true", help=argparse.SUPPRESS)  # child process modes
    parser.add_argument("--split-file", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.tutorial:
        tutorial(args.data, args.epochs, args.image_size)
        return
    if args.split_file:
        write_split(args.data, args.image_size, args.split_file)
        return

    with tempfile.TemporaryDirectory(prefix="catdog-train-bench-") as tmp:
        tmp = Path(tmp)
        split_file = tmp / "split.json"
        _timed([sys.executable, __file__, "--data", args.data, "--image-size", str(args.image_size),
                "--split-file", str(split_file)])
        train_dir, val_dir = _link_split(json.loads(split_file.read_text()), tmp / "split")
        cold = _catdog(train_dir, val_dir, tmp / "run-cold", tmp / "cache", args.epochs, args.image_size)
        warm = _catdog(train_dir, val_dir, tmp / "run-warm", tmp / "cache", args.epochs, args.image_size)
        wall, done = _timed([sys.executable, __file__, "--tutorial", "--data", args.data, "--epochs", str(args.epochs),
                             "--image-size", str(args.image_size)])
        tut = {"wall_s": wall, **json.loads(done.stdout.strip().splitlines()[-1])}

    result = {
        "data": args.data, "epochs": args.epochs, "image_size": args.image_size, "weights": "none",
        "cpus": os.cpu_count(), "load_average_at_end": os.getloadavg(),
        "tutorial": tut, "catdog_cold_cache": cold, "catdog_warm_cache": warm,
        "speedup_cold": tut["wall_s"] / cold["wall_s"], "speedup_warm": tut["wall_s"] / warm["wall_s"],
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    print(f"tutorial (1 process, model.fit): {tut['wall_s']:7.1f} s  val_accuracy final {tut['final_val_accuracy']:.3f}"
          f" best {tut['best_val_accuracy']:.3f}")
    for name, run in (("catdog cached, cold cache", cold), ("catdog cached, warm cache", warm)):
        print(f"{name:31s}: {run['wall_s']:7.1f} s  val_accuracy final {run['final_val_accuracy']:.3f}"
              f" best {run['best_val_accuracy']:.3f} (saved model {run['saved_model_val_accuracy']:.3f},"
              f" {run['epochs_run']} epochs)")
    print(f"speed-up: {result['speedup_cold']:.2f}x cold, {result['speedup_warm']:.2f}x warm  -> {RESULTS}")


if __name__ == "__main__":
    main()
