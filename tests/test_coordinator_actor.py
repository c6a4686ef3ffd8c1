"""End to end on Ray: the named CoordinatorActor through one query -> apply -> verdict cycle."""

from __future__ import annotations

import sys
from concurrent.futures import Future

import pandas as pd
import pytest

from orchestration.protocol import ProbationMetrics
from orchestration.actor import get_or_create_coordinator
from orchestration.protocol import Apply, Continue
from orchestration.config import CoordinatorConfig
from orchestration.population import RunNotOpen
from orchestration.protocol import AdvisorResponse, LayerStats, Proposal, TrainingSnapshot, WeightOp

PROPOSAL = Proposal(weights=[WeightOp(op="shrink", group="fc.weight", amount=0.2)], reason="overfitting")


class InstantAdvisor:
    """An in-process advisor that answers every snapshot at once with the same proposal."""

    def submit(self, snapshot: TrainingSnapshot) -> Future:
        future: Future = Future()
        future.set_result(AdvisorResponse(proposal=PROPOSAL, status="valid", latency_s=0.01, backend="fake", model="fake"))
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
def test_one_actor_coordinates_a_population_of_runs_sharing_the_cache(ray_local, tmp_path):
    """Run "a" goes through query -> apply -> accepted verdict; run "b", opened in the same actor with
    its own settings, is answered from the cache entry "a" stored, and keeps its own ledger."""
    # The test module is not importable on Ray workers; ship its classes by value.
    ray_local.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    config = CoordinatorConfig(burn_in_epochs=1, query_interval=1, probation_steps=5, ask_when_healthy=True)
    coordinator = get_or_create_coordinator("coordinator-e2e", config=config, advisor_factory=InstantAdvisor)
    same = get_or_create_coordinator("coordinator-e2e", config=config)
    assert same._actor_id == coordinator._actor_id
    assert ray_local.get(coordinator.open_run.remote("a", config, "run-a"))
    assert not ray_local.get(coordinator.open_run.remote("a", config, "run-a"))  # reopening changes nothing

    get = ray_local.get
    assert get(coordinator.on_epoch_end.remote("a", snapshot_at(0))) == Continue("no query trigger")
    asked = get(coordinator.on_epoch_end.remote("a", snapshot_at(1)))
    assert isinstance(asked, Continue) and "asked advisor" in asked.reason
    decision = get(coordinator.on_epoch_end.remote("a", snapshot_at(2)))
    assert isinstance(decision, Apply)
    assert decision.proposal == PROPOSAL and decision.alphas == {"fc.weight": 0.1}
    assert decision.probation_steps == 5

    candidate = ProbationMetrics(val_loss=0.7, val_accuracy=0.8, train_loss=0.65)
    reference = ProbationMetrics(val_loss=0.8, val_accuracy=0.78, train_loss=0.75)
    assert get(coordinator.report_probation.remote("a", decision.query_id, candidate, reference)).accepted

    other = CoordinatorConfig(burn_in_epochs=1, query_interval=1, probation_steps=3, ask_when_healthy=True)  # a trial's own, tuned settings
    ray_local.get(coordinator.open_run.remote("b", other, "run-b"))
    get(coordinator.on_epoch_end.remote("b", snapshot_at(0)))
    hit = get(coordinator.on_epoch_end.remote("b", snapshot_at(1)))
    assert isinstance(hit, Apply) and hit.source == "cache" and hit.proposal == PROPOSAL and hit.probation_steps == 3
    stats = ray_local.get(coordinator.stats.remote())
    assert stats["runs_open"] == ["a", "b"] and stats["cache_hits"] == 1 and stats["shared_cache_hits"] == 1

    assert get(coordinator.summary_counts.remote("a"))["advisor_queries"] == 1
    path = get(coordinator.write_ledger.remote("a", str(tmp_path / "ledger.csv")))
    assert list(pd.read_csv(path)["kind"]) == ["query", "proposal", "verdict"]
    state = ray_local.get(coordinator.close_run.remote("a"))
    assert state["alphas"]["alphas"] == {"fc.weight": pytest.approx(0.15)}
    with pytest.raises(ray_local.exceptions.RayTaskError, match="not open") as raised:
        get(coordinator.summary_counts.remote("a"))
    assert isinstance(raised.value.cause, RunNotOpen) and raised.value.cause.run == "a"  # what the link tells a restart by
    records = get(coordinator.ledger_records.remote("b"))
    assert [record["kind"] for record in records] == ["cache_hit", "proposal"] and "learned by run run-a" in records[0]["reason"]
    assert ray_local.get(coordinator.discard_under.remote("b")) == ["b"]
    ray_local.kill(coordinator)
