"""The learning-rate-free peers, the LR range test and the collapsed run's restart: their pure parts, without Ray."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from orchestration.config import CoordinatorConfig
from orchestration.coordinator import probation_steps
from orchestration.diagnostics import chance_ceiling, collapse, diagnose
from orchestration.policy import QueryPolicy
from orchestration.menu import RESTART_LR_SCALE, action_of, build_menu
from orchestration.protocol import Finding, LayerStats, Proposal, TrainingSnapshot
from orchestration.triage import restrict_to_allowed
from serve_llm.validate import proposal_violations, validate_proposal
from workers.config import TrainConfig
from workers.engine import build_optimizer, warmup_cosine
from workers.lr_find import choose, exponential_lrs, should_stop, smoothed, suggest
from workers.optimizers import effective_lr_factor, group_scalars, reset_value, schedule_free_average, schedule_multiplier


# --- the LR range test -----------------------------------------------------------------------------


def test_exponential_lrs_span_the_range_evenly_in_log() -> None:
    lrs = exponential_lrs(100)
    assert lrs[0] == pytest.approx(1e-8) and lrs[-1] == pytest.approx(1.0)
    ratios = np.diff(np.log(lrs))
    assert np.allclose(ratios, ratios[0])
    with pytest.raises(ValueError, match="at least 2"):
        exponential_lrs(1)


def test_smoothing_is_bias_corrected() -> None:
    assert smoothed([2.0, 2.0, 2.0]) == pytest.approx([2.0, 2.0, 2.0])  # a constant stays itself from the first step
    assert smoothed([1.0, 3.0])[1] == pytest.approx((0.98 * 0.02 * 1 + 0.02 * 3) / (1 - 0.98**2))


def test_stops_at_four_times_the_best_smoothed_loss_or_a_non_finite_one() -> None:
    assert not should_stop([1.0])
    assert not should_stop([1.0, 0.5, 1.9])
    assert should_stop([1.0, 0.5, 2.01])
    assert should_stop([1.0, math.nan])


def _synthetic_curve(steps: int = 100, steepest_at: float = 1e-3) -> tuple[list[float], list[float]]:
    """A loss flat at 2.3 for tiny rates, falling fastest (per decade) at `steepest_at`, then blowing up past 0.1."""
    lrs = exponential_lrs(steps)
    losses = []
    for lr in lrs:
        x = math.log10(lr) - math.log10(steepest_at)
        losses.append(0.3 + 2.0 / (1 + math.exp(3 * x)) + (50 * (lr - 0.1) if lr > 0.1 else 0.0))
    return lrs, losses


def test_the_suggestion_is_the_steepest_descent_per_log_lr() -> None:
    lrs, losses = _synthetic_curve()
    index = suggest(lrs, losses)
    assert lrs[index] == pytest.approx(1e-3, rel=0.25)  # the curve's steepest point, within one step (x1.2) of the grid
    # The first 10 and the last point are never chosen, even when steepest there.
    falling = [10.0 - i for i in range(30)]
    assert suggest(exponential_lrs(30), falling) not in (*range(10), 29)


def test_a_fall_after_a_blow_up_is_never_the_suggestion() -> None:
    """Schedule-free AdamW's range test on digits (ZeRO-1, 2 workers; `tests/test_peers_e2e.py`): the loss fell fastest
    near 3e-3, blew up to 27 past 0.06 and came back down to 2.4 at lr 1, short of the 4x early stop; the steepest
    smoothed fall was then in the recovery, and the suggestion 0.48."""
    losses = [2.309, 2.323, 2.315, 2.328, 2.319, 2.326, 2.313, 2.3, 2.324, 2.315, 2.31, 2.315, 2.327, 2.316, 2.311, 2.319,
              2.314, 2.324, 2.314, 2.32, 2.322, 2.309, 2.306, 2.313, 2.303, 2.316, 2.323, 2.317, 2.319, 2.332,
              2.292, 2.33, 2.31, 2.315, 2.31, 2.327, 2.308, 2.318, 2.314, 2.315, 2.314, 2.31, 2.317, 2.309,
              2.292, 2.312, 2.315, 2.291, 2.29, 2.298, 2.29, 2.288, 2.274, 2.273, 2.271, 2.246, 2.236, 2.209,
              2.195, 2.158, 2.117, 2.054, 1.912, 1.771, 1.723, 1.325, 1.13, 0.9033, 0.9739, 0.6795, 1.003,
              0.6384, 1.425, 0.999, 0.6513, 0.4242, 1.344, 0.403, 2.94, 1.282, 4.227, 16.97, 12.62, 1.44,
              3.231, 7.162, 1.676, 5.948, 3.174, 27.08, 3.459, 9.433, 50.76, 4.103, 26.01, 2.39, 2.496, 2.362,
              2.367, 2.388]
    lrs = exponential_lrs(len(losses))
    assert not any(should_stop(smoothed(losses[:i + 1])) for i in range(len(losses)))
    assert 1e-4 <= lrs[suggest(lrs, smoothed(losses))] < 0.06  # before the blow-up (it picked 0.48; now 0.017)


def test_too_short_a_curve_falls_back_and_says_so() -> None:
    lrs = exponential_lrs(100)
    result = choose(lrs[:11], [2.3] * 5 + [50.0] * 6, fallback_lr=3e-3, planned=100)
    assert result.lr == 3e-3 and result.suggested is None
    assert "stopped after 11 of 100 steps" in result.fallback and result.stopped_early
    found = choose(*_synthetic_curve(), fallback_lr=3e-3, planned=100)
    assert found.fallback == "" and found.lr == found.suggested and len(found.curve) == 100


# --- the peers ---------------------------------------------------------------------------------------


def test_config_resolves_the_default_lr_per_optimizer_and_refuses_nonsense() -> None:
    assert TrainConfig().lr == 3e-3
    assert TrainConfig(optimizer="prodigy").lr == 1.0
    assert TrainConfig(lr="find").lr == "find"
    with pytest.raises(ValueError, match="multiplier"):
        TrainConfig(optimizer="prodigy", lr=3e-3)  # a step size where Prodigy wants its multiplier
    with pytest.raises(ValueError, match="prodigy"):
        TrainConfig(optimizer="prodigy", lr="find")
    with pytest.raises(ValueError, match="train.lr"):
        TrainConfig(lr="fast")
    with pytest.raises(ValueError, match="lr_find_steps"):
        TrainConfig(lr="find", lr_find_steps=5)


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))


def _steps(optimizer: torch.optim.Optimizer, model: nn.Module, count: int = 5) -> None:
    generator = torch.Generator().manual_seed(1)
    for _ in range(count):
        x, y = torch.randn(16, 4, generator=generator), torch.randint(0, 3, (16,), generator=generator)
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()


def test_schedule_free_average_is_what_its_own_eval_computes() -> None:
    model = _model()
    optimizer = build_optimizer(model, TrainConfig(optimizer="schedulefree_adamw", lr=1e-2))
    assert all(group["train_mode"] for group in optimizer.param_groups)  # built in train mode, and it stays there
    _steps(optimizer, model)
    beta1 = optimizer.param_groups[0]["betas"][0]
    ours = {name: schedule_free_average(p.detach().clone(), optimizer.state[p]["z"], beta1) for name, p in model.named_parameters()}
    optimizer.eval()
    for name, param in model.named_parameters():
        assert torch.allclose(ours[name], param.detach(), atol=1e-7), name


def test_prodigy_lr_is_a_multiplier_on_its_estimate() -> None:
    model = _model()
    optimizer = build_optimizer(model, TrainConfig(optimizer="prodigy"))
    assert effective_lr_factor(optimizer) == pytest.approx(1e-6)  # d0 before any step
    _steps(optimizer, model, 40)
    d = float(optimizer.param_groups[0]["d"])
    assert d > 1e-6 and effective_lr_factor(optimizer) == d
    assert [group["d"] for group in group_scalars(optimizer)] == [d]  # the digest and the rollback see d


def test_schedules_per_optimizer() -> None:
    def cosine(step: int) -> float:
        return warmup_cosine(step, warmup_steps=4, total_steps=40, min_lr_ratio=0.05)

    assert [schedule_multiplier("schedulefree_adamw", step, warmup_steps=4, cosine=cosine) for step in (0, 3, 4, 39)] == [0.25, 1.0, 1.0, 1.0]
    assert schedule_multiplier("prodigy", 39, warmup_steps=4, cosine=cosine) == pytest.approx(cosine(39)) and cosine(39) < 0.1


def test_a_restart_resets_moments_but_keeps_the_points_meaningful() -> None:
    model = _model()
    optimizer = build_optimizer(model, TrainConfig(optimizer="schedulefree_adamw"))
    _steps(optimizer, model)
    param = next(model.parameters())
    z = optimizer.state[param]["z"]
    assert torch.equal(reset_value("z", z, param, optimizer), param.detach())  # x = y = z: a fresh start from here
    assert torch.count_nonzero(reset_value("exp_avg_sq", optimizer.state[param]["exp_avg_sq"], param, optimizer)) == 0
    prodigy = build_optimizer(model, TrainConfig(optimizer="prodigy"))
    _steps(prodigy, model)
    assert reset_value("p0", prodigy.state[param]["p0"], param, prodigy) is None  # the start d is measured from stays


# --- the collapsed run ---------------------------------------------------------------------------------


def _snapshot(val_accuracy: list[float], train_loss: list[float], *, num_classes: int = 10, epoch: int | None = None) -> TrainingSnapshot:
    epochs = len(val_accuracy)
    return TrainingSnapshot(epoch=epoch or epochs, step=11 * (epoch or epochs), num_classes=num_classes, val_accuracy=val_accuracy,
                            train_loss=train_loss, val_loss=[2.31] * epochs, train_accuracy=[0.1] * epochs,
                            layers=[LayerStats(name="fc.weight", num_params=10, weight_norm=1.0, update_ratio=0.001)],
                            hyperparameters={"lr": 0.3, "weight_decay": 1e-4, "dropout": 0.1, "momentum": 0.9})


def test_collapse_is_chance_accuracy_with_a_training_loss_that_does_not_fall() -> None:
    assert chance_ceiling(10) == pytest.approx(0.15)
    collapsed = _snapshot([0.1, 0.09], [2.5, 2.31])
    assert collapse(collapsed, diverging=False) is not None
    assert collapse(_snapshot([0.1, 0.09], [2.5, 2.31], num_classes=0), diverging=False) is None  # classes unknown: no reading
    assert collapse(_snapshot([0.1], [2.31]), diverging=False) is None  # one epoch is not enough
    assert collapse(_snapshot([0.1, 0.12], [2.3, 2.0]), diverging=False) is None  # a slow start whose loss falls
    assert collapse(_snapshot([0.1, 0.4], [2.4, 2.3]), diverging=False) is None  # above chance
    assert collapse(_snapshot([0.9, 0.1], [0.3, 9.0]), diverging=True) is not None  # diverged to chance
    diagnosis = diagnose(collapsed)
    assert diagnosis.collapsed and diagnosis.findings()[0] == Finding.COLLAPSED
    assert QueryPolicy(CoordinatorConfig(burn_in_epochs=1)).decide(collapsed, last_query_epoch=1, weight_drift=0.0, in_flight=False,
                                                                    diagnosis=diagnosis).reason.startswith("collapsed")
    assert not diagnosis.underfitting  # tiny updates at chance are not "learning slowly": raising lr is the wrong way


def test_the_menu_restarts_a_collapsed_run_first_from_the_right_point() -> None:
    never_learned = _snapshot([0.1, 0.09], [2.5, 2.31])
    menu = build_menu(never_learned, diagnose(never_learned))
    restart = menu[1]
    assert restart.action == "restart" and restart.remedy == Finding.COLLAPSED
    proposal = Proposal.from_dict(restart.proposal)
    assert proposal.restart == "initial" and proposal.hyperparameters.lr_scale == RESTART_LR_SCALE
    assert action_of(proposal) == "restart" and proposal.summary().startswith("restart(initial)")
    learned = _snapshot([0.8, 0.1, 0.1], [0.5, 2.4, 2.35])
    assert Proposal.from_dict(build_menu(learned, diagnose(learned))[1].proposal).restart == "best"
    damaged = _snapshot([0.23, 0.1, 0.1], [3.9, 2.4, 2.35])  # above chance once, far from learned: its weights are no restart point
    assert Proposal.from_dict(build_menu(damaged, diagnose(damaged))[1].proposal).restart == "initial"


def test_a_restart_is_validated_restricted_and_tried_for_an_epoch() -> None:
    snapshot = _snapshot([0.1, 0.09], [2.5, 2.31])
    response = validate_proposal({"restart": "initial", "hyperparameters": {"lr_scale": 0.1}, "reason": "collapsed"}, snapshot)
    assert response.usable and response.proposal.restart == "initial"
    assert proposal_violations(response.proposal, snapshot) == []
    bad = validate_proposal({"restart": "yesterday", "hyperparameters": {"lr_scale": 0.1}}, snapshot)
    assert bad.proposal.restart == "" and any("restart" in problem for problem in bad.problems)
    assert restrict_to_allowed(response.proposal, CoordinatorConfig(apply_weights=False)).restart == ""
    config = CoordinatorConfig(probation_steps=10, rescue_probation_epochs=2.0)
    at = _snapshot([0.1, 0.09], [2.5, 2.31], epoch=3)  # 33 steps in 3 epochs
    assert probation_steps(response.proposal, at, config) == 22
    assert probation_steps(Proposal.from_dict({"hyperparameters": {"lr_scale": 0.5}}), at, config) == 10
    with pytest.raises(ValueError, match="rescue_probation_epochs"):
        CoordinatorConfig(rescue_probation_epochs=-1)


def test_prodigy_refuses_transfer_learnings_per_block_rates(tmp_path) -> None:
    from cluster.experiment import build_config
    from orchestration.errors import ConfigError

    with pytest.raises(ConfigError, match="prodigy.*model.pretrained"):
        build_config(overrides=["train.optimizer=prodigy", f"model.pretrained={tmp_path}"])
