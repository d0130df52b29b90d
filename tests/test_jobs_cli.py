"""Every job entrypoint: --help works (run as `__main__` in this process), and the README's demo
command runs end to end (a subprocess joined to the session's Ray)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from support import run_job_module

REPO = Path(__file__).resolve().parents[1]
JOBS = ["train", "score", "predict", "evaluate", "report", "demo", "export"]


@pytest.mark.parametrize("job", JOBS)
def test_help(job, capsys):
    code = run_job_module(f"jobs.{job}", "--help")
    out, err = capsys.readouterr()
    assert code == 0, err
    assert f"jobs.{job}" in out and "--" in out


def test_demo_refuses_existing_workdir(tmp_path, capsys):
    (tmp_path / "something").write_text("keep me")
    assert run_job_module("jobs.demo", "--workdir", str(tmp_path)) == 2
    err = capsys.readouterr().err
    assert "already exists" in err and "--overwrite" in err
    assert (tmp_path / "something").read_text() == "keep me"


@pytest.mark.slow
def test_demo_runs_end_to_end_and_its_overwrite_keeps_a_users_files(ray_job_env, tmp_path):
    workdir = tmp_path / "demo"
    # A workdir that already holds a user's files, among them one inside the demo's data and
    # predictions folders: --overwrite replaces only what the demo makes. (A run folder that holds
    # no run is refused by jobs.train --overwrite: tests/train/test_train_output_safety.py.)
    users = {workdir / "notes.txt": "keep me", workdir / "data" / "train" / "cats" / "mine.txt": "mine",
             workdir / "predictions" / "my-notes.md": "mine too"}
    for path, text in users.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    # The demo's own 8 epochs (cheap: ~0.05 s each). Random-backbone features are large, so the
    # first Adam steps overshoot (loss ~10); 4 epochs passed or failed by the shuffle order alone.
    result = subprocess.run(
        [sys.executable, "-m", "jobs.demo", "--workdir", str(workdir), "--images-per-class", "16", "--image-size", "32",
         "--epochs", "8", "--overwrite"],
        cwd=REPO, capture_output=True, text=True, timeout=600, env=ray_job_env,  # joins the session's Ray
    )
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads(result.stdout[result.stdout.index("{") :])
    assert summary["rows_written"] == 40 and summary["errors"] == 0
    assert summary["accuracy_on_scored_folder"] >= 0.9
    for artifact in ("model.keras", "classes.json", "metrics.json", "history.csv", "curves.png", "config.json"):
        assert (workdir / "run" / artifact).is_file(), artifact
    assert (workdir / "predictions" / "_SUCCESS.json").is_file()
    assert all(path.read_text() == text for path, text in users.items())
    # Logs stay quiet: none of TensorFlow's C++ start-up lines reach the user.
    assert "oneDNN custom operations" not in result.stderr
    assert "absl::InitializeLog" not in result.stderr
