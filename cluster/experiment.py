"""`ExperimentConfig`: the one config a run is made of, composed of each package's own config.

It loads from YAML, takes dotted `--set key=value` overrides and named recipes, and is validated
before Ray starts: a bad value raises `ConfigError` naming the field.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from cluster.runtime import ClusterConfig
from orchestration.config import CoordinatorConfig
from orchestration.settings import ConfigError, build_section, merge, parse_override
from serve_llm.config import AdvisorConfig
from tune_search.config import TuneConfig
from workers.config import DataConfig, ModelConfig, ModesConfig, TrainConfig
from workers.faults import FaultConfig
from workers.files import atomic_write_text


@dataclass(kw_only=True, slots=True)
class ExperimentConfig:
    name: str = "run"
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    modes: ModesConfig = field(default_factory=ModesConfig)  # research modes, all off by default (`workers.modes`)
    advisor: AdvisorConfig = field(default_factory=AdvisorConfig)
    coordinator: CoordinatorConfig = field(default_factory=CoordinatorConfig)
    tune: TuneConfig = field(default_factory=TuneConfig)  # used by `hybridtrain tune` only
    faults: FaultConfig = field(default_factory=FaultConfig)  # testing only: kill a worker or fill the disk at a chosen point (`workers.faults`)

    def __post_init__(self) -> None:
        if self.faults.kill_epoch is not None and self.faults.kill_epoch > self.train.epochs:
            raise ConfigError(f"faults.kill_epoch must be unset or in [1, {self.train.epochs}], got {self.faults.kill_epoch!r}")
        if self.faults.stop_driver_epoch is not None and self.faults.stop_driver_epoch > self.train.epochs:
            raise ConfigError(f"faults.stop_driver_epoch must be unset or in [1, {self.train.epochs}], got {self.faults.stop_driver_epoch!r}")
        if self.faults.disk_full and self.faults.disk_full_epoch > self.train.epochs:
            raise ConfigError(f"faults.disk_full_epoch must be in [1, {self.train.epochs}], got {self.faults.disk_full_epoch!r}")
        # L2-SP pulls the backbone toward the pretrained weights: it needs them, and needs them whole on every rank.
        if self.modes.l2sp > 0 and not self.model.pretrained:
            raise ConfigError(f"modes.l2sp={self.modes.l2sp!r} pulls weights toward pretrained ones: set model.pretrained too")
        if self.modes.l2sp > 0 and self.train.zero_stage == 3:
            raise ConfigError(f"modes.l2sp={self.modes.l2sp!r} needs train.zero_stage 0-2 (ZeRO-3 partitions the weights the pull reads), "
                              f"got train.zero_stage={self.train.zero_stage!r}")
        if self.model.pretrained and self.train.optimizer == "prodigy":
            # Transfer learning trains each block in its own parameter group (its own rate); DeepSpeed's ZeRO 1-2 step the
            # groups one at a time, so each would estimate its own d, and a frozen block's lr 0 stops Prodigy's estimate.
            raise ConfigError("train.optimizer=prodigy estimates one step size over all parameters: it does not take model.pretrained's "
                              "per-block learning rates; use adamw or schedulefree_adamw for transfer learning")
        if self.model.pretrained:
            from workers.modes import pretrained_file

            try:
                pretrained_file(self.model.pretrained)
            except FileNotFoundError as error:
                raise ConfigError(str(error)) from None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# Named recipes: overrides on top of the dataclass defaults. Every run starts from "default"; the
# others derive from it.
RECIPES: dict[str, dict[str, Any]] = {
    # Digits epochs take a third of a second while the CPU-hosted LLM takes seconds to choose: never
    # wait for it, and take an answer up to 8 epochs late (a pick from the menu is still checked
    # against the findings at that moment: it is dropped when the finding it answered is gone).
    "default": {"coordinator": {"wait_for_answer_s": 0.0, "max_answer_age_epochs": 8}},
    # The tiniest real run: 2 workers, ZeRO-2, digits; about a minute on a 2-core laptop.
    "smoke": {"name": "smoke", "train": {"num_workers": 2, "zero_stage": 2, "epochs": 8, "early_stopping_patience": 0, "lr": 3e-3}},
    "zero3": {"name": "zero3", "train": {"zero_stage": 3}},
    "mlp": {"name": "mlp", "model": {"kind": "mlp", "width": 128}},
    "resnet": {"name": "resnet", "model": {"kind": "resnet", "width": 16}},
}

# Sweep recipes for `hybridtrain tune --recipe NAME`: overrides on top of the run recipe of the same name
# (if any) and the defaults.
SWEEP_RECIPES: dict[str, dict[str, Any]] = {
    # Four PBT trials of the smoke run, each 2 workers at half a CPU: a whole population on a 2-core laptop.
    "smoke": {"name": "sweep-smoke", "advisor": {"backend": "none"},
              "train": {"epochs": 6, "cpus_per_worker": 0.5, "warmup_epochs": 0.0},
              "tune": {"scheduler": "pbt", "num_samples": 4, "perturbation_interval": 2, "quantile_fraction": 0.25,
                       "space": {"train.lr": {"loguniform": [3e-4, 1e-2]}, "model.dropout": {"uniform": [0.0, 0.3]}}}},
    "default": {"name": "sweep", "tune": {"scheduler": "pbt", "num_samples": 4,
                                          "space": {"train.lr": {"loguniform": [1e-4, 1e-2]}, "train.weight_decay": {"loguniform": [1e-5, 1e-2]},
                                                    "model.dropout": {"uniform": [0.0, 0.4]}}}},
}


def load_config_file(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} does not exist")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as error:
        raise ConfigError(f"config file {str(path)!r} is not valid YAML: {error}") from error
    if not isinstance(data, dict):
        raise ConfigError(f"config file {str(path)!r} must hold a mapping at the top level, got {type(data).__name__}")
    return data


def build_config(*, recipe: str | None = None, config_file: str | Path | None = None, overrides: list[str] = (),
                 sweep: bool = False) -> ExperimentConfig:
    """Dataclass defaults, the `default` recipe, the named recipe (for a sweep: the run recipe and then the
    sweep recipe of that name), the config file, then each `--set`; validated at the end."""
    values: dict[str, Any] = dict(RECIPES["default"])
    recipes = {**RECIPES, **SWEEP_RECIPES} if sweep else RECIPES
    if recipe is not None:
        if recipe not in recipes:
            raise ConfigError(f"unknown recipe {recipe!r}; recipes are {sorted(recipes)}")
        values = merge(values, RECIPES.get(recipe, {}))
        if sweep:
            values = merge(values, SWEEP_RECIPES.get(recipe, {}))
    if config_file is not None:
        values = merge(values, load_config_file(config_file))
    for text in overrides:
        values = merge(values, parse_override(text))
    return config_from_dict(values)


def config_from_dict(values: dict[str, Any]) -> ExperimentConfig:
    return build_section(ExperimentConfig, values, "")


def write_config(config: ExperimentConfig, path: Path) -> None:
    """Written whole (`workers.files`): a resume rewrites it, and a torn one would leave nothing to resume with."""
    atomic_write_text(path, yaml.safe_dump(config.to_dict(), sort_keys=False))


def read_config(path: Path) -> ExperimentConfig:
    return config_from_dict(load_config_file(path))
