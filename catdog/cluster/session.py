"""The Ray this process drives: join a cluster, or start a local one on loopback only.

Also the runtime_env Ray Train's workers get, which depends on which of the two happened.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os

from catdog.process import LOCAL_RAY_ENV, QUIET_ENV, SPEED_ENV, quiet_environment

logger = logging.getLogger(__name__)

_started_local_ray = False  # init_ray started a local Ray from this process

# On Linux Ray replaces a loopback node address by the machine's external one and its GCS,
# raylet, object manager, workers and agents then listen on every interface. With "clusters"
# switched off, as Ray does on macOS and Windows, the node address stays 127.0.0.1 and every one
# of them binds to loopback (tests/cluster/test_local_security.py checks the listening sockets).
_LOCAL_ONLY_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"
LOOPBACK = "127.0.0.1"


def worker_runtime_env() -> dict | None:
    """runtime_env for Ray Train's workers: quiet logs and Ray Train's faster worker poll.

    None on a local Ray that `init_ray` started: its processes inherit this process' environment,
    which holds those variables already.
    """
    return None if _started_local_ray else {"env_vars": {**QUIET_ENV, **SPEED_ENV}}


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
    # it lets tasks and actors run in the workers Ray prestarts: a runtime_env needs workers
    # started for it, which delays the first batch.
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
