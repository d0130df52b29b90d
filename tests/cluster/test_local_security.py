"""Local mode listens on loopback only, with no dashboard (issue #5, part 5).

Each case starts Ray in a fresh Python process (so no other test's cluster is involved), runs a
task so that workers and agents exist, and reads the listening sockets of that process tree from
/proc; the two processes run side by side. The control case shows what plain `ray.init()` does on this machine, so the check itself is
proven able to fail.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from support.netinfo import Listener

pytestmark = [pytest.mark.slow, pytest.mark.ray]

REPO = Path(__file__).resolve().parents[2]
DASHBOARD_PORT = 8265

_CHILD = r"""
import json, os, sys
sys.path[:0] = [sys.argv[1], sys.argv[2]]
import ray
from support.netinfo import listeners, process_tree
if sys.argv[3] == "catdog":
    from catdog.cluster.session import init_ray
    init_ray(num_cpus=1)
else:
    ray.init(num_cpus=1, include_dashboard=False, _node_ip_address="127.0.0.1")

@ray.remote(num_cpus=0.5)
def where():
    return ray.util.get_node_ip_address()

worker_ip = ray.get(where.remote())
node = ray._private.worker._global_node
report = {
    "node_ip": node.node_ip_address,
    "worker_ip": worker_ip,
    "webui_url": node.address_info.get("webui_url"),
    "driver_env_left": os.environ.get("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"),
    "listeners": [vars(item) for item in listeners(process_tree(os.getpid()))],
}
ray.shutdown()
print("REPORT " + json.dumps(report))
"""


@pytest.fixture(scope="module")
def children():
    """Both cases side by side, each a fresh process with a session folder of its own (short: Ray's
    AF_UNIX socket paths must stay under 107 bytes); their (returncode, stdout, stderr) by mode."""
    roots = {mode: Path(tempfile.mkdtemp(prefix="cdsec-", dir="/tmp")) for mode in ("catdog", "plain")}
    procs = {}
    try:
        for mode, root in roots.items():
            env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER")}
            env["RAY_TMPDIR"] = str(root)
            procs[mode] = subprocess.Popen([sys.executable, "-c", _CHILD, str(REPO), str(REPO / "tests"), mode], env=env,
                                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        outputs = {mode: proc.communicate(timeout=180) for mode, proc in procs.items()}
        yield {mode: (procs[mode].returncode, *output) for mode, output in outputs.items()}
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        for root in roots.values():
            shutil.rmtree(root, ignore_errors=True)


def _report(child: tuple[int | None, str, str]) -> dict:
    returncode, stdout, stderr = child
    lines = [line for line in stdout.splitlines() if line.startswith("REPORT ")]
    assert returncode == 0 and lines, stdout[-2000:] + stderr[-4000:]
    report = json.loads(lines[-1][len("REPORT ") :])
    report["listeners"] = [Listener(**item) for item in report["listeners"]]
    return report


def test_init_ray_listens_on_loopback_only_and_starts_no_dashboard(children):
    report = _report(children["catdog"])
    listeners = report["listeners"]
    names = " ".join(item.process for item in listeners)
    # Not vacuous: Ray's own servers were found and checked.
    assert "gcs_server" in names and "raylet" in names, listeners
    exposed = [item for item in listeners if not item.loopback]
    assert exposed == [], f"listening beyond loopback: {exposed}"
    assert report["node_ip"] == "127.0.0.1" and report["worker_ip"] == "127.0.0.1"
    assert not report["webui_url"], "a local catdog Ray must not start the dashboard"
    assert DASHBOARD_PORT not in {item.port for item in listeners}
    assert report["driver_env_left"] is None, "the driver's environment is restored after start"


def test_plain_ray_init_is_what_the_loopback_setting_fixes(children):
    """Control: without catdog's setting, Ray 2.60 on Linux rewrites 127.0.0.1 and listens wider."""
    report = _report(children["plain"])
    if report["node_ip"] == "127.0.0.1":
        pytest.skip("this machine has no external address; Ray falls back to loopback by itself")
    exposed = [item for item in report["listeners"] if not item.loopback]
    assert exposed, "plain ray.init listened on loopback only; the catdog setting may be unnecessary now"
