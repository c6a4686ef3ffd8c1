"""The coordinators of many runs behind one advisor client and one response cache.

A sweep's trials are a population: each trial's run keeps its own `Coordinator` (its own alphas,
track record, ledger and query timing, configured by its own, possibly tuned, coordinator
settings), while the advisor client and the response cache are the population's, so an answer one
trial learned is reused by another in a similar state. A single `hybridtrain run` is a population
of one.

Runs are opened and closed by key (the launcher uses one key per run directory). Calls into one
run are serialised by that run's lock; calls into different runs may run at once (the Ray actor
around this is threaded), so a run that waits for its answer (`wait_for_answer_s`) holds up only
itself.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from orchestration.cache import ResponseCache
from orchestration.config import CoordinatorConfig
from orchestration.coordinator import AdvisorPort, Coordinator
from orchestration.errors import HybridtrainError
from orchestration.protocol import Decision, ProbationMetrics, TrainingSnapshot, Verdict

_Result = TypeVar("_Result")


class RunNotOpen(HybridtrainError, KeyError):
    """A call named a run this population does not coordinate: never opened, closed, or opened in an
    actor that has since restarted (a restarted actor starts empty, so its workers open the run again:
    `workers.coordinator_link` tells a restart by this class). Still a `KeyError`, as before it had one.
    """

    def __init__(self, run: str, open_runs: list[str]) -> None:
        super().__init__(run, open_runs)
        self.run = run
        self.open_runs = open_runs

    def __str__(self) -> str:
        return f"run {self.run!r} is not open in this coordinator (open: {self.open_runs})"


class Population:
    """Per-run coordinators sharing one advisor and one response cache (see the module docstring)."""

    def __init__(self, config: CoordinatorConfig, advisor: AdvisorPort | None) -> None:
        """`config` sets the shared cache (similarity, quantum, size); each run brings its own config."""
        self.config = config
        self.advisor = advisor
        self.cache = ResponseCache.from_config(config)
        self.runs: dict[str, Coordinator] = {}
        self.opened: list[str] = []  # every run key ever opened, in order
        self._run_locks: dict[str, threading.Lock] = {}
        self._lock = threading.Lock()

    def open(self, run: str, *, config: CoordinatorConfig | None = None, run_id: str = "run") -> bool:
        """Start coordinating `run`; True if it is new. Opening an open run changes nothing (a restarted
        driver or worker group reaches the coordinator it had)."""
        with self._lock:
            if run in self.runs:
                return False
            self.runs[run] = Coordinator(config or self.config, self.advisor, run_id, cache=self.cache)
            self._run_locks[run] = threading.Lock()
            self.opened.append(run)
            return True

    def close(self, run: str) -> dict[str, Any]:
        """Stop coordinating `run` and return its final state (ledger included)."""
        with self._lock:
            coordinator = self._get(run)
            lock = self._run_locks.pop(run)
            del self.runs[run]
        with lock:
            return coordinator.to_state()

    def discard_under(self, prefix: str) -> list[str]:
        """Close, without their state, the open runs whose key starts with `prefix`: runs whose driver
        was killed (a sweep trial paused or stopped by its scheduler) and that will never close."""
        with self._lock:
            gone = [run for run in self.runs if run.startswith(prefix)]
            for run in gone:
                del self.runs[run], self._run_locks[run]
        return gone

    # --- what a worker calls on its run's coordinator (each `Coordinator.<same name>` for `run`) ---

    def on_epoch_end(self, run: str, snapshot: TrainingSnapshot, weight_drift: float = 0.0) -> Decision:
        return self._with_run(run, lambda coordinator: coordinator.on_epoch_end(snapshot, weight_drift))

    def report_probation(self, run: str, query_id: str, candidate: ProbationMetrics, reference: ProbationMetrics, *,
                         epoch: int | None = None, step: int = 0) -> Verdict:
        return self._with_run(run, lambda coordinator: coordinator.report_probation(query_id, candidate, reference, epoch=epoch, step=step))

    def report_apply_failed(self, run: str, query_id: str, problem: str, *, epoch: int | None = None, step: int = 0) -> None:
        return self._with_run(run, lambda coordinator: coordinator.report_apply_failed(query_id, problem, epoch=epoch, step=step))

    def report_incident(self, run: str, problem: str, *, epoch: int, step: int = 0, query_id: str = "") -> None:
        return self._with_run(run, lambda coordinator: coordinator.report_incident(problem, epoch=epoch, step=step, query_id=query_id))

    def summary_counts(self, run: str) -> dict[str, int]:
        return self._with_run(run, lambda coordinator: coordinator.summary_counts())

    def telemetry(self, run: str) -> dict[str, Any]:
        return self._with_run(run, lambda coordinator: coordinator.telemetry())

    def ledger_records(self, run: str) -> list[dict[str, Any]]:
        return self._with_run(run, lambda coordinator: coordinator.ledger_records())

    def write_ledger(self, run: str, path: str | Path) -> str:
        return self._with_run(run, lambda coordinator: coordinator.write_ledger(path))

    def to_state(self, run: str) -> dict[str, Any]:
        return self._with_run(run, lambda coordinator: coordinator.to_state())

    def load_state(self, run: str, state: dict[str, Any]) -> None:
        return self._with_run(run, lambda coordinator: coordinator.load_state(state))

    # --- the population's own --------------------------------------------------------------------

    def stats(self) -> dict[str, Any]:
        """How the population's coordinator was used: runs served and the shared cache's counters."""
        with self._lock:
            open_runs, opened = sorted(self.runs), list(self.opened)
        return {"runs_open": open_runs, "runs_opened": len(opened), "cache_entries": len(self.cache), "cache_hits": self.cache.hits,
                "cache_misses": self.cache.misses, "shared_cache_hits": self.cache.shared_hits}

    def _with_run(self, run: str, call: Callable[[Coordinator], _Result]) -> _Result:
        """`call(coordinator)` on `run`'s coordinator, one call per run at a time (other runs go on meanwhile)."""
        with self._lock:
            coordinator, lock = self._get(run), self._run_locks[run]
        with lock:
            return call(coordinator)

    def _get(self, run: str) -> Coordinator:
        if run not in self.runs:
            raise RunNotOpen(run, sorted(self.runs))
        return self.runs[run]
