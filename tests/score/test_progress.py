"""Row-level progress (catdog.score.progress): the line's arithmetic, and live lines from a real scoring run."""

from __future__ import annotations

import logging
import re

from catdog.io.sample_data import generate_sample_dataset
from catdog.score.config import ScoreConfig
from catdog.score.progress import format_line

import pytest


def test_progress_line_shows_rows_rate_eta_and_errors():
    line = format_line(250, 1000, 10.0, {"truncated": 2, "not_an_image": 1})
    assert line == "Scored 250 / 1,000 files (25.0%), 25.0 images/s, ETA 30s; errors: not_an_image 1, truncated 2"
    assert format_line(0, 10, 5.0, {}) == "Scored 0 / 10 files (0.0%), 0.0 images/s"
    assert format_line(100, 400_100, 100.0, {}).endswith("1.0 images/s, ETA 111h06m")
    assert format_line(12, 10, 1.0, {}).startswith("Scored 10 / 10 files (100.0%)")  # a retried batch counted twice


@pytest.mark.slow
def test_scoring_logs_progress_lines_while_it_runs(ray_cluster, tiny_model_run, tmp_path, caplog):
    from catdog.score.run import score

    photos = generate_sample_dataset(tmp_path / "photos", images_per_class=12)
    (photos / "cats" / "broken.jpg").write_bytes(b"not a jpeg")
    caplog.set_level(logging.INFO, logger="catdog.score.progress")
    score(ScoreConfig(model=str(tiny_model_run), input=str(photos), output=str(tmp_path / "preds"),
                      batch_size=4, progress_interval_s=0.5))
    lines = [r.getMessage() for r in caplog.records if r.name == "catdog.score.progress"]
    assert len(lines) >= 2, lines  # at least one while running, and the last one
    # before the listing ends the total is unknown: "Scored N files, M listed so far"
    counts = [int(re.match(r"Scored (\d+)( / 25)? files", line).group(1)) for line in lines]
    assert counts == sorted(counts)
    assert lines[-1].startswith("Scored 25 / 25 files (100.0%)") and lines[-1].endswith("errors: not_an_image 1")
