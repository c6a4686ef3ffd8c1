"""AlphaController: starts at stability_alpha, adapts multiplicatively, never leaves its bounds."""

from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from orchestration.alphas import AlphaController
from orchestration.config import CoordinatorConfig


def controller(**overrides) -> AlphaController:
    """Built the way the coordinator builds it: from a CoordinatorConfig, which checks the values once."""
    settings = {"stability_alpha": 0.1, "alpha_min": 0.01, "alpha_max": 0.5, "alpha_up": 2.0, "alpha_down": 0.5}
    return AlphaController.from_config(CoordinatorConfig(**{**settings, **overrides}))


def test_starts_at_stability_alpha_and_adapts_per_group():
    alphas = controller()
    assert alphas.alpha_for(["a", "b"]) == {"a": 0.1, "b": 0.1}
    assert alphas.update(["a"], accepted=True) == {"a": pytest.approx(0.2)}
    assert alphas.update(["b"], accepted=False) == {"b": pytest.approx(0.05)}
    assert alphas.alpha_for(["a", "b", "c"]) == pytest.approx({"a": 0.2, "b": 0.05, "c": 0.1})


def test_suggested_alpha_may_lower_but_never_raise():
    alphas = controller()
    assert alphas.alpha_for(["a"], suggested=0.9) == {"a": 0.1}
    assert alphas.alpha_for(["a"], suggested=0.05) == {"a": 0.05}
    assert alphas.alpha_for(["a"], suggested=0.0) == {"a": 0.01}  # floored at alpha_min


def test_zero_alpha_means_blending_off_forever():
    alphas = controller(stability_alpha=0.0)
    alphas.update(["a"], accepted=True)
    alphas.update(["a"], accepted=False)
    assert alphas.alpha_for(["a"], suggested=0.3) == {"a": 0.0}


@given(st.lists(st.booleans(), max_size=40))
def test_alphas_stay_within_bounds(verdicts):
    alphas = controller()
    for accepted in verdicts:
        alpha = alphas.update(["g"], accepted)["g"]
        assert 0.01 <= alpha <= 0.5


def test_state_round_trips_through_json():
    alphas = controller()
    alphas.update(["a"], accepted=True)
    restored = AlphaController.from_state(json.loads(json.dumps(alphas.to_state())))
    assert restored.alpha_for(["a", "b"]) == alphas.alpha_for(["a", "b"])


def test_bad_settings_raise():
    with pytest.raises(ValueError, match="alpha_up"):
        controller(alpha_up=0.5)
    with pytest.raises(ValueError, match="stability_alpha"):
        controller(stability_alpha=0.9)
