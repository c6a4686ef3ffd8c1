"""`ExperimentConfig`: the one config a run is made of, composed of each package's own config.

It loads from YAML, takes dotted `--set key=value` overrides and named recipes, and is validated
before Ray starts: a bad value raises `ConfigError` naming the field.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from cluster.runtime import ClusterConfig
from orchestration.coordinator_config import CoordinatorConfig
from serve_llm.config import AdvisorConfig
from workers.config import DataConfig, ModelConfig, TrainConfig


class ConfigError(ValueError):
    """A config value, key or file that cannot be used; the message names the field."""


@dataclass(kw_only=True, slots=True)
class ExperimentConfig:
    name: str = "run"
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    advisor: AdvisorConfig = field(default_factory=AdvisorConfig)
    coordinator: CoordinatorConfig = field(default_factory=CoordinatorConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)




# Named recipes: overrides on top of the dataclass defaults. Every run starts from "default"; the
# others derive from it.
RECIPES: dict[str, dict[str, Any]] = {
    # Digits epochs take seconds while a CPU-hosted LLM answers in 10-20 s: let an epoch boundary
    # wait for an answer already asked for, so the run is really advised. On real workloads
    # (minutes per epoch) the dataclass defaults, fully asynchronous, are the right ones.
    "default": {"coordinator": {"wait_for_answer_s": 60.0, "max_answer_age_epochs": 4}},
    # The tiniest real run: 2 workers, ZeRO-2, digits; about a minute on a 2-core laptop.
    "smoke": {"name": "smoke", "train": {"num_workers": 2, "zero_stage": 2, "epochs": 8, "early_stopping_patience": 0, "lr": 3e-3}},
    "zero3": {"name": "zero3", "train": {"zero_stage": 3}},
    "mlp": {"name": "mlp", "model": {"kind": "mlp"}},
    "resnet": {"name": "resnet", "model": {"kind": "resnet", "width": 16}},
}


def _field_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _coerce(path: str, annotation: Any, value: Any) -> Any:
    """Check `value` against a field's annotation (int, float, str, bool and their `| None`)."""
    if dataclasses.is_dataclass(annotation):
        if not isinstance(value, dict):
            raise ConfigError(f"{path} must be a mapping of {sorted(f.name for f in dataclasses.fields(annotation))}, got {value!r}")
        return _build(annotation, value, path)
    args = typing.get_args(annotation)
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for option in (a for a in args if a is not type(None)):
            try:
                return _coerce(path, option, value)
            except ConfigError as error:
                errors.append(str(error))
        raise ConfigError(errors[0] if errors else f"{path}: bad value {value!r}")
    if annotation is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{path} must be true or false, got {value!r}")
    if annotation is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{path} must be an integer, got {value!r}")
    if annotation is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise ConfigError(f"{path} must be a number, got {value!r}")
    if annotation is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{path} must be a string, got {value!r}")
    return value


def _build(cls: type, values: dict[str, Any], prefix: str) -> Any:
    hints = _field_types(cls)
    known = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(values) - set(known))
    if unknown:
        where = f"{prefix}." if prefix else ""
        raise ConfigError(f"unknown config key(s) {[where + k for k in unknown]}; valid keys under {prefix or 'the top level'}: {known}")
    kwargs = {name: _coerce(f"{prefix}.{name}" if prefix else name, hints[name], value) for name, value in values.items()}
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (ValueError, TypeError) as error:
        message = str(error)
        raise ConfigError(message if prefix and message.startswith(prefix) else f"{message}") from error


def _merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def parse_override(text: str) -> dict[str, Any]:
    """`train.epochs=10` -> {"train": {"epochs": 10}}; the value is parsed as YAML (10, 0.5, true, null)."""
    if "=" not in text:
        raise ConfigError(f"--set expects key=value, got {text!r}")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"--set expects a dotted key such as train.epochs, got {key!r}")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as error:
        raise ConfigError(f"--set {key}: cannot parse value {raw!r} ({error})") from error
    if isinstance(value, str):
        try:  # YAML 1.1 reads "1e-3" as a string; a user means the number
            value = float(value) if any(c in value for c in ".eE") else value
        except ValueError:
            pass
    nested: dict[str, Any] = {}
    cursor = nested
    parts = key.split(".")
    for part in parts[:-1]:
        cursor = cursor.setdefault(part, {})
    cursor[parts[-1]] = value
    return nested


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


def build_config(*, recipe: str | None = None, config_file: str | Path | None = None, overrides: list[str] = ()) -> ExperimentConfig:
    """Dataclass defaults, the `default` recipe, the named recipe, the config file, then each `--set`;
    validated at the end."""
    values: dict[str, Any] = dict(RECIPES["default"])
    if recipe is not None:
        if recipe not in RECIPES:
            raise ConfigError(f"unknown recipe {recipe!r}; recipes are {sorted(RECIPES)}")
        values = _merge(values, RECIPES[recipe])
    if config_file is not None:
        values = _merge(values, load_config_file(config_file))
    for text in overrides:
        values = _merge(values, parse_override(text))
    return config_from_dict(values)


def config_from_dict(values: dict[str, Any]) -> ExperimentConfig:
    return _build(ExperimentConfig, values, "")


def write_config(config: ExperimentConfig, path: Path) -> None:
    path.write_text(yaml.safe_dump(config.to_dict(), sort_keys=False))


def read_config(path: Path) -> ExperimentConfig:
    return config_from_dict(load_config_file(path))
