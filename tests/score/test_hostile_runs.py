"""Whole scoring jobs in a hostile world, on the session's real Ray: storage oddities (a Latin-1
name, a FIFO, a socket, a device, a dangling link) give one row each in a run and in a resume,
transient errors are retried once fixed, a resume checks what it resumes, a crash mid-rewrite is
repaired by the next resume, and two runs on one output never both write."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.fs as pafs
import pytest

from catdog.io.paths import local_path_bytes
from catdog.io.sample_data import generate_sample_dataset
from catdog.score.predictions_folder import SUCCESS_FILE, PredictionsFolder, predictions_schema
from support import run_job_module
from support.hostile_corpus import MAX_PIXELS, write_corpus, write_storage_oddities
from support.outputs import FullDisk, replaced_paths

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow


def _job(env: dict, *argv: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """`python -m jobs.score ...` in a subprocess joined to the session's Ray; a hang fails the test."""
    return subprocess.run([sys.executable, "-m", "jobs.score", *argv], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout, env=env)


def _rows(out: Path) -> dict[str, dict]:
    table = PredictionsFolder(str(out)).read()
    paths = table["path"].to_pylist()
    assert len(paths) == len(set(paths)), "duplicate rows"
    return {r["path"]: r for r in table.to_pylist()}


def _kind(row: dict) -> str | None:
    return None if row["error"] is None else row["error"].split(":", 1)[0]


def _success(out: Path) -> dict:
    return json.loads((out / SUCCESS_FILE).read_text())


def test_storage_oddities_give_one_row_each_in_a_run_and_a_resume(ray_job_env, tiny_model_run, tmp_path):
    root = tmp_path / "share"
    expected = {**write_corpus(root), **write_storage_oddities(root)}
    os.symlink(root / "arrives-later.jpg", root / "dangling.jpg")  # a link whose file is not there yet
    out = tmp_path / "preds"
    common = ["--model", str(tiny_model_run), "--input", str(root), "--output", str(out), "--batch-size", "4",
              "--max-image-pixels", str(MAX_PIXELS), "--rows-per-file", "8"]
    result = _job(ray_job_env, *common)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = _rows(out)
    assert set(rows) == {str(root / name) for name in expected} | {str(root / "dangling.jpg")}
    for name, outcome in expected.items():
        assert _kind(rows[str(root / name)]) == outcome.error, (name, rows[str(root / name)]["error"])
    latin1 = next(p for p in rows if "legacy" in p)
    assert latin1.endswith("caf\\xe9 cr\\xe8me.jpg") and rows[latin1]["label"] is not None
    assert os.path.isfile(local_path_bytes(latin1))  # the exact bytes come back from the path column
    assert _kind(rows[str(root / "dangling.jpg")]) == "read_error"

    (root / "arrives-later.jpg").write_bytes((root / "plain.jpg").read_bytes())  # the link is fixed
    result = _job(ray_job_env, *common, "--resume")
    assert result.returncode == 0, result.stderr[-3000:]
    summary = _success(out)
    assert summary["retried_transient_errors"] == 1 and summary["rows_removed"] == 1
    assert summary["rows_scored_this_run"] == 2  # the link, and the file it now points to
    assert summary["rows_written"] == len(expected) + 2
    again = _rows(out)
    assert set(again) == set(rows) | {str(root / "arrives-later.jpg")}
    assert _kind(again[str(root / "dangling.jpg")]) is None
    # The permanent kinds stay as they were: not scored again.
    assert all(again[p]["scored_at"] == rows[p]["scored_at"] for p in rows if p != str(root / "dangling.jpg"))


def test_a_resume_checks_its_input_and_precision_and_never_drops_rows_for_a_typo(
        ray_cluster, tiny_model_run, tmp_path, capsys):
    photos = generate_sample_dataset(tmp_path / "photos", images_per_class=3)
    elsewhere = generate_sample_dataset(tmp_path / "other", images_per_class=2)
    out = tmp_path / "preds"
    base = ["--model", str(tiny_model_run), "--output", str(out), "--batch-size", "4"]
    assert run_job_module("jobs.score", *base, "--input", str(photos)) == 0
    capsys.readouterr()
    before = sorted(_rows(out))
    success = (out / SUCCESS_FILE).read_text()

    assert run_job_module("jobs.score", *base, "--input", str(elsewhere), "--resume", "--drop-unlisted") == 2
    err = capsys.readouterr().err
    assert f"scored from {photos}" in err and f"lists {elsewhere}" in err and "--input-moved" in err
    assert run_job_module("jobs.score", *base, "--input", str(photos), "--resume", "--precision", "bfloat16") == 2
    assert "--precision float32" in capsys.readouterr().err
    # Even when told the input moved, --drop-unlisted refuses to remove every row.
    assert run_job_module("jobs.score", *base, "--input", str(elsewhere), "--resume", "--input-moved",
                          "--drop-unlisted") == 2
    assert "refusing to remove them all" in capsys.readouterr().err
    assert sorted(_rows(out)) == before and (out / SUCCESS_FILE).read_text() == success  # all refused, all kept


def test_a_rewrite_cut_short_by_a_full_disk_is_repaired_by_the_next_resume(ray_cluster, tiny_model_run, tmp_path,
                                                                          capsys):
    photos = generate_sample_dataset(tmp_path / "photos", images_per_class=4)
    out = tmp_path / "preds"
    base = ["--model", str(tiny_model_run), "--input", str(photos), "--output", str(out), "--batch-size", "4"]
    assert run_job_module("jobs.score", *base, "--rows-per-file", "100") == 0
    rows = _rows(out)
    first = sorted(rows)[0]
    # A rewrite replacing one row stops after the part file was retired: its rows live only in _rewrite/.
    folder = PredictionsFolder(str(out))
    folder.fs = pafs.PyFileSystem(FullDisk(4))
    with pytest.raises(OSError, match="injected"):
        folder.remove_rows(replaced_paths(tmp_path, [first]), "bbbbbbbbbbbb", predictions_schema(("cats", "dogs")),
                           str(tmp_path))
    assert not PredictionsFolder(str(out)).part_files()
    capsys.readouterr()
    assert run_job_module("jobs.score", *base, "--resume") == 0
    summary = _success(out)
    assert len(summary["recovered_rewrites"]) == 1 and summary["rows_written"] == len(rows)
    assert sorted(_rows(out)) == sorted(rows)
    assert "Interrupted rewrite" in capsys.readouterr().err


def test_two_runs_on_one_output_one_exits_2_and_the_other_is_untouched(ray_job_env, tiny_model_run, tmp_path,
                                                                       capsys):
    photos = generate_sample_dataset(tmp_path / "photos", images_per_class=20)
    out = tmp_path / "preds"
    base = ["--model", str(tiny_model_run), "--input", str(photos), "--output", str(out), "--batch-size", "4",
            "--overwrite"]
    first = subprocess.Popen([sys.executable, "-m", "jobs.score", *base], cwd=REPO, env=ray_job_env,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not (out / "_catdog_lease.json").exists():
            assert first.poll() is None and time.monotonic() < deadline, "the first run never took its lease"
            time.sleep(0.05)
        assert run_job_module("jobs.score", *base) == 2
        err = capsys.readouterr().err
        holder = json.loads((out / "_catdog_lease.json").read_text())
        assert holder["run_id"] in err and holder["host"] in err
        stdout, stderr = first.communicate(timeout=300)
    finally:
        first.kill()
    assert first.returncode == 0, stderr[-3000:]
    summary = _success(out)
    assert summary["run_id"] == holder["run_id"] and summary["rows_written"] == 40
    assert len(_rows(out)) == 40 and not (out / "_catdog_lease.json").exists()
