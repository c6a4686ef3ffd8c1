"""Tune callbacks of a sweep, all observers run in the Tune driver: a live progress table, the
population's telemetry series, and the feed that keeps the LLM explorer's population table current."""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

from cluster.sweep_outputs import EXPLORES, count_lines
from orchestration.telemetry import Telemetry
from workers.components import TENSORBOARD


def explore_feed(explorer):
    """Feeds every trial result to the LLM explorer, which keeps the population table and asks ahead."""
    from ray.tune import Callback

    class ExploreFeed(Callback):
        def on_trial_result(self, iteration, trials, trial, result, **info):
            explorer.observe(trial.trial_id, trial.config, result)

    return ExploreFeed()


def progress_table(metric: str, every_s: float = 10.0):
    """A compact live table (trial, status, epoch, score, lr) instead of Ray's raw log stream."""
    from ray.tune import Callback

    class ProgressTable(Callback):
        def __init__(self) -> None:
            self.rows: dict[str, dict[str, Any]] = {}
            self.printed = 0.0

        def on_trial_result(self, iteration, trials, trial, result, **info):
            self.rows[trial.trial_id] = {"trial": str(trial), "epoch": result.get("epoch"), "score": result.get(metric), "lr": result.get("lr")}
            if time.monotonic() - self.printed >= every_s:
                self.show(trials)

        def on_experiment_end(self, trials, **info):
            self.show(trials)

        def show(self, trials) -> None:
            self.printed = time.monotonic()
            lines = [f"[hybridtrain] {'trial':<28} {'status':<11} {'epoch':>5} {metric:>12} {'lr':>9}"]
            for trial in trials:
                row = self.rows.get(trial.trial_id, {})
                score, lr = row.get("score"), row.get("lr")
                lines.append(f"[hybridtrain] {str(trial):<28} {trial.status:<11} {row.get('epoch') or '-':>5} "
                             f"{'-' if score is None else f'{score:.4f}':>12} {'-' if lr is None else f'{lr:.2e}':>9}")
            print("\n".join(lines), flush=True)

    return ProgressTable()


def sweep_series(sweep_dir: Path, name: str, metric: str, mode: str):
    """The population's series (best score, each trial's score, exploits, trials running) to Ray's metrics and to
    SWEEP_DIR/tensorboard; each trial's run writes its own series under its run directory."""
    from ray.tune import Callback

    class SweepSeries(Callback):
        def __init__(self) -> None:
            self.telemetry = Telemetry({"sweep": name}, tensorboard_dir=sweep_dir / TENSORBOARD)
            self.best: float | None = None
            self.results = 0  # the x axis of the population's series: results received so far

        def on_trial_result(self, iteration, trials, trial, result, **info):
            score = result.get(metric)
            if score is None or not math.isfinite(score):
                return
            if self.best is None or (score > self.best if mode == "max" else score < self.best):
                self.best = score
            self.results += 1
            running = sum(1 for item in trials if item.status == "RUNNING")
            self.telemetry.emit({"population_best": self.best, "exploits": count_lines(sweep_dir / EXPLORES), "trials_running": running},
                                step=self.results)
            self.telemetry.emit_tagged("trial_score", {trial.trial_id: score}, step=self.results)

        def on_experiment_end(self, trials, **info):
            self.telemetry.close()

    return SweepSeries()
