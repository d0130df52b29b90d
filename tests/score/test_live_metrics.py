"""Live scoring metrics (catdog.score.live_metrics): a real scoring run on the session Ray, then the
node's Prometheus endpoint, scraped on 127.0.0.1, shows the counters moved by its rows."""

from __future__ import annotations

import re
import time
import urllib.request

import pytest

from catdog.io.sample_data import generate_sample_dataset
from catdog.score.config import ScoreConfig


def _scrape(port: int) -> str:
    return urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()


def _total(text: str, name: str, **tags: str) -> float:
    """Sum of a metric's samples across actors, for samples carrying every given tag."""
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name + "{") and all(f'{key}="{value}"' in line for key, value in tags.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


@pytest.mark.slow
def test_scoring_moves_the_counters_on_the_nodes_metrics_endpoint(ray_cluster, tiny_model_run, tmp_path):
    from catdog.model.run_folder import RunFolder
    from catdog.score.run import score

    port = ray_cluster.nodes()[0]["MetricsExportPort"]
    model_id = RunFolder(str(tiny_model_run)).describe().model_id
    before = _scrape(port)
    photos = generate_sample_dataset(tmp_path / "photos", images_per_class=10)
    (photos / "cats" / "broken.jpg").write_bytes(b"not a jpeg")
    summary = score(ScoreConfig(model=str(tiny_model_run), input=str(photos), output=str(tmp_path / "preds"),
                                batch_size=4))
    assert summary["rows_written"] == 21
    images = "ray_catdog_images_scored_total"
    deadline = time.monotonic() + 60  # Ray exports metrics every few seconds
    while True:
        after = _scrape(port)
        moved = _total(after, images, model_id=model_id) - _total(before, images, model_id=model_id)
        if moved >= 21 or time.monotonic() > deadline:
            break
        time.sleep(2)
    assert moved == 21, re.findall(r"ray_catdog\S*", after)[:10]
    errors = "ray_catdog_image_errors_total"
    kind = {"model_id": model_id, "kind": "not_an_image"}
    assert _total(after, errors, **kind) - _total(before, errors, **kind) == 1
    assert _total(after, "ray_catdog_batch_latency_seconds_count", model_id=model_id) > _total(
        before, "ray_catdog_batch_latency_seconds_count", model_id=model_id)
    assert _total(after, "ray_catdog_images_per_second", model_id=model_id) > 0
