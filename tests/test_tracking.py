"""MLflow tracking and registry (catdog.tracking) against a real `mlflow server` on 127.0.0.1.

The server runs from this venv (mlflow-skinny plus SQLAlchemy and alembic, the test extra) with a
SQLite backend and a local artifact folder, one per module. The jobs run in-process on the
session's Ray: train and log, register, alias, then score from `models:/NAME@ALIAS` and from the
run folder and compare the rows; evaluate from `runs:/ID/run`.
"""

from __future__ import annotations

import csv
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from catdog.errors import ModelLoadError
from catdog.tracking import data_fingerprint, flat_params, is_model_uri, resolve_model

REPO = Path(__file__).resolve().parents[1]
SERVER_START_S = 180  # the server imports Flask, FastAPI and SQLAlchemy and migrates the database: ~20 s on 2 cores


# ---- fast: no server, no Ray ------------------------------------------------------------------


def test_fingerprint_params_and_model_uris():
    assert data_fingerprint(["b.jpg", "a.jpg"], [2, 1]) == data_fingerprint(["a.jpg", "b.jpg"], [1, 2])  # sorted
    assert data_fingerprint(["a.jpg", "b.jpg"], [1, 2]) != data_fingerprint(["a.jpg", "b.jpg"], [1, 3])  # sizes count
    assert data_fingerprint(["a.jpg"], [1]) != data_fingerprint(["c.jpg"], [1])
    assert flat_params({"seed": 1, "model_spec": {"head": "gap"}, "class_names": ["cats", "dogs"], "x": None,
                        "long": "y" * 7000}) == {"seed": "1", "model_spec.head": "gap",
                                                  "class_names": '["cats", "dogs"]', "x": "None", "long": "y" * 6000}
    assert is_model_uri("models:/catdog@champion") and is_model_uri("runs:/abc/run")
    assert not is_model_uri("runs/r1") and not is_model_uri("s3://bucket/models/r1")
    assert resolve_model("runs/r1") == ("runs/r1", None)  # a path: no MLflow
    with pytest.raises(ModelLoadError, match="models:/NAME@ALIAS or models:/NAME/VERSION"):
        resolve_model("models:/catdog/latest", "http://127.0.0.1:9")  # refused before any request


def test_git_commit_of_a_checkout_and_of_a_plain_folder(tmp_path):
    from catdog.tracking import git_commit

    repo, plain = tmp_path / "repo", tmp_path / "plain"
    plain.mkdir()
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@example.com", "-C", str(repo)]
    subprocess.run(["git", "init", "-q", str(repo)], check=True)
    subprocess.run([*git, "commit", "-q", "--allow-empty", "-m", "first"], check=True)
    head = subprocess.run([*git, "rev-parse", "HEAD"], check=True, capture_output=True, text=True).stdout.strip()
    assert git_commit(str(repo)) == head and len(head) == 40
    assert git_commit(str(plain)) is None


def test_mlflow_mistakes_exit_2_before_ray_starts(tmp_path, sample_images):
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    cases = {
        "--register-as needs an MLflow server": ["jobs.train", "--data", str(sample_images), "--output",
                                                 str(tmp_path / "run"), "--register-as", "catdog"],
        "needs an MLflow server": ["jobs.score", "--model", "models:/catdog@champion", "--input", str(sample_images),
                                   "--output", str(tmp_path / "preds")],
        "no MLflow server answers": ["jobs.train", "--data", str(sample_images), "--output", str(tmp_path / "run"),
                                     "--mlflow-uri", f"http://127.0.0.1:{_free_port()}"],  # nobody listens there
    }
    procs = {expected: subprocess.Popen([sys.executable, "-m", *args], cwd=REPO, env=env, text=True,
                                        stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
             for expected, args in cases.items()}
    for expected, proc in procs.items():
        output, _ = proc.communicate(timeout=120)
        assert proc.returncode == 2 and expected in output and "Traceback" not in output, output
    assert not (tmp_path / "run").exists() and not (tmp_path / "preds").exists()


# ---- slow: a real server, a real run ------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    """`mlflow server` on 127.0.0.1 with a SQLite backend and proxied local artifacts; its URI."""
    pytest.importorskip("mlflow")
    pytest.importorskip("sqlalchemy")
    root = tmp_path_factory.mktemp("mlflow")
    port = _free_port()
    # one web worker (the default is 4), no job runner: neither is needed to log and download
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    log = open(root / "server.log", "w")
    server = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
         "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}", "--artifacts-destination", str(root / "artifacts")],
        stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)  # its own group: stopped whole
    uri = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + SERVER_START_S
        while True:
            try:
                with urllib.request.urlopen(f"{uri}/health", timeout=5) as answer:
                    if answer.status == 200:
                        break
            except OSError:
                pass
            if server.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"mlflow server did not answer: {(root / 'server.log').read_text()[-3000:]}")
            time.sleep(1)
        yield uri
    finally:
        os.killpg(server.pid, signal.SIGTERM)  # the server, its uvicorn worker
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()
        log.close()


def _run_job(main, args: list[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main([str(a) for a in args])
    assert exit_info.value.code == 0


def _rows(folder: Path) -> dict[str, tuple]:
    from catdog.score.predictions_folder import PredictionsFolder

    table = PredictionsFolder(str(folder)).read()
    probs = sorted(name for name in table.column_names if name.startswith("prob_"))
    rows = table.select(["path", "label", *probs]).to_pylist()
    return {row["path"]: (row["label"], np.array([row[p] for p in probs])) for row in rows}


@pytest.mark.slow
@pytest.mark.ray
def test_a_registered_run_scores_like_its_run_folder(ray_cluster, mlflow_server, sample_images, tmp_path, monkeypatch):
    from mlflow import MlflowClient

    from catdog.io.labelled import list_labelled_images
    from catdog.model.run_folder import RunFolder
    from catdog.tracking import open_tracking
    from jobs.evaluate import main as evaluate_main
    from jobs.score import main as score_main
    from jobs.train import main as train_main

    run = tmp_path / "run"
    _run_job(train_main, ["--data", sample_images, "--output", run, "--weights", "none", "--image-size", 32,
                          "--epochs", 2, "--cache-dir", tmp_path / "cache", "--mlflow-uri", mlflow_server,
                          "--mlflow-experiment", "catdog-test", "--register-as", "catdog-test"])

    # ---- the MLflow run: parameters, per-epoch metrics, the run folder --------------------------
    client = MlflowClient(tracking_uri=mlflow_server, registry_uri=mlflow_server)
    [logged] = client.search_runs([client.get_experiment_by_name("catdog-test").experiment_id])
    assert logged.info.status == "FINISHED"
    params = logged.data.params
    config = json.loads((run / "config.json").read_text())
    assert params["seed"] == "123" and params["run_id"] == config["run_id"] == logged.info.run_name
    assert params["model_spec.image_size"] == "32" and params["weights"] == "none"
    listing = list_labelled_images(str(sample_images))
    assert params["data_fingerprint"] == data_fingerprint(listing.relative_paths, listing.sizes)
    assert params["data_files"] == str(len(listing))
    commit = params["git_commit"]  # this checkout's HEAD, which other work may move meanwhile; "None" outside git
    assert commit == "None" or (len(commit) == 40 and logged.data.tags["mlflow.source.git.commit"] == commit)
    assert params["versions.tensorflow"] == __import__("tensorflow").__version__
    history = list(csv.DictReader((run / "history.csv").open()))
    assert len(history) == 2
    for name in ("loss", "accuracy", "val_loss", "val_accuracy", "epoch_time_s"):
        points = client.get_metric_history(logged.info.run_id, name)
        assert {(p.step, p.value) for p in points} == {(int(r["epoch"]), float(r[name])) for r in history}, name
    artifacts = {a.path for a in client.list_artifacts(logged.info.run_id, "run")}
    assert {"run/model.keras", "run/classes.json", "run/history.csv", "run/metrics.json", "run/tensorboard"} <= artifacts
    assert "run/checkpoints" not in artifacts

    # ---- registry: version 1 is the logged run folder; an alias points at it ----------------------
    [version] = client.search_model_versions("name='catdog-test'")
    assert version.version == "1" and version.run_id == logged.info.run_id
    client.set_registered_model_alias("catdog-test", "champion", "1")

    # ---- scoring from the registry gives the run folder's rows -------------------------------------
    _run_job(score_main, ["--model", run, "--input", sample_images, "--output", tmp_path / "from-run"])
    _run_job(score_main, ["--model", "models:/catdog-test@champion", "--mlflow-uri", mlflow_server,
                          "--input", sample_images, "--output", tmp_path / "from-registry"])
    from_run = json.loads((tmp_path / "from-run" / "_SUCCESS.json").read_text())
    from_registry = json.loads((tmp_path / "from-registry" / "_SUCCESS.json").read_text())
    assert from_registry["model_uri"] == "models:/catdog-test/1" and from_run["model_uri"] is None
    assert from_registry["model_id"] == from_run["model_id"]
    expected, got = _rows(tmp_path / "from-run"), _rows(tmp_path / "from-registry")
    assert sorted(got) == sorted(expected) and len(got) == len(listing)
    for path, (label, probs) in expected.items():
        assert got[path][0] == label, path
        np.testing.assert_allclose(got[path][1], probs, rtol=0, atol=1e-6, err_msg=path)

    # ---- evaluation from runs:/, the server from MLFLOW_TRACKING_URI --------------------------------
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    run_uri = f"runs:/{logged.info.run_id}/run"
    _run_job(evaluate_main, ["--model", run_uri, "--data", sample_images, "--output", tmp_path / "evaluation"])
    evaluation = json.loads((tmp_path / "evaluation" / "metrics.json").read_text())
    assert evaluation["model_uri"] == evaluation["scoring"]["model_uri"] == run_uri
    assert evaluation["scoring"]["model_id"] == from_run["model_id"] and evaluation["rows"] == len(listing)

    # ---- the next run registered under the same name is version 2; the alias stays on 1 -------------
    tracker = open_tracking(mlflow_server, "catdog-test", "catdog-test")
    again = tracker.log_run(RunFolder(str(run)), "again", {"seed": 1}, history, {}, time.time())
    assert again["model_uri"] == "models:/catdog-test/2"
    assert client.get_model_version_by_alias("catdog-test", "champion").version == "1"
