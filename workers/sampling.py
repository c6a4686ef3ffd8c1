"""Which training samples an epoch visits: curriculum learning and loss-prioritised batch selection.

Both modes are pure NumPy over per-sample scores: `scores[i]` is the loss of train position `i`
under the current model, measured at the epoch's start. Both cut their batches the way
`workers.data.shard_batches` does: every rank derives the same global order from (seed, epoch),
takes every `world_size`-th entry and splits it into the same number of micro-steps, a multiple of
`grad_accum_steps` (a rank with fewer steps would hang the collectives under ZeRO). Batches hold
positions in the train split (0..N-1), not dataset indices, as `shard_batches` does.

Curriculum learning (Bengio et al., 2009), with a linear pacing function the advisor may re-pace:

    f_first = curriculum_start,   f_next = min(1, f + pace)
    pool    = the ceil(f * N) lowest-scoring positions     (ties: lower position first; NaN/inf last)
    epoch   = shuffled passes over the pool, `num_samples` samples in all (default one pass),
              sharded as `shard_batches(num_samples)`

Batch selection (importance sampling; Katharopoulos & Fleuret, 2018):

    p_i = floor / N + (1 - floor) * s_i^power / sum_j s_j^power
    draw N positions i.i.d. from p (seeded by (seed, epoch)): as many steps as a uniform epoch
    w_i = 1 / (N p_i)  <=  1 / floor
    E_{i~p}[w_i l_i] = sum_i p_i l_i / (N p_i) = mean_i l_i

so `mean(w * l)` over any micro-batch is an unbiased estimate of the training-set mean loss, and its
gradient one of the full-batch gradient; the `floor` share of uniform probability bounds the weights,
and with them the variance a few tiny-loss samples could otherwise add.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from workers.data import shard_batches

_SELECTION_STREAM = 6151  # keeps selection's draws apart from the shuffle and probation streams in workers.data
_DECIMALS = 12  # pool fractions are rounded so that 0.3 + 0.15 + 0.15 is 0.6, as the closed formula gives


def _scores(scores: np.ndarray) -> np.ndarray:
    """`scores` as a float64 vector, or a ValueError saying what is wrong with it."""
    array = np.asarray(scores)
    if array.ndim != 1:
        raise ValueError(f"scores must be one score per train sample, shape (N,), got shape {array.shape}")
    if len(array) == 0:
        raise ValueError("scores is empty: there are no train samples to choose from")
    if not (np.issubdtype(array.dtype, np.integer) or np.issubdtype(array.dtype, np.floating)):
        raise ValueError(f"scores must be real numbers, got dtype {array.dtype}")
    return array.astype(np.float64)


def _check_layout(*, rank: int, world_size: int, batch_size: int, grad_accum_steps: int) -> None:
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size!r}")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, {world_size}), got {rank!r}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size!r}")
    if grad_accum_steps < 1:
        raise ValueError(f"grad_accum_steps must be >= 1, got {grad_accum_steps!r}")


# Curriculum learning


def next_pool_fraction(current: float, pace: float) -> float:
    """The next epoch's pool fraction: `min(1, current + pace)`.

    Computed step by step from the current fraction, not from the run's start, so a pace the
    advisor changes mid-run takes effect from the next widening on and leaves the past as it was.
    """
    if not (math.isfinite(current) and 0 < current <= 1):
        raise ValueError(f"pool fraction must be in (0, 1], got {current!r}")
    if not (math.isfinite(pace) and pace >= 0):
        raise ValueError(f"curriculum pace must be a finite number >= 0, got {pace!r}")
    return min(1.0, round(current + pace, _DECIMALS))


def curriculum_pool(scores: np.ndarray, fraction: float, *, min_size: int = 1) -> np.ndarray:
    """Train positions of the easiest `ceil(fraction * N)` samples (at least `min_size`, at most N), sorted.

    Easiest means lowest score; equal scores are taken in position order, so every rank holding the
    same scores builds the same pool. NaN and ±inf scores (a loss that overflowed or a failed
    measurement) count as the hardest and enter the pool last. Negative scores are allowed: only
    their order matters here. For epochs of one pass over the pool, `min_size = world_size *
    batch_size * grad_accum_steps` keeps even the first one at a full optimizer step on every rank.
    """
    values = _scores(scores)
    if not (math.isfinite(fraction) and 0 < fraction <= 1):
        raise ValueError(f"pool fraction must be in (0, 1], got {fraction!r}")
    if min_size < 1:
        raise ValueError(f"min_size must be >= 1, got {min_size!r}")
    size = min(len(values), max(min_size, math.ceil(fraction * len(values) - 1e-9)))
    difficulty = np.where(np.isfinite(values), values, np.inf)
    return np.sort(np.argsort(difficulty, kind="stable")[:size])


def pool_batches(pool: np.ndarray, *, rank: int, world_size: int, batch_size: int, epoch: int, seed: int,
                 grad_accum_steps: int = 1, num_samples: int | None = None) -> list[np.ndarray]:
    """This rank's batches over `pool` (train positions) for one epoch of `num_samples` samples, sharded like `shard_batches`.

    The epoch is shuffled passes over the pool, each pass a fresh permutation, cut off after
    `num_samples` samples across all ranks (default `len(pool)`: one pass). Pass the train split's
    size to give a curriculum epoch a full epoch's steps, so the step budget and the learning-rate
    schedule stay those of the baseline; each pool sample then appears floor or ceil of
    `num_samples / len(pool)` times. Every rank takes `steps_per_epoch(num_samples)` micro-steps.
    The full pool `arange(N)` with `num_samples=N` gives exactly `shard_batches(N)`'s batches: a
    curriculum that has widened to the whole set trains as the baseline does.
    """
    _check_layout(rank=rank, world_size=world_size, batch_size=batch_size, grad_accum_steps=grad_accum_steps)
    positions = np.asarray(pool)
    if positions.ndim != 1 or len(positions) == 0 or not np.issubdtype(positions.dtype, np.integer):
        raise ValueError(f"pool must be a non-empty vector of integer train positions, got dtype {positions.dtype} and shape {positions.shape}")
    budget = len(positions) if num_samples is None else num_samples
    if budget < world_size:
        raise ValueError(f"an epoch of {budget} samples cannot give each of {world_size} ranks a sample")
    # Pass 0 is `shard_batches`'s own permutation, which is what makes the full pool reproduce the baseline.
    passes = [np.random.default_rng([seed, epoch] if index == 0 else [seed, epoch, index]).permutation(len(positions))
              for index in range(math.ceil(budget / len(positions)))]
    order = np.concatenate(passes)[:budget]
    slots = shard_batches(budget, rank=rank, world_size=world_size, batch_size=batch_size, epoch=epoch, seed=seed,
                          grad_accum_steps=grad_accum_steps, shuffle=False)
    return [positions[order[slot]] for slot in slots]


@dataclass(frozen=True, kw_only=True, slots=True)
class CurriculumState:
    """Where a curriculum stands: the share of the train split in this epoch's pool, and how fast it widens.

    A value: `state.advanced()` is the next epoch's state and `dataclasses.replace(state, pace=...)`
    a re-paced one; both validate. `to_dict`/`from_dict` carry it through checkpoints.
    """

    pool_fraction: float  # in (0, 1]; modes.curriculum_start at the first epoch
    pace: float  # fraction of the train split added per epoch, >= 0 (0 holds the pool where it is)

    def __post_init__(self) -> None:
        if not (math.isfinite(self.pool_fraction) and 0 < self.pool_fraction <= 1):
            raise ValueError(f"CurriculumState.pool_fraction must be in (0, 1], got {self.pool_fraction!r}")
        if not (math.isfinite(self.pace) and self.pace >= 0):
            raise ValueError(f"CurriculumState.pace must be a finite number >= 0, got {self.pace!r}")

    def advanced(self) -> CurriculumState:
        """The state for the next epoch: the pool widened by the current pace."""
        return replace(self, pool_fraction=next_pool_fraction(self.pool_fraction, self.pace))

    def to_dict(self) -> dict[str, float]:
        return {"pool_fraction": float(self.pool_fraction), "pace": float(self.pace)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> CurriculumState:
        missing = {"pool_fraction", "pace"} - set(data)
        if missing:
            raise ValueError(f"curriculum state is missing {sorted(missing)}; found {sorted(data)}")
        return cls(pool_fraction=float(data["pool_fraction"]), pace=float(data["pace"]))


# Batch selection


def selection_probabilities(scores: np.ndarray, *, floor: float, power: float = 1.0) -> np.ndarray:
    """Each train position's probability of being drawn: `floor / N + (1 - floor) * s^power / sum(s^power)`.

    `floor` in (0, 1] is the share of uniform probability mixed in (1 is plain uniform sampling);
    `power` >= 0 sharpens (> 1) or flattens (< 1) the preference for high scores. Scores are losses
    and must not be negative. NaN and ±inf scores count as the hardest: they take the largest finite
    score (uniform if none is finite). All-zero scores give uniform probabilities.
    """
    values = _scores(scores)
    if not (math.isfinite(floor) and 0 < floor <= 1):
        raise ValueError(f"selection floor must be in (0, 1], got {floor!r}")
    if not (math.isfinite(power) and power >= 0):
        raise ValueError(f"selection power must be a finite number >= 0, got {power!r}")
    finite = np.isfinite(values)
    negative = finite & (values < 0)
    if negative.any():
        first = int(np.argmax(negative))
        raise ValueError(f"scores must be losses (>= 0): {int(negative.sum())} of {len(values)} are negative, "
                         f"the first is position {first} ({float(values[first]):g})")
    hardest = values[finite].max() if finite.any() else 0.0
    values = np.where(finite, values, hardest)
    num_samples = len(values)
    if hardest == 0.0:
        return np.full(num_samples, 1.0 / num_samples)
    preference = (values / hardest) ** power  # scaled to [0, 1] first, so a large power cannot overflow
    return floor / num_samples + (1.0 - floor) * preference / preference.sum()


def selected_batches(scores: np.ndarray, *, rank: int, world_size: int, batch_size: int, epoch: int, seed: int, floor: float,
                     power: float = 1.0, grad_accum_steps: int = 1) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """This rank's batches of train positions drawn by `selection_probabilities`, and their importance weights.

    Every rank draws the same N positions with replacement from `default_rng([seed, epoch, stream])`
    and takes every `world_size`-th draw, cut into `steps_per_epoch(N)` micro-steps: the same steps as
    a uniform epoch. `weights[k][j] = 1 / (N p)` belongs to `batches[k][j]`; train on
    `mean(weights * per_sample_loss)` per micro-batch for an unbiased gradient.
    """
    _check_layout(rank=rank, world_size=world_size, batch_size=batch_size, grad_accum_steps=grad_accum_steps)
    probabilities = selection_probabilities(scores, floor=floor, power=power)
    num_samples = len(probabilities)
    draws = np.random.default_rng([seed, epoch, _SELECTION_STREAM]).choice(num_samples, size=num_samples, p=probabilities)
    weights = 1.0 / (num_samples * probabilities)
    # The draws are already i.i.d., so they are sharded in the order drawn, with no further shuffle.
    slots = shard_batches(num_samples, rank=rank, world_size=world_size, batch_size=batch_size, epoch=epoch, seed=seed,
                          grad_accum_steps=grad_accum_steps, shuffle=False)
    batches = [draws[slot] for slot in slots]
    return batches, [weights[batch] for batch in batches]
