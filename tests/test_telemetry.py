"""Live series: TensorBoard files a reader can open, and the shipped Grafana dashboard matching the series."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from orchestration.telemetry import SERIES, TAG_OF, Telemetry, advisor_series, grafana_dashboard

ROOT = Path(__file__).resolve().parents[1]


def _scalars(directory: Path) -> dict[str, list[tuple[int, float]]]:
    events = EventAccumulator(str(directory))
    events.Reload()
    return {tag: [(event.step, event.value) for event in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def test_series_reach_tensorboard_with_their_steps_and_tags(tmp_path) -> None:
    telemetry = Telemetry({"run": "r"}, tensorboard_dir=tmp_path, ray_metrics=False)
    telemetry.emit({"val_loss": 0.9, "val_accuracy": 0.5, "advisor_latency_s": None}, step=1)
    telemetry.emit({"val_loss": 0.7, "val_accuracy": math.nan}, step=2)  # no value is not a zero
    telemetry.emit_tagged("alpha", {"features.0.weight": 0.15, "head.bias": 0.05}, step=2)
    telemetry.close()
    scalars = _scalars(tmp_path)
    assert scalars["val_loss"] == [(1, pytest.approx(0.9)), (2, pytest.approx(0.7))]
    assert scalars["val_accuracy"] == [(1, 0.5)]
    assert "advisor_latency_s" not in scalars
    assert scalars["alpha/features.0.weight"] == [(2, pytest.approx(0.15))]


def test_a_resumed_run_replaces_the_epochs_it_repeats(tmp_path) -> None:
    first = Telemetry({"run": "r"}, tensorboard_dir=tmp_path, ray_metrics=False)
    for epoch in (1, 2, 3):
        first.emit({"val_loss": float(epoch)}, step=epoch)
    first.close()
    resumed = Telemetry({"run": "r"}, tensorboard_dir=tmp_path, ray_metrics=False, first_step=3)  # checkpoint after epoch 2
    for epoch in (3, 4):
        resumed.emit({"val_loss": 10.0 * epoch}, step=epoch)
    resumed.close()
    assert _scalars(tmp_path)["val_loss"] == [(1, 1.0), (2, 2.0), (3, 30.0), (4, 40.0)]


def test_unknown_series_and_missing_tags_are_errors(tmp_path) -> None:
    telemetry = Telemetry({"run": "r"}, ray_metrics=False)
    with pytest.raises(KeyError, match="unknown series 'val_los'"):
        telemetry.emit({"val_los": 1.0}, step=1)
    with pytest.raises(ValueError, match="needs its 'group' tag"):
        telemetry.emit({"alpha": 0.1}, step=1)
    with pytest.raises(ValueError, match="takes no tag"):
        telemetry.emit_tagged("val_loss", {"x": 0.1}, step=1)


def test_advisor_series_come_from_the_coordinator_totals() -> None:
    counts = {"advisor_queries": 3, "cache_hits": 1, "proposals_accepted": 1, "proposals_rejected": 1, "proposals_invalid": 0,
              "answers_stale": 0, "answers_timeout": 1, "errors": 0}
    series = advisor_series({"counts": counts, "latency_s": 2.5, "alphas": {}})
    assert series["advisor_queries"] == 3 and series["answers_timeout"] == 1 and series["advisor_latency_s"] == 2.5
    assert set(series) <= set(SERIES)


def test_the_shipped_grafana_dashboard_is_current_and_covers_every_series() -> None:
    shipped = json.loads((ROOT / "docs" / "grafana-hybridtrain.json").read_text())
    assert shipped == grafana_dashboard(), "regenerate it: hybridtrain grafana --output docs/grafana-hybridtrain.json"
    expressions = [target["expr"] for panel in shipped["panels"] for target in panel["targets"]]
    for name in SERIES:
        assert any(expr.startswith(f"ray_hybridtrain_{name}{{") for expr in expressions), name
    for name, tag in TAG_OF.items():
        panel = next(panel for panel in shipped["panels"] if panel["targets"][0]["expr"].startswith(f"ray_hybridtrain_{name}{{"))
        assert "{{" + tag + "}}" in panel["targets"][0]["legendFormat"]


def test_telemetry_pickles_with_an_open_writer_and_the_copy_appends(tmp_path) -> None:
    import pickle

    telemetry = Telemetry({"sweep": "s"}, tensorboard_dir=tmp_path, ray_metrics=False)  # Tune pickles its callbacks
    telemetry.emit({"population_best": 0.5}, step=1)
    copy = pickle.loads(pickle.dumps(telemetry))
    copy.emit({"population_best": 0.7}, step=2)
    copy.close()
    telemetry.close()
    # Two event files (the original's and the copy's); TensorBoard reads both, in file-name order, which two
    # writers opened in the same second do not fix: compare by step.
    assert sorted(_scalars(tmp_path)["population_best"]) == [(1, 0.5), (2, pytest.approx(0.7))]
