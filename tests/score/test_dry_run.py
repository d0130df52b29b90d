"""jobs.score --dry-run (catdog.score.dry_run): the plan of a real input and model, nothing written; the
same refusals as a real run."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from catdog.errors import OutputExistsError
from catdog.io.sample_data import generate_sample_dataset
from catdog.score.config import ScoreConfig

ROOT = Path(__file__).resolve().parents[2]


def test_dry_run_prints_the_plan_and_writes_nothing(tiny_model_run, tmp_path):
    photos = generate_sample_dataset(tmp_path / "photos", images_per_class=10)
    out = tmp_path / "preds"
    job = subprocess.run([sys.executable, "-m", "jobs.score", "--model", str(tiny_model_run), "--input", str(photos),
                          "--output", str(out), "--dry-run", "--batch-size", "8", "--top-k", "2"],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert job.returncode == 0, job.stderr[-3000:]
    plan = json.loads(job.stdout[job.stdout.index("{"):])
    assert plan["writes_nothing"] is True and not out.exists()
    assert plan["files_listed"] == plan["files_to_score"] == 20 and plan["batches"] == 3
    assert plan["predictors"] == {"min": 1, "max": 1, "why": "one CPU predictor (default)"}
    assert plan["resources"]["predictor"] == {"CPU": 1.0} and plan["extra_columns"]["top_k"] == 2
    assert plan["warm_up"]["sample_files"] == 20 and plan["warm_up"]["predict_s_per_image"] > 0
    assert plan["estimate_s"] > 0 and plan["image_size"] == 32


def test_dry_run_refuses_what_a_run_would_refuse(tiny_model_run, tmp_path):
    from catdog.score.dry_run import plan_score

    photos = generate_sample_dataset(tmp_path / "photos", images_per_class=1)
    with pytest.raises(OutputExistsError, match="overlaps"):
        plan_score(ScoreConfig(model=str(tiny_model_run), input=str(photos), output=str(photos / "preds")))
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "x.txt").write_text("someone's")
    with pytest.raises(OutputExistsError, match="already exists"):
        plan_score(ScoreConfig(model=str(tiny_model_run), input=str(photos), output=str(tmp_path / "out")))
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["x.txt"]
