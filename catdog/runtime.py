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
# catdog's log lines, in drivers (catdog.cli.configure_logging) and in Ray actors (log_from_actor).
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
LOG_DATE_FORMAT = "%H:%M:%S"
# Ray Train V2's controller polls its workers every 2 s and each `ray.train.report` waits for that
# poll: with one report per epoch, a 0.2 s epoch of head training took 2 s (measured). 0.25 s keeps
# the controller's polling cheap and an epoch's overhead small.
SPEED_ENV = {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.25"}
# Only for the local Ray catdog starts itself (one node, nothing to preempt): Ray Train V2's
# preemption watcher is one more actor process to boot (~2.5 s of CPU) before the first epoch.
# Jobs on a cluster keep it: spot nodes there are drained and the watcher reacts to that.
LOCAL_RAY_ENV = {"RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0"}


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


@contextlib.contextmanager
def _without_pyplot():
    """Hide matplotlib.pyplot while TensorFlow imports Keras: Keras' visualization module imports
    pyplot when it can (~0.7 s of a ~4 s import, measured), in every process; catdog draws its
    plots with matplotlib.figure and never needs pyplot. Later imports of pyplot work as usual."""
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


# On CPU a model actor (scoring's predictor, training's feature embedder) runs this many batches at
# once, each TensorFlow op on its share of the cores. TensorFlow's intra-op threads meet at the end
# of every op (~170 per ResNet50 forward) and wait for the slowest one; batches on fewer threads
# each do not wait for each other. ResNet50 forward, batch 64, 2 cores, one process: one batch on 2
# threads 81-97 img/s in bfloat16, two batches on 1 thread each 116-190 img/s (this host's speed
# moves); jobs.score on 2,000 photos 45.5-46.5 s -> 34.1-39.0 s (A/B). GPUs run one batch at a time.
CPU_CONCURRENT_BATCHES = 2


def concurrent_batches(use_gpu: bool) -> int:
    """Batches one model actor runs at once: CPU_CONCURRENT_BATCHES on CPU, 1 on a GPU."""
    return 1 if use_gpu else CPU_CONCURRENT_BATCHES


def model_actor_pool(use_gpu: bool, **size):
    """Ray Data ActorPoolStrategy(**size) whose actors run `concurrent_batches(use_gpu)` calls at once.

    Ray Data otherwise runs an actor's calls one at a time (a lock around the UDF), whatever
    `max_concurrent_calls_per_actor` says, unless the pool enables true multi-threading.
    """
    import ray

    calls = concurrent_batches(use_gpu)
    if calls > 1:
        size.update(max_concurrent_calls_per_actor=calls, enable_true_multi_threading=True)
    return ray.data.ActorPoolStrategy(**size)


def configure_model_actor(use_gpu: bool) -> int:
    """Set up a process that runs a model for Ray Data; returns the batches it runs at once.

    Quiet TensorFlow, catdog's log lines shown in the driver, and on CPU each op on
    visible_cores() // CPU_CONCURRENT_BATCHES threads. Call before TensorFlow runs any op.
    """
    log_from_actor()
    configure_tensorflow(use_gpu)
    batches = concurrent_batches(use_gpu)
    if batches > 1:
        set_tensorflow_op_threads(max(1, visible_cores() // batches))
    return batches


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


_started_local_ray = False  # init_ray started a local Ray from this process


def worker_runtime_env() -> dict | None:
    """runtime_env for Ray Train's workers: quiet logs and Ray Train's faster worker poll.

    None on a local Ray that `init_ray` started: its processes inherit this process' environment,
    which holds those variables already.
    """
    return None if _started_local_ray else {"env_vars": {**QUIET_ENV, **SPEED_ENV}}


# On Linux Ray replaces a loopback node address by the machine's external one and its GCS,
# raylet, object manager, workers and agents then listen on every interface. With "clusters"
# switched off, as Ray does on macOS and Windows, the node address stays 127.0.0.1 and every one
# of them binds to loopback (measured with /proc/net/tcp; tests/test_local_security.py).
_LOCAL_ONLY_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"
LOOPBACK = "127.0.0.1"


@contextlib.contextmanager
def _loopback_only():
    """Start Ray's processes with clusters disabled; restore the driver's environment after.

    The processes started inside inherit the variable for their whole life; the driver gets it
    back as it was, so a later `init_ray(address=...)` in this process can still join a cluster.
    """
    from ray._private import ray_constants

    saved_env = os.environ.get(_LOCAL_ONLY_ENV)
    saved_constant = ray_constants.ENABLE_RAY_CLUSTER
    os.environ[_LOCAL_ONLY_ENV] = "0"
    ray_constants.ENABLE_RAY_CLUSTER = False  # read at call time; Ray may be imported already
    try:
        yield
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = saved_constant
        if saved_env is None:
            os.environ.pop(_LOCAL_ONLY_ENV, None)
        else:
            os.environ[_LOCAL_ONLY_ENV] = saved_env


def _job_env_vars() -> dict:
    """env_vars of the Ray job this driver runs in (`ray job submit --runtime-env-json`), if any."""
    import json

    raw = os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR")
    if not raw:
        return {}
    try:
        runtime_env = json.loads(raw).get("runtime_env") or {}
    except (ValueError, AttributeError):
        return {}
    return dict(runtime_env.get("env_vars") or {})


def init_ray(address: str | None = None, num_cpus: int | None = None) -> None:
    """Join the cluster named by RAY_ADDRESS/`address`, or start a local Ray bound to localhost.

    A local Ray gets no dashboard and no Train preemption watcher, every process it starts
    listens on 127.0.0.1 only, and its session files go under RAY_TMPDIR when set. Inside a
    submitted job, variables the job's runtime_env sets win over catdog's quiet defaults (Ray
    refuses to merge conflicting keys).
    """
    global _started_local_ray
    quiet_environment()
    import ray

    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    kwargs: dict = {"log_to_driver": True, "logging_level": logging.WARNING, "configure_logging": True}
    if address:
        job_env = _job_env_vars()
        env_vars = {k: v for k, v in {**QUIET_ENV, **SPEED_ENV}.items() if k not in job_env}
        logger.info("Joining Ray cluster at %s", address)
        ray.init(address=address, runtime_env={"env_vars": env_vars}, **kwargs)
        _started_local_ray = False
        return
    # A local Ray's processes inherit this environment. Set here rather than as a job runtime_env,
    # it lets tasks and actors run in the workers Ray prestarts: a runtime_env needs workers started
    # for it, which put a 2,000-image scoring run's first batch ~3 s later (measured).
    for key, value in {**QUIET_ENV, **SPEED_ENV, **LOCAL_RAY_ENV}.items():
        os.environ.setdefault(key, value)
    kwargs.update(include_dashboard=False, num_cpus=num_cpus)
    with _loopback_only():
        # address="local": without it ray.init joins the last `ray start` cluster recorded in
        # /tmp/ray/ray_current_cluster (and hangs when that one is gone or unreachable).
        ray.init(address="local", _node_ip_address=LOOPBACK, **kwargs)
    _started_local_ray = True
    logger.info("Started local Ray on %s: %s", LOOPBACK, ray.cluster_resources())
    from ray.data import DataContext

    DataContext.get_current().enable_progress_bars = True
