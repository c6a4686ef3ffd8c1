"""`TuneConfig`: how a sweep searches (scheduler, budget, search space). Validated before Ray starts.

The search space maps a run-config key to a distribution:

    space:
      train.lr: {loguniform: [1.0e-4, 3.0e-2]}
      model.dropout: {uniform: [0.0, 0.3]}
      train.optimizer: {choice: [adamw, sgd]}
      train.zero_stage: {grid: [1, 2]}
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from orchestration.settings import is_int, is_number, require

SCHEDULERS = ("pbt", "pb2", "asha", "random")
DISTRIBUTIONS = ("loguniform", "uniform", "choice", "grid")
# Run-config keys a sweep may search over. Never train.num_workers: ZeRO shards depend on the world size,
# so a checkpoint cloned across trials must come from the same number of workers.
TUNABLE_KEYS = (
    "train.lr", "train.weight_decay", "train.momentum", "train.batch_size", "train.optimizer", "train.zero_stage",
    "model.dropout", "model.width", "coordinator.stability_alpha", "coordinator.query_interval", "coordinator.accept_threshold",
)
# Keys whose value changes what a checkpoint holds: a trial cannot take another trial's weights once they differ,
# so PBT/PB2 may sample them at the start but never mutate them.
SHAPE_KEYS = ("train.batch_size", "train.optimizer", "train.zero_stage", "model.width")
Scheduler = Literal["pbt", "pb2", "asha", "random"]


@dataclass(kw_only=True, slots=True)
class TuneConfig:
    """A sweep: `num_samples` trials, each a full training run, scheduled by `scheduler`."""

    scheduler: Scheduler = "pbt"
    metric: str = "val_accuracy"  # reported every epoch by every trial
    mode: Literal["max", "min"] = "max"
    num_samples: int = 4  # trials (times the grid size, for grid keys)
    max_concurrent_trials: int | None = None  # None -> num_samples (PBT/PB2 need the whole population running at once)
    perturbation_interval: int = 2  # PBT/PB2: epochs between exploit/explore decisions
    quantile_fraction: float = 0.25  # PBT/PB2: bottom fraction that copies the top fraction
    resample_probability: float = 0.25  # PBT: chance a mutated value is re-drawn instead of perturbed
    grace_period: int = 2  # ASHA: epochs every trial runs before it may be stopped
    reduction_factor: int = 2  # ASHA
    llm_explore: bool = False  # PBT: the advisor proposes the explored config (falls back to PBT's own perturbation)
    # How long an explore waits, inside Tune's event loop, for an answer still in flight: while it waits no
    # trial's result is processed, so keep it well under a second (a late answer is a recorded fallback).
    explore_timeout_s: float = 0.5
    seed: int = 0
    space: dict[str, dict[str, Any]] = field(default_factory=lambda: {"train.lr": {"loguniform": [1e-4, 1e-2]}})

    def __post_init__(self) -> None:
        require(self.scheduler in SCHEDULERS, "tune.scheduler", self.scheduler, f"must be one of {SCHEDULERS}")
        require(self.mode in ("max", "min"), "tune.mode", self.mode, "must be max or min")
        require(isinstance(self.metric, str) and bool(self.metric), "tune.metric", self.metric, "must name a reported metric")
        require(is_int(self.num_samples) and self.num_samples >= 1, "tune.num_samples", self.num_samples, "must be an integer >= 1")
        require(self.max_concurrent_trials is None or (is_int(self.max_concurrent_trials) and self.max_concurrent_trials >= 1),
                "tune.max_concurrent_trials", self.max_concurrent_trials, "must be unset or an integer >= 1")
        require(is_int(self.perturbation_interval) and self.perturbation_interval >= 1, "tune.perturbation_interval",
                self.perturbation_interval, "must be an integer >= 1")
        require(is_number(self.quantile_fraction) and 0 < self.quantile_fraction <= 0.5, "tune.quantile_fraction",
                self.quantile_fraction, "must be in (0, 0.5]")
        require(is_number(self.resample_probability) and 0 <= self.resample_probability <= 1, "tune.resample_probability",
                self.resample_probability, "must be in [0, 1]")
        require(is_int(self.grace_period) and self.grace_period >= 1, "tune.grace_period", self.grace_period, "must be an integer >= 1")
        require(is_int(self.reduction_factor) and self.reduction_factor >= 2, "tune.reduction_factor", self.reduction_factor, "must be >= 2")
        require(is_number(self.explore_timeout_s) and self.explore_timeout_s >= 0, "tune.explore_timeout_s", self.explore_timeout_s, "must be >= 0")
        require(isinstance(self.space, dict) and bool(self.space), "tune.space", self.space, "must map at least one key to a distribution")
        for key, spec in self.space.items():
            check_distribution(key, spec)
        if self.scheduler in ("pbt", "pb2"):
            mutable = [key for key in self.space if key not in SHAPE_KEYS and distribution(self.space[key])[0] != "grid"]
            require(bool(mutable), "tune.space", sorted(self.space), f"needs a key that {self.scheduler} can mutate (not one of {SHAPE_KEYS})")
        if self.scheduler == "pb2":
            continuous = [key for key in self.space if distribution(self.space[key])[0] in ("loguniform", "uniform")]
            require(bool(continuous), "tune.space", sorted(self.space), "needs a loguniform or uniform key for pb2 (it models continuous bounds)")
        require(not self.llm_explore or self.scheduler == "pbt", "tune.llm_explore", self.llm_explore, "needs tune.scheduler pbt")

    @property
    def concurrency(self) -> int:
        return self.max_concurrent_trials or self.num_samples


def distribution(spec: dict[str, Any]) -> tuple[str, Any]:
    """`(kind, argument)` of a one-entry mapping such as `{"loguniform": [1e-4, 1e-2]}`."""
    (kind, argument), = spec.items()
    return kind, argument


def check_distribution(key: str, spec: Any) -> None:
    """Raise `ConfigError` naming `tune.space.<key>` unless `spec` is a well-formed distribution over a tunable key."""
    field_name = f"tune.space.{key}"
    require(key in TUNABLE_KEYS, field_name, key, f"is not a tunable key; tunable keys are {TUNABLE_KEYS}")
    require(isinstance(spec, dict) and len(spec) == 1, field_name, spec, f"must be one of {{kind: argument}} with kind in {DISTRIBUTIONS}")
    kind, argument = distribution(spec)
    require(kind in DISTRIBUTIONS, field_name, kind, f"must use one of {DISTRIBUTIONS}")
    if kind in ("loguniform", "uniform"):
        require(isinstance(argument, list) and len(argument) == 2 and all(is_number(v) for v in argument), field_name, argument,
                "must be [low, high]")
        low, high = argument
        require(low < high, field_name, argument, "must have low < high")
        require(kind != "loguniform" or low > 0, field_name, argument, "must have low > 0 for loguniform")
    else:
        require(isinstance(argument, list) and len(argument) >= 1, field_name, argument, "must be a non-empty list of values")
        require(len({repr(value) for value in argument}) == len(argument), field_name, argument, "must not repeat a value")


def extreme_values(spec: dict[str, Any]) -> list[Any]:
    """The values a run config must accept for the space to be valid: both bounds, or every listed value."""
    kind, argument = distribution(spec)
    return list(argument)
