"""Deterministic, varied training snapshots for smoke runs, tests and the latency benchmark.

Each one is shaped like a real small CNN run on digits and shows one situation an advisor
should recognise: healthy progress, a plateau, divergence, overfitting, dead units, or a mix.
"""

from __future__ import annotations

import random

from orchestration.protocol import LayerStats, ProposalOutcome, TrainingSnapshot

SITUATIONS = ("healthy", "plateau", "diverging", "overfitting", "dead_units", "early", "plateau_dead")
_LAYERS = (("conv1.weight", 288), ("conv1.bias", 32), ("conv2.weight", 18432), ("conv2.bias", 64),
           ("fc1.weight", 16384), ("fc1.bias", 64), ("fc2.weight", 640), ("fc2.bias", 10))


def _curve(situation: str, epochs: int, rng: random.Random) -> tuple[list[float], list[float]]:
    train, val = [], []
    for epoch in range(epochs):
        base = 2.3 * (0.55 ** (epoch + 1)) + 0.05
        if situation == "dead_units":  # most of a layer silent: still learning, but slowly and not far
            base = 2.3 * (0.85 ** (epoch + 1)) + 0.3
        if situation.startswith("plateau") and epoch >= 2:
            base = 2.3 * 0.55**3 + 0.05 + rng.uniform(-0.004, 0.004)
        if situation == "diverging" and epoch >= epochs - 2:
            base = 2.3 * 0.55**2 * (3.0 if epoch == epochs - 1 else 1.8)
        train.append(round(base * rng.uniform(0.995, 1.005), 4))
        gap = 0.03 + (0.12 * epoch if situation == "overfitting" else 0.0)
        val.append(round(train[-1] + gap, 4))
    return train, val


def example_snapshot(situation: str, seed: int = 0, *, epochs: int = 6) -> TrainingSnapshot:
    """One snapshot in `situation` (one of `SITUATIONS`), varied by `seed`."""
    if situation not in SITUATIONS:
        raise ValueError(f"situation must be one of {SITUATIONS}, got {situation!r}")
    rng = random.Random(f"{situation}-{seed}")
    epochs = 2 if situation == "early" else epochs
    train, val = _curve(situation, epochs, rng)
    layers = [
        LayerStats(
            name=name,
            num_params=size,
            weight_norm=round(rng.uniform(0.5, 8.0), 3),
            grad_norm=round(rng.uniform(0.001, 0.5) * (20.0 if situation == "diverging" else 1.0), 4),
            update_ratio=round(rng.uniform(0.001, 0.05), 4),
            dead_fraction=round(0.9 if situation in ("dead_units", "plateau_dead") and name.startswith("fc1")
                                else rng.uniform(0.0, 0.1), 3),
        )
        for name, size in _LAYERS
    ]
    recent = []
    if seed % 2 == 1:
        recent.append(ProposalOutcome(epoch=epochs - 2, summary="lr_scale=0.5", verdict="accepted", reward=0.012))
    return TrainingSnapshot(
        run_id=f"{situation}-{seed}",
        epoch=epochs,
        step=epochs * 28,
        total_epochs=20,
        model_kind="cnn2d",
        train_loss=train,
        val_loss=val,
        train_accuracy=[round(min(0.999, 1.0 - loss / 2.5), 4) for loss in train],
        val_accuracy=[round(min(0.999, 1.0 - loss / 2.4), 4) for loss in val],
        hyperparameters={"lr": 0.001 * (1 + seed % 3), "weight_decay": 0.0001, "dropout": 0.1,
                         "momentum": 0.9, "batch_size": 64},
        layers=layers,
        recent_proposals=recent,
    )


def example_snapshots(count: int) -> list[TrainingSnapshot]:
    """`count` snapshots cycling through every situation with different seeds."""
    return [example_snapshot(SITUATIONS[index % len(SITUATIONS)], seed=index) for index in range(count)]
