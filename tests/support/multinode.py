"""A real multi-node Ray cluster on this machine, for tests: a head that takes no tasks (like
cluster.yaml's) and worker nodes, each its own raylet, every one on 127.0.0.1.

The cluster lives in a process of its own (`python tests/support/multinode.py`, driven over a pipe, one
JSON request and one JSON reply per line):
- the pytest process is already a driver of the session's local Ray, and a process joins one
  Ray cluster only;
- `ray.cluster_utils.Cluster` is meant to run in its driver's process: its shutdown resets that
  process' Ray state and it records its address as the machine's "current cluster".
Jobs under test run as subprocesses joined to it (`env=cluster.job_env()`); the test asks the
cluster process where actors run (the GCS actor table: node id, pid) and to remove a node for
real (its raylet, object store and workers are SIGKILLed, as in a spot preemption or OOM kill).

    with MultiNodeCluster(worker_nodes=3) as cluster:
        subprocess.run([sys.executable, "-m", "jobs.train", ...], env=cluster.job_env())
        victim = cluster.actors("RayTrainWorker")[0]["node_id"]
        cluster.remove_node(victim)
        cluster.ensure_worker_nodes(3)  # back to three for the next test
"""

from __future__ import annotations

import json
import os
import queue
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

LOOPBACK = "127.0.0.1"
# On Linux Ray advertises the machine's external address even when given 127.0.0.1; with this
# variable set to 0 before Ray is imported every node and driver stays on loopback
# (../shared/notes/ray-tf-behaviour.md, Several Ray nodes on one machine).
LOCAL_ONLY_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"
REPO = Path(__file__).resolve().parents[2]
START_TIMEOUT_S = 120  # head + 3 nodes start in ~10 s here; the 2 cores are shared with other runs
REQUEST_TIMEOUT_S = 60
NODE_DEATH_TIMEOUT_S = 60
# The GCS notices a SIGKILLed raylet by missed health checks: ~14 s with Ray's defaults (measured
# here), ~3 s with these. Actors on the node are seen dead sooner, through their lost connections.
FAST_NODE_DEATH = {"health_check_period_ms": 1000, "health_check_failure_threshold": 3}
_REPLY = "MULTINODE "  # prefix of the cluster process' reply lines


class MultiNodeCluster:
    """Client side: starts, drives and stops the cluster process. A context manager."""

    def __init__(self, worker_nodes: int = 3, cpus_per_node: float = 1, resources: dict | None = None,
                 object_store_mb: int = 150):
        self.worker_nodes = worker_nodes
        self.node_args = {"num_cpus": cpus_per_node, "resources": resources or {},
                          "object_store_memory": object_store_mb * 1024 * 1024}
        self.address: str | None = None  # GCS address, 127.0.0.1:port: RAY_ADDRESS for jobs
        self.head_node_id: str | None = None
        self.temp_dir: str | None = None
        self._process: subprocess.Popen | None = None
        self._replies: queue.Queue = queue.Queue()

    # ---- life cycle -------------------------------------------------------------------------------

    def start(self) -> MultiNodeCluster:
        # short and private: Unix socket paths live under it, and /tmp/ray is other sessions'
        self.temp_dir = tempfile.mkdtemp(prefix="catdog-mn-", dir="/tmp")
        env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
        env.update({LOCAL_ONLY_ENV: "0", "RAY_TMPDIR": self.temp_dir, "PYTHONPATH": str(REPO)})
        log = open(Path(self.temp_dir) / "cluster.log", "wb")  # noqa: SIM115 - owned by the process
        self._process = subprocess.Popen([sys.executable, __file__], cwd=REPO, env=env, stdin=subprocess.PIPE,
                                         stdout=subprocess.PIPE, stderr=log, text=True, bufsize=1)
        log.close()
        threading.Thread(target=self._read_replies, daemon=True, name="multinode-replies").start()
        try:
            ready = self._request({"op": "start", "worker_nodes": self.worker_nodes, **self.node_args},
                                  timeout=START_TIMEOUT_S)
        except BaseException:
            self.stop()
            raise
        self.address, self.head_node_id = ready["address"], ready["head_node_id"]
        if not self.address.startswith(f"{LOOPBACK}:"):
            self.stop()
            raise RuntimeError(f"the cluster advertises {self.address}, not {LOOPBACK}: is {LOCAL_ONLY_ENV}=0 read?")
        return self

    def stop(self) -> None:
        """Stop every node and the cluster process (only the processes this helper started)."""
        if self._process is not None:
            if self._process.poll() is None:
                try:
                    self._request({"op": "stop"}, timeout=REQUEST_TIMEOUT_S)
                except (RuntimeError, TimeoutError, OSError):
                    pass
                try:
                    self._process.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    self._process.kill()  # its node reaper takes the nodes with it
                    self._process.wait(timeout=30)
            self._process = None
        if self.temp_dir:
            shutil.rmtree(self.temp_dir, ignore_errors=True)
            self.temp_dir = None

    def __enter__(self) -> MultiNodeCluster:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # ---- what tests use ---------------------------------------------------------------------------

    def job_env(self, **extra: str) -> dict[str, str]:
        """Environment for a job subprocess that joins this cluster (RAY_ADDRESS) from loopback."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
        env.update({"RAY_ADDRESS": self.address, LOCAL_ONLY_ENV: "0", "PYTHONPATH": str(REPO), **extra})
        return env

    def nodes(self) -> list[dict]:
        """Every node the GCS knows: {node_id, alive, is_head, resources}."""
        return self._request({"op": "nodes"})["nodes"]

    def worker_node_ids(self) -> list[str]:
        """The worker nodes this helper started and has not removed, in the order they were added."""
        return self._request({"op": "worker_nodes"})["node_ids"]

    def actors(self, class_name: str | None = None, alive_only: bool = True) -> list[dict]:
        """Actors from the GCS actor table: {actor_id, class_name, state, node_id, pid}."""
        found = self._request({"op": "actors"})["actors"]
        return [a for a in found if (class_name is None or a["class_name"] == class_name)
                and (not alive_only or a["state"] == "ALIVE")]

    def remove_node(self, node_id: str, graceful: bool = False) -> float:
        """Kill one worker node's processes (SIGKILL unless `graceful`), wait until they are gone and
        the GCS lists the node as dead; returns the seconds the GCS took to notice."""
        return self._request({"op": "remove_node", "node_id": node_id, "graceful": graceful},
                             timeout=REQUEST_TIMEOUT_S + NODE_DEATH_TIMEOUT_S)["noticed_after_s"]

    def add_worker_node(self, cpus: float | None = None, resources: dict | None = None) -> str:
        """Start one more worker node (by default like the others); returns its node id."""
        args = {**self.node_args, **({"num_cpus": cpus} if cpus is not None else {}),
                **({"resources": resources} if resources is not None else {})}
        return self._request({"op": "add_node", **args})["node_id"]

    def ensure_worker_nodes(self, count: int | None = None) -> list[str]:
        """Add default worker nodes until `count` (default: as many as at start) are alive."""
        count = self.worker_nodes if count is None else count
        alive = self.worker_node_ids()
        for _ in range(count - len(alive)):
            alive.append(self.add_worker_node())
        return alive

    # ---- the pipe ---------------------------------------------------------------------------------

    def _read_replies(self) -> None:
        for line in self._process.stdout:
            if line.startswith(_REPLY):
                self._replies.put(json.loads(line[len(_REPLY):]))
        self._replies.put({"error": "the cluster process exited"})

    def _request(self, request: dict, timeout: float = REQUEST_TIMEOUT_S) -> dict:
        if self._process is None or self._process.poll() is not None:
            raise RuntimeError(f"the multi-node cluster process is not running (log: {self.temp_dir}/cluster.log)")
        self._process.stdin.write(json.dumps(request) + "\n")
        self._process.stdin.flush()
        try:
            reply = self._replies.get(timeout=timeout)
        except queue.Empty:
            raise TimeoutError(f"no reply to {request['op']} within {timeout} s "
                               f"(log: {self.temp_dir}/cluster.log)") from None
        if "error" in reply:
            raise RuntimeError(f"{request['op']}: {reply['error']} (log: {self.temp_dir}/cluster.log)")
        return reply


# ---- the cluster process ---------------------------------------------------------------------------


def _serve() -> None:
    """Hold a ray.cluster_utils.Cluster and answer requests from stdin until "stop" or EOF."""
    os.environ[LOCAL_ONLY_ENV] = "0"  # before Ray is imported (also set by the client)
    replies = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)  # anything else printed goes to the log, not into the reply pipe

    from ray.cluster_utils import Cluster

    cluster: Cluster | None = None
    by_id: dict = {}

    def node_args(request: dict) -> dict:
        return {"num_cpus": request["num_cpus"], "resources": request["resources"],
                "object_store_memory": request["object_store_memory"], "node_ip_address": LOOPBACK}

    def answer(request: dict) -> dict:
        nonlocal cluster
        op = request["op"]
        if op == "start":
            head_args = {**node_args(request), "num_cpus": 0, "resources": {}, "include_dashboard": False,
                         "_system_config": FAST_NODE_DEATH}
            cluster = Cluster(initialize_head=True, head_node_args=head_args)
            by_id[cluster.head_node.node_id] = cluster.head_node
            for _ in range(request["worker_nodes"]):
                node = cluster.add_node(**node_args(request))
                by_id[node.node_id] = node
            cluster.wait_for_nodes()
            return {"address": cluster.address, "head_node_id": cluster.head_node.node_id}
        if op == "add_node":
            node = cluster.add_node(**node_args(request))
            cluster.wait_for_nodes()
            by_id[node.node_id] = node
            return {"node_id": node.node_id}
        if op == "remove_node":
            node = by_id.get(request["node_id"])
            if node is None or node is cluster.head_node:
                raise ValueError(f"no worker node {request['node_id']}")
            cluster.remove_node(node, allow_graceful=request["graceful"])
            del by_id[request["node_id"]]
            killed = time.monotonic()
            while time.monotonic() - killed < NODE_DEATH_TIMEOUT_S:
                if not any(n["NodeID"] == request["node_id"] and n["Alive"] for n in cluster.global_state.node_table()):
                    return {"noticed_after_s": round(time.monotonic() - killed, 2)}
                time.sleep(0.1)
            raise TimeoutError(f"the GCS still lists node {request['node_id']} as alive")
        if op == "worker_nodes":
            return {"node_ids": [i for i, n in by_id.items() if n is not cluster.head_node]}
        if op == "nodes":
            head = cluster.head_node.node_id
            return {"nodes": [{"node_id": n["NodeID"], "alive": n["Alive"], "is_head": n["NodeID"] == head,
                               "resources": n["Resources"]} for n in cluster.global_state.node_table()]}
        if op == "actors":
            table = cluster.global_state.actor_table(None)
            return {"actors": [{"actor_id": actor_id, "class_name": a["ActorClassName"], "state": a["State"],
                                "node_id": a["Address"]["NodeID"], "pid": a["Pid"]} for actor_id, a in table.items()]}
        if op == "stop":
            return {}
        raise ValueError(f"unknown request {op!r}")

    try:
        for line in sys.stdin:
            request = json.loads(line)
            try:
                reply = answer(request)
            except Exception as exc:  # noqa: BLE001 - sent back to the test, which raises it
                reply = {"error": f"{type(exc).__name__}: {exc}"}
            if request["op"] == "stop" and cluster is not None:
                cluster.shutdown()
                cluster = None
            replies.write(_REPLY + json.dumps(reply) + "\n")
            if request["op"] == "stop":
                return
    finally:
        if cluster is not None:
            cluster.shutdown()


if __name__ == "__main__":
    _serve()
