"""Live series: one name, two places. Every value goes to Ray's metrics (`ray.util.metrics`, exported on each
node's Prometheus endpoint as `ray_hybridtrain_<name>` and shown by the dashboard's metrics views and the Grafana
dashboard in docs/) and to TensorBoard (`tensorboard --logdir RUN_DIR`).

Counts (queries, accepted proposals, exploits) are exported as gauges holding the run's total, not as Prometheus
counters: a worker group restarted from a checkpoint carries its totals back, and a counter would count twice.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

PREFIX = "hybridtrain_"

# name -> (unit, what it is); the Grafana dashboard has one panel per name (tests check the two agree)
SERIES: dict[str, tuple[str, str]] = {
    "epoch": ("", "last completed epoch"),
    "train_loss": ("", "mean training loss of the epoch"),
    "train_accuracy": ("ratio", "accuracy on the epoch's training batches (training mode, before each step)"),
    "val_loss": ("", "validation loss after the epoch"),
    "val_accuracy": ("ratio", "validation accuracy after the epoch"),
    "lr": ("", "learning rate at the end of the epoch"),
    "samples_per_s": ("samples/s", "training throughput of the epoch, all workers"),
    "worker_samples_per_s": ("samples/s", "training throughput of the epoch on one worker (tag rank)"),
    "epoch_s": ("s", "wall time of the epoch: training, validation, asking the advisor and probation"),
    "probation_s": ("s", "time the epoch spent trying a proposal on probation"),
    "advisor_queries": ("", "advisor queries so far"),
    "cache_hits": ("", "queries answered by the response cache so far"),
    "proposals_accepted": ("", "proposals kept after probation so far"),
    "proposals_rejected": ("", "proposals rolled back after probation so far"),
    "proposals_invalid": ("", "advisor answers that failed the schema so far"),
    "answers_timeout": ("", "advisor answers that came too late so far"),
    "advisor_latency_s": ("s", "time the advisor took for its latest answer"),
    "alpha": ("", "blend factor of a parameter group (tag group)"),
    "population_best": ("", "best score of any trial of the sweep so far"),
    "trial_score": ("", "latest score of a trial (tag trial)"),
    "exploits": ("", "PBT exploits (a trial restarted from another's checkpoint) so far"),
    "trials_running": ("", "trials of the sweep running now"),
}
TAG_OF = {"worker_samples_per_s": "rank", "alpha": "group", "trial_score": "trial"}


class Telemetry:
    """Writes series for one run (or one sweep): `emit({name: value}, step=epoch)`.

    `scope` tags every Ray series (`{"run": name}` or `{"sweep": name}`); a series listed in `TAG_OF` carries
    one more tag, and `emit_tagged` sets it. Ray metrics are on when this process is part of a Ray cluster;
    TensorBoard is on when `tensorboard_dir` is given.
    """

    def __init__(self, scope: dict[str, str], *, tensorboard_dir: Path | str | None = None, ray_metrics: bool | None = None,
                 first_step: int | None = None) -> None:
        """`first_step`: a run resumed from a checkpoint writes from this step on, and TensorBoard drops what an
        earlier attempt wrote from there (the epochs the restart repeats)."""
        self.scope = {key: str(value) for key, value in scope.items()}
        self._gauges: dict[str, Any] = {}
        self._writer = None
        if ray_metrics is None:
            import ray

            ray_metrics = ray.is_initialized()
        self.ray_metrics = ray_metrics
        self.tensorboard_dir = None if tensorboard_dir is None else str(tensorboard_dir)
        self.first_step = first_step

    def __getstate__(self) -> dict[str, Any]:
        """Picklable (Tune saves its callbacks with the experiment): the open writer and gauges are not carried;
        an unpickled copy appends to the same directory."""
        return {"scope": self.scope, "ray_metrics": self.ray_metrics, "tensorboard_dir": self.tensorboard_dir, "first_step": None,
                "_gauges": {}, "_writer": None}

    def emit(self, values: dict[str, float | None], *, step: int) -> None:
        """Untagged series; a None or non-finite value is skipped (no answer yet is not a zero)."""
        for name, value in values.items():
            self._write(name, value, step=step)
        self.flush()

    def emit_tagged(self, name: str, values: dict[str, float | None], *, step: int) -> None:
        """One tagged series (`TAG_OF[name]`): `{tag value: value}`."""
        for tag, value in values.items():
            self._write(name, value, step=step, tag=str(tag))
        self.flush()

    def flush(self) -> None:
        if self._writer is not None:
            self._writer.flush()

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    def _write(self, name: str, value: float | None, *, step: int, tag: str | None = None) -> None:
        if name not in SERIES:
            raise KeyError(f"unknown series {name!r}; known: {', '.join(SERIES)}")
        if value is None or not math.isfinite(float(value)):
            return
        if (tag is None) != (name not in TAG_OF):
            raise ValueError(f"series {name!r} " + (f"needs its {TAG_OF[name]!r} tag" if tag is None else "takes no tag"))
        if self.ray_metrics:
            tags = dict(self.scope) | ({TAG_OF[name]: tag} if tag is not None else {})
            self._gauge(name).set(float(value), tags=tags)
        if self.tensorboard_dir is not None:
            if self._writer is None:
                from torch.utils.tensorboard import SummaryWriter

                self._writer = SummaryWriter(log_dir=self.tensorboard_dir, flush_secs=10, purge_step=self.first_step)
            self._writer.add_scalar(name if tag is None else f"{name}/{tag}", float(value), global_step=step)

    def _gauge(self, name: str):
        gauge = self._gauges.get(name)
        if gauge is None:
            from ray.util.metrics import Gauge

            tag_keys = tuple(self.scope) + ((TAG_OF[name],) if name in TAG_OF else ())
            unit, description = SERIES[name]
            gauge = self._gauges[name] = Gauge(PREFIX + name, description=description + (f" ({unit})" if unit else ""), tag_keys=tag_keys)
        return gauge


def advisor_series(telemetry: dict[str, Any]) -> dict[str, float | None]:
    """The untagged advisor series from `Coordinator.telemetry()`."""
    counts = telemetry["counts"]
    names = ("advisor_queries", "cache_hits", "proposals_accepted", "proposals_rejected", "proposals_invalid", "answers_timeout")
    return {name: counts[name] for name in names} | {"advisor_latency_s": telemetry.get("latency_s")}


def grafana_dashboard(*, datasource: str = "${datasource}") -> dict[str, Any]:
    """A Grafana dashboard with one time-series panel per series, filterable by run and sweep."""
    panels = []
    for index, (name, (unit, description)) in enumerate(SERIES.items()):
        tag = TAG_OF.get(name)
        scope = "sweep" if name in ("population_best", "trial_score", "exploits", "trials_running") else "run"
        legend = "{{" + scope + "}}" + (" {{" + tag + "}}" if tag else "")
        panels.append({
            "id": index + 1, "type": "timeseries", "title": name.replace("_", " "), "description": description,
            "datasource": {"type": "prometheus", "uid": datasource},
            "gridPos": {"h": 8, "w": 8, "x": (index % 3) * 8, "y": (index // 3) * 8},
            "fieldConfig": {"defaults": {"unit": {"s": "s", "ratio": "percentunit", "samples/s": "short"}.get(unit, "short")}, "overrides": []},
            "targets": [{"refId": "A", "datasource": {"type": "prometheus", "uid": datasource},
                         "expr": f'ray_{PREFIX}{name}{{{scope}=~"${scope}"}}', "legendFormat": legend}],
        })
    variables = [{"name": "datasource", "type": "datasource", "query": "prometheus", "label": "Prometheus"}]
    for scope, series in (("run", "val_loss"), ("sweep", "population_best")):
        variables.append({"name": scope, "type": "query", "label": scope, "includeAll": True, "multi": True, "allValue": ".*",
                          "datasource": {"type": "prometheus", "uid": datasource}, "refresh": 2,
                          "query": {"query": f"label_values(ray_{PREFIX}{series}, {scope})", "refId": "vars"},
                          "definition": f"label_values(ray_{PREFIX}{series}, {scope})"})
    return {"title": "hybridtrain", "uid": "hybridtrain", "schemaVersion": 39, "version": 1, "refresh": "10s", "time": {"from": "now-1h", "to": "now"},
            "tags": ["hybridtrain", "ray"], "templating": {"list": variables}, "panels": panels}
