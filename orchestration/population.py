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
from typing import Any

from orchestration.cache import ResponseCache
from orchestration.config import CoordinatorConfig
from orchestration.coordinator import AdvisorPort, Coordinator

# What a worker may call on its run's coordinator through the population.
RUN_METHODS = frozenset({"on_epoch_end", "report_probation", "report_apply_failed", "report_incident", "summary_counts", "telemetry",
                         "ledger_records", "write_ledger", "to_state", "load_state"})


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

    def call(self, run: str, method: str, *args: Any, **kwargs: Any) -> Any:
        """`coordinator.<method>(*args, **kwargs)` for `run`'s coordinator, one call per run at a time."""
        if method not in RUN_METHODS:
            raise ValueError(f"{method!r} is not a coordinator call; calls are {sorted(RUN_METHODS)}")
        with self._lock:
            coordinator, lock = self._get(run), self._run_locks[run]
        with lock:
            return getattr(coordinator, method)(*args, **kwargs)

    def stats(self) -> dict[str, Any]:
        """How the population's coordinator was used: runs served and the shared cache's counters."""
        with self._lock:
            open_runs, opened = sorted(self.runs), list(self.opened)
        return {"runs_open": open_runs, "runs_opened": len(opened), "cache_entries": len(self.cache), "cache_hits": self.cache.hits,
                "cache_misses": self.cache.misses, "shared_cache_hits": self.cache.shared_hits}

    def _get(self, run: str) -> Coordinator:
        if run not in self.runs:
            raise KeyError(f"run {run!r} is not open in this coordinator (open: {sorted(self.runs)})")
        return self.runs[run]
