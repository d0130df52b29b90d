"""Peak resident memory of one Python child process, measured so that the parent's size cannot leak in.

`getrusage(...).ru_maxrss` and `os.wait4` are wrong for this on Linux: at exec the kernel folds
the *parent's* high-water mark into the child's maxrss, so a child of a 2 GB pytest process
reports >= 2 GB whatever it does (seen in CI). `VmHWM` in /proc/<pid>/status belongs to the
child's own address space, which exec creates fresh; the wrapper below reads it at exit.
Used by tests/analyse/test_report.py, tests/io/test_imaging.py and benchmarks/report_bench.py.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

_WRAPPER = """
import atexit, runpy, sys
report_to, kind, target = sys.argv[1:4]
def _write_peak():
    with open("/proc/self/status") as status:
        kib = next(int(line.split()[1]) for line in status if line.startswith("VmHWM:"))
    with open(report_to, "w") as out:
        out.write(str(kib))
atexit.register(_write_peak)
if kind == "-m":
    sys.argv = [target, *sys.argv[4:]]
    runpy.run_module(target, run_name="__main__", alter_sys=True)
else:
    sys.argv = ["-c", *sys.argv[4:]]
    exec(compile(target, "<string>", "exec"), {"__name__": "__main__"})
"""


@dataclass
class Measured:
    returncode: int
    stdout: str
    stderr: str
    peak_rss_mib: float
    wall_s: float


def run_python(kind: str, target: str, args: list[str], cwd: Path, env: dict | None = None,
               timeout: float = 600) -> Measured:
    """Run `python -m target args` (kind "-m") or `python -c target args` (kind "-c") and return
    its output with the peak RSS of that process alone (MiB)."""
    if kind not in ("-m", "-c"):
        raise ValueError(f"kind must be -m or -c, not {kind!r}")
    with tempfile.NamedTemporaryFile(prefix="peak-rss-", suffix=".txt", delete=False) as handle:
        report = Path(handle.name)
    try:
        started = time.perf_counter()
        proc = subprocess.run([sys.executable, "-c", _WRAPPER, str(report), kind, target, *args], cwd=cwd,
                              env=env, capture_output=True, text=True, timeout=timeout)
        wall = time.perf_counter() - started
        text = report.read_text().strip()
        peak = int(text) / 1024 if text else float("nan")
    finally:
        os.unlink(report)
    return Measured(proc.returncode, proc.stdout, proc.stderr, peak, wall)
