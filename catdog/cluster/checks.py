"""Storage mistakes that only show on a cluster of several machines, refused before anything is written.

A local path (or a file:// URI) names a different folder on every node. On a cluster, run files,
checkpoints, cache entries and part files land on whichever node wrote them, and a reader on
another node finds nothing there, or only part of it. Jobs call `refuse_local_paths_on_cluster`
once they are connected to Ray; a user whose path is mounted on every node (NFS and the like)
says so with `--assume-shared-storage`.
"""

from __future__ import annotations

from catdog.errors import CatdogError
from catdog.io import storage

SHARED_STORAGE_FLAG = "--assume-shared-storage"
SHARED_STORAGE_HELP = ("local paths given are on storage every node mounts at the same place (NFS and the like); "
                       "without it a Ray cluster of several nodes refuses local output and cache paths")


class LocalPathOnClusterError(CatdogError):
    """A node-local path was given for something every node of a cluster must see. Exit code 2."""


def is_node_local(location: str) -> bool:
    """True for locations that only one machine sees: plain paths and file:// URIs."""
    return not storage.is_uri(location) or location.lower().startswith("file://")


def work_leaves_this_machine() -> str | None:
    """Why this job's Ray work can run on machines other than the driver's; None when it cannot.

    Either the connected Ray has several alive nodes, or the driver's node takes no tasks (a head
    like cluster.yaml's, whose work runs on worker nodes an autoscaler adds later). None without
    a Ray connection.
    """
    import ray

    if not ray.is_initialized():
        return None
    alive = [node for node in ray.nodes() if node["Alive"]]
    if len(alive) > 1:
        return f"a Ray cluster of {len(alive)} nodes"
    here = ray.get_runtime_context().get_node_id()
    driver_node = next((node for node in alive if node["NodeID"] == here), None)
    if driver_node is not None and not any(driver_node["Resources"].get(kind) for kind in ("CPU", "GPU")):
        return "a Ray head that takes no tasks (its work runs on worker nodes that join later)"
    return None


def refuse_local_paths_on_cluster(paths: dict[str, str | None], assume_shared: bool) -> None:
    """Refuse node-local paths when the job's work can run on other machines.

    Call it after Ray is initialised and before anything is written.

    Args:
        paths: flag name -> the location given for it (None: not used), e.g.
            {"--output": config.output, "--cache-dir": config.cache_dir}.
        assume_shared: the user stated that local paths are mounted on every node.

    Raises:
        LocalPathOnClusterError: naming each local path, the cluster, and what to do instead.
    """
    if assume_shared:
        return
    local = {flag: path for flag, path in paths.items() if path and is_node_local(path)}
    if not local:
        return
    where = work_leaves_this_machine()
    if where is None:
        return
    named = ", ".join(f"{flag} {path}" for flag, path in local.items())
    raise LocalPathOnClusterError(
        f"{named}: local path{'s' if len(local) > 1 else ''} on {where}, where each node would read and write "
        f"a folder of its own. Use shared storage: an object-store URI (s3://bucket/..., gs://bucket/...), or "
        f"pass {SHARED_STORAGE_FLAG} if every node mounts this path at the same place (NFS and the like)"
    )
