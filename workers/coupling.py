"""Neuron-group coupling (`coordinator.neuron_groups`): a layer's output units grouped by their activation
statistics, so that the advisor's blend factor, and its proposals, can differ between groups of one layer.

Per unit, over a validation pass: the mean pre-activation and the fraction of samples where it is positive.
Standardised per layer, they are clustered by k-means into `group_count(units)` = ceil(log2(units)) groups
(at most one per unit), re-clustered every `coordinator.regroup_every` epochs. So the number of alphas and
advisor-visible groups grows with the logarithm of the width, not the width. Groups are numbered by
ascending activity, so group 0 holds the quietest units (the dead ones, when a layer has some).

Every rank sees the same all-reduced statistics and clusters them with the same seed: the groups are the
same everywhere without any exchange. Pure numpy.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

KMEANS_ITERATIONS = 25


def group_count(units: int) -> int:
    """ceil(log2(units)) groups for a layer of `units` outputs (1 for a single unit)."""
    return max(1, min(units, math.ceil(math.log2(units)))) if units > 1 else 1


def kmeans(points: np.ndarray, k: int, *, seed: int, iterations: int = KMEANS_ITERATIONS) -> np.ndarray:
    """Labels 0..k-1 of `points` (n, d) by k-means with k-means++ seeding; deterministic for a seed. Empty
    clusters take the point farthest from its centre. Labels are renumbered by ascending first coordinate."""
    points = np.asarray(points, dtype=np.float64)
    n = len(points)
    k = min(k, n)
    rng = np.random.default_rng(seed)
    centres = [points[rng.integers(n)]]
    for _ in range(1, k):
        distance = np.min([((points - centre) ** 2).sum(axis=1) for centre in centres], axis=0)
        total = distance.sum()
        centres.append(points[rng.choice(n, p=distance / total)] if total > 0 else points[rng.integers(n)])
    centres = np.array(centres)
    labels = np.zeros(n, dtype=np.int64)
    for _ in range(iterations):
        distances = ((points[:, None, :] - centres[None, :, :]) ** 2).sum(axis=2)
        labels = distances.argmin(axis=1)
        for cluster in range(k):
            members = points[labels == cluster]
            if len(members):
                centres[cluster] = members.mean(axis=0)
            else:
                farthest = distances[np.arange(n), labels].argmax()
                centres[cluster], labels[farthest] = points[farthest], cluster
    order = np.argsort(centres[:, 0], kind="stable")
    return np.argsort(order)[labels]


def unit_groups(stats: dict[str, np.ndarray], *, seed: int) -> dict[str, np.ndarray]:
    """Per layer (module name -> (units, 2) array of [mean pre-activation, fraction positive]), each unit's group."""
    groups = {}
    for index, (layer, values) in enumerate(stats.items()):
        values = np.asarray(values, dtype=np.float64)
        spread = values.std(axis=0)
        standardised = (values - values.mean(axis=0)) / np.where(spread > 0, spread, 1.0)
        # Activity first, so that group numbers run from the quietest units to the busiest.
        groups[layer] = kmeans(standardised[:, ::-1], group_count(len(values)), seed=seed + index)
    return groups


def describe_groups(labels: np.ndarray, stats: np.ndarray) -> list[dict[str, Any]]:
    """For the snapshot: each group's size, mean fraction of positive activations and mean pre-activation."""
    described = []
    for group in range(int(labels.max()) + 1 if len(labels) else 0):
        members = labels == group
        described.append({"size": int(members.sum()), "active": round(float(stats[members, 1].mean()) if members.any() else 0.0, 4),
                          "mean": round(float(stats[members, 0].mean()) if members.any() else 0.0, 4)})
    return described
