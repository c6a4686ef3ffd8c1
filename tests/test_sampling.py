"""Sampling for the research modes: the curriculum's pool and pacing, loss-prioritised batches and their weights."""

from __future__ import annotations

import json
import math
from dataclasses import replace

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from workers.data import shard_batches, steps_per_epoch
from workers.sampling import (CurriculumState, curriculum_pool, next_pool_fraction, pool_batches, selected_batches,
                              selection_probabilities)

scores_lists = st.lists(st.integers(0, 6).map(float) | st.floats(0, 10, allow_nan=False), min_size=1, max_size=200)


def _easiest_by_hand(scores: np.ndarray, size: int) -> np.ndarray:
    key = [(score if math.isfinite(score) else math.inf, position) for position, score in enumerate(scores)]
    return np.sort([position for _, position in sorted(key)[:size]])


# Curriculum: the pool


@settings(max_examples=80, deadline=None)
@given(scores=scores_lists, fraction=st.floats(0.001, 1.0))
def test_the_pool_is_exactly_the_easiest_samples_ties_by_position(scores, fraction) -> None:
    scores = np.array(scores)
    pool = curriculum_pool(scores, fraction)
    size = min(len(scores), max(1, math.ceil(fraction * len(scores) - 1e-9)))
    assert np.array_equal(pool, _easiest_by_hand(scores, size))
    outside = np.setdiff1d(np.arange(len(scores)), pool)
    if len(outside):
        assert scores[pool].max() <= scores[outside].min()


def test_non_finite_scores_are_the_hardest_and_negative_ones_are_allowed() -> None:
    scores = np.array([np.nan, np.inf, -np.inf, 5.0, -1.0, 0.0])
    assert curriculum_pool(scores, 0.5).tolist() == [3, 4, 5]
    assert curriculum_pool(scores, 4 / 6).tolist() == [0, 3, 4, 5]  # the first non-finite, by position
    assert curriculum_pool(scores, 1.0).tolist() == list(range(6))


def test_the_pool_is_at_least_min_size_and_at_most_the_train_split() -> None:
    scores = np.arange(100.0)
    assert len(curriculum_pool(scores, 0.01, min_size=2 * 8 * 2)) == 32  # world_size * batch_size * grad_accum_steps
    assert len(curriculum_pool(scores, 0.01, min_size=500)) == 100
    assert len(curriculum_pool(scores, 0.3)) == 30  # not 31: 0.3 * 100 is 30.000000000000004 in floating point


@pytest.mark.parametrize("scores, fraction, message", [
    (np.zeros((3, 2)), 0.5, r"shape \(N,\), got shape \(3, 2\)"),
    (np.zeros(0), 0.5, "scores is empty"),
    (np.array(["a", "b"]), 0.5, "must be real numbers"),
    (np.zeros(4), 0.0, r"pool fraction must be in \(0, 1\], got 0.0"),
    (np.zeros(4), 1.5, r"pool fraction must be in \(0, 1\], got 1.5"),
    (np.zeros(4), float("nan"), r"pool fraction must be in \(0, 1\], got nan"),
])
def test_the_pool_refuses_bad_input(scores, fraction, message) -> None:
    with pytest.raises(ValueError, match=message):
        curriculum_pool(scores, fraction)


# Curriculum: pacing


def test_the_pool_grows_by_pace_each_epoch_and_reaches_the_full_set() -> None:
    scores = np.random.default_rng(0).exponential(size=200)
    state = CurriculumState(pool_fraction=0.3, pace=0.15)
    fractions, pools = [], []
    for _ in range(7):
        fractions.append(state.pool_fraction)
        pools.append(curriculum_pool(scores, state.pool_fraction))
        state = state.advanced()
    assert fractions == [0.3, 0.45, 0.6, 0.75, 0.9, 1.0, 1.0]
    assert [len(pool) for pool in pools] == [60, 90, 120, 150, 180, 200, 200]
    for smaller, larger in zip(pools, pools[1:]):
        assert np.isin(smaller, larger).all()  # the pool only widens: nothing easy is dropped
    assert np.array_equal(pools[-1], np.arange(200))


@settings(max_examples=60, deadline=None)
@given(start=st.integers(1, 100), pace=st.integers(0, 100), epochs=st.integers(1, 40))
def test_stepwise_pacing_matches_the_closed_formula_while_the_pace_holds(start, pace, epochs) -> None:
    state = CurriculumState(pool_fraction=start / 100, pace=pace / 100)
    for epoch in range(epochs):
        assert state.pool_fraction == min(1.0, (start + pace * epoch) / 100)
        state = state.advanced()


def test_a_pace_changed_mid_run_changes_the_growth_from_then_on() -> None:
    steady = [CurriculumState(pool_fraction=0.2, pace=0.1)]
    for _ in range(4):
        steady.append(steady[-1].advanced())
    repaced = steady[:3]  # the advisor raises the pace after the third epoch
    repaced[-1] = replace(repaced[-1], pace=0.3)
    for _ in range(2):
        repaced.append(repaced[-1].advanced())
    assert [s.pool_fraction for s in steady] == [0.2, 0.3, 0.4, 0.5, 0.6]
    assert [s.pool_fraction for s in repaced] == [0.2, 0.3, 0.4, 0.7, 1.0]
    held = replace(steady[2], pace=0.0)
    assert held.advanced().pool_fraction == 0.4


@pytest.mark.parametrize("current, pace, message", [
    (0.0, 0.1, r"pool fraction must be in \(0, 1\], got 0.0"),
    (0.5, -0.1, "pace must be a finite number >= 0, got -0.1"),
    (0.5, float("inf"), "pace must be a finite number >= 0, got inf"),
])
def test_pacing_refuses_bad_values(current, pace, message) -> None:
    with pytest.raises(ValueError, match=message):
        next_pool_fraction(current, pace)


def test_curriculum_state_round_trips_through_json_and_validates() -> None:
    state = CurriculumState(pool_fraction=0.45, pace=0.15)
    assert CurriculumState.from_dict(json.loads(json.dumps(state.to_dict()))) == state
    with pytest.raises(ValueError, match=r"CurriculumState.pool_fraction must be in \(0, 1\], got 1.2"):
        CurriculumState(pool_fraction=1.2, pace=0.1)
    with pytest.raises(ValueError, match=r"CurriculumState.pace must be a finite number >= 0, got -0.5"):
        replace(state, pace=-0.5)
    with pytest.raises(ValueError, match=r"missing \['pace'\]"):
        CurriculumState.from_dict({"pool_fraction": 0.5})


# Curriculum: per-rank batches


@settings(max_examples=60, deadline=None)
@given(num_train=st.integers(8, 300), fraction=st.floats(0.01, 1.0), world_size=st.integers(1, 8), batch_size=st.integers(1, 32),
       accum=st.integers(1, 4), epoch=st.integers(0, 5))
def test_pool_shards_are_disjoint_cover_the_pool_with_equal_steps(num_train, fraction, world_size, batch_size, accum, epoch) -> None:
    scores = np.random.default_rng(num_train).normal(size=num_train)
    pool = curriculum_pool(scores, fraction, min_size=world_size)
    per_rank = [pool_batches(pool, rank=r, world_size=world_size, batch_size=batch_size, epoch=epoch, seed=3, grad_accum_steps=accum)
                for r in range(world_size)]
    steps = {len(batches) for batches in per_rank}
    assert steps == {steps_per_epoch(len(pool), world_size=world_size, batch_size=batch_size, grad_accum_steps=accum)}
    assert next(iter(steps)) % accum == 0
    seen = np.concatenate([b for batches in per_rank for b in batches])
    assert np.array_equal(np.sort(seen), pool)  # each pool sample once across all ranks, nothing outside it
    assert max(len(b) for batches in per_rank for b in batches) <= batch_size


@settings(max_examples=60, deadline=None)
@given(num_train=st.integers(8, 300), fraction=st.floats(0.01, 1.0), world_size=st.integers(1, 8), batch_size=st.integers(1, 32),
       accum=st.integers(1, 4), epoch=st.integers(0, 5))
def test_a_full_budget_epoch_over_the_pool_has_a_full_epochs_steps(num_train, fraction, world_size, batch_size, accum, epoch) -> None:
    scores = np.random.default_rng(num_train).normal(size=num_train)
    pool = curriculum_pool(scores, fraction)
    per_rank = [pool_batches(pool, rank=r, world_size=world_size, batch_size=batch_size, epoch=epoch, seed=3, grad_accum_steps=accum,
                             num_samples=num_train) for r in range(world_size)]
    steps = {len(batches) for batches in per_rank}
    assert steps == {steps_per_epoch(num_train, world_size=world_size, batch_size=batch_size, grad_accum_steps=accum)}
    seen = np.concatenate([b for batches in per_rank for b in batches])
    assert len(seen) == num_train and np.isin(seen, pool).all()
    visits = np.bincount(seen, minlength=num_train)[pool]
    assert visits.min() == num_train // len(pool) and visits.max() == math.ceil(num_train / len(pool))  # repeats spread evenly


@pytest.mark.parametrize("num_samples", [None, 101])
def test_the_full_pool_trains_exactly_like_the_baseline(num_samples) -> None:
    for rank in range(3):
        baseline = shard_batches(101, rank=rank, world_size=3, batch_size=8, epoch=4, seed=11, grad_accum_steps=2)
        curriculum = pool_batches(np.arange(101), rank=rank, world_size=3, batch_size=8, epoch=4, seed=11, grad_accum_steps=2,
                                  num_samples=num_samples)
        assert len(curriculum) == len(baseline)
        assert all(np.array_equal(a, b) for a, b in zip(curriculum, baseline))


def test_pool_batches_refuse_an_epoch_smaller_than_the_world_and_non_positions() -> None:
    with pytest.raises(ValueError, match="an epoch of 2 samples cannot give each of 4 ranks a sample"):
        pool_batches(np.array([3, 7]), rank=0, world_size=4, batch_size=8, epoch=0, seed=0)
    repeated = pool_batches(np.array([3, 7]), rank=3, world_size=4, batch_size=8, epoch=0, seed=0, num_samples=40)
    assert sum(len(b) for b in repeated) == 10 and set(np.concatenate(repeated).tolist()) <= {3, 7}  # a small pool, repeated
    with pytest.raises(ValueError, match="vector of integer train positions"):
        pool_batches(np.array([0.5, 1.0]), rank=0, world_size=1, batch_size=8, epoch=0, seed=0)
    with pytest.raises(ValueError, match=r"rank must be in \[0, 2\), got 2"):
        pool_batches(np.arange(10), rank=2, world_size=2, batch_size=8, epoch=0, seed=0)


# Batch selection: probabilities


@settings(max_examples=80, deadline=None)
@given(scores=scores_lists, floor=st.floats(0.01, 1.0), power=st.floats(0.0, 4.0))
def test_probabilities_sum_to_one_prefer_high_losses_and_bound_the_weights(scores, floor, power) -> None:
    scores = np.array(scores)
    probabilities = selection_probabilities(scores, floor=floor, power=power)
    num_samples = len(scores)
    assert probabilities.sum() == pytest.approx(1.0)
    assert (probabilities >= floor / num_samples * (1 - 1e-12)).all()
    assert (1.0 / (num_samples * probabilities) <= 1.0 / floor * (1 + 1e-9)).all()  # every importance weight
    order = np.argsort(scores, kind="stable")
    assert (np.diff(probabilities[order]) >= -1e-15).all()  # a higher loss is never less likely


def test_floor_one_is_uniform_sampling_with_unit_weights() -> None:
    scores = np.random.default_rng(1).exponential(size=37)
    assert np.allclose(selection_probabilities(scores, floor=1.0), 1 / 37)
    batches, weights = selected_batches(scores, rank=0, world_size=1, batch_size=8, epoch=0, seed=0, floor=1.0)
    assert all(np.allclose(w, 1.0) for w in weights)
    assert sum(len(b) for b in batches) == 37


def test_non_finite_scores_are_the_hardest_and_all_zero_scores_are_uniform() -> None:
    probabilities = selection_probabilities(np.array([1.0, 4.0, np.nan, np.inf, 0.0]), floor=0.2)
    assert probabilities[2] == probabilities[3] == probabilities[1] == probabilities.max()
    assert np.allclose(selection_probabilities(np.array([np.nan, np.inf]), floor=0.2), 0.5)
    assert np.allclose(selection_probabilities(np.zeros(4), floor=0.2), 0.25)
    assert np.allclose(selection_probabilities(np.array([1.0, 9.0]), floor=0.2, power=0.0), 0.5)


def test_a_large_power_does_not_overflow() -> None:
    probabilities = selection_probabilities(np.array([1e300, 1e299, 1.0]), floor=0.5, power=4.0)
    assert np.isfinite(probabilities).all() and probabilities.sum() == pytest.approx(1.0)


@pytest.mark.parametrize("scores, floor, power, message", [
    (np.array([1.0, -0.5, -2.0]), 0.2, 1.0, r"2 of 3 are negative, the first is position 1 \(-0.5\)"),
    (np.ones((2, 2)), 0.2, 1.0, r"shape \(N,\), got shape \(2, 2\)"),
    (np.ones(3), 0.0, 1.0, r"selection floor must be in \(0, 1\], got 0.0"),
    (np.ones(3), 1.5, 1.0, r"selection floor must be in \(0, 1\], got 1.5"),
    (np.ones(3), 0.2, -1.0, "selection power must be a finite number >= 0, got -1.0"),
])
def test_selection_refuses_bad_input(scores, floor, power, message) -> None:
    with pytest.raises(ValueError, match=message):
        selection_probabilities(scores, floor=floor, power=power)


# Batch selection: per-rank batches and weights


@settings(max_examples=60, deadline=None)
@given(num_train=st.integers(1, 300), world_size=st.integers(1, 8), batch_size=st.integers(1, 32), accum=st.integers(1, 4),
       epoch=st.integers(0, 5))
def test_selected_epochs_have_a_uniform_epochs_steps_on_every_rank(num_train, world_size, batch_size, accum, epoch) -> None:
    scores = np.random.default_rng(num_train).exponential(size=num_train)
    probabilities = selection_probabilities(scores, floor=0.2)
    per_rank = [selected_batches(scores, rank=r, world_size=world_size, batch_size=batch_size, epoch=epoch, seed=5, floor=0.2,
                                 grad_accum_steps=accum) for r in range(world_size)]
    steps = {len(batches) for batches, _ in per_rank}
    assert steps == {steps_per_epoch(num_train, world_size=world_size, batch_size=batch_size, grad_accum_steps=accum)}
    assert sum(len(b) for batches, _ in per_rank for b in batches) == num_train  # N draws, split among the ranks
    for batches, weights in per_rank:
        assert [len(b) for b in batches] == [len(w) for w in weights]
        for batch, weight in zip(batches, weights):
            assert ((0 <= batch) & (batch < num_train)).all()
            assert np.allclose(weight, 1.0 / (num_train * probabilities[batch]))  # each weight belongs to its sample
            assert len(batch) <= batch_size


def test_selection_is_deterministic_for_a_seed_and_changes_with_the_epoch() -> None:
    scores = np.random.default_rng(2).exponential(size=64)

    def draw(epoch: int, seed: int) -> np.ndarray:
        batches, _ = selected_batches(scores, rank=1, world_size=2, batch_size=8, epoch=epoch, seed=seed, floor=0.2)
        return np.concatenate(batches)

    assert np.array_equal(draw(3, 7), draw(3, 7))
    assert not np.array_equal(draw(3, 7), draw(4, 7))
    assert not np.array_equal(draw(3, 7), draw(3, 8))


def _drawn_over_epochs(scores: np.ndarray, *, epochs: int, floor: float) -> tuple[np.ndarray, np.ndarray]:
    """Every position drawn across all ranks over `epochs` epochs, and the weight each draw carries."""
    positions, weights = [], []
    for epoch in range(epochs):
        for rank in range(2):
            batches, batch_weights = selected_batches(scores, rank=rank, world_size=2, batch_size=8, epoch=epoch, seed=0, floor=floor)
            positions.extend(batches)
            weights.extend(batch_weights)
    return np.concatenate(positions), np.concatenate(weights)


def test_importance_weights_make_the_selected_mean_unbiased() -> None:
    rng = np.random.default_rng(3)
    losses = rng.exponential(size=60) ** 2  # skewed, as per-sample losses are
    other = rng.normal(size=60)  # a per-sample quantity unrelated to the loss (a gradient component, say)
    positions, weights = _drawn_over_epochs(losses, epochs=400, floor=0.2)
    for values in (losses, other):
        weighted = np.mean(weights * values[positions])
        spread = np.std(weights * values[positions]) / math.sqrt(len(positions))
        assert abs(weighted - values.mean()) < 4 * spread  # E[w_i v_i] = mean(v), to sampling error
    unweighted = losses[positions].mean()
    assert unweighted > 1.5 * losses.mean()  # without the weights the estimate leans toward high losses


def test_high_loss_samples_are_drawn_more_often_in_proportion() -> None:
    losses = np.linspace(0.0, 3.0, 30)
    positions, _ = _drawn_over_epochs(losses, epochs=400, floor=0.2)
    frequency = np.bincount(positions, minlength=30) / len(positions)
    expected = selection_probabilities(losses, floor=0.2)
    assert np.abs(frequency - expected).max() < 0.01
    assert frequency[-5:].sum() > 3 * frequency[:5].sum()
    assert frequency[0] > 0  # the floor keeps even a zero-loss sample in play
