"""Pure blending maths: exact endpoints, each weight op, composition and skipping."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from workers.blending import apply_hyperparameter_change, apply_weight_ops, blend, propose_tensor
from orchestration.protocol import HyperparameterChange, WeightOp


def generator(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_blend_alpha_zero_is_bitwise_identity_and_alpha_one_is_proposed():
    current = torch.randn(4, 3, generator=generator(1))
    proposed = torch.randn(4, 3, generator=generator(2))
    assert torch.equal(blend(current, proposed, 0.0), current)
    assert torch.equal(blend(current, proposed, 1.0), proposed)
    assert blend(current, proposed, 0.0).data_ptr() != current.data_ptr()


def test_blend_formula_and_bad_inputs():
    current, proposed = torch.tensor([0.0, 2.0]), torch.tensor([4.0, 6.0])
    assert torch.allclose(blend(current, proposed, 0.25), torch.tensor([1.0, 3.0]))
    with pytest.raises(ValueError, match="alpha"):
        blend(current, proposed, 1.5)
    with pytest.raises(ValueError, match="shape"):
        blend(current, torch.zeros(3), 0.5)


finite_floats = st.floats(min_value=-1e6, max_value=1e6, allow_nan=False, width=32)


@settings(max_examples=200, deadline=None)
@given(
    pairs=st.lists(st.tuples(finite_floats, finite_floats), min_size=1, max_size=16),
    alpha=st.floats(min_value=0.0, max_value=1.0),
)
def test_blend_stays_between_current_and_proposed(pairs, alpha):
    current = torch.tensor([pair[0] for pair in pairs], dtype=torch.float32)
    proposed = torch.tensor([pair[1] for pair in pairs], dtype=torch.float32)
    blended = blend(current, proposed, alpha)
    assert torch.all(blended >= torch.minimum(current, proposed))
    assert torch.all(blended <= torch.maximum(current, proposed))


def test_shrink_noise_and_toward_references():
    current = torch.randn(8, 4, generator=generator(3))
    best, ema = torch.zeros(8, 4), torch.ones(8, 4)
    shrunk = propose_tensor(WeightOp(op="shrink", group="w", amount=0.25), current)
    assert torch.allclose(shrunk, current * 0.75)
    noisy_a = propose_tensor(WeightOp(op="noise", group="w", amount=0.1), current, generator=generator(7))
    noisy_b = propose_tensor(WeightOp(op="noise", group="w", amount=0.1), current, generator=generator(7))
    assert torch.equal(noisy_a, noisy_b) and not torch.equal(noisy_a, current)
    assert (noisy_a - current).std() < 0.2 * current.std()
    toward_best = propose_tensor(WeightOp(op="toward_best", group="w", amount=0.5), current, best=best)
    assert torch.allclose(toward_best, current * 0.5)
    toward_ema = propose_tensor(WeightOp(op="toward_ema", group="w", amount=1.0), current, ema=ema)
    assert torch.equal(toward_ema, ema)


def test_missing_references_raise_clear_errors():
    current = torch.ones(2, 2)
    with pytest.raises(ValueError, match="best weights"):
        propose_tensor(WeightOp(op="toward_best", group="w", amount=0.5), current)
    with pytest.raises(ValueError, match="EMA"):
        propose_tensor(WeightOp(op="toward_ema", group="w", amount=0.5), current)
    with pytest.raises(ValueError, match="dead-unit mask"):
        propose_tensor(WeightOp(op="reinit_dead", group="w", amount=1.0), current, generator=generator())
    with pytest.raises(ValueError, match="generator"):
        propose_tensor(WeightOp(op="noise", group="w", amount=0.1), current)


def test_reinit_dead_redraws_only_dead_rows():
    current = torch.full((6, 10), 3.0)
    dead = torch.tensor([True, False, True, False, False, True])
    proposed = propose_tensor(
        WeightOp(op="reinit_dead", group="w", amount=1.0), current, dead_units=dead, generator=generator()
    )
    assert torch.equal(proposed[~dead], current[~dead])
    assert not torch.any(proposed[dead] == 3.0)
    assert proposed[dead].abs().max() < 3.0  # drawn with std sqrt(2 / 10) ~ 0.45
    bias = propose_tensor(
        WeightOp(op="reinit_dead", group="b", amount=1.0), torch.ones(6), dead_units=dead, generator=generator()
    )
    assert torch.equal(bias, (~dead).float())
    partly = propose_tensor(
        WeightOp(op="reinit_dead", group="w", amount=0.34), current, dead_units=dead, generator=generator()
    )
    assert int((partly != 3.0).any(dim=1).sum()) == 1


def test_values_are_reshaped_and_counted():
    current = torch.zeros(2, 2)
    op = WeightOp(op="values", group="w", values=[1.0, 2.0, 3.0, 4.0])
    assert torch.equal(propose_tensor(op, current), torch.tensor([[1.0, 2.0], [3.0, 4.0]]))
    with pytest.raises(ValueError, match="3 numbers"):
        propose_tensor(WeightOp(op="values", group="w", values=[1.0, 2.0, 3.0]), current)


def test_apply_weight_ops_returns_changed_groups_and_what_it_did():
    params = {"features.0.weight": torch.ones(3, 2), "features.0.bias": torch.ones(3), "fc.weight": torch.ones(2, 3)}
    ops = [
        WeightOp(op="shrink", group="features.0.weight", amount=0.5),
        WeightOp(op="shrink", group="features.0.weight", amount=0.5),  # composes: W * 0.25
        WeightOp(op="toward_best", group="fc.weight", amount=1.0),  # no best weights: skipped
        WeightOp(op="shrink", group="missing.weight", amount=0.1),
        WeightOp(op="shrink", group="features.0.bias", amount=0.5),
    ]
    alphas = {"features.0.weight": 0.5, "fc.weight": 0.5, "missing.weight": 0.5, "features.0.bias": 0.0}
    new_params, operations = apply_weight_ops(params, ops, alphas, seed=0)
    assert set(new_params) == {"features.0.weight"}
    assert torch.allclose(new_params["features.0.weight"], torch.full((3, 2), 0.625))  # 0.5 * 1 + 0.5 * 0.25
    assert torch.equal(params["features.0.weight"], torch.ones(3, 2))  # inputs untouched
    assert any(line.startswith("skipped toward_best(fc.weight") for line in operations)
    assert any("no parameter group named 'missing.weight'" in line for line in operations)
    assert "unchanged features.0.bias: alpha=0" in operations
    assert "blended features.0.weight with alpha=0.5" in operations


def test_apply_weight_ops_is_seeded_per_group():
    params = {"a": torch.randn(4, 4, generator=generator(1)), "b": torch.randn(4, 4, generator=generator(2))}
    noise_a, noise_b = (WeightOp(op="noise", group=group, amount=0.1) for group in ("a", "b"))
    alphas = {"a": 1.0, "b": 1.0}
    forward, _ = apply_weight_ops(params, [noise_a, noise_b], alphas, seed=3)
    backward, _ = apply_weight_ops(params, [noise_b, noise_a], alphas, seed=3)
    other_seed, _ = apply_weight_ops(params, [noise_a, noise_b], alphas, seed=4)
    assert all(torch.equal(forward[group], backward[group]) for group in alphas)
    assert not torch.equal(forward["a"], other_seed["a"])


def test_apply_weight_ops_needs_an_alpha_for_each_group():
    with pytest.raises(ValueError, match="no alpha"):
        apply_weight_ops({"w": torch.ones(2)}, [WeightOp(op="shrink", group="w", amount=0.1)], {}, seed=0)


def test_apply_hyperparameter_change():
    current = {"lr": 0.1, "weight_decay": 0.0, "batch_size": 32.0}
    change = HyperparameterChange(lr_scale=0.25, weight_decay=0.01, dropout=0.3)
    new, operations = apply_hyperparameter_change(current, change)
    assert new == pytest.approx({"lr": 0.025, "weight_decay": 0.01, "batch_size": 32.0, "dropout": 0.3})
    half, _ = apply_hyperparameter_change(current, change, alpha=0.5)
    assert half["lr"] == pytest.approx(0.05) and half["weight_decay"] == pytest.approx(0.005)
    assert len(operations) == 3
    assert apply_hyperparameter_change(current, HyperparameterChange()) == (current, [])
