"""End to end on Ray: the named CoordinatorActor through one query -> apply -> verdict cycle."""

from __future__ import annotations

import sys
from concurrent.futures import Future
from dataclasses import dataclass, field

import pandas as pd
import pytest

from orchestration.protocol import ProbationMetrics
from orchestration.actor import get_or_create_coordinator
from orchestration.protocol import Apply, Continue
from orchestration.config import CoordinatorConfig
from orchestration.protocol import LayerStats, Proposal, TrainingSnapshot, WeightOp

PROPOSAL = Proposal(weights=[WeightOp(op="shrink", group="fc.weight", amount=0.2)], reason="overfitting")


@dataclass
class InstantAnswer:
    """Duck-typed `serve_llm.validate.AdvisorResponse`."""

    proposal: Proposal | None
    status: str = "valid"
    problems: list[str] = field(default_factory=list)
    raw_text: str = ""
    latency_s: float = 0.01
    backend: str = "fake"
    model: str = "fake"


class InstantAdvisor:
    """An in-process advisor that answers every snapshot at once with the same proposal."""

    def submit(self, snapshot: TrainingSnapshot) -> Future:
        future: Future = Future()
        future.set_result(InstantAnswer(PROPOSAL))
        return future


def snapshot_at(epoch: int) -> TrainingSnapshot:
    val_loss = [1.0 - 0.1 * e for e in range(epoch + 1)]
    return TrainingSnapshot(
        run_id="e2e",
        epoch=epoch,
        val_loss=val_loss,
        train_loss=[v - 0.05 for v in val_loss],
        layers=[LayerStats(name="fc.weight")],
    )


@pytest.mark.e2e
def test_actor_runs_one_query_apply_verdict_cycle(ray_local, tmp_path):
    # The test module is not importable on Ray workers; ship its classes by value.
    ray_local.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    config = CoordinatorConfig(burn_in_epochs=1, query_interval=1, probation_steps=5)
    coordinator = get_or_create_coordinator(
        "coordinator-e2e", config=config, run_id="e2e", advisor_factory=InstantAdvisor
    )
    same = get_or_create_coordinator("coordinator-e2e", config=config, run_id="ignored")
    assert same._actor_id == coordinator._actor_id

    assert ray_local.get(coordinator.on_epoch_end.remote(snapshot_at(0))) == Continue("no query trigger")
    asked = ray_local.get(coordinator.on_epoch_end.remote(snapshot_at(1)))
    assert isinstance(asked, Continue) and "asked advisor" in asked.reason
    decision = ray_local.get(coordinator.on_epoch_end.remote(snapshot_at(2)))
    assert isinstance(decision, Apply)
    assert decision.proposal == PROPOSAL and decision.alphas == {"fc.weight": 0.1}
    assert decision.probation_steps == 5

    candidate = ProbationMetrics(val_loss=0.7, val_accuracy=0.8, train_loss=0.65)
    reference = ProbationMetrics(val_loss=0.8, val_accuracy=0.78, train_loss=0.75)
    verdict = ray_local.get(coordinator.report_probation.remote(decision.query_id, candidate, reference))
    assert verdict.accepted

    counts = ray_local.get(coordinator.summary_counts.remote())
    assert counts["advisor_queries"] == 1 and counts["proposals_accepted"] == 1
    path = ray_local.get(coordinator.write_ledger.remote(str(tmp_path / "ledger.csv")))
    assert list(pd.read_csv(path)["kind"]) == ["query", "proposal", "verdict"]
    state = ray_local.get(coordinator.to_state.remote())
    assert state["alphas"]["alphas"] == {"fc.weight": pytest.approx(0.15)}
    ray_local.kill(coordinator)
