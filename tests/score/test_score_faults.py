"""Scoring under failure, caused for real: a predictor actor process killed mid-run, the jobs.score
driver SIGKILLed mid-run then resumed, and hostile inputs (symlinks, unreadable and vanishing files,
bombs, broken manifests, empty inputs). Each checks rows == files and no duplicate paths."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
from PIL import Image

from catdog.score import predictions_folder as output
from catdog.score.config import ScoreConfig
from catdog.score.predictions_folder import PredictionsFolder
from support import run_job_module, write_model_run
from support.hostile_corpus import write_huge_png

ROOT = Path(__file__).resolve().parents[2]
PREDICTOR_CLASS = "MapWorker(MapBatches(Predictor))"
# With 160 photos per fault run, inference at 128 px outlasts detecting the first output file and
# killing by seconds (~3 s of work on 2 idle cores), and stays small for the test budget.
FAULT_IMAGE_SIZE = 128
FAULT_IMAGES = 160


@pytest.fixture(scope="module")
def slow_model_run(tmp_path_factory) -> Path:
    """A 128-pixel model: slow enough per image that a run can be interrupted mid-way."""
    return write_model_run(tmp_path_factory.mktemp("run128"), image_size=FAULT_IMAGE_SIZE)


def _rows_and_duplicates(out: Path) -> tuple[int, int]:
    paths = PredictionsFolder(str(out)).read(columns=["path"])["path"]
    return len(paths), len(paths) - len(pc.unique(paths))


def _photo_manifest(real_photos: Path, folder: str, path: Path) -> tuple[Path, int]:
    photos = sorted(str(p) for p in (real_photos / folder).glob("*.jpg"))[:FAULT_IMAGES]
    pq.write_table(pa.table({"path": photos}), path)
    return path, len(photos)


def _readable_rows(out: Path) -> int:
    rows = 0
    for f in PredictionsFolder(str(out)).part_files():
        try:
            rows += pq.read_metadata(f).num_rows
        except (pa.ArrowException, OSError):
            pass  # being written, or cut short by the kill
    return rows


def _wait_for(predicate, timeout: float, what: str, interval: float = 0.05):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def _predictor_actors(state: str | None = None) -> list[dict]:
    """Predictor actors of this session's cluster, from Ray's GCS actor table (the state API
    needs the dashboard, which a local catdog Ray does not start)."""
    from ray._private.state import actors

    return [a for a in actors().values() if a["ActorClassName"] == PREDICTOR_CLASS
            and (state is None or a["State"] == state)]


def _clean_env() -> dict:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # the job starts its own local Ray
    env["PYTHONPATH"] = str(ROOT)
    return env


@pytest.mark.slow
def test_killed_predictor_actor_is_restarted_and_no_row_is_lost_or_doubled(ray_cluster, slow_model_run,
                                                                           real_photos, tmp_path):
    from catdog.score.run import score

    out = tmp_path / "preds"
    manifest, expected = _photo_manifest(real_photos, "dogs", tmp_path / "dogs.parquet")
    config = ScoreConfig(model=str(slow_model_run), input=str(manifest), output=str(out),
                         batch_size=8, rows_per_file=8)
    result: dict = {}
    worker = threading.Thread(target=lambda: result.update(summary=score(config)), daemon=True)
    worker.start()
    try:
        _wait_for(lambda: _readable_rows(out) > 0 or not worker.is_alive(), 300, "the first part file")
        actors = _predictor_actors("ALIVE")
        assert len(actors) == 1, actors
        victim = actors[0]
        written_before_kill = _readable_rows(out)
        os.kill(victim["Pid"], signal.SIGKILL)
        assert written_before_kill < expected, "the run ended before the kill: not a mid-run failure"
    finally:
        worker.join(timeout=600)
    assert not worker.is_alive() and "summary" in result
    summary = result["summary"]
    assert summary["files_listed"] == summary["rows_written"] == expected
    assert _rows_and_duplicates(out) == (expected, 0)
    after = {a["ActorID"]: a for a in _predictor_actors()}[victim["ActorID"]]
    assert after["NumRestarts"] >= 1  # Ray restarted it in a new process; the lost batch was retried


@pytest.mark.slow
def test_sigkilled_driver_then_resume_ends_with_exact_rows(ray_cluster, slow_model_run, real_photos, tmp_path, capsys):
    """The killed run drives a local Ray of its own (the driver's crash takes that Ray with it); the
    resumed run joins the session's Ray, as a re-submitted job joins its cluster (in this process:
    `python -m jobs.score` run as `__main__`)."""
    out = tmp_path / "preds"
    manifest, expected = _photo_manifest(real_photos, "cats", tmp_path / "cats.parquet")
    arguments = ["--model", str(slow_model_run), "--input", str(manifest), "--output", str(out),
                 "--batch-size", "8", "--rows-per-file", "8"]
    first = subprocess.Popen([sys.executable, "-m", "jobs.score", *arguments], cwd=ROOT, env=_clean_env(),
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    try:
        _wait_for(lambda: _readable_rows(out) > 0 or first.poll() is not None, 300, "the first part file")
        assert first.poll() is None, first.stderr.read()[-3000:]
        os.kill(first.pid, signal.SIGKILL)
        first.wait(timeout=30)
        time.sleep(3)  # the killed run's workers outlive it by ~2 s (they may still write a file)
        partial = _readable_rows(out)
        assert 0 < partial < expected
        assert not (out / output.SUCCESS_FILE).exists()  # readers can tell it is partial

        capsys.readouterr()
        assert run_job_module("jobs.score", *arguments, "--resume") == 0, capsys.readouterr().err[-3000:]
        printed = capsys.readouterr().out
    finally:
        _kill_group(first.pid)
    summary = json.loads((out / output.SUCCESS_FILE).read_text())
    assert summary["files_listed"] == summary["rows_written"] == expected
    assert 0 < summary["rows_from_earlier_runs"] < expected
    assert summary["rows_scored_this_run"] == expected - summary["rows_from_earlier_runs"]
    assert _rows_and_duplicates(out) == (expected, 0)
    start = printed.index("{")
    assert json.JSONDecoder().raw_decode(printed, start)[0]["rows_written"] == expected  # the job prints the summary


def _kill_group(pid: int) -> None:
    """Stop what the killed driver left behind (its Ray processes share its session)."""
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


FILLER = """
import sys
import numpy as np
import ray
ray.init(address=sys.argv[1], logging_level="ERROR")
from ray._private.internal_api import memory_summary
refs = [ray.put(np.ones(10 * 2**20, dtype=np.uint8)) for _ in range(7)]  # 70 MiB held, under the spill threshold
print("ready", flush=True)
for _ in sys.stdin:  # one object store summary per line asked, each ended by "end"
    print(memory_summary(address=sys.argv[1], stats_only=True), flush=True)
    print("end", flush=True)
"""


def _free_port() -> int:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.mark.slow
def test_a_full_object_store_spills_and_scoring_completes(slow_model_run, real_photos, tmp_path):
    """A 100 MB object store, 70 MiB of it held by another driver, then a scoring job on top: Ray
    spills to disk and the job completes exactly (no crash, no lost rows)."""
    port = _free_port()
    env = {**_clean_env(), "RAY_AUTH_MODE": "token"}  # clients of a `ray start` head send the token
    ray_cli = str(Path(sys.executable).with_name("ray"))  # this interpreter's Ray, on PATH or not
    head = subprocess.Popen([ray_cli, "start", "--head", "--block", f"--port={port}", "--num-cpus=2",
                             "--object-store-memory=100000000", "--include-dashboard=false",
                             "--node-ip-address=127.0.0.1"], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    filler = None
    try:
        address = f"127.0.0.1:{port}"
        filler = _wait_for(lambda: _start_filler(address, env), 120, "the head to accept drivers", interval=2)
        time.sleep(2)
        before = _spilled(filler)
        manifest, expected = _photo_manifest(real_photos, "dogs", tmp_path / "dogs.parquet")
        out = tmp_path / "preds"
        job = subprocess.run([sys.executable, "-m", "jobs.score", "--model", str(slow_model_run), "--input",
                              str(manifest), "--output", str(out), "--ray-address", address,
                              # One batch of decoded pixels (~7.9 MB) passes the spill threshold on top of the filler.
                              "--batch-size", "160"],
                             cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
        assert job.returncode == 0, job.stderr[-3000:]
        after = _spilled(filler)
    finally:
        if filler is not None and filler.poll() is None:
            filler.kill()
        _kill_group(head.pid)
    assert _rows_and_duplicates(out) == (expected, 0)
    assert before == 0 and after >= 10, (before, after)  # the job's data pushed the filler's objects to disk


def _spilled(filler) -> int:
    """MiB spilled so far, from Ray's object store summary ("Spilled 70 MiB, 7 objects, ...")."""
    filler.stdin.write("stats\n")
    filler.stdin.flush()
    lines = list(iter(filler.stdout.readline, "end\n"))
    spilled = [line for line in lines if line.startswith("Spilled")]
    return int(spilled[0].split()[1]) if spilled else 0


def _start_filler(address: str, env: dict):
    filler = subprocess.Popen([sys.executable, "-c", FILLER, address], env=env, stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    if filler.stdout.readline().strip() == "ready":
        return filler
    filler.wait()
    return None


@pytest.mark.slow
def test_hostile_folder_symlinks_unreadable_vanishing_and_bomb_files(ray_cluster, tiny_model_run, tmp_path):
    from catdog.io.inputs import list_inputs
    from catdog.score.run import score_listing

    folder, outside = tmp_path / "in", tmp_path / "outside"
    (folder / "sub").mkdir(parents=True)
    outside.mkdir()
    for name in ("a.jpg", "sub/b.png", "vanishing.jpg", "locked.jpg", "é" * 125 + ".jpeg"):
        Image.new("RGB", (24, 16), (120, 60, 30)).save(folder / name)
    Image.new("RGB", (8, 8)).save(outside / "secret.jpg")
    os.symlink(outside / "secret.jpg", folder / "escape.jpg")  # outside: not followed
    os.symlink(outside, folder / "escape_dir")
    os.symlink(folder, folder / "sub" / "loop")  # a loop: walked once
    os.symlink(folder / "gone.jpg", folder / "dangling.jpg")  # inside, target missing: an error row
    (folder / "dir.jpg").mkdir()  # a directory named like an image: not a file
    write_huge_png(folder / "bomb.png")  # 30,000 x 30,000: refused from its header
    (folder / "locked.jpg").chmod(0)

    listing = list_inputs(str(folder))
    assert listing.skipped == {"symlink_outside_input": 2, "repeated_folder": 1}
    (folder / "vanishing.jpg").unlink()  # deleted between listing and reading
    config = ScoreConfig(model=str(tiny_model_run), input=str(folder), output=str(tmp_path / "preds"), batch_size=4)
    summary = score_listing(config, listing)

    table = PredictionsFolder(config.output).read()
    rows = {Path(p).name: e for p, e in zip(table["path"].to_pylist(), table["error"].to_pylist())}
    assert table.num_rows == listing.num_files == 7 == len(rows)
    assert rows["a.jpg"] is None and rows["b.png"] is None and rows["é" * 125 + ".jpeg"] is None
    assert rows["vanishing.jpg"].startswith("read_error: FileNotFoundError")
    assert rows["dangling.jpg"].startswith("read_error: FileNotFoundError")
    assert rows["bomb.png"].startswith("too_large: 30000x30000")
    if os.geteuid() == 0:  # root reads any file: the locked file is scored
        assert rows["locked.jpg"] is None
    else:
        assert rows["locked.jpg"].startswith("read_error: PermissionError")
    assert summary["errors_by_kind"]["read_error"] >= 2 and summary["errors_by_kind"]["too_large"] == 1
    assert summary["skipped_while_listing"] == listing.skipped


@pytest.mark.parametrize("case", ["empty_folder", "zero_byte_manifest", "missing_input"])
def test_unusable_input_exits_2_and_writes_nothing(tiny_model_run, tmp_path, case, capsys):
    source = tmp_path / "input"
    if case == "empty_folder":
        (source / "sub").mkdir(parents=True)
        (source / "notes.txt").write_text("no images here")
    elif case == "zero_byte_manifest":
        source = tmp_path / "manifest.parquet"
        source.write_bytes(b"")
    out = tmp_path / "preds"
    code = run_job_module("jobs.score", "--model", str(tiny_model_run), "--input", str(source), "--output", str(out))
    err = capsys.readouterr().err
    assert code == 2, err[-2000:]
    assert str(source) in err and "Traceback" not in err
    assert not out.exists()
