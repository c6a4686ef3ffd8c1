"""The coordinator as a named Ray actor: a thin shell around a `Population` (the coordinators of
one or more runs, sharing one advisor client and one response cache).

`hybridtrain run` creates one actor per run directory and opens its run in it; `hybridtrain tune`
creates one per sweep, and every trial opens its run in that one. Rank 0 of every worker group of a
run (a restarted one included) reaches it by name and calls it with its run key, one typed method
per coordinator call (`actor.on_epoch_end.remote(run, snapshot, ...)`). The actor is
threaded: runs are served side by side, each run's calls one at a time.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import ray

from orchestration.config import CoordinatorConfig
from orchestration.coordinator import AdvisorPort
from orchestration.population import Population
from orchestration.protocol import Decision, ProbationMetrics, TrainingSnapshot, Verdict

MAX_CONCURRENT_CALLS = 64  # threads of the actor: at least the runs that may wait for an answer at once
MAX_RESTARTS = 3  # the actor is restarted this often if its process dies (workers restore each run's state)


@ray.remote(num_cpus=0, max_concurrency=MAX_CONCURRENT_CALLS)
class CoordinatorActor:
    """Ray actor around `Population`. `advisor_factory` (any picklable callable, e.g.
    `functools.partial(serve_llm.client.make_client, advisor_config)`) is called inside the actor:
    Serve handles and HTTP sessions are made where they are used."""

    def __init__(self, config: CoordinatorConfig, advisor_factory: Callable[[], AdvisorPort] | None = None) -> None:
        self.population = Population(config, advisor_factory() if advisor_factory is not None else None)

    def open_run(self, run: str, config: CoordinatorConfig | None = None, run_id: str = "run") -> bool:
        return self.population.open(run, config=config, run_id=run_id)

    def close_run(self, run: str) -> dict[str, Any]:
        return self.population.close(run)

    def discard_under(self, prefix: str) -> list[str]:
        return self.population.discard_under(prefix)

    # The run calls, each forwarded to `Population.<same name>`: a run that is not open raises
    # `RunNotOpen`, which reaches the caller as a `RayTaskError` whose `cause` it is.

    def on_epoch_end(self, run: str, snapshot: TrainingSnapshot, weight_drift: float = 0.0) -> Decision:
        return self.population.on_epoch_end(run, snapshot, weight_drift)

    def report_probation(self, run: str, query_id: str, candidate: ProbationMetrics, reference: ProbationMetrics, *,
                         epoch: int | None = None, step: int = 0) -> Verdict:
        return self.population.report_probation(run, query_id, candidate, reference, epoch=epoch, step=step)

    def report_apply_failed(self, run: str, query_id: str, problem: str, *, epoch: int | None = None, step: int = 0) -> None:
        return self.population.report_apply_failed(run, query_id, problem, epoch=epoch, step=step)

    def report_incident(self, run: str, problem: str, *, epoch: int, step: int = 0, query_id: str = "") -> None:
        return self.population.report_incident(run, problem, epoch=epoch, step=step, query_id=query_id)

    def summary_counts(self, run: str) -> dict[str, int]:
        return self.population.summary_counts(run)

    def telemetry(self, run: str) -> dict[str, Any]:
        return self.population.telemetry(run)

    def ledger_records(self, run: str) -> list[dict[str, Any]]:
        return self.population.ledger_records(run)

    def write_ledger(self, run: str, path: str | Path) -> str:
        return self.population.write_ledger(run, path)

    def to_state(self, run: str) -> dict[str, Any]:
        return self.population.to_state(run)

    def load_state(self, run: str, state: dict[str, Any]) -> None:
        return self.population.load_state(run, state)

    def stats(self) -> dict[str, Any]:
        return self.population.stats()

    def node_id(self) -> str:
        return ray.get_runtime_context().get_node_id()


def get_or_create_coordinator(name: str, namespace: str | None = None, *, config: CoordinatorConfig,
                              advisor_factory: Callable[[], AdvisorPort] | None = None, detached: bool = False) -> ray.actor.ActorHandle:
    """The named coordinator actor, created on first call (`get_if_exists=True`).

    Later calls return the existing actor and ignore the other arguments, so every run of a sweep
    (and a restarted driver, with `detached=True`) reaches the same coordinator.
    """
    # A dead coordinator comes back (empty); each run's rank 0 opens its run again with the state it last saw.
    options: dict[str, Any] = {"name": name, "namespace": namespace, "get_if_exists": True, "max_restarts": MAX_RESTARTS}
    if detached:
        options["lifetime"] = "detached"
    return CoordinatorActor.options(**options).remote(config, advisor_factory=advisor_factory)
