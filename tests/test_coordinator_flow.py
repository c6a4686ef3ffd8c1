"""The Coordinator as a state machine, driven by a scripted advisor whose futures the test controls."""

from __future__ import annotations

import dataclasses
import json
import pickle
from concurrent.futures import Future

import pandas as pd
import pytest

from orchestration.protocol import ProbationMetrics
from orchestration.coordinator import Coordinator
from orchestration.protocol import Apply, Continue
from orchestration.config import CoordinatorConfig
from orchestration.protocol import AdvisorResponse, HyperparameterChange, LayerStats, Proposal, ResponseStatus, TrainingSnapshot, WeightOp


def fake_answer(proposal: Proposal | None, *, status: ResponseStatus = "valid", problems: tuple[str, ...] = ()) -> AdvisorResponse:
    """An advisor's answer as a scripted advisor gives it (valid by default, 0.25 s)."""
    return AdvisorResponse(proposal=proposal, status=status, problems=list(problems), latency_s=0.25, backend="fake", model="fake")


class ScriptedAdvisor:
    """Hands out futures and lets the test decide when and how each is answered."""

    def __init__(self) -> None:
        self.submitted: list[tuple[TrainingSnapshot, Future]] = []

    def submit(self, snapshot: TrainingSnapshot) -> Future:
        future: Future = Future()
        self.submitted.append((snapshot, future))
        return future

    def answer(self, answer: AdvisorResponse, index: int = -1) -> None:
        self.submitted[index][1].set_result(answer)


PROPOSAL = Proposal(
    hyperparameters=HyperparameterChange(lr_scale=0.5),
    weights=[WeightOp(op="shrink", group="features.0.weight", amount=0.1)],
    reason="loss has flattened",
)
GOOD = ProbationMetrics(val_loss=0.7, val_accuracy=0.75, train_loss=0.6)
REFERENCE = ProbationMetrics(val_loss=0.8, val_accuracy=0.7, train_loss=0.7)
BAD = ProbationMetrics(val_loss=0.9, val_accuracy=0.65, train_loss=0.6)


def snapshot_at(epoch: int, history: int = 20) -> TrainingSnapshot:
    """A steadily improving run (no plateau, no divergence) at `epoch`."""
    val_loss = [1.0 * 0.9**e for e in range(epoch + 1)][-history:]
    return TrainingSnapshot(
        run_id="r",
        epoch=epoch,
        step=10 * epoch,
        train_loss=[v * 0.9 for v in val_loss],
        val_loss=val_loss,
        val_accuracy=[0.5] * len(val_loss),
        hyperparameters={"lr": 0.01, "weight_decay": 1e-4, "dropout": 0.1},
        layers=[LayerStats(name="features.0.weight", grad_norm=0.3, update_ratio=0.01)],
    )


def config(**overrides) -> CoordinatorConfig:
    settings = {"query_interval": 2, "burn_in_epochs": 2, "plateau_window": 100, "history_window": 4, "ask_when_healthy": True}
    return CoordinatorConfig(**{**settings, **overrides})


@pytest.fixture
def advisor() -> ScriptedAdvisor:
    return ScriptedAdvisor()


def ask_and_apply(coordinator: Coordinator, advisor: ScriptedAdvisor, epoch: int) -> Apply:
    """Drive one query at `epoch` and its answer at `epoch + 1`."""
    assert isinstance(coordinator.on_epoch_end(snapshot_at(epoch)), Continue)
    advisor.answer(fake_answer(PROPOSAL))
    decision = coordinator.on_epoch_end(snapshot_at(epoch + 1))
    assert isinstance(decision, Apply)
    return decision


def test_query_then_continue_then_apply_then_accept(advisor):
    settings = config(history_window=2)
    coordinator = Coordinator(settings, advisor, run_id="r")
    assert coordinator.on_epoch_end(snapshot_at(0)) == Continue("no query trigger")
    decision = coordinator.on_epoch_end(snapshot_at(2))
    assert isinstance(decision, Continue) and "asked advisor" in decision.reason
    sent = advisor.submitted[0][0]
    assert sent.val_loss == snapshot_at(2).val_loss[-2:]  # trimmed to history_window
    assert coordinator.on_epoch_end(snapshot_at(3)) == Continue("waiting for advisor answer r:q1")

    advisor.answer(fake_answer(PROPOSAL))
    decision = coordinator.on_epoch_end(snapshot_at(4))
    assert decision == Apply(
        query_id="r:q1",
        proposal=PROPOSAL,
        alphas={"features.0.weight": 0.1},
        source="advisor",
        epoch_asked=2,
        probation_steps=settings.probation_steps,
        reward_mode="counterfactual",
        reset_optimizer_moments=False,
        seed=decision.seed,
    )
    assert coordinator.on_epoch_end(snapshot_at(5)) == Continue("waiting")  # no query during probation

    verdict = coordinator.report_probation("r:q1", GOOD, REFERENCE)
    assert verdict.accepted and verdict.reward > 0
    assert coordinator.alphas.current("features.0.weight") == pytest.approx(0.15)
    assert [record.kind for record in coordinator.ledger.records] == ["query", "proposal", "verdict"]
    assert coordinator.summary_counts()["proposals_accepted"] == 1
    assert len(coordinator.cache) == 1


def test_rejection_records_rollback_lowers_alpha_and_feeds_track_record(advisor):
    coordinator = Coordinator(config(), advisor, run_id="r")
    apply = ask_and_apply(coordinator, advisor, epoch=2)
    verdict = coordinator.report_probation(apply.query_id, BAD, REFERENCE, epoch=4, step=45)
    assert not verdict.accepted
    kinds = [record.kind for record in coordinator.ledger.records]
    assert kinds[-2:] == ["verdict", "rollback"]
    assert coordinator.alphas.current("features.0.weight") == pytest.approx(0.05)
    assert len(coordinator.cache) == 0
    assert coordinator.summary_counts()["proposals_rejected"] == 1

    coordinator.on_epoch_end(snapshot_at(5))  # interval: 3 epochs since the query at epoch 2
    shown = advisor.submitted[-1][0].recent_proposals
    assert [(o.verdict, o.summary) for o in shown] == [("rejected", PROPOSAL.summary())]
    assert shown[0].reward == pytest.approx(verdict.reward)


def test_cache_hit_on_near_identical_snapshot_skips_the_advisor(advisor):
    coordinator = Coordinator(config(query_interval=1, burn_in_epochs=0), advisor, run_id="r")
    apply = ask_and_apply(coordinator, advisor, epoch=1)
    coordinator.report_probation(apply.query_id, GOOD, REFERENCE)

    same_state = snapshot_at(1)
    same_state.epoch = 5
    decision = coordinator.on_epoch_end(same_state)
    assert isinstance(decision, Apply) and decision.source == "cache"
    assert decision.proposal == PROPOSAL
    assert len(advisor.submitted) == 1
    assert coordinator.summary_counts()["cache_hits"] == 1

    coordinator.report_probation(decision.query_id, BAD, REFERENCE)
    assert len(coordinator.cache) == 0  # rejected proposals leave the cache
    assert coordinator.outcomes[-1].summary.startswith("(cached)")


def test_stale_answer_is_dropped(advisor):
    coordinator = Coordinator(config(max_answer_age_epochs=1, query_interval=10), advisor, run_id="r")
    coordinator.on_epoch_end(snapshot_at(2), weight_drift=1.0)
    coordinator.on_epoch_end(snapshot_at(3))
    advisor.answer(fake_answer(PROPOSAL))
    decision = coordinator.on_epoch_end(snapshot_at(4))
    assert isinstance(decision, Continue)
    assert coordinator.ledger.records[-1].kind == "stale"
    assert coordinator.summary_counts()["answers_stale"] == 1
    assert not coordinator.in_flight


def test_unanswered_query_is_abandoned_after_max_age(advisor):
    coordinator = Coordinator(config(max_answer_age_epochs=1, query_interval=3), advisor, run_id="r")
    coordinator.on_epoch_end(snapshot_at(3))
    decision = coordinator.on_epoch_end(snapshot_at(6))  # abandoned, and the interval asks again
    assert [record.kind for record in coordinator.ledger.records] == ["query", "stale", "query"]
    assert advisor.submitted[0][1].cancelled()
    assert "asked advisor" in decision.reason


@pytest.mark.parametrize(
    ("answer", "kind", "count_name"),
    [
        (fake_answer(None, status="rejected", problems=["not JSON"]), "invalid", "proposals_invalid"),
        (fake_answer(None, status="valid"), "invalid", "proposals_invalid"),
        (fake_answer(None, status="timeout"), "timeout", "answers_timeout"),
        (fake_answer(None, status="error", problems=["replica died"]), "error", "errors"),
    ],
)
def test_unusable_answers_are_recorded_and_dropped(advisor, answer, kind, count_name):
    coordinator = Coordinator(config(), advisor, run_id="r")
    coordinator.on_epoch_end(snapshot_at(2))
    advisor.answer(answer)
    assert isinstance(coordinator.on_epoch_end(snapshot_at(3)), Continue)
    record = coordinator.ledger.records[-1]
    assert (record.kind, record.status) == (kind, answer.status)
    assert record.problems == "; ".join(answer.problems)
    assert coordinator.summary_counts()[count_name] == 1
    assert not coordinator.in_flight


def test_clamped_answer_is_applied_with_its_problems_recorded(advisor):
    coordinator = Coordinator(config(), advisor, run_id="r")
    coordinator.on_epoch_end(snapshot_at(2))
    advisor.answer(fake_answer(PROPOSAL, status="clamped", problems=["lr_scale clamped"]))
    assert isinstance(coordinator.on_epoch_end(snapshot_at(3)), Apply)
    assert coordinator.ledger.records[-1].problems == "lr_scale clamped"


def test_suggested_alpha_lowers_and_apply_settings_filter(advisor):
    coordinator = Coordinator(config(apply_hyperparameters=False), advisor, run_id="r")
    coordinator.on_epoch_end(snapshot_at(2))
    suggested = Proposal(hyperparameters=PROPOSAL.hyperparameters, weights=PROPOSAL.weights, alpha=0.05)
    advisor.answer(fake_answer(suggested))
    decision = coordinator.on_epoch_end(snapshot_at(3))
    assert decision.alphas == {"features.0.weight": 0.05}
    assert decision.proposal.hyperparameters.is_empty() and decision.proposal.weights == PROPOSAL.weights


def test_proposal_with_nothing_allowed_is_recorded_as_noop(advisor):
    coordinator = Coordinator(config(apply_weights=False), advisor, run_id="r")
    coordinator.on_epoch_end(snapshot_at(2))
    advisor.answer(fake_answer(Proposal(weights=PROPOSAL.weights)))
    assert isinstance(coordinator.on_epoch_end(snapshot_at(3)), Continue)
    assert coordinator.ledger.records[-1].reason.startswith("no-op")


def test_apply_failure_is_recorded_and_unblocks_queries(advisor):
    coordinator = Coordinator(config(), advisor, run_id="r")
    apply = ask_and_apply(coordinator, advisor, epoch=2)
    coordinator.report_apply_failed(apply.query_id, "group features.0.weight is not gathered")
    assert coordinator.ledger.records[-1].kind == "error" and not coordinator.in_flight
    with pytest.raises(ValueError, match="on probation"):
        coordinator.report_probation(apply.query_id, GOOD, REFERENCE)


def test_advisor_off_changes_nothing_and_records_nothing():
    coordinator = Coordinator(config(burn_in_epochs=0, query_interval=1), None, run_id="r")
    for epoch in range(5):
        assert coordinator.on_epoch_end(snapshot_at(epoch), weight_drift=10.0) == Continue("advisor disabled")
    assert len(coordinator.ledger) == 0


def test_state_round_trip_carries_alphas_cache_ledger_and_track_record(advisor, tmp_path):
    coordinator = Coordinator(config(), advisor, run_id="r")
    apply = ask_and_apply(coordinator, advisor, epoch=2)
    coordinator.report_probation(apply.query_id, GOOD, REFERENCE)
    state = json.loads(json.dumps(coordinator.to_state(), allow_nan=False))

    restored = Coordinator.from_state(state, config=config(), advisor=ScriptedAdvisor())
    assert restored.to_state() == coordinator.to_state()
    assert restored.alphas.current("features.0.weight") == coordinator.alphas.current("features.0.weight")
    restored.on_epoch_end(snapshot_at(9))
    assert restored.ledger.records[-1].query_id == "r:q2"  # query numbering carries on

    frame = pd.read_csv(coordinator.write_ledger(tmp_path / "ledger.csv"))
    assert list(frame["kind"]) == ["query", "proposal", "verdict"]


def test_decisions_pickle(advisor):
    coordinator = Coordinator(config(), advisor, run_id="r")
    apply = ask_and_apply(coordinator, advisor, epoch=2)
    assert pickle.loads(pickle.dumps(apply)) == apply


def test_real_advisor_response_flows_through(advisor):
    from serve_llm import validate  # the project's own module: a broken import must fail, not skip

    coordinator = Coordinator(config(), advisor, run_id="r")
    coordinator.on_epoch_end(snapshot_at(2))
    advisor.answer(validate.AdvisorResponse(proposal=PROPOSAL, status="valid", latency_s=0.5))
    decision = coordinator.on_epoch_end(snapshot_at(3))
    assert isinstance(decision, Apply) and decision.proposal == PROPOSAL
    assert coordinator.ledger.records[-1].latency_s == 0.5


def test_a_probation_lost_to_a_restart_is_closed_and_querying_resumes(advisor):
    coordinator = Coordinator(config(), advisor, run_id="r")
    apply = ask_and_apply(coordinator, advisor, epoch=2)
    applied_at = apply.epoch_asked + 1
    # The worker died during the probation; training replays the same epoch from the previous checkpoint.
    decision = coordinator.on_epoch_end(snapshot_at(applied_at))
    assert not coordinator.in_flight or isinstance(decision, Continue) and "asked advisor" in decision.reason
    errors = [record for record in coordinator.ledger.records if record.kind == "error"]
    assert len(errors) == 1 and "restarted" in errors[0].reason and errors[0].query_id == apply.query_id
    with pytest.raises(ValueError, match="no proposal"):
        coordinator.report_probation(apply.query_id, GOOD, REFERENCE)  # the lost probation cannot be judged late


def test_decisions_say_when_the_coordinator_asked(advisor):
    """Workers measure weight drift from the weights at the last query; the decision tells them when that was."""
    coordinator = Coordinator(config(), advisor, run_id="r")
    assert not coordinator.on_epoch_end(snapshot_at(1)).asked_now
    assert coordinator.on_epoch_end(snapshot_at(2)).asked_now  # interval query sent
    advisor.answer(fake_answer(PROPOSAL))
    applied = coordinator.on_epoch_end(snapshot_at(3))
    assert isinstance(applied, Apply) and not applied.asked_now  # answers a query made at epoch 2


def test_the_prompt_carries_the_coordinators_own_diagnosis(advisor):
    coordinator = Coordinator(config(plateau_window=3, plateau_threshold=0.05), advisor, run_id="r")
    flat = snapshot_at(6)
    flat.val_loss = [0.5] * len(flat.val_loss)
    assert coordinator.on_epoch_end(flat).asked_now
    sent, _ = advisor.submitted[-1]
    assert sent.diagnosis is not None and sent.diagnosis.plateau
    assert any(note.startswith("plateau") for note in sent.diagnosis.notes)


def test_a_query_in_flight_at_a_checkpoint_is_recorded_as_abandoned_when_restored(advisor):
    coordinator = Coordinator(config(), advisor, run_id="r")
    coordinator.on_epoch_end(snapshot_at(2))  # asks; no answer yet
    state = coordinator.to_state()
    restored = Coordinator.from_state(state, config=config(), advisor=ScriptedAdvisor())
    kinds = [record.kind for record in restored.ledger.records]
    assert kinds == ["query", "stale"] and "checkpoint" in restored.ledger.records[-1].reason
    assert not restored.in_flight


def test_worker_incidents_land_in_the_ledger_and_the_counts(advisor):
    coordinator = Coordinator(config(), advisor, run_id="r")
    coordinator.report_incident("could not apply: lr_scale 0.5 cannot change a learning rate that is 0", epoch=7, step=70, query_id="r:q3")
    record = coordinator.ledger.records[-1]
    assert (record.kind, record.epoch, record.query_id) == ("error", 7, "r:q3")
    assert coordinator.summary_counts()["errors"] == 1


def test_telemetry_reports_totals_latency_and_moved_alphas(advisor):
    coordinator = Coordinator(config(), advisor, run_id="r")
    assert coordinator.telemetry() == {"counts": coordinator.ledger.counts(), "latency_s": None, "alphas": {}}
    decision = ask_and_apply(coordinator, advisor, 2)
    coordinator.report_probation(decision.query_id, BAD, REFERENCE)
    telemetry = coordinator.telemetry()
    assert telemetry["counts"]["advisor_queries"] == 1 and telemetry["counts"]["proposals_rejected"] == 1
    assert telemetry["latency_s"] == pytest.approx(0.25)
    assert telemetry["alphas"]["features.0.weight"] < 0.1  # a rejection lowered the group's alpha


def test_a_query_a_finding_triggered_is_waited_for_and_a_routine_one_is_not(advisor):
    import threading

    # learning slowly: tiny updates at low accuracy, validation loss not above training loss
    slow = [LayerStats(name="features.0.weight", grad_norm=0.3, update_ratio=0.001)]

    def answer_soon() -> None:
        threading.Timer(0.3, lambda: advisor.answer(fake_answer(PROPOSAL))).start()

    waiting = Coordinator(config(wait_on_findings_s=10.0, query_interval=0, plateau_window=1), advisor, run_id="r")
    at = lambda epoch: dataclasses.replace(snapshot_at(epoch), layers=slow, train_loss=snapshot_at(epoch).val_loss)  # noqa: E731
    assert "learning slowly" in waiting.on_epoch_end(at(2)).reason
    answer_soon()
    assert isinstance(waiting.on_epoch_end(at(3)), Apply)  # held the boundary until the answer came

    routine = Coordinator(config(wait_on_findings_s=10.0), advisor, run_id="r2")
    assert "interval" in routine.on_epoch_end(snapshot_at(2)).reason
    answer_soon()
    assert routine.on_epoch_end(snapshot_at(3)) == Continue("waiting for advisor answer r2:q1")  # no finding: no wait


def test_a_healthy_state_is_kept_without_asking_and_a_finding_is_asked(advisor):
    """By default (choose mode) a query whose menu answers no finding is kept by the coordinator itself, recorded
    as a "kept" row; the model is not asked. A state with a finding goes to the advisor as before."""
    coordinator = Coordinator(config(ask_when_healthy=False), advisor, run_id="r")
    decision = coordinator.on_epoch_end(snapshot_at(2))
    assert isinstance(decision, Continue) and decision.asked_now and "kept without asking" in decision.reason
    assert advisor.submitted == [] and coordinator.in_flight is False
    records = coordinator.ledger.records
    assert [record.kind for record in records] == ["kept"] and "no finding to answer" in records[0].reason
    assert coordinator.ledger.counts()["kept_unasked"] == 1 and coordinator.ledger.counts()["advisor_queries"] == 0
    assert coordinator.on_epoch_end(snapshot_at(3)) == Continue("no query trigger")  # the look counts for the interval

    slow = [LayerStats(name="features.0.weight", grad_norm=0.3, update_ratio=0.001)]
    at_slow = dataclasses.replace(snapshot_at(4), layers=slow, train_loss=snapshot_at(4).val_loss)
    asked = coordinator.on_epoch_end(at_slow)
    assert "asked advisor" in asked.reason
    assert len(advisor.submitted) == 1 and any(option.remedy == "learning slowly" for option in advisor.submitted[0][0].menu)


def test_no_wait_for_an_answer_whose_finding_is_gone(advisor):
    """A boundary waits for the answer to a finding's query only while that finding is still there: once it is
    gone the answer would be dropped as stale, so waiting for it would only cost time."""
    import time

    slow = [LayerStats(name="features.0.weight", grad_norm=0.3, update_ratio=0.001)]
    at_slow = dataclasses.replace(snapshot_at(2), layers=slow, train_loss=snapshot_at(2).val_loss)
    coordinator = Coordinator(config(wait_on_findings_s=5.0, query_interval=0, plateau_window=1), advisor, run_id="r")
    assert "asked advisor" in coordinator.on_epoch_end(at_slow).reason
    started = time.monotonic()
    assert coordinator.on_epoch_end(snapshot_at(3)) == Continue("waiting for advisor answer r:q1")  # healthy again
    assert time.monotonic() - started < 1.0


RAISE_10X = Proposal(hyperparameters=HyperparameterChange(lr_scale=10.0), reason="learning slowly")


def test_cap_lr_scale_cuts_a_raise_to_reach_the_cap_and_leaves_cuts_alone() -> None:
    from orchestration.coordinator import cap_lr_scale

    assert cap_lr_scale(RAISE_10X, lr_factor=1.0, max_lr_factor=10.0) == (RAISE_10X, "")  # reaches the cap exactly
    capped, note = cap_lr_scale(RAISE_10X, lr_factor=4.0, max_lr_factor=10.0)
    assert capped.hyperparameters.lr_scale == pytest.approx(2.5) and capped.reason == RAISE_10X.reason
    assert note == "lr_scale 10 capped to 2.5: lr would reach 40x train.lr, coordinator.max_lr_factor is 10 (now at 4x)"
    at_cap, _ = cap_lr_scale(RAISE_10X, lr_factor=12.0, max_lr_factor=10.0)  # above the cap already: no raise, and no cut either
    assert at_cap.hyperparameters.lr_scale is None and at_cap.is_noop()
    cut = Proposal(hyperparameters=HyperparameterChange(lr_scale=0.1))
    assert cap_lr_scale(cut, lr_factor=50.0, max_lr_factor=10.0) == (cut, "")
    assert cap_lr_scale(RAISE_10X, lr_factor=1e4, max_lr_factor=0.0) == (RAISE_10X, "")  # 0: no cap
    with pytest.raises(ValueError, match="coordinator.max_lr_factor"):
        CoordinatorConfig(max_lr_factor=0.5)


def test_accepted_lr_raises_stop_compounding_at_the_cap(advisor) -> None:
    """Four accepted 10x raises took 1e-4 to 1.0: each answer is bounded (0.1-10x), their product was not."""
    coordinator = Coordinator(config(cache_enabled=False, max_lr_factor=10.0), advisor)
    lr_factor, applied = 1.0, []
    for epoch in (2, 4, 6, 8):
        asking = dataclasses.replace(snapshot_at(epoch), lr_factor=lr_factor)
        assert isinstance(coordinator.on_epoch_end(asking), Continue)
        advisor.answer(fake_answer(dataclasses.replace(RAISE_10X, weights=list(PROPOSAL.weights))))
        decision = coordinator.on_epoch_end(dataclasses.replace(snapshot_at(epoch + 1), lr_factor=lr_factor))
        assert isinstance(decision, Apply)
        scale = decision.proposal.hyperparameters.lr_scale
        applied.append(scale)
        assert coordinator.report_probation(decision.query_id, GOOD, REFERENCE).accepted
        lr_factor *= scale if scale is not None else 1.0  # what the workers' schedule then holds
    assert applied == [10.0, None, None, None] and lr_factor == 10.0
    capped = [row for row in coordinator.ledger_records() if row["kind"] == "proposal" and "capped" in row["reason"]]
    assert len(capped) == 3 and "coordinator.max_lr_factor is 10 (now at 10x)" in capped[0]["reason"]
    # A raise with nothing else in it is dropped once capped to nothing: recorded, and training goes on.
    assert isinstance(coordinator.on_epoch_end(dataclasses.replace(snapshot_at(10), lr_factor=10.0)), Continue)
    advisor.answer(fake_answer(RAISE_10X))
    decision = coordinator.on_epoch_end(dataclasses.replace(snapshot_at(11), lr_factor=10.0))
    assert isinstance(decision, Continue) and "capped to 1" in decision.reason and not coordinator.in_flight
    assert coordinator.ledger_records()[-1]["reason"].endswith("nothing else to apply")
