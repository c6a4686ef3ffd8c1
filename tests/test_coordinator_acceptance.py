"""Reward and verdict: the documented formula, thresholds and non-finite losses."""

from __future__ import annotations

import math

import pytest

from orchestration.acceptance import compute_reward, judge
from orchestration.protocol import ProbationMetrics, Verdict
from orchestration.config import CoordinatorConfig

CONFIG = CoordinatorConfig(reward_loss_weight=1.0, reward_accuracy_weight=2.0, reward_gap_weight=0.5)
REFERENCE = ProbationMetrics(val_loss=1.0, val_accuracy=0.6, train_loss=0.8)


def test_reward_formula():
    candidate = ProbationMetrics(val_loss=0.9, val_accuracy=0.65, train_loss=0.6)
    # loss gain 0.1; accuracy gain 2 * 0.05; gap 0.3 vs 0.2 grows by 0.1, penalised 0.5 * 0.1
    assert compute_reward(candidate, REFERENCE, CONFIG) == pytest.approx(0.1 + 0.1 - 0.05)


def test_identical_metrics_give_zero_reward_and_rejection_at_threshold_zero():
    verdict = judge(REFERENCE, REFERENCE, CONFIG)
    assert verdict == Verdict(accepted=False, reward=0.0, reason=verdict.reason)
    assert "<=" in verdict.reason


def test_shrinking_gap_is_not_rewarded_and_missing_terms_are_zero():
    candidate = ProbationMetrics(val_loss=1.0, val_accuracy=0.6, train_loss=0.95)
    assert compute_reward(candidate, REFERENCE, CONFIG) == 0.0
    assert compute_reward(ProbationMetrics(val_loss=0.5), ProbationMetrics(val_loss=1.0), CONFIG) == 0.5


def test_verdict_follows_threshold():
    better = ProbationMetrics(val_loss=0.95, val_accuracy=0.6, train_loss=0.75)
    assert judge(better, REFERENCE, CONFIG).accepted
    strict = CoordinatorConfig(accept_threshold=0.1)
    assert not judge(better, REFERENCE, strict).accepted


def test_non_finite_losses():
    diverged = ProbationMetrics(val_loss=math.nan)
    assert compute_reward(diverged, REFERENCE, CONFIG) == -math.inf
    assert not judge(diverged, REFERENCE, CONFIG).accepted
    assert compute_reward(REFERENCE, ProbationMetrics(val_loss=math.inf), CONFIG) == math.inf
