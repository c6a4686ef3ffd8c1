"""QueryPolicy as a state machine over epochs: burn-in, in-flight, triggers, cooldowns."""

from __future__ import annotations

import math

from orchestration.config import CoordinatorConfig
from orchestration.policy import Query, QueryPolicy, is_diverging, relative_improvement
from orchestration.protocol import TrainingSnapshot


def snapshot_with(val_loss, train_loss=None) -> TrainingSnapshot:
    val_loss = list(val_loss)
    return TrainingSnapshot(
        epoch=len(val_loss) - 1,
        val_loss=val_loss,
        train_loss=list(train_loss) if train_loss is not None else [v * 0.9 for v in val_loss],
    )


def improving(epochs: int) -> list[float]:
    """A loss curve improving 20 % per epoch: never a plateau."""
    return [2.0 * 0.8**epoch for epoch in range(epochs)]


def decide(policy, snapshot, *, last=None, drift=0.0, in_flight=False):
    return policy.decide(snapshot, last_query_epoch=last, weight_drift=drift, in_flight=in_flight)


def test_interval_queries_after_burn_in_and_never_during_it():
    policy = QueryPolicy(CoordinatorConfig(query_interval=2, burn_in_epochs=3, plateau_window=3))
    asked_at = []
    last = None
    for epoch in range(10):
        query = decide(policy, snapshot_with(improving(epoch + 1)), last=last)
        if query is not None:
            asked_at.append(epoch)
            last = epoch
            assert query.reason.startswith("interval")
    assert asked_at == [3, 5, 7, 9]


def test_never_while_in_flight_even_when_diverging():
    policy = QueryPolicy(CoordinatorConfig(burn_in_epochs=0))
    diverged = snapshot_with([1.0, 0.5, 5.0])
    assert decide(policy, diverged, in_flight=True) is None
    assert decide(policy, diverged).reason.startswith("divergence")


def test_burn_in_blocks_every_trigger():
    policy = QueryPolicy(CoordinatorConfig(burn_in_epochs=5, query_interval=1))
    assert decide(policy, snapshot_with([1.0, 0.5, float("nan")]), drift=10.0) is None


def test_divergence_by_val_train_and_non_finite_loss():
    assert is_diverging([1.0, 1.0], [1.0, 0.5, 0.8], 1.5) is not None  # 0.8 > 1.5 * 0.5
    assert is_diverging([1.0, 2.0], [1.0, 0.9], 1.5) is not None  # train 2.0 > 1.5 * 1.0
    assert is_diverging([1.0, math.inf], [1.0], 1.5) is not None
    assert is_diverging([1.0, 0.9], [1.0, 0.9], 1.5) is None
    assert is_diverging([], [], 1.5) is None


def test_plateau_triggers_then_cools_down_for_a_window():
    config = CoordinatorConfig(burn_in_epochs=0, query_interval=0, plateau_window=3, plateau_threshold=0.01)
    policy = QueryPolicy(config)
    flat = [1.0, 0.5, 0.5, 0.5, 0.5]
    query = decide(policy, snapshot_with(flat))
    assert query is not None and query.reason.startswith("plateau")
    assert decide(policy, snapshot_with(flat + [0.5]), last=4) is None  # 1 epoch since asking
    assert decide(policy, snapshot_with(flat + [0.5, 0.5, 0.5]), last=4).reason.startswith("plateau")


def test_relative_improvement_needs_window_plus_one_epochs():
    assert relative_improvement([1.0, 0.9], 2) is None
    assert math.isclose(relative_improvement([1.0, 0.9, 0.8], 2), 0.2)


def test_weight_drift_trigger():
    policy = QueryPolicy(CoordinatorConfig(burn_in_epochs=0, query_interval=0, drift_threshold=0.3))
    curve = snapshot_with(improving(3))
    assert decide(policy, curve, last=1, drift=0.2) is None
    assert decide(policy, curve, last=1, drift=0.5) == Query(reason="weight drift 0.5 > 0.3")


def test_never_twice_in_one_epoch():
    policy = QueryPolicy(CoordinatorConfig(burn_in_epochs=0, query_interval=1))
    curve = snapshot_with([1.0, 0.5, 5.0])
    assert decide(policy, curve, last=curve.epoch) is None


def test_the_last_epoch_is_never_asked_about_even_when_diverging():
    """An answer is tried at a later epoch end; after the last one there is none, so the question would be wasted."""
    import dataclasses

    policy = QueryPolicy(CoordinatorConfig(query_interval=1, burn_in_epochs=1))
    diverging = snapshot_with([1.0, 0.9, 5.0, math.nan])
    assert decide(policy, dataclasses.replace(diverging, total_epochs=0)) is not None  # unknown length: asked
    assert decide(policy, dataclasses.replace(diverging, total_epochs=4)) is not None  # epoch 3 of 4
    assert decide(policy, dataclasses.replace(diverging, total_epochs=3)) is None  # epoch 3 of 3: the last
    assert decide(policy, dataclasses.replace(diverging, total_epochs=2)) is None
