"""The peak-memory probe used by the memory tests and benchmarks measures the child, not its parent."""

from __future__ import annotations

from pathlib import Path

from benchmarks.peak_memory import run_python

REPO = Path(__file__).resolve().parents[1]


def test_child_peak_excludes_a_large_parent_and_sees_the_childs_own_allocation():
    parent_ballast = bytearray(600 * 2**20)  # touched pages: this process's RSS grows past 600 MiB
    parent_ballast[:: 4096] = b"\1" * len(parent_ballast[:: 4096])
    idle = run_python("-c", "import sys; print(sys.argv[1])", ["hello"], cwd=REPO)
    assert idle.returncode == 0 and idle.stdout.strip() == "hello"
    assert idle.peak_rss_mib < 100, idle  # ru_maxrss would report >= 600 here (inherited at exec)
    grow = "b = bytearray(300 * 2**20); b[::4096] = bytes(len(b[::4096])); b[::4096] = b'\\1' * len(b[::4096])"
    busy = run_python("-c", grow, [], cwd=REPO)
    assert busy.returncode == 0, busy.stderr
    assert 300 <= busy.peak_rss_mib < 400, busy
    assert run_python("-m", "json.tool", ["/nonexistent"], cwd=REPO).returncode != 0
    del parent_ballast
