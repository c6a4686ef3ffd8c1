"""Snapshot features and the response cache: fixed length, hits on near-identical runs, eviction."""

from __future__ import annotations

import json
import math

import numpy as np

from orchestration.cache import FEATURE_NAMES, ResponseCache, snapshot_features
from orchestration.protocol import HyperparameterChange, LayerStats, Proposal, TrainingSnapshot, WeightOp


def run_snapshot(val_loss=0.8, lr=0.01, layer_count=2, epoch=5, model_kind="cnn2d") -> TrainingSnapshot:
    return TrainingSnapshot(
        epoch=epoch,
        model_kind=model_kind,
        train_loss=[1.2, 1.0, 0.75],
        val_loss=[1.3, 1.0, val_loss],
        val_accuracy=[0.5, 0.6, 0.7],
        hyperparameters={"lr": lr, "weight_decay": 1e-4, "dropout": 0.1},
        layers=[
            LayerStats(name=f"features.{index}.weight", grad_norm=0.5, update_ratio=0.01, dead_fraction=0.1)
            for index in range(layer_count)
        ],
    )


PROPOSAL = Proposal(
    hyperparameters=HyperparameterChange(lr_scale=0.5),
    weights=[WeightOp(op="shrink", group="features.0.weight", amount=0.1)],
    reason="plateau",
)


def test_features_have_fixed_length_and_are_quantised():
    for layer_count in (0, 1, 7):
        features = snapshot_features(run_snapshot(layer_count=layer_count), quantum=0.1)
        assert features.shape == (len(FEATURE_NAMES),)
        assert np.all(np.isfinite(features))
        np.testing.assert_allclose(features / 0.1, np.round(features / 0.1), atol=1e-9)


def test_features_survive_empty_snapshots_and_keep_non_finite_values():
    assert np.all(np.isfinite(snapshot_features(TrainingSnapshot(), quantum=0.1)))
    diverged = TrainingSnapshot(val_loss=[1.0, math.nan], train_loss=[math.inf])
    features = dict(zip(FEATURE_NAMES, snapshot_features(diverged, quantum=0.1)))
    assert math.isnan(features["log_loss"]) and math.isnan(features["loss_trend"]) and math.isnan(features["generalisation_gap"])


def _flat(last_val_loss: float, grad_norm: float = 0.5) -> TrainingSnapshot:
    snapshot = run_snapshot()
    snapshot.train_loss, snapshot.val_loss = [1.0, 1.0, 1.0], [1.0, 1.0, last_val_loss]
    snapshot.layers[0].grad_norm = grad_norm
    return snapshot


def test_a_diverged_state_never_matches_a_healthy_one():
    """NaN and inf features used to become 0: a NaN val loss then looked exactly like a loss of 1 (ln 1 = 0),
    so a diverged run was answered with what helped a healthy one."""
    cache = ResponseCache(similarity=0.2, quantum=0.1)
    cache.store(_flat(1.0), PROPOSAL)
    assert cache.lookup(_flat(1.0))[0] == PROPOSAL
    for diverged in (_flat(math.nan), _flat(math.inf), _flat(1.0, grad_norm=math.inf), _flat(1.0, grad_norm=math.nan)):
        assert cache.lookup(diverged) == (None, math.inf)
    # Nor is a diverged state's answer stored, to be matched later by anything.
    cache.store(_flat(math.nan), PROPOSAL)
    assert len(cache) == 1
    assert (cache.hits, cache.misses) == (1, 4)


def test_hit_on_near_identical_snapshot_and_miss_on_a_different_one():
    cache = ResponseCache(similarity=0.2, quantum=0.1)
    assert cache.lookup(run_snapshot()) == (None, math.inf)
    cache.store(run_snapshot(), PROPOSAL)
    proposal, distance = cache.lookup(run_snapshot(val_loss=0.801))
    assert proposal == PROPOSAL and distance <= 0.2
    proposal, distance = cache.lookup(run_snapshot(lr=1e-4))
    assert proposal is None and distance > 0.2
    assert (cache.hits, cache.misses) == (1, 2)


def test_no_hit_across_model_signatures():
    cache = ResponseCache(similarity=10.0, quantum=0.1)
    cache.store(run_snapshot(), PROPOSAL)
    assert cache.lookup(run_snapshot(model_kind="mlp"))[0] is None
    assert cache.lookup(run_snapshot(layer_count=3))[0] is None


def test_rejected_proposals_are_evicted_and_size_is_bounded():
    cache = ResponseCache(similarity=0.2, quantum=0.1, max_entries=2)
    other = Proposal(hyperparameters=HyperparameterChange(dropout=0.2))
    cache.store(run_snapshot(), PROPOSAL)
    cache.store(run_snapshot(epoch=6), PROPOSAL)
    cache.store(run_snapshot(epoch=7), other)
    assert len(cache) == 2
    assert cache.evict_proposal(PROPOSAL) == 1
    assert [entry.proposal for entry in cache.entries] == [other]


def test_state_round_trips_through_json():
    cache = ResponseCache(similarity=0.2, quantum=0.1)
    cache.store(run_snapshot(), PROPOSAL)
    cache.lookup(run_snapshot())
    restored = ResponseCache.from_state(json.loads(json.dumps(cache.to_state())))
    assert restored.to_state() == cache.to_state()
    assert restored.lookup(run_snapshot())[0] == PROPOSAL
