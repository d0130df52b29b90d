"""What the Ray cluster this driver joined has of a resource (GPUs), and the most its autoscaler can add.

Pools size themselves from it (`catdog.score.pipeline.plan_pool`), and `--use-gpu` fails loudly
with it (`wait_for_gpus`) instead of waiting forever for a GPU no node will ever bring.

Where the autoscaler's limits come from, first found wins:
1. the cluster config the autoscaler publishes in the GCS (autoscaler v2, KubeRay);
2. the config file named on the command line of the autoscaler's monitor process, found on this
   machine by the GCS port: autoscaler v1 (what `ray up` runs in Ray 2.60) publishes no limits,
   and its monitor runs on the head node, where `ray job submit` runs drivers. A monitor without a
   config file means no autoscaler: the nodes present are all there will be;
3. otherwise unknown (a driver on another machine than a v1 head): `Capacity.most` is None.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

from catdog.errors import CatdogError

logger = logging.getLogger(__name__)

GPU = "GPU"
_CONFIG_FLAG = "--autoscaling-config="
_WAIT_LOG_EVERY_S = 30.0


class ClusterResourceError(CatdogError):
    """The cluster lacks a resource the job needs and cannot get it (in time). Exit code 2."""


@dataclass(frozen=True)
class Capacity:
    """`resource` in the alive nodes now (`present`) and the most the cluster can have (`most`;
    None when unknown); `source` says where `most` came from, for log lines and messages."""

    resource: str
    present: float
    most: float | None
    source: str

    @property
    def autoscaling(self) -> bool:
        """An autoscaler can add more of the resource than the nodes now hold."""
        return self.most is not None and self.most > self.present


def capacity(resource: str = GPU) -> Capacity:
    """The connected cluster's `resource`: present now, and the most its autoscaler can bring."""
    import ray

    present = float(ray.cluster_resources().get(resource, 0.0))
    reported = _reported_limits()
    if reported is not None:
        return Capacity(resource, present, max(present, float(reported.get(resource, 0))),
                        "the cluster config the autoscaler reports to the GCS")
    monitor = _monitor_config_path()
    if monitor is None:
        return Capacity(resource, present, None, "unknown: no autoscaler limits readable from this machine")
    if monitor == "":
        return Capacity(resource, present, present, "no autoscaler: the nodes present are all there will be")
    most = _most_from_config(_read_config(monitor), resource)
    if most is None:
        return Capacity(resource, present, None, f"unknown: {monitor} leaves node resources to be detected")
    return Capacity(resource, present, max(present, most), f"the autoscaler config {monitor}")


def describe_nodes() -> str:
    """`3 nodes: CPU 3, GPU 0` for the alive nodes, for messages."""
    import ray

    alive = [n for n in ray.nodes() if n["Alive"]]
    total = ray.cluster_resources()
    return f"{len(alive)} node{'s' if len(alive) != 1 else ''}: CPU {total.get('CPU', 0):g}, GPU {total.get(GPU, 0):g}"


def wait_for_gpus(gpus: float, cpus: float, timeout_s: float) -> Capacity:
    """Return once one node offers `gpus` GPUs and `cpus` CPUs together (one predictor's share).

    With no GPU and none to come, raise at once. When an autoscaler may add one, ask for it (a
    placeholder actor of that shape, which dies with this driver) and wait up to `timeout_s`.

    Raises:
        ClusterResourceError: no GPU and no autoscaler node type with GPUs, or none joined in time.
    """
    import ray

    found = capacity(GPU)
    if found.present >= gpus:
        return found
    if found.most is not None and found.most < gpus:
        raise ClusterResourceError(
            f"--use-gpu: the Ray cluster has no GPU ({describe_nodes()}) and cannot get one ({found.source}). "
            "Run without --use-gpu, or join a cluster with GPU nodes or an autoscaler node type that has GPUs")
    logger.info("--use-gpu: no GPU in the cluster yet (%s); waiting up to %.0f s (--wait-for-workers) for the "
                "autoscaler to add a GPU node (limits: %s)", describe_nodes(), timeout_s, found.source)
    placeholder = ray.remote(num_gpus=gpus, num_cpus=cpus)(_Placeholder).remote()
    started = time.monotonic()
    try:
        while True:
            left = timeout_s - (time.monotonic() - started)
            ready, _ = ray.wait([placeholder.ready.remote()], timeout=max(0.0, min(left, _WAIT_LOG_EVERY_S)))
            if ready:
                break
            if left <= _WAIT_LOG_EVERY_S:
                raise ClusterResourceError(
                    f"--use-gpu: no GPU node joined within {timeout_s:g} s (--wait-for-workers; {describe_nodes()}; "
                    f"limits: {found.source}). Check the autoscaler (`ray status`, its GPU node type and quotas), "
                    "or wait longer with a larger --wait-for-workers")
            logger.info("--use-gpu: still waiting for a GPU node (%.0f s so far; %s)",
                        time.monotonic() - started, describe_nodes())
    finally:
        ray.kill(placeholder)
    logger.info("--use-gpu: a GPU node joined after %.0f s (%s)", time.monotonic() - started, describe_nodes())
    return capacity(GPU)


class _Placeholder:
    """Holds a predictor's resources only so that the autoscaler sees the demand."""

    def ready(self) -> bool:
        return True


def _reported_limits() -> dict | None:
    """Most of each resource from the GCS cluster config (autoscaler v2, KubeRay); None without one."""
    try:
        import ray._private.state

        return ray._private.state.state.get_max_resources_from_cluster_config()
    except Exception as exc:  # noqa: BLE001 - a private Ray API: unknown rather than failing the job
        logger.debug("No cluster config in the GCS: %s", exc)
        return None


def _monitor_config_path() -> str | None:
    """The autoscaling config file of this cluster's monitor when it runs on this machine:
    '' for a monitor without one (no autoscaler), None when no such monitor is found here."""
    import ray

    port = ray.get_runtime_context().gcs_address.rsplit(":", 1)[-1]
    proc = Path("/proc")
    if not proc.is_dir():
        return None
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        args = [a.decode(errors="replace") for a in argv]
        if not any(a.endswith("autoscaler/_private/monitor.py") for a in args):
            continue
        if not any(a.startswith("--gcs-address=") and a.rsplit(":", 1)[-1] == port for a in args):
            continue
        given = [a[len(_CONFIG_FLAG):] for a in args if a.startswith(_CONFIG_FLAG)]
        return os.path.expanduser(given[0]) if given else ""
    return None


def _read_config(path: str) -> dict:
    import yaml  # a Ray dependency; JSON is YAML too

    try:
        return yaml.safe_load(Path(path).read_text()) or {}
    except (OSError, yaml.YAMLError) as exc:
        logger.debug("Could not read the autoscaler config %s: %s", path, exc)
        return {}


def _most_from_config(config: dict, resource: str) -> float | None:
    """The most of `resource` a cluster config allows: the head's, plus each worker type's
    max_workers x its per-node amount, within the cluster's max_workers. None when a worker type
    that can start leaves its resources to be detected (nothing to count from)."""
    types = config.get("available_node_types") or {}
    head = config.get("head_node_type")
    cluster_max = config.get("max_workers")
    total = 0.0
    largest_per_node = 0.0
    for name, node_type in types.items():
        resources = node_type.get("resources") or {}
        if name == head:
            total += float(resources.get(resource, 0))
            continue
        count = int(node_type.get("max_workers", cluster_max or 0))
        if cluster_max is not None:
            count = min(count, int(cluster_max))
        if count <= 0:
            continue
        if not resources:
            return None
        per_node = float(resources.get(resource, 0))
        total += count * per_node
        largest_per_node = max(largest_per_node, per_node)
    if cluster_max is not None:
        head_amount = float(((types.get(head) or {}).get("resources") or {}).get(resource, 0))
        total = min(total, head_amount + int(cluster_max) * largest_per_node)
    return total
