"""Choosing, not inventing: the menu built from the diagnosis, the pick's validation, significant acceptance."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest

from orchestration.acceptance import judge, reward_noise
from orchestration.config import CoordinatorConfig
from orchestration.coordinator import Coordinator
from orchestration.diagnostics import diagnose, is_diverging
from orchestration.menu import action_of, build_menu, finding_present, track_records
from orchestration.protocol import (
    Apply,
    Diagnosis,
    Finding,
    HyperparameterChange,
    LayerStats,
    MenuOption,
    ProbationMetrics,
    Proposal,
    ProposalOutcome,
    TrainingSnapshot,
    WeightOp,
)
from serve_llm.backends import HeuristicBackend, _orders
from serve_llm.validate import validate_choice

LAYERS = [LayerStats(name="fc1.weight", num_params=64, update_ratio=0.05), LayerStats(name="fc2.weight", num_params=20, update_ratio=0.02)]


def state(**overrides) -> TrainingSnapshot:
    values = dict(epoch=6, total_epochs=20, train_loss=[1.0, 0.8, 0.6, 0.5, 0.45, 0.41], val_loss=[1.0, 0.82, 0.63, 0.53, 0.48, 0.44],
                  val_accuracy=[0.5, 0.6, 0.7, 0.75, 0.78, 0.8], hyperparameters={"lr": 1e-3, "weight_decay": 1e-4, "dropout": 0.1},
                  layers=LAYERS)
    return TrainingSnapshot(**(values | overrides))


def actions(menu) -> dict[str, str]:
    return {option.action: option.remedy for option in menu}


def test_findings_are_the_words_they_always_were() -> None:
    assert [finding.value for finding in Finding] == ["collapsed", "diverging", "learning rate too high", "overfitting", "dead units", "learning slowly",
                                                    "plateau"]  # collapsed: issue 24's restart, a new word before the old ones
    assert Diagnosis(plateau=True, dead_groups=["fc1.weight"], too_fast=True).findings() == [Finding.TOO_FAST, Finding.DEAD_UNITS, Finding.PLATEAU]
    read_back = MenuOption(key="A", action="lr_down", label="halve lr", remedy="plateau")  # a menu read back from JSON
    assert read_back.remedy is Finding.PLATEAU and json.dumps(read_back.remedy) == '"plateau"' and f"for {read_back.remedy}" == "for plateau"
    assert diagnose(state(val_loss=[1.0, 0.99, 0.99, 0.99, 0.99, 0.99])).notes[0].startswith(f"{Finding.PLATEAU}: ")


def test_a_healthy_state_offers_keep_first_and_prefers_it() -> None:
    menu = build_menu(state(), Diagnosis())
    assert [option.key for option in menu] == ["A", "B", "C"] and menu[0].action == "keep"
    assert actions(menu) == {"keep": "", "lr_down": "", "lr_up": ""}  # no finding calls for either lr move
    assert menu[0].prior > max(option.prior for option in menu[1:])


@pytest.mark.parametrize(
    ("diagnosis", "remedy_action", "check"),
    [
        (Diagnosis(plateau=True), "lr_down", lambda p: p.hyperparameters.lr_scale == 0.5),
        (Diagnosis(underfitting=True), "lr_up", lambda p: p.hyperparameters.lr_scale == 3.0),
        (Diagnosis(diverging=True), "rescue", lambda p: p.hyperparameters.lr_scale == 0.3 and {op.op for op in p.weights} == {"toward_best"}),
        (Diagnosis(overfitting=True), "regularise", lambda p: p.hyperparameters.weight_decay > 1e-4 and p.hyperparameters.dropout > 0.1),
        (Diagnosis(dead_groups=["fc1.weight"]), "reinit_dead", lambda p: [op.group for op in p.weights] == ["fc1.weight"]),
    ],
)
def test_each_finding_brings_its_remedy_and_it_outranks_keep(diagnosis, remedy_action, check) -> None:
    menu = build_menu(state(), diagnosis)
    remedy = next(option for option in menu if option.action == remedy_action)
    assert remedy.remedy and check(Proposal.from_dict(remedy.proposal))
    assert remedy.prior > menu[0].prior  # something is wrong: keep is no longer the default
    assert action_of(Proposal.from_dict(remedy.proposal)) == remedy_action
    assert len(menu) <= 6 and len({option.key for option in menu}) == len(menu)


def test_the_track_record_lowers_an_action_that_kept_failing() -> None:
    rejected = [ProposalOutcome(epoch=e, summary="lr_scale=0.5", verdict="rejected", reward=-0.1, action="lr_down") for e in (3, 6, 9)]
    assert track_records(rejected)["lr_down"].tried == 3 and track_records(rejected)["lr_down"].kept == 0
    fresh = next(o for o in build_menu(state(), Diagnosis(plateau=True)) if o.action == "lr_down")
    tried = next(o for o in build_menu(state(), Diagnosis(plateau=True), rejected) if o.action == "lr_down")
    keep = build_menu(state(), Diagnosis(plateau=True), rejected)[0]
    assert tried.prior < fresh.prior and tried.prior <= keep.prior  # after three rejections keep wins (ties go to the earlier option)
    assert "tried 3x" in tried.label and "kept 0x" in tried.label


def test_action_families() -> None:
    assert action_of(Proposal()) == "keep"
    assert action_of(Proposal(hyperparameters=HyperparameterChange(lr_scale=2.0))) == "lr_up"
    assert action_of(Proposal(hyperparameters=HyperparameterChange(dropout=0.3))) == "regularise"
    assert action_of(Proposal(weights=[WeightOp(op="shrink", group="g", amount=0.1)])) == "other"


@pytest.mark.parametrize("text", ["B", " B.", "b", '{"choice": "B"}'])
def test_a_pick_on_the_menu_gives_that_options_proposal(text) -> None:
    snapshot = state(menu=build_menu(state(), Diagnosis(plateau=True)))
    response = validate_choice(text, snapshot, scores={"A": 0.3, "B": 0.5, "C": 0.2})
    assert response.usable and response.choice == "B"
    assert response.proposal.hyperparameters.lr_scale == 0.5
    assert response.proposal.reason.startswith("advisor chose B (p=0.50)")


@pytest.mark.parametrize("text", ["Z", "", "B C", "ignore the menu and set lr to 100", '{"choice": "Q"}', "A" * 5000])
def test_a_pick_off_the_menu_is_rejected(text) -> None:
    snapshot = state(menu=build_menu(state(), Diagnosis(plateau=True)))
    response = validate_choice(text, snapshot)
    assert response.status == "rejected" and response.proposal is None and "no option on the menu" in response.problems[0]


def test_the_heuristic_chooses_the_remedy_or_keep() -> None:
    plateau = state(menu=build_menu(state(), Diagnosis(plateau=True)))
    healthy = state(menu=build_menu(state(), Diagnosis()))
    backend = HeuristicBackend()
    assert backend.propose_batch([plateau])[0].proposal.hyperparameters.lr_scale == 0.5
    assert backend.propose_batch([healthy])[0].proposal.is_noop()


def test_menu_orders_cancel_position() -> None:
    assert _orders(3, 2) == [[0, 1, 2], [2, 1, 0]]
    orders = _orders(4, 9)
    assert len(orders) == 5 and all(sorted(order) == [0, 1, 2, 3] for order in orders)
    # over all orders, every option sits in every position at least once
    assert all({order[position] for order in orders} == {0, 1, 2, 3} for position in range(4))


def paired(losses: list[float], correct: list[int]) -> ProbationMetrics:
    return ProbationMetrics(val_loss=sum(losses) / len(losses), val_accuracy=sum(correct) / len(correct), train_loss=0.1,
                            sample_losses=tuple(losses), sample_correct=tuple(correct))


def test_a_gain_inside_the_probations_noise_is_rejected() -> None:
    config = CoordinatorConfig()
    reference = paired([1.0, 2.0, 0.5, 1.5] * 25, [1, 0, 1, 0] * 25)
    # tiny mean gain, large per-sample disagreement: noise
    noisy = paired([1.0 + (0.3 if i % 2 else -0.31) for i in range(100)], [1, 0, 1, 0] * 25)
    noisy = dataclasses.replace(noisy, sample_losses=tuple(r + d for r, d in zip(reference.sample_losses, [(0.3 if i % 2 else -0.31) for i in range(100)])))
    noisy = dataclasses.replace(noisy, val_loss=sum(noisy.sample_losses) / 100)
    verdict = judge(noisy, reference, config)
    assert 0 < verdict.reward < 2 * reward_noise(noisy, reference, config)
    assert not verdict.accepted and "x noise" in verdict.reason
    assert judge(noisy, reference, dataclasses.replace(config, accept_significance=0.0)).accepted  # the old gate let it through


def test_a_consistent_gain_is_accepted() -> None:
    config = CoordinatorConfig()
    reference = paired([1.0, 2.0, 0.5, 1.5] * 25, [1, 0, 1, 0] * 25)
    better = paired([value * 0.9 for value in reference.sample_losses], list(reference.sample_correct))
    verdict = judge(better, reference, config)
    assert verdict.accepted and verdict.reward > 2 * reward_noise(better, reference, config)


def test_without_per_sample_values_no_margin_applies() -> None:
    config = CoordinatorConfig()
    verdict = judge(ProbationMetrics(val_loss=0.99), ProbationMetrics(val_loss=1.0), config)
    assert verdict.accepted and reward_noise(ProbationMetrics(val_loss=0.99), ProbationMetrics(val_loss=1.0), config) is None


def test_slow_learning_is_a_finding_and_rising_val_loss_with_steady_accuracy_is_not_divergence() -> None:
    slow = state(val_accuracy=[0.2, 0.22, 0.24, 0.26, 0.28, 0.3], train_loss=[2.0, 1.98, 1.96, 1.94, 1.92, 1.9],
                 val_loss=[2.0, 1.98, 1.96, 1.94, 1.92, 1.9], layers=[dataclasses.replace(layer, update_ratio=0.002) for layer in LAYERS])
    assert diagnose(slow).underfitting and not diagnose(state()).underfitting
    # train loss keeps falling, accuracy holds: overfitting, not divergence
    assert is_diverging([0.01, 0.005, 0.004], [0.03, 0.032, 0.05], 1.5, [0.98, 0.98, 0.98]) is None
    assert is_diverging([0.5, 0.6, 0.7], [0.5, 0.6, 0.9], 1.5, [0.9, 0.8, 0.6]) is not None


def plateau_state(epoch: int) -> TrainingSnapshot:
    return state(epoch=epoch, train_loss=[0.5, 0.45, 0.44, 0.44, 0.44, 0.44], val_loss=[0.5, 0.48, 0.48, 0.48, 0.48, 0.48])


def test_the_coordinator_sends_a_menu_and_drops_a_late_pick_whose_finding_is_gone(answers) -> None:
    advisor = answers
    coordinator = Coordinator(CoordinatorConfig(query_interval=0, max_answer_age_epochs=8), advisor)
    coordinator.on_epoch_end(plateau_state(5))
    sent = advisor.futures[0][0]
    assert [option.action for option in sent.menu][:2] == ["keep", "lr_down"] and sent.menu[1].remedy == "plateau"
    advisor.futures[0][1].set_result(validate_choice("B", sent))
    # the plateau is over by the time the pick is read: improving steadily again
    decision = coordinator.on_epoch_end(state(epoch=8))
    assert not isinstance(decision, Apply)
    stale = [row for row in coordinator.ledger_records() if row["kind"] == "stale"]
    assert stale and "plateau" in stale[0]["reason"] and "gone" in stale[0]["reason"]


def test_a_pick_whose_finding_persists_goes_on_probation_and_joins_the_track_record(answers) -> None:
    advisor = answers
    coordinator = Coordinator(CoordinatorConfig(query_interval=0), advisor)
    coordinator.on_epoch_end(plateau_state(5))
    advisor.futures[0][1].set_result(validate_choice("B", advisor.futures[0][0]))
    decision = coordinator.on_epoch_end(plateau_state(6))
    assert isinstance(decision, Apply) and decision.proposal.hyperparameters.lr_scale == 0.5
    coordinator.report_probation(decision.query_id, ProbationMetrics(val_loss=0.5), ProbationMetrics(val_loss=0.48))
    assert coordinator.outcomes[-1].action == "lr_down" and coordinator.outcomes[-1].verdict == "rejected"
    assert finding_present(Diagnosis(plateau=True), "plateau") and not finding_present(Diagnosis(), "plateau")
    assert math.isfinite(coordinator.outcomes[-1].reward)


def _layers(*ratios: float, dead: float = 0.0) -> list[LayerStats]:
    return [LayerStats(name=f"l{index}.weight", num_params=64, update_ratio=ratio, dead_fraction=dead) for index, ratio in enumerate(ratios)]


def test_large_steps_without_progress_read_as_a_learning_rate_too_high_and_cut_it_before_anything_else() -> None:
    # the median group moves 0.2 of its norm per epoch while validation loss sits 20 % above its best
    lurching = state(val_loss=[1.0, 0.6, 0.5, 0.7, 0.62, 0.6], train_loss=[1.0, 0.7, 0.55, 0.6, 0.58, 0.56], layers=_layers(0.2, 0.25, 0.18, dead=0.98))
    diagnosis = diagnose(lurching)
    assert diagnosis.too_fast and any(note.startswith("learning rate too high") for note in diagnosis.notes)
    assert not diagnosis.dead_groups and not diagnosis.underfitting  # units a too-high rate killed would die again
    menu = build_menu(lurching, diagnosis)
    first = next(option for option in menu if option.remedy)
    assert first.action == "lr_down" and first.proposal["hyperparameters"]["lr_scale"] == 0.3
    assert finding_present(diagnosis, first.remedy)
    # one group lurching is enough, even with the median tiny (a dead net whose head thrashes)
    assert diagnose(state(layers=_layers(0.0001, 0.0002, 0.9))).too_fast
    # the same step sizes while validation loss keeps falling are a healthy start, not a finding
    assert not diagnose(state(layers=_layers(0.2, 0.25, 0.18))).too_fast


def test_a_large_gap_is_overfitting_even_when_it_no_longer_grows() -> None:
    steady_gap = state(train_loss=[0.3, 0.2, 0.1, 0.06, 0.05, 0.05], val_loss=[0.35, 0.3, 0.25, 0.2, 0.19, 0.185])
    diagnosis = diagnose(steady_gap)
    assert diagnosis.overfitting and "3.7x train loss" in diagnosis.notes[-1]
    assert next(option for option in build_menu(steady_gap, diagnosis) if option.remedy).action == "regularise"
    assert not diagnose(state(train_loss=[0.3, 0.2, 0.1, 0.06, 0.05, 0.03], val_loss=[0.3, 0.2, 0.12, 0.08, 0.07, 0.07])).overfitting  # gap < 0.1


@pytest.mark.parametrize(("median_step", "raise_by"), [(0.025, 3.0), (0.01, 6.0), (0.0083, 7.0), (0.002, 10.0)])
def test_the_learning_rate_raise_scales_with_how_slowly_the_weights_move(median_step: float, raise_by: float) -> None:
    """Learning slowly at a median update ratio r: raise lr by round(0.06 / r) within [3, 10], the step that brings
    the median update to the middle of the healthy band (0.03..0.12), since Adam's steps scale with the lr."""
    slow = state(layers=[dataclasses.replace(layer, update_ratio=median_step) for layer in LAYERS],
                 train_loss=[1.0, 0.9, 0.85, 0.8, 0.78, 0.76], val_loss=[1.0, 0.9, 0.85, 0.8, 0.78, 0.76])
    diagnosis = diagnose(slow)
    assert diagnosis.underfitting and diagnosis.lr_raise == raise_by
    option = next(option for option in build_menu(slow, diagnosis) if option.action == "lr_up")
    assert option.proposal["hyperparameters"]["lr_scale"] == raise_by and f"{raise_by:g}x" in option.label
    assert HeuristicBackend().propose_batch([dataclasses.replace(slow, diagnosis=diagnosis, menu=build_menu(slow, diagnosis))])[0] \
        .proposal.hyperparameters.lr_scale == raise_by
