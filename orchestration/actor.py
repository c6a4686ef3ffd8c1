"""The coordinator as a named Ray actor: a thin shell that builds the advisor client inside the
actor process and forwards every call to a plain `Coordinator`.

One actor per run (`get_or_create_coordinator`, `get_if_exists=True`), so rank 0 of every worker
group of that run, including a restarted one, reaches the same coordinator.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import ray

from orchestration.config import CoordinatorConfig
from orchestration.coordinator import AdvisorPort, Coordinator
from orchestration.protocol import Decision, ProbationMetrics, TrainingSnapshot, Verdict


@ray.remote(num_cpus=0)
class CoordinatorActor:
    """Ray actor around `Coordinator`. `advisor_factory` (any picklable callable, e.g.
    `functools.partial(serve_llm.client.make_client, advisor_config)`) is called inside the actor:
    Serve handles and HTTP sessions are made where they are used."""

    def __init__(self, config: CoordinatorConfig, run_id: str = "run", advisor_factory: Callable[[], AdvisorPort] | None = None,
                 state: dict[str, Any] | None = None) -> None:
        advisor = advisor_factory() if advisor_factory is not None else None
        if state is None:
            self.coordinator = Coordinator(config, advisor, run_id)
        else:
            self.coordinator = Coordinator.from_state(state, config=config, advisor=advisor, run_id=run_id)

    def on_epoch_end(self, snapshot: TrainingSnapshot, weight_drift: float = 0.0) -> Decision:
        return self.coordinator.on_epoch_end(snapshot, weight_drift)

    def report_probation(self, query_id: str, candidate: ProbationMetrics, reference: ProbationMetrics, *,
                         epoch: int | None = None, step: int = 0) -> Verdict:
        return self.coordinator.report_probation(query_id, candidate, reference, epoch=epoch, step=step)

    def report_apply_failed(self, query_id: str, problem: str, *, epoch: int | None = None, step: int = 0) -> None:
        self.coordinator.report_apply_failed(query_id, problem, epoch=epoch, step=step)

    def report_incident(self, problem: str, *, epoch: int, step: int = 0, query_id: str = "") -> None:
        self.coordinator.report_incident(problem, epoch=epoch, step=step, query_id=query_id)

    def summary_counts(self) -> dict[str, int]:
        return self.coordinator.summary_counts()

    def ledger_records(self) -> list[dict[str, Any]]:
        return self.coordinator.ledger_records()

    def write_ledger(self, path: str) -> str:
        return self.coordinator.write_ledger(path)

    def to_state(self) -> dict[str, Any]:
        return self.coordinator.to_state()

    def load_state(self, state: dict[str, Any]) -> None:
        self.coordinator.load_state(state)


def get_or_create_coordinator(name: str, namespace: str | None = None, *, config: CoordinatorConfig, run_id: str = "run",
                              advisor_factory: Callable[[], AdvisorPort] | None = None, state: dict[str, Any] | None = None,
                              detached: bool = False) -> ray.actor.ActorHandle:
    """The named coordinator actor, created on first call (`get_if_exists=True`).

    Later calls return the existing actor and ignore the other arguments, so every worker of a
    run (and a restarted driver, with `detached=True`) reaches the same coordinator.
    """
    options: dict[str, Any] = {"name": name, "namespace": namespace, "get_if_exists": True}
    if detached:
        options["lifetime"] = "detached"
    return CoordinatorActor.options(**options).remote(config, run_id, advisor_factory=advisor_factory, state=state)
