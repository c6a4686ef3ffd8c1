"""Live monitoring end to end: during a real smoke run on an embedded Ray, the node's Prometheus endpoint (what the
dashboard's metrics views and Grafana read) serves the hybridtrain series with plausible values, and the run
directory holds TensorBoard event files of the same series."""

from __future__ import annotations

import re
import threading
import time
import urllib.request

import pandas as pd
import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from cluster.experiment import build_config
from cluster.launch import run_experiment

pytestmark = pytest.mark.e2e

SAMPLE = re.compile(r'^ray_hybridtrain_(\w+)\{([^}]*)\}\s+(\S+)$')


def _scrape(port: int, run: str) -> dict[tuple[str, str], float]:
    """The hybridtrain samples of `run` on the endpoint: {(series, other tags): value}."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    samples = {}
    for line in text.splitlines():
        match = SAMPLE.match(line)
        if match and f'run="{run}"' in match.group(2):
            tags = ",".join(sorted(tag for tag in match.group(2).split(",") if tag.split("=")[0] in ("rank", "group")))
            samples[(match.group(1), tags)] = float(match.group(3))
    return samples


def test_a_running_smoke_run_exports_its_series_to_prometheus_and_tensorboard(ray_local, tmp_path) -> None:
    ports = {node["MetricsExportPort"] for node in ray_local.nodes() if node["Alive"]}
    assert len(ports) == 1
    port = ports.pop()
    run_dir = tmp_path / "monitored"
    # A checkpoint (and a report) every epoch keeps each epoch near Train's 2 s report poll: Ray's metrics agent,
    # which publishes every few seconds, sees the workers' series before the run ends.
    config = build_config(recipe="smoke", overrides=["train.epochs=6", "advisor.backend=heuristic", "coordinator.query_interval=1", "coordinator.ask_when_healthy=true",
                                                     "train.checkpoint_every=1"])
    outcome: dict = {}
    runner = threading.Thread(target=lambda: outcome.update(summary=run_experiment(config, run_dir)), daemon=True)
    runner.start()
    seen: dict[tuple[str, str], float] = {}
    while runner.is_alive():  # Ray's metrics agent publishes every few seconds: keep the latest of each series
        seen.update(_scrape(port, run_dir.name))
        time.sleep(2.0)
    runner.join()
    assert "summary" in outcome, "the run failed"
    summary = outcome["summary"]

    assert 1 <= seen[("epoch", "")] <= 6
    assert 0.1 < seen[("val_accuracy", "")] <= 1.0 and 0.1 < seen[("train_accuracy", "")] <= 1.0
    assert 0.0 < seen[("val_loss", "")] < 5.0 and seen[("lr", "")] > 0
    assert seen[('worker_samples_per_s', 'rank="0"')] > 0 and seen[('worker_samples_per_s', 'rank="1"')] > 0
    assert seen[("epoch_s", "")] > 0
    assert seen[("advisor_queries", "")] >= 1  # asked every epoch
    assert seen[("advisor_queries", "")] <= summary["advisor_queries"]

    events = EventAccumulator(str(run_dir / "tensorboard"))
    events.Reload()
    val_accuracy = events.Scalars("val_accuracy")
    assert [event.step for event in val_accuracy] == list(range(1, 7))
    metrics = pd.read_csv(run_dir / "metrics.csv")
    assert [event.value for event in val_accuracy] == pytest.approx(list(metrics.val_accuracy))
    assert {"worker_samples_per_s/0", "worker_samples_per_s/1", "advisor_queries", "proposals_accepted"} <= set(events.Tags()["scalars"])
