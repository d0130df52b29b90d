"""Training: argument checks (fast, no Ray) and real Ray Train runs on generated and real images.

The session's 2-worker cached run (`trained_run`, conftest) is inspected by several tests; a second
run goes through the `python -m jobs.train` command line, joined to the session's Ray, and must
reuse that run's feature cache; a third runs end to end with augmentation on a backbone weights
file the test saved.
"""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

import numpy as np
import pytest

from catdog.io.labelled import list_labelled_images, split_train_val
from catdog.train.calibration import MIN_ROWS_PER_HALF, fit_half
from catdog.train.config import TrainConfig
from support import job_lines, run_job_module

ARTIFACTS = ["model.keras", "classes.json", "config.json", "metrics.json", "history.csv", "curves.png"]


def _read(run: Path, name: str):
    return json.loads((run / name).read_text())


# ---- fast: configuration and command line -----------------------------------------------------


def test_parser_defaults_are_the_config_defaults():
    from jobs.train import build_parser

    args = vars(build_parser().parse_args(["--data", "d", "--output", "o"]))
    args.pop("verbose")
    assert TrainConfig(**args) == TrainConfig(data="d", output="o")


@pytest.mark.parametrize(
    "change, flag",
    [
        ({"mode": "fast"}, "--mode"),
        ({"val_fraction": 1.0}, "--val-fraction"),
        ({"image_size": 16}, "--image-size"),
        ({"epochs": 0}, "--epochs"),
        ({"num_workers": 4, "batch_size": 2}, "--batch-size"),
        ({"cpus_per_worker": 0}, "--cpus-per-worker"),
        ({"augment": True}, "--augment"),
        ({"patience": -1}, "--patience"),
        ({"weights": "/no/such/file.weights.h5"}, "--weights"),
    ],
)
def test_config_validation_names_the_bad_setting(change, flag):
    from catdog.errors import CatdogError

    with pytest.raises(CatdogError, match=flag):
        TrainConfig(data="d", output="o", **change).validate()


def test_bad_arguments_exit_2_before_ray_starts(tmp_path, sample_images, capsys, monkeypatch):
    import catdog.cluster.session

    def no_ray(*args, **kwargs):
        raise AssertionError("the job went on to start Ray")

    monkeypatch.setattr(catdog.cluster.session, "init_ray", no_ray)
    one_class = tmp_path / "one"
    (one_class / "cats").mkdir(parents=True)
    (one_class / "cats" / "a.jpg").write_bytes((sample_images / "cats" / "cats_0001.jpg").read_bytes())
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "model.keras").write_text("an earlier run")
    garbage = tmp_path / "garbage.weights.h5"
    garbage.write_bytes(b"not an HDF5 file")
    out = str(tmp_path / "out")
    cases = {
        "could not load backbone weights": ["--data", str(sample_images), "--output", out, "--weights", str(garbage)],
        "data folder not found": ["--data", str(tmp_path / "missing"), "--output", out],
        "at least 2 classes": ["--data", str(one_class), "--output", out],
        "--val-fraction": ["--data", str(sample_images), "--output", out, "--val-fraction", "1.5"],
        "--augment needs --mode end-to-end": ["--data", str(sample_images), "--output", out, "--augment"],
        "--overwrite": ["--data", str(sample_images), "--output", str(taken)],
        "--weights": ["--data", str(sample_images), "--output", out, "--weights", str(tmp_path / "nope.h5")],
        "invalid int value": ["--data", str(sample_images), "--output", out, "--epochs", "ten"],
        "invalid choice": ["--data", str(sample_images), "--output", out, "--head", "mlp"],
    }
    for expected, args in cases.items():
        code = run_job_module("jobs.train", *args)
        captured = capsys.readouterr()
        output = "\n".join(job_lines(captured.out) + job_lines(captured.err))
        assert code == 2, (expected, output)
        assert expected in output, (expected, output)
        assert "Ray" not in output and "Traceback" not in output, output
    assert not Path(out).exists()
    assert (taken / "model.keras").read_text() == "an earlier run"


def _embeddings(n: int, width: int = 4):
    import pyarrow as pa

    return pa.table({"label": pa.array(np.arange(n) % 2, pa.int32()),
                     "features": pa.FixedSizeListArray.from_arrays(pa.array(np.arange(n * width, dtype=np.float32)), width)})


def test_each_worker_gets_only_its_disjoint_shard_and_the_shards_cover_the_data(ray_cluster):
    from catdog.train.data import shard_refs
    from catdog.train.embedding_shards import embedding_arrays

    n, width, world = 23, 4, 3
    train, val = _embeddings(n, width), _embeddings(10, width)
    refs = shard_refs(train, val, world, seed=7)
    assert len(refs["train"]) == len(refs["val"]) == world  # one object per worker: nobody fetches all rows
    shards = [embedding_arrays(ray_cluster.get(ref)) for ref in refs["train"]]
    rows = [sorted(int(r) for r in features[:, 0] // width) for features, _ in shards]
    assert sorted(sum(rows, [])) == list(range(n))  # disjoint and covering
    assert [len(r) for r in rows] == [8, 8, 7]
    assert {int(label) for _, labels in shards for label in labels} == {0, 1}
    assert all(len(set(r) & {0, 1, 2, 3, 4, 5, 6, 7}) < 8 for r in rows)  # shuffled before dealing: classes mix
    val_rows = [embedding_arrays(ray_cluster.get(ref))[0][:, 0] // width for ref in refs["val"]]
    assert [int(r) for part in val_rows for r in part] == list(range(10))  # contiguous, in table order


def test_cached_batches_reshuffle_a_shard_each_epoch_and_cut_it_to_the_common_length():
    from catdog.train.embedding_shards import cached_batches, embedding_arrays

    n, width = 23, 4
    features, labels = embedding_arrays(_embeddings(n, width))
    assert features.shape == (n, width) and labels.dtype == np.int32

    def rows(seed: int | None, cut: int | None = None) -> list[int]:  # row index = first feature / width
        return [int(r) for b in cached_batches(features, labels, 5, seed, cut) for r in b["features"][:, 0] // width]

    assert len(rows(7, 20)) == 20 and len(set(rows(7, 20))) == 20
    assert rows(8, 20) != rows(7, 20)  # another epoch, another permutation
    assert rows(None) == list(range(n))  # validation: every row of the shard, in order


def test_worker_seeds_differ_by_rank_and_epoch():
    from catdog.train.seeds import worker_seed

    world, epoch = 3, 2
    seeds = [worker_seed(123, rank, epoch) for rank in range(world)]
    assert len(set(seeds)) == world and all(0 <= seed < 2**32 for seed in seeds)
    assert worker_seed(123, 0, epoch) == seeds[0]  # deterministic
    assert worker_seed(123, 0, epoch + 1) != seeds[0]  # a resumed worker group does not replay epoch 1's masks
    assert worker_seed(124, 0, epoch) != seeds[0]


def test_seeding_a_worker_changes_its_dropout_masks_not_its_weights():
    import keras
    import tensorflow as tf

    from catdog.model.build import ModelSpec, build_head
    from catdog.train.loop import _build_augmenter
    from catdog.train.seeds import seed_worker_randomness, worker_seed

    spec = ModelSpec(num_classes=2, image_size=32, hidden_units=64, dropout=0.5)
    keras.utils.set_random_seed(123)
    head = build_head(spec)
    hidden = keras.Model(head.input, [head.get_layer("hidden").output, head.get_layer("dropout").output])
    weights = [w.copy() for w in head.get_weights()]
    x = tf.ones((8, *spec.feature_shape))

    def masks(rank: int) -> np.ndarray:  # which active units dropout zeroed
        seed_worker_randomness([head], worker_seed(123, rank, 1))
        active, dropped = (np.asarray(t) for t in hidden(x, training=True))
        return (dropped == 0)[active > 0]

    rank0, rank1 = masks(0), masks(1)
    assert 0.3 < rank0.mean() < 0.7 and (rank0 != rank1).mean() > 0.3
    assert (masks(0) == rank0).all()  # the same rank and epoch: the same masks again
    for before, after in zip(weights, head.get_weights()):
        np.testing.assert_array_equal(before, after)
    augmenter = _build_augmenter(32)
    layer_seeds = seed_worker_randomness([head, augmenter], worker_seed(123, 0, 1))
    assert len(layer_seeds) == 4 and len(set(layer_seeds)) == 4  # dropout, flip, rotation, crop: one each
    images = tf.random.uniform((4, 32, 32, 3), 0, 255, seed=1)

    def augment(rank: int) -> np.ndarray:
        seed_worker_randomness([augmenter], worker_seed(123, rank, 1))
        return np.asarray(augmenter(images, training=True))

    rank0 = augment(0)
    np.testing.assert_array_equal(augment(0), rank0)
    assert not np.allclose(augment(1), rank0)  # each rank flips, rotates and crops its own way


def test_help_lists_every_flag_of_the_issue(capsys):
    assert run_job_module("jobs.train", "--help") == 0
    help_text = capsys.readouterr().out
    for flag in ("--data", "--output", "--val-data", "--val-fraction", "--seed", "--image-size", "--head",
                 "--weights", "--mode", "--augment", "--epochs", "--batch-size", "--learning-rate", "--patience",
                 "--num-workers", "--use-gpu", "--cpus-per-worker", "--cache-dir", "--keep-checkpoints",
                 "--max-failures", "--overwrite"):
        assert flag in help_text, flag


# ---- slow: real training runs -----------------------------------------------------------------


@pytest.fixture(scope="module")
def two_worker_run(trained_run):
    """The session's trained run (conftest): its config, run folder and TrainResult."""
    return trained_run


@pytest.mark.slow
def test_two_workers_reach_high_accuracy_with_identical_weights(two_worker_run):
    config, output, result = two_worker_run
    metrics = _read(output, "metrics.json")
    assert result.metrics["best"] == metrics["best"]
    assert metrics["best"]["val_accuracy"] >= 0.95
    assert metrics["validation"]["accuracy"] >= 0.95
    workers = metrics["workers"]
    assert workers["num_workers"] == 2 and workers["weights_in_sync"] is True
    memory = workers["memory_by_rank"]  # each rank fetched only its own half of the embeddings
    total = sum(m["embeddings_mib"] for m in memory)
    assert [m["rank"] for m in memory] == [0, 1] and total > 0
    assert all(abs(m["embeddings_mib"] - total / 2) <= 0.1 * total for m in memory), memory
    fingerprints = workers["weight_fingerprints_by_epoch"]
    assert sorted(fingerprints, key=int) == [str(e) for e in range(1, metrics["epochs_run"] + 1)]
    for epoch, pair in fingerprints.items():
        assert len(pair) == 2 and pair[0] == pair[1], (epoch, pair)
    assert len({pair[0] for pair in fingerprints.values()}) == len(fingerprints)  # weights did change every epoch
    # ... while each worker drew its own dropout masks (seed states gathered from the workers)
    dropout = metrics["seeds"]["dropout_by_rank"]
    assert metrics["seeds"]["run"] == config.seed and len(dropout) == 2 and dropout[0] != dropout[1]


@pytest.mark.slow
def test_run_folder_holds_every_artifact(two_worker_run, training_data):
    from PIL import Image

    config, output, _ = two_worker_run
    for name in ARTIFACTS:
        assert (output / name).stat().st_size > 0, name
    assert _read(output, "classes.json") == ["cats", "dogs"]
    run_config = _read(output, "config.json")
    metrics = _read(output, "metrics.json")
    assert run_config["weights"] == "none" and run_config["num_workers"] == 2
    assert run_config["model_spec"]["num_classes"] == 2 and run_config["model_spec"]["image_size"] == 32
    assert run_config["model_spec"]["temperature"] == metrics["calibration"]["temperature"]
    with open(output / "history.csv") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["epoch"]) for r in rows] == list(range(1, metrics["epochs_run"] + 1))
    assert float(rows[-1]["val_accuracy"]) == pytest.approx(metrics["final"]["val_accuracy"])
    assert Image.open(output / "curves.png").size[0] >= 600
    data = metrics["data"]
    assert data["train_images"] + data["val_images"] + data["skipped"] == 82
    assert metrics["cache"]["computed"] == 82 and metrics["cache"]["reused"] == 0
    assert metrics["cache"]["alongside_ray_train_start"] is True  # 2 workers + 2 embedding actors fit 2 CPUs
    assert set(metrics["validation"]["per_class"]) == {"cats", "dogs"}
    assert np.sum(metrics["validation"]["confusion_matrix"]) == data["val_images"]
    calibration = metrics["calibration"]
    for key in ("before", "after"):
        assert set(calibration[key]) == {"ece", "nll"}
    # fitted on one half of the readable validation rows, reported on the other: recomputed here
    readable = _readable_validation(config)
    assert len(readable) == data["val_images"]
    fit = fit_half(readable, config.seed)
    assert calibration["fitted"] is True
    assert calibration["rows"] == {"validation": data["val_images"], "fit": int(fit.sum()), "report": int((~fit).sum())}
    assert min(calibration["rows"]["fit"], calibration["rows"]["report"]) >= MIN_ROWS_PER_HALF
    checkpoints = [p for p in (output / "checkpoints").glob("train-*/epoch-*") if p.is_dir()]
    assert 1 <= len(checkpoints) <= config.keep_checkpoints + 1  # best K by val_loss, plus the latest
    assert all((p / "best_head.weights.h5").stat().st_size < 10_000_000 for p in checkpoints)  # head only


@pytest.mark.slow
def test_unreadable_images_are_skipped_counted_and_listed(two_worker_run, training_data):
    skipped = _read(two_worker_run[1], "metrics.json")["data"]["skipped_files"]
    assert [s["path"] for s in skipped] == [str(training_data / "cats" / "notes.jpg"),
                                             str(training_data / "dogs" / "nested" / "cut.jpg")]
    assert [s["error"].split(":")[0] for s in skipped] == ["not_an_image", "truncated"]


def _readable_validation(config: TrainConfig) -> list[str]:
    """Relative paths of the run's validation images that decode (the unreadable ones are skipped)."""
    _, val = split_train_val(list_labelled_images(config.data), config.val_fraction, config.seed)
    broken = {"cats/notes.jpg", "dogs/nested/cut.jpg"}
    return [path for path in val.relative_paths if path not in broken]


@pytest.mark.slow
def test_saved_model_scores_validation_images_with_the_fitted_temperature(two_worker_run):
    from catdog.io.imaging import read_and_decode
    from catdog.model.build import load_model

    config, output, _ = two_worker_run
    metrics = _read(output, "metrics.json")
    model = load_model(str(output))  # Keras safe mode
    _, val = split_train_val(list_labelled_images(config.data), config.val_fraction, config.seed)
    decoded = read_and_decode(val.paths, config.image_size)
    readable = np.array([error is None for error in decoded["error"]])
    probabilities = np.asarray(model.predict(decoded["image"][readable], verbose=0), dtype=np.float64)
    labels = np.array(val.labels)[readable]
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, atol=1e-5)
    assert np.mean(probabilities.argmax(axis=1) == labels) >= 0.95
    temperature = metrics["calibration"]["temperature"]
    assert model.get_layer("head").get_layer("temperature").scale == pytest.approx(1 / temperature)
    # the model's probabilities are softmax(logits / T): on the report half only (the rows the
    # temperature was not fitted on), their NLL is the "after" figure of metrics.json
    report = ~fit_half(np.array(val.relative_paths)[readable], config.seed)
    assert int(report.sum()) == metrics["calibration"]["rows"]["report"]
    log_probs = np.log(np.clip(probabilities[report], 1e-300, 1.0))
    nll = -np.mean(log_probs[np.arange(int(report.sum())), labels[report]])
    assert nll == pytest.approx(metrics["calibration"]["after"]["nll"], abs=1e-3)


@pytest.mark.slow
def test_second_run_from_the_command_line_reuses_the_feature_cache(two_worker_run, training_data, feature_cache,
                                                                   tmp_path, capsys):
    changed = training_data / "cats" / "cats_0003.jpg"
    os.utime(changed, ns=(changed.stat().st_atime_ns, changed.stat().st_mtime_ns + 10**9))  # "edited"
    output = tmp_path / "again"
    # `python -m jobs.train` as `__main__` in this process, on the session's Ray
    code = run_job_module("jobs.train", "--data", str(training_data), "--output", str(output), "--weights", "none",
                          "--image-size", "32", "--epochs", "1", "--num-workers", "1", "--cache-dir", str(feature_cache))
    assert code == 0, capsys.readouterr().err[-3000:]
    metrics = _read(output, "metrics.json")
    assert metrics["cache"]["reused"] == 81 and metrics["cache"]["computed"] == 1  # only the edited file
    assert metrics["data"]["skipped"] == 2  # unreadable files are remembered too, not retried
    assert metrics["backbone_fingerprint"] == _read(two_worker_run[1], "metrics.json")["backbone_fingerprint"]
    assert metrics["epochs_run"] == 1
    for name in ARTIFACTS:
        assert (output / name).exists(), name


@pytest.mark.slow
def test_end_to_end_with_augmentation_on_a_saved_weights_file(ray_cluster, training_data, tmp_path, two_worker_run):
    import keras

    from catdog.model.build import ResNet50Preprocess, load_model
    from catdog.train.run import train

    keras.utils.set_random_seed(7)  # not catdog's seed: a backbone the cache has never seen
    backbone = keras.applications.ResNet50(include_top=False, weights=None, input_shape=(32, 32, 3), pooling="avg")
    weights_file = tmp_path / "backbone.weights.h5"
    backbone.save_weights(weights_file)
    output = tmp_path / "e2e"
    train(TrainConfig(data=str(training_data), output=str(output), weights=str(weights_file), image_size=32, epochs=2,
                      num_workers=2, mode="end-to-end", augment=True, seed=5))

    metrics = _read(output, "metrics.json")
    assert metrics["workers"]["weights_in_sync"] is True and metrics["epochs_run"] == 2
    assert len(set(metrics["seeds"]["dropout_by_rank"])) == 2  # augmentation and dropout differ by rank
    # 13 validation images: too few for two calibration halves, so no temperature, and it says so
    calibration = metrics["calibration"]
    assert calibration["fitted"] is False and calibration["temperature"] == 1.0 and calibration["after"] is None
    assert calibration["rows"]["validation"] == metrics["data"]["val_images"] == 13
    assert "not fitted" in calibration["note"]
    assert load_model(str(output)).get_layer("head").get_layer("temperature").scale == pytest.approx(1.0)
    assert metrics["cache"] is None
    assert metrics["data"]["skipped"] == 2  # decoded per run in this mode, still skipped and listed
    assert metrics["backbone_fingerprint"] != _read(two_worker_run[1], "metrics.json")["backbone_fingerprint"]
    assert _read(output, "config.json")["weights"] == str(weights_file)
    extractor = load_model(str(output)).get_layer("feature_extractor")
    pixels = np.random.default_rng(0).integers(0, 256, size=(4, 32, 32, 3)).astype("float32")
    expected = backbone(ResNet50Preprocess()(pixels), training=False)
    np.testing.assert_allclose(extractor(pixels, training=False), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_real_photos_produce_every_artifact(ray_cluster, real_photos, tmp_path):
    from catdog.train.run import train

    output = tmp_path / "real"
    # 1.5 CPUs per worker: the worker and an embedding actor do not fit 2 CPUs together, so the
    # embeddings are computed first and the fit starts after (the other tests overlap the two)
    train(TrainConfig(data=str(real_photos), output=str(output), weights="none", image_size=32, epochs=2,
                      num_workers=1, cpus_per_worker=1.5, cache_dir=str(tmp_path / "cache")))
    for name in ARTIFACTS:
        assert (output / name).stat().st_size > 0, name
    metrics = _read(output, "metrics.json")
    data = metrics["data"]
    assert data["classes"] == ["cats", "dogs"]
    assert data["train_images"] + data["val_images"] + data["skipped"] == 500
    assert 0.1 < data["val_images"] / 500 < 0.3
    assert 0.0 <= metrics["best"]["val_accuracy"] <= 1.0 and metrics["epochs_run"] <= 2
    assert metrics["cache"]["alongside_ray_train_start"] is False


def test_embeddings_overlap_the_fit_only_when_workers_and_embedding_actors_fit_together(ray_cluster):
    from catdog.train.fit import embedding_overlaps_fit

    def overlaps(**settings) -> bool:
        return embedding_overlaps_fit(TrainConfig(data="d", output="o", **settings))

    assert ray_cluster.cluster_resources()["CPU"] == 2
    assert overlaps(num_workers=1, cpus_per_worker=0.5) and overlaps(num_workers=2, cpus_per_worker=0.5)
    assert not overlaps(num_workers=2, cpus_per_worker=0.75)  # 1.5 CPUs of workers + 1.5 of actors
    assert not overlaps(num_workers=1, cpus_per_worker=0.5, use_gpu=True)  # no GPU here: never side by side


@pytest.mark.slow
def test_too_few_readable_images_found_while_the_fit_starts_fail_with_the_data_error(two_worker_run, training_data,
                                                                                     feature_cache, tmp_path):
    """The embeddings are computed while the Train workers start; when they reveal that nothing
    in --val-data is readable, the waiting workers fail and the user gets the data error (exit 2),
    not a hang and not a Ray Train failure. The training images come from the session's cache
    (filled by the trained run); the unreadable validation files are new to it."""
    from catdog.errors import InputError
    from catdog.train.run import train

    val = tmp_path / "val"
    for name in ("cats", "dogs"):
        (val / name).mkdir(parents=True)
        (val / name / "broken.jpg").write_text("not an image")
    config = TrainConfig(data=str(training_data), val_data=str(val), output=str(tmp_path / "out"), weights="none",
                         image_size=32, epochs=1, num_workers=1, cache_dir=str(feature_cache))
    with pytest.raises(InputError, match="too few readable images: 80 train .* 0 validation"):
        train(config)


def test_ray_train_workarounds_reach_the_controller_and_drop_the_stalling_cleaner(ray_cluster):
    """Ray 2.60 Train V2 costs, pinned (README of the workarounds: catdog/train/fit.py and
    catdog/process.py): the PlacementGroupCleaner callback (a ~15 s stall at every fit's end) and,
    without datasets, the Datasets callback are dropped; the controller's 2 s poll, which each
    per-epoch report waits for, is shortened and a local Ray's preemption watcher is off, both
    through the job's environment, which the controller actor inherits."""
    from ray.train import ScalingConfig
    from ray.train.tensorflow import TensorflowTrainer
    from ray.train.v2._internal.callbacks.datasets import DatasetsCallback
    from ray.train.v2._internal.callbacks.placement_group_callback import PlacementGroupCleanerCallback

    from catdog.cluster.session import worker_runtime_env
    from catdog.process import LOCAL_RAY_ENV, SPEED_ENV
    from catdog.train.fit import trainer_class

    def kinds(trainer) -> set[type]:
        return {type(callback) for callback in trainer._create_default_callbacks()}

    scaling = ScalingConfig(num_workers=1, resources_per_worker={"CPU": 0.25})
    stock = kinds(TensorflowTrainer(lambda: None, scaling_config=scaling))
    assert PlacementGroupCleanerCallback in stock and DatasetsCallback in stock
    ours = trainer_class()(lambda: None, scaling_config=scaling)
    assert isinstance(ours, TensorflowTrainer)
    assert PlacementGroupCleanerCallback not in kinds(ours)
    assert DatasetsCallback not in kinds(ours)  # no datasets (cached mode): no DatasetManager actor to boot
    with_data = trainer_class()(lambda: None, scaling_config=scaling, datasets={"train": ray_cluster.data.range(4)})
    assert DatasetsCallback in kinds(with_data)

    @ray_cluster.remote(num_cpus=0)
    def job_env(name: str) -> str | None:
        return os.environ.get(name)

    for name, value in {**SPEED_ENV, **LOCAL_RAY_ENV}.items():  # the local Ray has no preemption watcher
        assert ray_cluster.get(job_env.remote(name)) == value
    # inherited, not a job runtime_env: tasks and actors can run in the workers Ray prestarts
    assert json.loads(ray_cluster.get_runtime_context().get_runtime_env_string() or "{}") == {}
    assert worker_runtime_env() is None


@pytest.mark.slow
def test_workers_get_tf_config_from_a_controller_that_never_loads_tensorflow(ray_cluster, tmp_path):
    """catdog.train.backend: each of two workers gets Ray's TF_CONFIG (every worker's address, its own
    rank), and the Train controller, which unpickles the backend config, has no TensorFlow loaded
    (with Ray's TensorflowConfig it has)."""
    from ray.train import RunConfig, ScalingConfig

    from catdog.train.backend import TensorflowWorkersConfig
    from catdog.train.fit import trainer_class

    def loop(config: dict) -> None:
        import ray.train

        def parent(pid: str) -> str:
            return next(line.split()[1] for line in Path(f"/proc/{pid}/status").read_text().splitlines()
                        if line.startswith("PPid:"))

        # This fit's controller: titled by its class, a child of this worker's raylet (another test
        # process may run a fit on a Ray of its own).
        raylet = str(os.getppid())
        [maps] = [(entry / "maps").read_text() for entry in Path("/proc").iterdir() if entry.name.isdigit()
                  and (entry / "cmdline").read_bytes().startswith(b"ray::TrainController")
                  and parent(entry.name) == raylet]
        rank = ray.train.get_context().get_world_rank()
        Path(config["out"], f"{rank}.json").write_text(json.dumps(
            {"tf_config": json.loads(os.environ["TF_CONFIG"]), "controller_loaded_tensorflow": "tensorflow" in maps}))

    trainer_class()(loop, train_loop_config={"out": str(tmp_path)}, tensorflow_config=TensorflowWorkersConfig(),
                    scaling_config=ScalingConfig(num_workers=2, resources_per_worker={"CPU": 0.25}),
                    run_config=RunConfig(storage_path=str(tmp_path / "storage"), name="tf-config")).fit()
    seen = [json.loads((tmp_path / f"{rank}.json").read_text()) for rank in (0, 1)]
    addresses = seen[0]["tf_config"]["cluster"]["worker"]
    assert len(addresses) == 2 and len(set(addresses)) == 2 and all(a.startswith("127.0.0.1:") for a in addresses)
    for rank, worker in enumerate(seen):
        assert worker["tf_config"] == {"cluster": {"worker": addresses}, "task": {"type": "worker", "index": rank}}
        assert worker["controller_loaded_tensorflow"] is False
