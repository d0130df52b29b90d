"""How catdog's processes start: the quiet environment they set and hand to Ray's workers, and the
log line format drivers and actors share (`catdog.cli.configure_logging`, `log_from_actor`)."""

from __future__ import annotations

import logging
import os
import warnings

# Silences TensorFlow/Ray noise a user does not need. Applied in the driver and passed to every
# Ray worker through the runtime_env, so workers start quiet too.
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
# Ray Train V2's controller polls its workers every 2 s by default and each `ray.train.report`
# (one per epoch) waits for that poll, which dwarfed a short epoch of head training; 0.25 s keeps
# the wait small and the polling cheap (see benchmarks/README.md, What these figures rest on).
SPEED_ENV = {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.25"}
# Only for the local Ray catdog starts itself (one node, nothing to preempt): Ray Train V2's
# preemption watcher is one more actor process to boot before the first epoch. Jobs on a cluster
# keep it: spot nodes there are drained and the watcher reacts to that.
LOCAL_RAY_ENV = {"RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0"}


def quiet_environment() -> None:
    """Set the quiet environment in this process (call before importing TensorFlow)."""
    for key, value in QUIET_ENV.items():
        os.environ.setdefault(key, value)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    warnings.filterwarnings("ignore", category=FutureWarning)
    for name in ("tensorflow", "absl", "h5py", "matplotlib"):
        logging.getLogger(name).setLevel(logging.ERROR)


LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
LOG_DATE_FORMAT = "%H:%M:%S"


def log_from_actor() -> None:
    """Inside a Ray actor, send catdog's INFO lines to stderr, which Ray shows in the driver.

    Ray workers log at WARNING and without catdog's handler; elsewhere this changes nothing.
    """
    import ray

    if not ray.is_initialized() or ray.get_runtime_context().get_actor_id() is None:
        return
    catdog_logger = logging.getLogger("catdog")
    if not catdog_logger.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter(LOG_FORMAT, LOG_DATE_FORMAT))
        catdog_logger.addHandler(handler)
        catdog_logger.setLevel(logging.INFO)
        catdog_logger.propagate = False
