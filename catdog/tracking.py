"""MLflow, optional (`pip install 'catdog[mlflow]'`): a training run's record, and models as URIs.

    jobs.train --mlflow-uri URI [--register-as NAME]
      -> after the run folder is written, from the driver: one MLflow run with the parameters
         (run config, git commit, data fingerprint, library versions), the per-epoch metrics of
         history.csv (step = epoch) and the run folder's files as artifacts under `run/`;
         `--register-as` makes them a new version of a registered model.
    jobs.score / jobs.evaluate --model models:/NAME@ALIAS | models:/NAME/VERSION | runs:/ID/PATH
      -> `resolve_model` downloads the artifacts into a temporary folder before anything else and
         names the version it resolved (`model_uri` in _SUCCESS.json, beside `model_id`).

MLflow's Keras autolog hooks `Model.fit()`, which the Ray Train loop does not call (see
catdog.train.loop), so the driver logs what it assembled. mlflow is imported only here, and only
when a tracking URI or a model URI asks for it: catdog runs without it.
"""

from __future__ import annotations

import atexit
import hashlib
import json
import logging
import os
import platform
import re
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass
from importlib import metadata
from typing import Sequence

from catdog.errors import CatdogError, ModelLoadError

logger = logging.getLogger(__name__)

MODEL_URI_PREFIXES = ("models:/", "runs:/")
RUN_ARTIFACT_PATH = "run"  # the run folder's files inside an MLflow run: runs:/<run id>/run
DEFAULT_EXPERIMENT = "catdog"
HISTORY_METRICS = ("loss", "accuracy", "val_loss", "val_accuracy", "epoch_time_s")
LIBRARIES = ("catdog", "ray", "tensorflow", "keras", "numpy", "pyarrow", "mlflow-skinny")
MAX_PARAM_LENGTH = 6000  # MLflow refuses longer parameter values
BATCH_PARAMS = 100  # MLflow's limit of parameters and tags per log_batch request
CONNECT_TIMEOUT_S = 15  # the pre-flight request to an http(s) tracking server
_MODEL_VERSION = re.compile(r"^models:/(?P<name>[^/@]+)(@(?P<alias>[^/@]+)|/(?P<version>[0-9]+))/?$")


class TrackingError(CatdogError):
    """MLflow asked for but unusable: not installed, or the server refuses or cannot be reached."""


def is_model_uri(location: str) -> bool:
    """True for an MLflow model reference (`models:/...`, `runs:/...`) rather than a path or URI."""
    return location.startswith(MODEL_URI_PREFIXES)


def _mlflow():
    try:
        import mlflow
    except ImportError as exc:
        raise TrackingError("MLflow is not installed: pip install 'catdog[mlflow]'") from exc
    return mlflow


def _client(tracking_uri: str):
    return _mlflow().MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)


# ---- models:/ and runs:/ for scoring and evaluation ---------------------------------------------

def resolve_model(location: str, tracking_uri: str | None = None) -> tuple[str, str | None]:
    """(A location catdog can load, the MLflow URI it came from or None) for a `--model`.

    A path or storage URI comes back as it is, without importing mlflow. A model URI is
    downloaded into a temporary folder, removed when the process exits; `models:/NAME@ALIAS` is
    resolved to `models:/NAME/VERSION` first, so the URI returned names what was scored even
    after the alias moves on.

    Raises:
        ModelLoadError: no tracking URI, mlflow missing, or MLflow could not resolve or download it.
    """
    if not is_model_uri(location):
        return location, None
    if location.startswith("models:/") and not _MODEL_VERSION.match(location):
        raise ModelLoadError(f"--model {location}: expected models:/NAME@ALIAS or models:/NAME/VERSION")
    tracking_uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
    if not tracking_uri:
        raise ModelLoadError(f"--model {location} needs an MLflow server: pass --mlflow-uri or set MLFLOW_TRACKING_URI")
    try:
        mlflow = _mlflow()
        _refuse_unreachable(tracking_uri)
    except TrackingError as exc:
        raise ModelLoadError(f"--model {location}: {exc}") from exc
    from mlflow.exceptions import MlflowException

    scratch = tempfile.mkdtemp(prefix="catdog-model-")
    atexit.register(shutil.rmtree, scratch, ignore_errors=True)
    try:
        resolved, source = _artifact_source(_client(tracking_uri), location)
        local = mlflow.artifacts.download_artifacts(artifact_uri=source, dst_path=scratch,
                                                    tracking_uri=tracking_uri, registry_uri=tracking_uri)
    except (MlflowException, OSError) as exc:
        raise ModelLoadError(f"could not get --model {location} from MLflow at {tracking_uri}: {exc}") from exc
    logger.info("Model %s is %s, downloaded from %s to %s", location, resolved, tracking_uri, local)
    return local, resolved


def _artifact_source(client, location: str) -> tuple[str, str]:
    """(The model URI to record, the artifact URI to download) of a `--model` URI.

    `models:/` (checked by `resolve_model`) is resolved here, through `client`: MLflow 3.17's own
    models:/ download asks the process-wide registry URI, not the one it is given.
    """
    if location.startswith("runs:/"):
        return location, location
    match = _MODEL_VERSION.match(location)
    name, version = match["name"], match["version"]
    if match["alias"]:
        version = client.get_model_version_by_alias(name, match["alias"]).version
    return f"models:/{name}/{version}", client.get_model_version_download_uri(name, version)


# ---- training runs ------------------------------------------------------------------------------

def data_fingerprint(relative_paths: Sequence[str], sizes: Sequence[int]) -> str:
    """A hash of a data listing: sorted relative paths with their sizes in bytes."""
    digest = hashlib.sha256()
    for path, size in sorted(zip(relative_paths, sizes)):
        digest.update(f"{path}\t{size}\n".encode("utf-8"))
    return digest.hexdigest()[:16]


def git_commit(folder: str | None = None) -> str | None:
    """`git rev-parse HEAD` in `folder` (default: the working directory); None outside a repository."""
    try:
        done = subprocess.run(["git", "rev-parse", "HEAD"], cwd=folder, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip() if done.returncode == 0 and done.stdout.strip() else None


def library_versions() -> dict[str, str]:
    """Python's and the installed versions of the libraries a run depends on."""
    versions = {"python": platform.python_version()}
    for name in LIBRARIES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return versions


def flat_params(values: dict, prefix: str = "") -> dict[str, str]:
    """Nested dicts as dotted keys; every value as text (lists as JSON), cut to MLflow's limit."""
    flat = {}
    for key, value in values.items():
        if isinstance(value, dict):
            flat.update(flat_params(value, f"{prefix}{key}."))
            continue
        text = json.dumps(value) if isinstance(value, (list, tuple)) else str(value)
        flat[f"{prefix}{key}"] = text[:MAX_PARAM_LENGTH]
    return flat


@dataclass
class TrainingTracker:
    """An MLflow experiment a training run logs to, checked to be reachable before the run starts."""

    tracking_uri: str
    experiment_id: str
    register_as: str | None = None

    def log_run(self, run_folder, run_name: str, params: dict, history: Sequence[dict], summary: dict,
                started_at: float) -> dict:
        """Log one finished training run and register it; return where it went.

        Args:
            run_folder: the written `catdog.model.run_folder.RunFolder`.
            run_name: the MLflow run's name (the catdog run id).
            params: parameters, nested dicts allowed (`flat_params`).
            history: the history rows: one metric per HISTORY_METRICS column, step = epoch.
            summary: final figures logged once, step 0 (best epoch's val_loss, temperature, ...).
            started_at: `time.time()` when training started, the MLflow run's start time.
        """
        from mlflow.entities import Metric, Param, RunStatus

        client = _client(self.tracking_uri)
        commit = params.get("git_commit")
        tags = {"catdog.model.run_folder": run_folder.location, "mlflow.source.name": "jobs.train",
                **({"mlflow.source.git.commit": commit} if commit else {})}
        run = client.create_run(self.experiment_id, start_time=int(started_at * 1000), tags=tags, run_name=run_name)
        run_id = run.info.run_id
        try:
            flat = sorted(flat_params(params).items())
            for start in range(0, len(flat), BATCH_PARAMS):
                client.log_batch(run_id, params=[Param(k, v) for k, v in flat[start:start + BATCH_PARAMS]])
            now = int(time.time() * 1000)
            metrics = [Metric(name, float(row[name]), now, int(row["epoch"])) for row in history for name in HISTORY_METRICS]
            metrics += [Metric(name, float(value), now, 0) for name, value in summary.items() if value is not None]
            client.log_batch(run_id, metrics=metrics)  # a few per epoch: far below MLflow's 1000 per request
            with tempfile.TemporaryDirectory(prefix="catdog-mlflow-") as staging:
                run_folder.copy_run_files(staging)  # the run folder may be an s3:// URI; checkpoints stay out
                client.log_artifacts(run_id, staging, RUN_ARTIFACT_PATH)
            model_uri = self._register(client, run) if self.register_as else None
        except BaseException:
            client.set_terminated(run_id, RunStatus.to_string(RunStatus.FAILED))
            raise
        client.set_terminated(run_id, RunStatus.to_string(RunStatus.FINISHED))
        logger.info("MLflow run %s in experiment %s at %s%s", run_id, self.experiment_id, self.tracking_uri,
                    f"; registered as {model_uri}" if model_uri else "")
        return {"tracking_uri": self.tracking_uri, "experiment_id": self.experiment_id, "run_id": run_id,
                "run_uri": f"runs:/{run_id}/{RUN_ARTIFACT_PATH}", "model_uri": model_uri}

    def _register(self, client, run) -> str:
        """A new version of `register_as` whose artifacts are the logged run folder."""
        from mlflow.exceptions import MlflowException
        from mlflow.protos.databricks_pb2 import RESOURCE_ALREADY_EXISTS, ErrorCode

        try:
            client.create_registered_model(self.register_as)
        except MlflowException as exc:
            if exc.error_code != ErrorCode.Name(RESOURCE_ALREADY_EXISTS):
                raise
        source = f"{run.info.artifact_uri.rstrip('/')}/{RUN_ARTIFACT_PATH}"
        version = client.create_model_version(self.register_as, source, run_id=run.info.run_id)
        return f"models:/{self.register_as}/{version.version}"


def open_tracking(tracking_uri: str | None, experiment: str | None, register_as: str | None) -> TrainingTracker | None:
    """The experiment a training run will log to (created when missing), or None without a URI.

    Called before Ray starts, so a missing mlflow or an unreachable server fails in seconds.

    Raises:
        TrackingError: mlflow is not installed, or the server refused or could not be reached.
    """
    if not tracking_uri:
        return None
    _mlflow()
    from mlflow.exceptions import MlflowException

    _refuse_unreachable(tracking_uri)
    name = experiment or os.environ.get("MLFLOW_EXPERIMENT_NAME") or DEFAULT_EXPERIMENT
    try:
        client = _client(tracking_uri)
        found = client.get_experiment_by_name(name)
        experiment_id = found.experiment_id if found is not None else client.create_experiment(name)
    except MlflowException as exc:
        raise TrackingError(f"could not use MLflow experiment {name!r} at {tracking_uri}: {exc}") from exc
    return TrainingTracker(tracking_uri, experiment_id, register_as)


def _refuse_unreachable(tracking_uri: str) -> None:
    """TrackingError at once when an http(s) server does not answer: MLflow's client retries a
    refused connection for minutes before it gives up. Any answer, an error
    status included (an authenticating proxy), counts as reachable."""
    import urllib.error
    import urllib.request

    if not tracking_uri.startswith(("http://", "https://")):
        return
    try:
        urllib.request.urlopen(f"{tracking_uri.rstrip('/')}/health", timeout=CONNECT_TIMEOUT_S).close()
    except urllib.error.HTTPError:
        return
    except (urllib.error.URLError, OSError) as exc:
        raise TrackingError(f"no MLflow server answers at {tracking_uri}: {getattr(exc, 'reason', exc)}") from exc
