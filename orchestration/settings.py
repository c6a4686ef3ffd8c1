"""How every config section is checked, built and overridden: one error, one rule helper, one parser.

Each package owns its config dataclass (`cluster.ClusterConfig`, `workers.config.*`,
`serve_llm.config.AdvisorConfig`, `orchestration.config.CoordinatorConfig`); they all check their
values with `require`, so every error names the field as `section.key` and quotes the bad value.
`build_section` turns a mapping (a YAML section, `--set` overrides) into a dataclass with the same
errors, and `parse_override` is the only `key=value` parser. This module sits at the bottom of the
import graph, beside the advice protocol, because every package's config reads it.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any

import yaml

from orchestration.errors import ConfigError


def require(condition: bool, field: str, value: object, rule: str) -> None:
    """Raise `ConfigError("<field> <rule>, got <value!r>")` unless `condition` holds.

    `field` is the dotted name a user writes in YAML or `--set`, e.g. `train.lr`.
    """
    if not condition:
        raise ConfigError(f"{field} {rule}, got {value!r}")


def is_number(value: object) -> bool:
    """A real, finite int or float (bool is not a number here)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and value == value and abs(value) != float("inf")


def is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _coerce(path: str, annotation: Any, value: Any) -> Any:
    """Check `value` against a field's annotation (int, float, str, bool, Literal, nested dataclass, `| None`)."""
    if dataclasses.is_dataclass(annotation):
        if not isinstance(value, dict):
            raise ConfigError(f"{path} must be a mapping of {sorted(f.name for f in dataclasses.fields(annotation))}, got {value!r}")
        return build_section(annotation, value, path)
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
    if typing.get_origin(annotation) is typing.Literal:
        require(value in args, path, value, f"must be one of {args}")
        return value
    if annotation is bool:
        require(isinstance(value, bool), path, value, "must be true or false")
    elif annotation is int:
        require(is_int(value), path, value, "must be an integer")
    elif annotation is float:
        require(isinstance(value, (int, float)) and not isinstance(value, bool), path, value, "must be a number")
        return float(value)
    elif annotation is str:
        require(isinstance(value, str), path, value, "must be a string")
    return value


def build_section(cls: type, values: dict[str, Any], section: str) -> Any:
    """`cls(**values)` with each value type-checked first; unknown keys are listed with the valid ones."""
    hints = typing.get_type_hints(cls)
    known = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(values) - set(known))
    if unknown:
        where = f"{section}." if section else ""
        raise ConfigError(f"unknown config key(s) {[where + k for k in unknown]}; valid keys under {section or 'the top level'}: {known}")
    kwargs = {name: _coerce(f"{section}.{name}" if section else name, hints[name], value) for name, value in values.items()}
    return cls(**kwargs)


def merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """Deep merge of nested mappings; `override` wins."""
    merged = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = merge(merged[key], value)
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
