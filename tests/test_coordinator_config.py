"""CoordinatorConfig: defaults are valid, bad values fail naming the field and quoting the value."""

from __future__ import annotations

import pytest

from orchestration.config import CoordinatorConfig


def test_defaults_are_valid_and_documented_values():
    config = CoordinatorConfig()
    assert config.stability_alpha == 0.1
    assert config.reward_mode == "counterfactual"
    assert config.reset_optimizer_moments is False
    assert config.apply_hyperparameters and config.apply_weights


@pytest.mark.parametrize(
    ("field_name", "value"),
    [
        ("query_interval", -1),
        ("plateau_window", 0),
        ("divergence_factor", 1.0),
        ("drift_threshold", 0.0),
        ("cache_quantum", 0.0),
        ("stability_alpha", 1.5),
        ("alpha_up", 0.9),
        ("alpha_down", 0.0),
        ("reward_mode", "oracle"),
        ("probation_steps", 0),
        ("history_window", 0),
        ("reward_gap_weight", -0.1),
    ],
)
def test_bad_value_names_field_and_quotes_value(field_name, value):
    with pytest.raises(ValueError) as error:
        CoordinatorConfig(**{field_name: value})
    assert f"coordinator.{field_name}" in str(error.value)
    assert repr(value) in str(error.value)


def test_stability_alpha_must_lie_within_alpha_bounds():
    with pytest.raises(ValueError, match="stability_alpha"):
        CoordinatorConfig(stability_alpha=0.6, alpha_max=0.5)
    CoordinatorConfig(stability_alpha=0.0)  # 0 = blending off, always allowed


def test_keyword_only():
    with pytest.raises(TypeError):
        CoordinatorConfig(5)  # type: ignore[misc]
