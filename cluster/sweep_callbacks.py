"""Tune callbacks of a sweep, all observers run in the Tune driver: a live progress table, the
population's telemetry series, and the feed that keeps the LLM explorer's population table current;
and `ray_output_to`, which keeps Ray's and Tune's own output off the sweep's terminal."""

from __future__ import annotations

import contextlib
import logging
import math
import sys
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any, TextIO

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
    """A compact live table (trial, status, epoch, score, lr) instead of Ray's raw log stream, printed to the
    terminal (`terminal()`: the real one while `ray_output_to` sends Ray's output to the sweep's log). Tune
    pickles its callbacks with the experiment, so the table holds no stream of its own."""
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
            print("\n".join(lines), file=terminal(), flush=True)

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


_terminals: list[TextIO] = []  # the terminals of the active `ray_output_to` contexts, innermost last


def terminal() -> TextIO:
    """Where hybridtrain's own sweep lines go: the terminal `ray_output_to` kept, else standard output."""
    return _terminals[-1] if _terminals else sys.stdout


@contextlib.contextmanager
def ray_output_to(log_path: Path) -> Iterator[TextIO]:
    """While the context lasts, everything Ray and Tune print in this process goes to `log_path` (appended):
    Tune's configuration box, its warnings (`reuse_actors`, "on_trial_result took 20.0 s"), the raylet's
    messages pushed to the driver ("N PYTHON worker processes have been started"), Python warnings. Yields
    the terminal, on which hybridtrain's own table and lines go on being printed.

    Tune prints at verbose=0 too (its configuration box), Ray's pushed messages go to `sys.stdout` as it is
    when they arrive, and Ray's loggers hold the stream they were set up with: so both the standard streams
    and the stream handlers that write to them are pointed at the log, and put back at the end.
    """
    shown, streams = sys.stdout, (sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "a", encoding="utf-8", buffering=1) as log, _stream_handlers_to(log, streams), contextlib.redirect_stdout(log), \
            contextlib.redirect_stderr(log), warnings.catch_warnings():
        warnings.simplefilter("default")  # each warning once per place, into the log (whoever set showwarning before)
        warnings.showwarning = lambda message, category, filename, lineno, file=None, line=None: log.write(
            warnings.formatwarning(message, category, filename, lineno, line))
        _terminals.append(shown)
        try:
            yield shown
        finally:
            _terminals.pop()


@contextlib.contextmanager
def _stream_handlers_to(log: TextIO, streams: tuple[Any, ...]) -> Iterator[None]:
    """Point every logging handler that writes to one of the terminal's `streams` at `log`; restore them at the end."""
    terminal_streams = {id(stream) for stream in streams}
    loggers = [logging.getLogger()] + [item for item in logging.root.manager.loggerDict.values() if isinstance(item, logging.Logger)]
    moved: list[tuple[logging.StreamHandler, Any]] = []
    for handler in {handler for item in loggers for handler in item.handlers}:
        follows = isinstance(getattr(type(handler), "stream", None), property)  # writes to sys.stderr as it is: redirected already
        if isinstance(handler, logging.StreamHandler) and not isinstance(handler, logging.FileHandler) and not follows \
                and id(handler.stream) in terminal_streams:
            moved.append((handler, handler.setStream(log)))
    try:
        yield
    finally:
        for handler, stream in moved:
            handler.setStream(stream)
