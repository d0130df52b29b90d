"""jobs.evaluate: metrics from predictions, temperature comparison, every plot, user errors, and
end to end through the real scoring pipeline with hand-set perfect and inverted heads."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from PIL import Image

from catdog.analyse import evaluation as E
from catdog.analyse import metrics, plots
from catdog.errors import CatdogError, InputError, ModelLoadError, OutputExistsError
from jobs import evaluate as evaluate_job

CLASSES = ["cats", "dogs"]


def assert_png(path: Path, min_side: int = 100) -> None:
    """A real, decodable, non-trivial PNG."""
    assert path.is_file(), path
    assert path.stat().st_size > 1000, path
    with Image.open(path) as image:
        assert image.format == "PNG"
        image.load()
        assert min(image.size) >= min_side, (path, image.size)
        assert len(set(image.convert("L").getdata())) > 2, f"{path} is blank"


def _predictions_table(true_labels, p_dogs, errors=None) -> pa.Table:
    n = len(true_labels)
    errors = errors or [None] * n
    p_dogs = np.asarray(p_dogs, dtype=np.float32)
    return pa.table({
        "path": [f"/data/{i}.jpg" for i in range(n)],
        "label": [None if e else ("dogs" if p >= 0.5 else "cats") for p, e in zip(p_dogs, errors)],
        "true_label": list(true_labels),
        "confidence": np.maximum(p_dogs, 1 - p_dogs),
        "error": errors,
        "prob_cats": 1 - p_dogs,
        "prob_dogs": p_dogs,
    })


def test_compute_metrics_skips_unscored_rows():
    table = _predictions_table(
        ["cats", "dogs", "dogs", "cats", "dogs"], [0.1, 0.8, 0.3, 0.0, 0.0],
        errors=[None, None, None, "truncated: cut short", "not_an_image: text"],
    )
    result, arrays = E.compute_metrics(table, CLASSES)
    assert result["rows"] == 3 and result["unscored"] == 2
    assert result["errors_by_kind"] == {"not_an_image": 1, "truncated": 1}
    assert result["accuracy"] == pytest.approx(2 / 3)
    assert result["confusion_matrix"] == [[1, 0], [1, 1]]
    assert result["roc_auc"] == pytest.approx(1.0)  # both dogs outrank the cat despite one miss
    assert arrays["paths"].tolist() == ["/data/0.jpg", "/data/1.jpg", "/data/2.jpg"]
    with pytest.raises(InputError, match="no image"):
        E.compute_metrics(_predictions_table(["cats"], [0.0], errors=["truncated: x"]), CLASSES)


def test_undo_temperature_recovers_untempered_probabilities():
    logits = np.random.default_rng(0).normal(0, 3, (50, 3))
    softmax = lambda z: np.exp(z - z.max(1, keepdims=True)) / np.exp(z - z.max(1, keepdims=True)).sum(1, keepdims=True)  # noqa: E731
    np.testing.assert_allclose(E.undo_temperature(softmax(logits / 2.5), 2.5), softmax(logits), atol=1e-9)


def test_calibration_before_and_after_when_training_fitted_a_temperature(tmp_path):
    y_true = np.array([0, 1, 0, 1])
    probs = np.array([[0.7, 0.3], [0.4, 0.6], [0.4, 0.6], [0.2, 0.8]])
    result = {"calibration": metrics.reliability(y_true, probs).to_dict()}
    E._add_calibration_comparison(result, probs, y_true, str(tmp_path), bins=15)
    assert result["temperature"] is None and result["ece"] == result["calibration"]["ece"]
    # The shape training writes: calibration.temperature with validation ECE before and after.
    training = {"temperature": 2.0, "bins": 15, "before": {"ece": 0.2}, "after": {"ece": 0.05}}
    (tmp_path / "metrics.json").write_text(json.dumps({"calibration": training}))
    E._add_calibration_comparison(result, probs, y_true, str(tmp_path), bins=15)
    assert result["temperature"] == 2.0
    assert result["training_calibration"] == training
    expected_before = metrics.reliability(y_true, E.undo_temperature(probs, 2.0)).ece
    assert result["ece_before_temperature"] == pytest.approx(expected_before)
    assert result["ece_before_temperature"] != pytest.approx(result["ece_after_temperature"])


def test_every_plot_is_a_valid_image(tmp_path, sample_images):
    rng = np.random.default_rng(0)
    paths = sorted(str(p) for p in sample_images.rglob("*.*"))[:30] + [str(tmp_path / "gone.jpg")]
    y_true = rng.integers(0, 2, len(paths))
    p_dogs = np.clip(0.2 * y_true + rng.random(len(paths)) * 0.8, 0, 1)
    probs = np.stack([1 - p_dogs, p_dogs], axis=1)
    result = metrics.classification_report(y_true, probs, CLASSES)
    arrays = {"y_true": y_true, "probs": probs, "paths": np.array(paths)}
    arrays["y_true"][-1], arrays["probs"][-1] = 0, [0.01, 0.99]  # the missing file is the worst mistake
    E.write_plots(str(tmp_path / "out"), result, arrays, CLASSES, mistakes=20, bins=15)
    for name in E.PLOTS:
        assert_png(tmp_path / "out" / name)
    mistakes = E._mistakes(arrays, CLASSES, 20)
    assert len(mistakes) == int((probs.argmax(1) != y_true).sum()) > 5
    assert mistakes[0].path.endswith("gone.jpg") and mistakes[0].confidence == pytest.approx(0.99)
    assert [m.confidence for m in mistakes] == sorted((m.confidence for m in mistakes), reverse=True)
    # No mistakes, and three classes: still valid images.
    plots.plot_mistakes([], str(tmp_path / "none.png"))
    assert_png(tmp_path / "none.png")
    y3 = np.array([0, 1, 2, 2])
    plots.plot_roc(y3, np.eye(3)[y3], ["a", "b", "c"], str(tmp_path / "roc3.png"))
    assert_png(tmp_path / "roc3.png")


def _run_folder(tmp_path: Path, classes=CLASSES) -> Path:
    run = tmp_path / "run"
    run.mkdir(parents=True)
    (run / "classes.json").write_text(json.dumps(classes))
    (run / "model.keras").write_bytes(b"not scored in this test")
    return run


def test_user_mistakes_fail_before_scoring(tmp_path, sample_images):
    run = _run_folder(tmp_path)
    with pytest.raises(ModelLoadError, match="classes.json"):
        E.evaluate(E.EvaluateConfig(str(tmp_path / "nowhere"), str(sample_images), str(tmp_path / "a")))
    with pytest.raises(InputError, match="not found"):
        E.evaluate(E.EvaluateConfig(str(run), str(tmp_path / "no-data"), str(tmp_path / "b")))
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "metrics.json").write_text("{}")
    with pytest.raises(OutputExistsError, match="--overwrite"):
        E.evaluate(E.EvaluateConfig(str(run), str(sample_images), str(tmp_path / "c")))
    other = _run_folder(tmp_path / "other", classes=["cats", "birds"])
    with pytest.raises(InputError, match="dogs"):
        E.evaluate(E.EvaluateConfig(str(other), str(sample_images), str(tmp_path / "d")))
    with pytest.raises(CatdogError, match="--bins"):
        E.EvaluateConfig(str(run), str(sample_images), str(tmp_path / "e"), bins=0)


def test_job_help_and_exit_code_two(tmp_path, capsys, sample_images):
    with pytest.raises(SystemExit) as exit_info:
        evaluate_job.main(["--help"])
    assert exit_info.value.code == 0
    assert "--model" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exit_info:
        evaluate_job.main(["--model", str(tmp_path / "x"), "--data", str(sample_images), "--output", str(tmp_path / "o")])
    assert exit_info.value.code == 2
    assert "classes.json" in capsys.readouterr().err


# --- end to end: the real scoring pipeline on a local Ray cluster ---------------------------------

HEAD_SCALE = 5.0  # logit gap for a margin-1 score: softmax gives 0.993 to the chosen class


def _hand_set_heads(sample_images: Path, spec, extractor):
    """Head weights (perfect, inverted) that separate this folder's features exactly.

    The backbone is random (no ImageNet offline), so the separating direction is solved for: with
    80 images and 2,048 features, a ridge fit interpolates, giving scores of about -1 (cats) and +1
    (dogs). Hidden unit 0 is relu(score), unit 1 relu(-score); the logits layer routes them to the
    right (perfect) or wrong (inverted) class.
    """
    from catdog.io.imaging import read_and_decode
    from catdog.io.labelled import list_labelled_images

    images = list_labelled_images(str(sample_images), class_names=CLASSES)
    decoded = read_and_decode(images.paths, spec.image_size)
    assert all(e is None for e in decoded["error"])
    features = np.asarray(extractor.predict(decoded["image"].astype("float32"), verbose=0), dtype=np.float64)
    target = np.where(np.array(images.labels) == 1, 1.0, -1.0)
    mean = features.mean(axis=0)
    centred = features - mean
    gram = centred @ centred.T
    direction = centred.T @ np.linalg.solve(gram + 1e-6 * np.trace(gram) / len(gram) * np.eye(len(gram)), target)
    scores = centred @ direction
    assert np.all(np.sign(scores) == target) and np.abs(scores).min() > 0.5, "features not separable"
    hidden_kernel = np.zeros((features.shape[1], spec.hidden_units), np.float32)
    hidden_bias = np.zeros(spec.hidden_units, np.float32)
    hidden_kernel[:, 0], hidden_bias[0] = direction, -mean @ direction
    hidden_kernel[:, 1], hidden_bias[1] = -direction, mean @ direction
    routes = {}
    for name, (unit_for_dogs, unit_for_cats) in {"perfect": (0, 1), "inverted": (1, 0)}.items():
        logits_kernel = np.zeros((spec.hidden_units, 2), np.float32)
        logits_kernel[unit_for_dogs, 1] = logits_kernel[unit_for_cats, 0] = HEAD_SCALE
        routes[name] = [hidden_kernel, hidden_bias, logits_kernel, np.zeros(2, np.float32)]
    return routes


@pytest.fixture(scope="module")
def hand_set_runs(tmp_path_factory, sample_images):
    """Run folders (model.keras + classes.json) of a perfect and an inverted model at 32 px."""
    from catdog.model import build as M

    spec = M.ModelSpec(num_classes=2, image_size=32, hidden_units=8)
    extractor = M.build_feature_extractor(spec, weights=None, seed=0)
    runs = {}
    for name, weights in _hand_set_heads(sample_images, spec, extractor).items():
        head = M.build_head(spec)
        head.get_layer("hidden").set_weights(weights[:2])
        head.get_layer("logits").set_weights(weights[2:])
        run = tmp_path_factory.mktemp(f"run-{name}")
        M.save_model(M.build_model(extractor, head), str(run / M.MODEL_FILENAME))
        (run / "classes.json").write_text(json.dumps(CLASSES))
        (run / "config.json").write_text(json.dumps({"model_spec": spec.to_dict()}))  # run-folder contract
        runs[name] = run
    return runs


@pytest.fixture(scope="module")
def perfect_evaluation(ray_cluster, hand_set_runs, sample_images, tmp_path_factory):
    """The perfect model evaluated on the sample images: the output folder and the returned metrics."""
    out = tmp_path_factory.mktemp("eval-perfect") / "eval"
    return out, E.evaluate(E.EvaluateConfig(str(hand_set_runs["perfect"]), str(sample_images), str(out)))


@pytest.mark.slow
def test_evaluate_perfect_model_end_to_end(perfect_evaluation):
    import pyarrow.parquet as pq

    from catdog.analyse.report import ReportConfig, summarise

    out, result = perfect_evaluation
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["rows"] == saved["images"] == 80 and saved["unscored"] == 0
    assert saved["accuracy"] == 1.0
    assert saved["roc_auc"] == 1.0 and saved["pr_auc"] == 1.0
    assert saved["confusion_matrix"] == [[40, 0], [0, 40]]
    assert saved["per_class"]["dogs"] == {"precision": 1.0, "recall": 1.0, "f1": 1.0, "support": 40}
    assert saved["log_loss"] < 0.05
    assert saved["temperature"] is None and saved["ece"] == saved["calibration"]["ece"]
    assert result["accuracy"] == saved["accuracy"]
    for name in E.PLOTS:
        assert_png(out / name)
    predictions = pq.read_table(out / "predictions")
    assert predictions.num_rows == 80
    assert predictions.column("label").to_pylist() == predictions.column("true_label").to_pylist()
    # The evaluation's predictions are a normal predictions folder for jobs.report.
    summary = summarise(ReportConfig(str(out / "predictions")))
    assert summary["rows"] == 80 and summary["accuracy_where_labelled"] == 1.0
    assert summary["throughput_images_per_s"] > 0


@pytest.mark.slow
def test_evaluate_inverted_model_end_to_end(ray_cluster, hand_set_runs, perfect_evaluation, sample_images, tmp_path):
    """The inverted model, evaluated over a copy of the perfect model's evaluation: refused without
    --overwrite, then every file replaced with it."""
    import shutil

    out = tmp_path / "eval"
    shutil.copytree(perfect_evaluation[0], out)
    before = sorted(p.relative_to(out) for p in out.rglob("*"))
    config = E.EvaluateConfig(str(hand_set_runs["inverted"]), str(sample_images), str(out), mistakes=20)
    with pytest.raises(OutputExistsError):
        E.evaluate(config)
    assert sorted(p.relative_to(out) for p in out.rglob("*")) == before
    result = E.evaluate(E.EvaluateConfig(str(hand_set_runs["inverted"]), str(sample_images), str(out), mistakes=20,
                                         overwrite=True))
    assert result["accuracy"] == 0.0 and result["rows"] == 80
    assert result["roc_auc"] == 0.0
    assert result["confusion_matrix"] == [[0, 40], [40, 0]]
    assert result["calibration"]["ece"] > 0.9  # sure of every wrong answer
    assert json.loads((out / "metrics.json").read_text())["accuracy"] == 0.0
    assert_png(out / "mistakes.png", min_side=400)  # 20 tiles: 4 rows of 5
