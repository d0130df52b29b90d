"""TensorFlow in a catdog process: imported quietly, GPU memory grown on demand, op threads set."""

from __future__ import annotations

import contextlib
import logging
import os
import sys

from catdog.process import quiet_environment

logger = logging.getLogger(__name__)


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


@contextlib.contextmanager
def _without_pyplot():
    """Hide matplotlib.pyplot while TensorFlow imports Keras: Keras' visualization module imports
    pyplot when it can, a noticeable share of the import in every process; catdog draws its plots
    with matplotlib.figure and never needs pyplot. Later imports of pyplot work as usual."""
    hidden = "matplotlib.pyplot" not in sys.modules
    if hidden:
        sys.modules["matplotlib.pyplot"] = None  # makes `import matplotlib.pyplot` raise ImportError
    try:
        yield
    finally:
        if hidden and sys.modules.get("matplotlib.pyplot", 0) is None:
            del sys.modules["matplotlib.pyplot"]


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
    with _stderr_silenced(), _without_pyplot():
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


def visible_cores() -> int:
    """CPU cores this process may run on (its affinity mask where the OS has one)."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return max(1, os.cpu_count() or 1)


def set_tensorflow_op_threads(threads: int) -> bool:
    """Run each TensorFlow op on at most `threads` threads (intra-op parallelism).

    Takes effect only before TensorFlow runs its first op in this process; returns False (and
    changes nothing) when it is too late, e.g. in a process that already ran a model.
    """
    configure_tensorflow()
    import tensorflow as tf

    if tf.config.threading.get_intra_op_parallelism_threads() == threads:
        return True
    try:
        tf.config.threading.set_intra_op_parallelism_threads(threads)
    except RuntimeError:  # "cannot be modified after initialization"
        logger.debug("TensorFlow already runs here; keeping its %d intra-op threads",
                     tf.config.threading.get_intra_op_parallelism_threads())
        return False
    return True
