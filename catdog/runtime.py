"""Process set-up shared by drivers, Ray workers and actors: quiet logs, GPU memory, local Ray."""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import warnings

logger = logging.getLogger(__name__)

# Environment that silences TensorFlow/Ray noise a user does not need. Applied in the driver and
# passed to every Ray worker through the runtime_env, so workers start quiet too.
QUIET_ENV = {
    "TF_CPP_MIN_LOG_LEVEL": "2",  # hide oneDNN / CUDA-probe / cpu_feature_guard INFO lines
    "TF_ENABLE_ONEDNN_OPTS": "1",
    "GRPC_VERBOSITY": "ERROR",
    "ABSL_MIN_LOG_LEVEL": "2",
    "KERAS_BACKEND": "tensorflow",
    "RAY_TRAIN_ENABLE_PRINT_PATCH": "0",  # Train V2 otherwise prints every worker line twice
    "RAY_DATA_DISABLE_PROGRESS_BARS": "0",
    "PYTHONWARNINGS": "ignore::DeprecationWarning,ignore::FutureWarning",
}


def quiet_environment() -> None:
    """Set the quiet environment in this process (call before importing TensorFlow)."""
    for key, value in QUIET_ENV.items():
        os.environ.setdefault(key, value)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    warnings.filterwarnings("ignore", category=FutureWarning)
    for name in ("tensorflow", "absl", "h5py", "matplotlib"):
        logging.getLogger(name).setLevel(logging.ERROR)


@contextlib.contextmanager
def _stderr_silenced():
    """Send file descriptor 2 to /dev/null: TensorFlow's C++ start-up lines (oneDNN, CUDA probe,
    "All log messages before absl::InitializeLog()") are written before any log level applies."""
    sys.stderr.flush()
    saved = os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(devnull)
        os.close(saved)


_tf_configured = False


def configure_tensorflow(use_gpu: bool = False) -> None:
    """Import TensorFlow quietly; on GPUs grow memory on demand so actors can share a device.

    TensorFlow takes all memory of every visible GPU by default, which breaks fractional GPUs and
    several actors per GPU (ray issue 13680).
    """
    global _tf_configured
    if _tf_configured:
        return
    quiet_environment()
    with _stderr_silenced():
        import tensorflow as tf

        gpus = tf.config.list_physical_devices("GPU")
    tf.get_logger().setLevel(logging.ERROR)
    _tf_configured = True
    for gpu in gpus:
        try:
            tf.config.experimental.set_memory_growth(gpu, True)
        except RuntimeError:  # already initialised in this process
            pass
    if use_gpu and not gpus:
        logger.warning("--use-gpu was given but TensorFlow sees no GPU in this process; running on CPU")


def worker_runtime_env() -> dict:
    """runtime_env for Ray tasks/actors/workers: quiet logs and catdog importable."""
    return {"env_vars": dict(QUIET_ENV)}


def init_ray(address: str | None = None, num_cpus: int | None = None) -> None:
    """Join the cluster named by RAY_ADDRESS/`address`, or start a local Ray bound to localhost.

    A local Ray gets no dashboard (nothing to listen on beyond what Ray itself needs) and its
    session files under RAY_TMPDIR when set.
    """
    quiet_environment()
    import ray

    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    kwargs: dict = {
        "runtime_env": worker_runtime_env(),
        "log_to_driver": True,
        "logging_level": logging.WARNING,
        "configure_logging": True,
    }
    if address:
        logger.info("Joining Ray cluster at %s", address)
        ray.init(address=address, **kwargs)
        return
    kwargs.update(include_dashboard=False, num_cpus=num_cpus)
    ray.init(**kwargs)
    logger.info("Started local Ray: %s", ray.cluster_resources())
    from ray.data import DataContext

    DataContext.get_current().enable_progress_bars = True
