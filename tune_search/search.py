"""From a `TuneConfig` to Ray Tune's objects: the parameter space and the scheduler.

Trials report once per epoch (`epoch` is the time attribute), so every interval below is in epochs.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from tune_search.config import SHAPE_KEYS, TuneConfig, distribution


def param_space(config: TuneConfig) -> dict[str, Any]:
    """Ray Tune's `param_space`: one sampled value per key and trial (grid keys multiply the trials)."""
    from ray import tune

    space: dict[str, Any] = {}
    for key, spec in config.space.items():
        kind, argument = distribution(spec)
        if kind == "loguniform":
            space[key] = tune.loguniform(*argument)
        elif kind == "uniform":
            space[key] = tune.uniform(*argument)
        elif kind == "choice":
            space[key] = tune.choice(argument)
        else:
            space[key] = tune.grid_search(argument)
    return space


def mutable_keys(config: TuneConfig) -> list[str]:
    """Keys PBT/PB2 may change on a running trial: not grid keys, and never keys that change what a
    checkpoint holds (`SHAPE_KEYS`), since an exploited trial continues from another trial's weights."""
    return [key for key, spec in config.space.items() if key not in SHAPE_KEYS and distribution(spec)[0] != "grid"]


class ClipToSpace:
    """PBT's explore step perturbs continuous values by a factor (x1.2, x0.8) and can leave the search space
    (a dropout of 0.3 becomes 0.36); this puts them back inside `[low, high]`. A picklable callable, as
    Tune pickles its scheduler with the experiment."""

    def __init__(self, config: TuneConfig) -> None:
        self.bounds = {key: distribution(spec)[1] for key, spec in config.space.items() if distribution(spec)[0] in ("loguniform", "uniform")}

    def __call__(self, explored: dict) -> dict:
        clipped = dict(explored)
        for key, (low, high) in self.bounds.items():
            if key in clipped and isinstance(clipped[key], (int, float)):
                clipped[key] = min(max(clipped[key], low), high)
        return clipped


def build_scheduler(config: TuneConfig, *, max_epochs: int, custom_explore_fn: Callable[[dict], dict] | None = None):
    """The Tune scheduler for `config.scheduler` (`random` is FIFO over randomly sampled trials)."""
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler, PopulationBasedTraining

    common = {"time_attr": "epoch", "metric": config.metric, "mode": config.mode}
    if config.scheduler == "asha":
        # max_t one past the last epoch: ASHA stops only in its rungs, never a trial that is about to finish
        # (stopping at max_t would kill the trial before it writes its final model).
        return ASHAScheduler(max_t=max_epochs + 1, grace_period=min(config.grace_period, max_epochs), reduction_factor=config.reduction_factor,
                             **common)
    if config.scheduler == "random":
        return FIFOScheduler()
    mutable = mutable_keys(config)
    if config.scheduler == "pb2":
        from ray.tune.schedulers.pb2 import PB2

        bounds = {key: list(distribution(config.space[key])[1]) for key in mutable if distribution(config.space[key])[0] in ("loguniform", "uniform")}
        return PB2(perturbation_interval=config.perturbation_interval, hyperparam_bounds=bounds, quantile_fraction=config.quantile_fraction,
                   **common)
    space = param_space(config)
    return PopulationBasedTraining(perturbation_interval=config.perturbation_interval, hyperparam_mutations={key: space[key] for key in mutable},
                                   quantile_fraction=config.quantile_fraction, resample_probability=config.resample_probability,
                                   custom_explore_fn=custom_explore_fn or ClipToSpace(config), **common)
