"""Scoring (catdog.score.run, catdog.output, jobs.score, jobs.predict): exact accounting on a hostile
corpus, predictions equal to the in-process model, re-runs (refuse, resume, overwrite), schema,
precision. Real local Ray (the session cluster), real TensorFlow, real files."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.dataset  # noqa: F401 - pa.dataset
import pyarrow.parquet as pq
import pytest
from PIL import Image

from catdog.errors import CatdogError, OutputExistsError
from catdog.io.imaging import decode_image
from catdog.io.paths import local_path_bytes
from catdog.score import predictions_folder as output
from catdog.score.config import ScoreConfig
from catdog.score.predictions_folder import PredictionsFolder, predictions_schema
from support import job_lines, run_job_module
from support.hostile_corpus import MAX_PIXELS, write_corpus, write_storage_oddities
from support.outputs import write_part

ROOT = Path(__file__).resolve().parents[2]
CLASSES = ["cats", "dogs"]
PROBS = ["prob_cats", "prob_dogs"]
# bf16 keeps 8 bits of mantissa; through ResNet50 the probabilities of the 32-px test model moved
# by at most ~0.02 (measured), so 0.05 is the stated tolerance against float32.
BF16_TOLERANCE = 0.05


def _config(run: Path, input_: Path | str, out: Path, **kw) -> ScoreConfig:
    kw.setdefault("rows_per_file", 8)
    kw.setdefault("batch_size", 8)
    return ScoreConfig(model=str(run), input=str(input_), output=str(out), **kw)


def _read(out: Path) -> pa.Table:
    return PredictionsFolder(str(out)).read()


def _in_process_probs(run: Path, paths: list[str], precision: str = "float32") -> np.ndarray:
    import tensorflow as tf

    from catdog.model.build import load_model
    from catdog.model.inference import inference_model

    model = inference_model(load_model(str(run)), precision)
    pixels = np.stack([decode_image(Path(os.fsdecode(local_path_bytes(p))).read_bytes(), 32)[0] for p in paths])
    # A graph, as in the predictor: in bfloat16 TensorFlow's graph fusions (conv + bias + relu)
    # round once where eager rounds per op, which moves these 32 px probabilities by up to 0.02.
    forward = tf.function(lambda x: model(x, training=False))
    return np.asarray(forward(pixels.astype(np.float32)), dtype=np.float32)


# ---- fast: configuration, arguments, output folder management (no Ray) ----

@pytest.mark.parametrize("kw", [
    {"precision": "int8"}, {"overwrite": True, "resume": True}, {"partition_by": "path"},
    {"num_workers": 2, "min_workers": 1, "max_workers": 2}, {"min_workers": 2}, {"min_workers": 3, "max_workers": 2},
    {"batch_size": 0}, {"gpus_per_worker": 0}, {"max_image_pixels": 0}, {"rows_per_file": 0},
])
def test_score_config_refuses_inconsistent_settings(kw):
    with pytest.raises(CatdogError):
        ScoreConfig(model="m", input="i", output="o", **kw)


def test_score_config_defaults():
    cpu, gpu = ScoreConfig("m", "i", "o"), ScoreConfig("m", "i", "o", use_gpu=True)
    assert (cpu.effective_batch_size, gpu.effective_batch_size) == (64, 128)
    assert cpu.to_dict()["precision"] == "float32"


def test_jobs_parse_their_arguments(capsys):
    from jobs import predict, score

    args = score.parse_args(["--model", "r", "--input", "i", "--output", "o", "--precision", "bfloat16", "--resume",
                             "--partition-by", "label", "--min-workers", "1", "--max-workers", "3"])
    assert (args.precision, args.resume, args.partition_by, args.max_workers) == ("bfloat16", True, "label", 3)
    for bad in (["--overwrite", "--resume"], ["--precision", "fp8"], ["--partition-by", "error"]):
        with pytest.raises(SystemExit) as info:
            score.parse_args(["--model", "r", "--input", "i", "--output", "o", *bad])
        assert info.value.code == 2
    with pytest.raises(SystemExit) as info:
        score.parse_args(["--help"])
    assert info.value.code == 0 and "ray job submit" in capsys.readouterr().out
    assert predict.parse_args(["x.jpg", "--model", "r"]).image == "x.jpg"
    text = predict.format_prediction({"label": "dogs", "confidence": 0.875, "probabilities": {"cats": 0.125, "dogs": 0.875}})
    assert text.splitlines() == ["This image is 87.50% dogs.", "  cats: 0.1250", "  dogs: 0.8750"]


def test_model_description_needs_no_tensorflow_and_names_the_artifact(tiny_model_run):
    from catdog.model.run_folder import artifact_id, describe_model, model_file

    info = describe_model(str(tiny_model_run))
    assert (info.image_size, info.class_names) == (32, tuple(CLASSES))
    assert info.model_id == artifact_id((tiny_model_run / "model.keras").read_bytes())  # the artifact's hash
    for location in (str(tiny_model_run), str(tiny_model_run / "model.keras")):
        assert model_file(location) == str(tiny_model_run / "model.keras")
    assert model_file("s3://b/run") == "s3://b/run/model.keras"
    probe = subprocess.run([sys.executable, "-c", "import sys\nfrom catdog.model.run_folder import describe_model\n"
                            f"describe_model({str(tiny_model_run)!r})\nprint('tensorflow' in sys.modules)"],
                           cwd=ROOT, capture_output=True, text=True, timeout=120, check=True)
    assert probe.stdout.strip() == "False"


def _lambda_run(folder: Path) -> Path:
    """A run folder whose model hides code in a Lambda layer (loadable only outside safe mode)."""
    from catdog.model import build as catdog_model  # noqa: F401 - TensorFlow, quietly

    import keras

    pixels = keras.Input((32, 32, 3))
    x = keras.layers.Lambda(lambda t: t * 2.0)(keras.layers.GlobalAveragePooling2D()(pixels))
    model = keras.Model(pixels, keras.layers.Dense(2, activation="softmax")(x))
    folder.mkdir()
    model.save(folder / "model.keras")
    (folder / "classes.json").write_text(json.dumps(CLASSES))
    return folder


def test_a_model_with_a_lambda_layer_is_refused_before_anything_runs(tmp_path, capsys):
    from catdog.errors import ModelLoadError
    from catdog.model.build import load_model
    from catdog.model.run_folder import describe_model

    run = _lambda_run(tmp_path / "run")
    with pytest.raises(ModelLoadError, match="Lambda"):
        describe_model(str(run))  # the driver's check, before Ray starts
    with pytest.raises(ModelLoadError, match="Lambda"):
        load_model(str(run))  # the actors' safe-mode load refuses it too
    images = tmp_path / "images"
    images.mkdir()
    Image.new("RGB", (8, 8)).save(images / "a.jpg")
    out = tmp_path / "out"
    code = run_job_module("jobs.score", "--model", str(run), "--input", str(images), "--output", str(out))
    err = capsys.readouterr().err
    assert code == 2 and "Lambda layers are refused" in err, err[-2000:]
    assert not out.exists()


@pytest.mark.parametrize("case", ["no_classes", "bad_classes", "not_a_model", "no_model"])
def test_unusable_run_folders_are_model_load_errors(tmp_path, tiny_model_run, case):
    from catdog.errors import ModelLoadError
    from catdog.model.run_folder import describe_model

    run = tmp_path / "run"
    run.mkdir()
    if case != "no_model":
        (run / "model.keras").write_bytes(b"PK-not-really" if case == "not_a_model" else
                                          (tiny_model_run / "model.keras").read_bytes())
    if case != "no_classes":
        (run / "classes.json").write_text('["only-one"]' if case == "bad_classes" else json.dumps(CLASSES))
    with pytest.raises(ModelLoadError, match=str(run)):
        describe_model(str(run))


def test_accounting_runs_in_a_one_shot_worker_and_its_verdicts_come_back_whole(tmp_path, ray_cluster):
    """With Ray up, accounting runs off the driver; a failed verdict still counts the repeated
    rows (the late-write recovery looks for them) and kept unlisted rows still count."""
    from catdog.score import ledger
    from catdog.score.run import _account_beside_driver

    out = tmp_path / "out"
    write_part(out, ["/a.jpg", "/b.jpg", "/old.jpg"], 0)
    folder = PredictionsFolder(str(out))
    for index, paths in enumerate((["/a.jpg"], ["/b.jpg"])):
        folder.write_listing_chunk(index, pa.table({"path": paths}))
    kept = ledger.split([pa.table({"path": ["/old.jpg"]})], str(tmp_path / "kept"), 1, pa.schema([("path", pa.string())]))
    counts = _account_beside_driver(folder, kept, listed_rows=2, scratch=str(tmp_path))
    assert (counts["rows_written"], counts["rows_not_in_listing"]) == (2, 1)
    write_part(out, ["/b.jpg"], 1)
    with pytest.raises(output.AccountingError, match="1 duplicates") as failed:
        _account_beside_driver(folder, kept, listed_rows=2, scratch=str(tmp_path))
    assert failed.value.duplicates == 1


# ---- slow: the pipeline on the session's Ray cluster ----

@pytest.fixture(scope="module")
def hostile(tmp_path_factory):
    root = tmp_path_factory.mktemp("hostile-input")
    return root, {**write_corpus(root), **write_storage_oddities(root)}


@pytest.mark.slow
def test_hostile_corpus_gives_one_row_per_file_and_in_process_predictions(ray_cluster, tiny_model_run, hostile, tmp_path,
                                                                         capsys):
    root, expected = hostile
    out = tmp_path / "preds"
    from catdog.score.run import score

    summary = score(_config(tiny_model_run, root, out, max_image_pixels=MAX_PIXELS))
    table = _read(out)
    paths = table["path"].to_pylist()
    assert table.num_rows == len(expected) == len(set(paths))
    assert sorted(paths) == sorted(str(root / name) for name in expected)
    rows = {Path(r["path"]).relative_to(root).as_posix(): r for r in table.to_pylist()}
    for name, outcome in expected.items():
        row = rows[name]
        kind = None if row["error"] is None else row["error"].split(":", 1)[0]
        assert kind == outcome.error, (name, row["error"])
        if outcome.error is None:
            assert (row["width"], row["height"]) == outcome.size
            assert row["label"] == CLASSES[int(row["prob_dogs"] > row["prob_cats"])]
            assert row["confidence"] == max(row["prob_cats"], row["prob_dogs"])
            assert abs(row["prob_cats"] + row["prob_dogs"] - 1) < 1e-5
        else:
            assert row["label"] is None and row["prob_cats"] is None and row["confidence"] is None, name

    good = sorted(str(root / n) for n, o in expected.items() if o.error is None)
    scored = table.filter(pa.compute.is_null(table["error"])).sort_by("path")
    got = np.stack([scored[c].to_numpy() for c in PROBS], axis=1)
    np.testing.assert_allclose(got, _in_process_probs(tiny_model_run, good), atol=1e-5)

    # Schema and readers: every part file has the documented schema; pandas and pyarrow read the folder.
    files = PredictionsFolder(str(out)).part_files()
    assert len(files) >= 2 and all(Path(f).parent == out for f in files)
    for f in files:
        assert pq.read_schema(f).remove_metadata().equals(predictions_schema(CLASSES)), f
    assert pq.read_table(out).num_rows == len(pd.read_parquet(out)) == len(expected)

    errors = {}
    for outcome in expected.values():
        if outcome.error:
            errors[outcome.error] = errors.get(outcome.error, 0) + 1
    success = json.loads((out / output.SUCCESS_FILE).read_text())
    assert success == json.loads(json.dumps(summary, default=str))
    assert success["files_listed"] == success["rows_written"] == len(expected)
    assert success["errors_by_kind"] == errors and success["predictions"] == len(good)
    assert success["model_id"] == rows["plain.jpg"]["model_id"] and success["images_per_s"] > 0
    assert sorted(success["output_files"]) == sorted(Path(f).name for f in files)

    # A second run without --resume/--overwrite is refused, in-process and as a job (exit 2).
    before = sorted(os.listdir(out))
    with pytest.raises(OutputExistsError):
        score(_config(tiny_model_run, root, out))
    capsys.readouterr()
    code = run_job_module("jobs.score", "--model", str(tiny_model_run), "--input", str(root), "--output", str(out))
    err = capsys.readouterr().err
    assert code == 2, err[-2000:]
    assert "already exists" in err and "--resume" in err
    assert sorted(os.listdir(out)) == before


@pytest.mark.slow
def test_interrupted_run_resumes_to_exact_rows_then_overwrite_partitions(ray_cluster, tiny_model_run, hostile, tmp_path):
    from catdog.score.run import score

    root, expected = hostile
    out = tmp_path / "preds"
    names = sorted(expected)
    first = tmp_path / "first.csv"
    pd.DataFrame({"path": [str(root / n) for n in names[:12]]}).to_csv(first, index=False)
    score(_config(tiny_model_run, first, out, rows_per_file=4, batch_size=4, max_image_pixels=MAX_PIXELS))
    # Make it look interrupted: one part file cut short mid-write, no _SUCCESS.json.
    parts = PredictionsFolder(str(out)).part_files()
    assert len(parts) == 3
    truncated = Path(parts[1])
    lost = pq.read_table(truncated).num_rows
    truncated.write_bytes(truncated.read_bytes()[: truncated.stat().st_size // 2])
    (out / output.SUCCESS_FILE).unlink()

    # The same files, now listed from their folder instead of the first manifest: moved on purpose.
    summary = score(_config(tiny_model_run, root, out, resume=True, input_moved=True, max_image_pixels=MAX_PIXELS))
    table = _read(out)
    assert table.num_rows == len(expected) == len(set(table["path"].to_pylist()))
    assert summary["rows_scored_this_run"] == len(expected) - 12 + lost
    assert summary["rows_from_earlier_runs"] == 12 - lost
    assert [Path(q).name for q in summary["quarantined_files"]] == [truncated.name]
    assert (out / output.QUARANTINE_DIR / truncated.name).exists()

    again = score(_config(tiny_model_run, root, out, resume=True, max_image_pixels=MAX_PIXELS))  # nothing left
    assert again["rows_scored_this_run"] == 0 and again["rows_written"] == len(expected)

    (out / "README.txt").write_text("someone else's file")
    summary = score(_config(tiny_model_run, root, out, overwrite=True, partition_by="label",
                            max_image_pixels=MAX_PIXELS))
    assert (out / "README.txt").read_text() == "someone else's file"
    assert not (out / output.QUARANTINE_DIR).exists()
    folders = sorted(p.name for p in out.iterdir() if p.is_dir() and not p.name.startswith("_"))
    assert (out / output.LISTING_DIR).is_dir() and not (out / output.TODO_DIR).exists()
    assert set(folders) <= {"label=__HIVE_DEFAULT_PARTITION__", "label=cats", "label=dogs"}
    assert "label=__HIVE_DEFAULT_PARTITION__" in folders  # error rows have no label
    table = _read(out)
    assert table.num_rows == len(expected) == len(set(table["path"].to_pylist()))
    assert summary["rows_scored_this_run"] == len(expected)
    labels = dict(zip(table["path"].to_pylist(), table["label"].to_pylist()))
    assert all((labels[str(root / n)] is None) == (o.error is not None) for n, o in expected.items())
    (out / "README.txt").unlink()  # pyarrow and pandas would try to read it as Parquet
    # pandas reads the hive layout given the partition type (its inferred dictionary type cannot
    # hold the null label of error rows: "Cannot yet unify dictionaries with nulls").
    hive = pa.dataset.partitioning(pa.schema([("label", pa.string())]), flavor="hive")
    frame = pd.read_parquet(out, partitioning=hive)
    assert len(frame) == len(expected) and frame["label"].isna().sum() == sum(o.error is not None for o in expected.values())


@pytest.mark.slow
def test_bfloat16_matches_float32_and_manifest_labels_and_missing_paths(ray_cluster, tiny_model_run, real_photos,
                                                                        tmp_path):
    from catdog.score.run import score

    photos = sorted(str(p) for p in (real_photos / "cats").glob("*.jpg"))[:12]
    photos += sorted(str(p) for p in (real_photos / "dogs").glob("*.jpg"))[:12]
    missing = [str(tmp_path / "never" / "there.jpg"), str(tmp_path / "gone.png")]
    manifest = tmp_path / "labelled.parquet"
    pq.write_table(pa.table({"path": photos + missing, "true_label": ["cats"] * 12 + ["dogs"] * 14}), manifest)
    out = tmp_path / "bf16"
    summary = score(_config(tiny_model_run, manifest, out, precision="bfloat16"))
    table = _read(out)
    assert table.schema.remove_metadata().equals(predictions_schema(CLASSES, with_true_label=True))
    assert table.num_rows == 26 == len(set(table["path"].to_pylist()))
    assert summary["with_true_label"] and summary["errors_by_kind"] == {"read_error": 2}
    labels = dict(zip(table["path"].to_pylist(), table["true_label"].to_pylist()))
    assert [labels[p] for p in photos + missing] == ["cats"] * 12 + ["dogs"] * 14  # carried through, errors too

    scored = table.filter(pa.compute.is_null(table["error"])).sort_by("path")
    got = np.stack([scored[c].to_numpy() for c in PROBS], axis=1)
    fp32 = _in_process_probs(tiny_model_run, scored["path"].to_pylist())
    bf16 = _in_process_probs(tiny_model_run, scored["path"].to_pylist(), "bfloat16")
    # The pipeline runs the same bf16 model. Without AVX-512 bf16, TensorFlow's Eigen fallback rounds
    # by the batch's shape, so the pipeline's batches and this one agree less closely than 1e-3.
    np.testing.assert_allclose(got, bf16, atol=0.02)
    assert np.abs(got - fp32).max() <= BF16_TOLERANCE
    assert not np.array_equal(got, fp32)  # it really ran in bfloat16


@pytest.mark.slow
def test_predict_job_prints_the_in_process_prediction(tiny_model_run, real_photos, capsys):
    photo = sorted((real_photos / "dogs").glob("*.jpg"))[0]
    code = run_job_module("jobs.predict", str(photo), "--model", str(tiny_model_run))
    out, err = capsys.readouterr()
    assert code == 0, err[-2000:]
    probs = _in_process_probs(tiny_model_run, [str(photo)])[0]
    best = int(probs.argmax())
    lines = job_lines(out.strip())
    assert lines[-3] == f"This image is {probs[best]:.2%} {CLASSES[best]}."
    assert lines[-2:] == [f"  cats: {probs[0]:.4f}", f"  dogs: {probs[1]:.4f}"]
    from catdog.errors import InputError
    from catdog.score.predictor import predict_image

    with pytest.raises(InputError, match="not_an_image"):  # jobs map InputError to exit 2
        predict_image(str(tiny_model_run), str(ROOT / "pyproject.toml"))


def test_object_store_budget_does_not_grow_with_the_input():
    """Peak memory of a scoring run must not grow with the number of images (issue: <= 15% from
    1,000 to 10,000); the object-store budget is what bounds the decoded pixels in flight."""
    from catdog.score.pipeline import MIN_OBJECT_STORE_BUDGET, object_store_budget

    small = object_store_budget(1_000, 32, 180, predictors=1)
    assert small == MIN_OBJECT_STORE_BUDGET
    assert object_store_budget(10_000, 32, 180, 1) == small
    huge = object_store_budget(1_000_000_000, 32, 180, 1)  # 1,024-path blocks: 8 of them in flight
    assert huge == 8 * 1024 * 180 * 180 * 3 < 1 << 30
    assert object_store_budget(1_000, 128, 224, predictors=8) == 32 * 128 * 224 * 224 * 3 * 8  # a GPU pool


# ---- the predictor actors: batches at once on CPU, threads per op --------------------------

def test_cpu_pools_run_two_batches_per_actor_at_once_and_gpu_pools_one(tmp_path):
    """Ray Data runs an actor's calls one at a time (a lock around the UDF) unless the pool allows
    true multi-threading; on CPU the predictor pool must, on GPU it must not."""
    from catdog.score.pipeline import _actor_pool

    for kw in ({}, {"num_workers": 3}, {"min_workers": 1, "max_workers": 4}):
        pool = _actor_pool(_config(tmp_path, tmp_path, tmp_path / "out", **kw))
        assert pool.max_concurrent_calls_per_actor == 2 and pool.enable_true_multi_threading, kw
    gpu_pool = _actor_pool(_config(tmp_path, tmp_path, tmp_path / "out", use_gpu=True, num_workers=2))
    assert gpu_pool.max_size == 2
    assert gpu_pool.max_concurrent_calls_per_actor is None and not gpu_pool.enable_true_multi_threading


@pytest.mark.slow
def test_a_predictor_actor_splits_the_cores_between_its_concurrent_batches(ray_cluster, tiny_model_run):
    """In its own (fresh) worker process, a CPU predictor runs each TensorFlow op on its share of
    the cores: 1 thread per op on 2 cores, not TensorFlow's default of every core."""
    from catdog.model.run_folder import describe_model
    from catdog.model.tensorflow_setup import visible_cores
    from catdog.score.predictor import Predictor

    def threads_and_batches(predictor):
        import tensorflow as tf

        return tf.config.threading.get_intra_op_parallelism_threads(), predictor.concurrent_batches

    actor = ray_cluster.remote(num_cpus=0.25)(Predictor).remote(describe_model(str(tiny_model_run)), "float32")
    try:
        threads, batches = ray_cluster.get(actor.__ray_call__.remote(threads_and_batches), timeout=120)
    finally:
        ray_cluster.kill(actor)
    assert batches == 2
    assert threads == max(1, visible_cores() // 2)


def test_predictor_calls_from_two_threads_equal_the_same_calls_one_at_a_time(tiny_model_run):
    """The scoring actor calls one Predictor from two threads at once: same rows as one by one."""
    from concurrent.futures import ThreadPoolExecutor

    from catdog.model.run_folder import describe_model
    from catdog.score.predictor import Predictor

    predictor = Predictor(describe_model(str(tiny_model_run)), "float32")
    rng = np.random.default_rng(0)
    batches = []
    for k in range(6):
        n = 5 + k
        errors = np.array([None] * n, dtype=object)
        errors[k % n] = "ImageDecodeError: broken"  # a failed row in every batch, at different places
        batches.append({"path": np.array([f"b{k}/{i}.jpg" for i in range(n)], dtype=object),
                        "image": rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8),
                        "width": np.full(n, 32, np.int32), "height": np.full(n, 32, np.int32), "error": errors})

    def without_time(table: pa.Table) -> pa.Table:
        return table.drop_columns(["scored_at"])

    one_by_one = [without_time(predictor(batch)) for batch in batches]
    with ThreadPoolExecutor(2) as pool:
        for _ in range(5):
            at_once = [without_time(t) for t in pool.map(predictor, batches)]
            for expected, got in zip(one_by_one, at_once):
                assert got.column_names == expected.column_names
                assert got.column("path").equals(expected.column("path"))
                np.testing.assert_allclose(got.column("prob_cats").to_numpy(zero_copy_only=False),
                                           expected.column("prob_cats").to_numpy(zero_copy_only=False), atol=1e-6)
                assert got.column("label").equals(expected.column("label"))
