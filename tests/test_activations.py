"""Learnable and switchable activations: the rational init, the factory in every model, and the
adaptive activation the advisor switches per layer (a buffer, so checkpoints and rollbacks carry it)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from orchestration.protocol import ACTIVATIONS
from workers.config import ACTIVATION_CHOICES, ModelConfig
from workers.models import (
    AdaptiveActivation,
    RationalActivation,
    activation_kinds,
    adaptive_activations,
    inactive_activation_parameters,
    build_model,
    make_activation,
)

MODELS = [("cnn2d", (1, 8, 8)), ("cnn1d", (4, 12)), ("cnn1d", (12,)), ("mlp", (10,)), ("resnet", (3, 8, 8))]


def _model(kind: str, sample_shape: tuple[int, ...], activation: str, *, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    config = ModelConfig(kind=kind, activation=activation, width=4, hidden=8, depth=2 if kind != "resnet" else 1, dropout=0.0)
    return build_model(config, sample_shape, 3)


def _inputs(sample_shape: tuple[int, ...], batch: int = 6) -> torch.Tensor:
    return torch.randn(batch, *sample_shape, generator=torch.Generator().manual_seed(1))


# --- (e) the rational init ----------------------------------------------------------------------


def test_rational_init_approximates_relu_on_minus_3_to_3() -> None:
    x = torch.linspace(-3, 3, 6001)
    with torch.no_grad():
        y = RationalActivation()(x)
    # Measured: 0.0418 against ReLU, 0.0298 against the leaky ReLU (slope 0.01) it was fitted to.
    assert (y - torch.relu(x)).abs().max() < 0.045
    assert (y - F.leaky_relu(x, 0.01)).abs().max() < 0.031
    assert (y - torch.relu(x)).pow(2).mean().sqrt() < 0.015  # measured 0.0133


def test_rational_denominator_never_vanishes() -> None:
    rational = RationalActivation()
    with torch.no_grad():
        rational.denominator.copy_(torch.tensor([-1.0, 0.0, -3.0, 0.0]))  # signs must not matter
        rational.numerator.copy_(torch.tensor([1.0, -2.0, 0.5, 0.0, 0.0, 0.0]))
    x = torch.cat([torch.linspace(-50, 50, 1001), torch.zeros(1)])
    y = rational(x)
    assert torch.isfinite(y).all()
    assert y[-1] == 1.0  # Q(0) = 1, P(0) = a_0


def test_rational_keeps_its_fit_in_bf16() -> None:
    x = torch.linspace(-3, 3, 601).to(torch.bfloat16)
    with torch.no_grad():
        y = RationalActivation().to(torch.bfloat16)(x)
    assert y.dtype == torch.bfloat16
    # Computed in fp32 from bf16-rounded coefficients; measured 0.038 against ReLU.
    assert (y.float() - torch.relu(x.float())).abs().max() < 0.045


# --- the factory in every model ------------------------------------------------------------------


@pytest.mark.parametrize("activation", ACTIVATION_CHOICES)
@pytest.mark.parametrize(("kind", "sample_shape"), MODELS)
def test_every_activation_trains_in_every_model(kind, sample_shape, activation) -> None:  # (a)
    model = _model(kind, sample_shape, activation)
    x, y = _inputs(sample_shape, 16), torch.randint(0, 3, (16,), generator=torch.Generator().manual_seed(2))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(4):
        optimizer.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert all(torch.isfinite(torch.tensor(losses)))
    kinds = set(activation_kinds(model).values())
    assert kinds == ({"relu"} if activation == "adaptive" else {activation})
    if activation in ("prelu", "rational"):
        activation_params = [p for m in model.modules() if isinstance(m, (nn.PReLU, RationalActivation)) for p in m.parameters()]
        assert activation_params and all(p.grad is not None and p.grad.abs().sum() > 0 for p in activation_params)


@pytest.mark.parametrize(("kind", "sample_shape"), MODELS)
def test_relu_models_keep_todays_state_dict_keys(kind, sample_shape) -> None:  # (f)
    model = _model(kind, sample_shape, "relu")
    assert list(model.state_dict()) == TODAYS_KEYS[kind]
    assert not any(isinstance(m, (nn.PReLU, RationalActivation, AdaptiveActivation)) for m in model.modules())


@pytest.mark.parametrize(("kind", "sample_shape"), MODELS)
def test_adaptive_starting_as_relu_is_the_relu_model_bit_for_bit(kind, sample_shape) -> None:
    relu, adaptive = _model(kind, sample_shape, "relu").eval(), _model(kind, sample_shape, "adaptive").eval()
    assert all(torch.equal(value, relu.state_dict()[name]) for name, value in adaptive.state_dict().items() if name in relu.state_dict())
    x = _inputs(sample_shape)
    assert torch.equal(relu(x), adaptive(x))


@pytest.mark.parametrize(("kind", "sample_shape"), MODELS)
def test_helpers_list_activations_in_forward_order(kind, sample_shape) -> None:
    model = _model(kind, sample_shape, "adaptive")
    called: list[str] = []
    for name, module in adaptive_activations(model).items():
        module.register_forward_hook(lambda *_, name=name: called.append(name))
    model(_inputs(sample_shape))
    assert called == list(adaptive_activations(model)) == list(activation_kinds(model))
    assert len(called) == sum(isinstance(m, nn.ReLU) for m in _model(kind, sample_shape, "relu").modules())


def test_prelu_has_one_slope_per_channel_on_every_input_layout() -> None:
    for shape in [(5, 3, 4, 4), (5, 3, 7), (5, 3)]:
        for module in (make_activation("prelu", 3), AdaptiveActivation(3, kind="prelu")):
            prelu = module if isinstance(module, nn.PReLU) else module.prelu
            with torch.no_grad():
                prelu.weight.copy_(torch.tensor([0.1, 0.2, 0.3]))
            out = module(-torch.ones(shape))
            assert out.shape == shape
            assert torch.allclose(out.transpose(0, 1).reshape(3, -1), -torch.tensor([[0.1], [0.2], [0.3]]).expand(3, out.numel() // 3))


def test_invalid_kinds_are_clear_errors() -> None:
    with pytest.raises(ValueError, match="model.activation must be one of .*got 'swish'"):
        make_activation("swish", 4)
    with pytest.raises(ValueError, match=r"kind must be one of \('relu', 'prelu', 'rational'\), got 'swish'"):
        AdaptiveActivation(4).set_kind("swish")
    with pytest.raises(ValueError, match="got 'adaptive'"):
        AdaptiveActivation(4, kind="adaptive")
    with pytest.raises(ValueError, match="model.activation"):
        ModelConfig(activation="swish")


def test_saved_choice_indices_keep_their_meaning() -> None:
    # Saved runs store an index into ACTIVATIONS: it may grow at its end, never be reordered.
    assert ACTIVATIONS[:3] == ("relu", "prelu", "rational")


# --- switching -----------------------------------------------------------------------------------


@pytest.mark.parametrize(("kind", "sample_shape"), MODELS)
def test_switching_changes_the_output_and_switching_back_restores_it(kind, sample_shape) -> None:  # (b)
    model = _model(kind, sample_shape, "adaptive").eval()
    x = _inputs(sample_shape)
    before = model(x)
    name, first = next(iter(adaptive_activations(model).items()))
    for other in ("prelu", "rational"):
        assert first.set_kind(other) == "relu"
        assert activation_kinds(model)[name] == other
        assert not torch.allclose(model(x), before)  # ReLU vs PReLU/rational differ on negative inputs
        assert first.set_kind("relu") == other
        assert torch.equal(model(x), before)


def test_inactive_kinds_get_no_gradient_and_keep_their_values() -> None:
    model = _model("mlp", (10,), "adaptive")
    activation = next(iter(adaptive_activations(model).values()))
    activation.set_kind("prelu")
    rational_before = activation.rational.numerator.detach().clone()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    F.cross_entropy(model(_inputs((10,))), torch.zeros(6, dtype=torch.long)).backward()
    optimizer.step()
    assert activation.prelu.weight.grad is not None and activation.rational.numerator.grad is None
    assert torch.equal(activation.rational.numerator, rational_before)
    no_gradient = [name for name, param in model.named_parameters() if param.grad is None]
    assert inactive_activation_parameters(model) == no_gradient == [
        "body.2.rational.numerator", "body.2.rational.denominator",  # body.2 is a PReLU now, body.5 still a ReLU
        "body.5.prelu.weight", "body.5.rational.numerator", "body.5.rational.denominator",
    ]


def test_a_direct_write_to_the_buffer_switches_too() -> None:
    activation = AdaptiveActivation(3)
    x = -torch.ones(2, 3)
    assert torch.equal(activation(x), torch.zeros(2, 3))  # caches relu
    activation.choice.fill_(ACTIVATIONS.index("prelu"))
    assert activation.kind == "prelu" and torch.allclose(activation(x), torch.full((2, 3), -0.25))
    activation.choice.fill_(7)
    with pytest.raises(ValueError, match="holds 7"):
        activation(x)


# --- checkpoints and rollback --------------------------------------------------------------------


def _switched_and_trained(kind: str, sample_shape: tuple[int, ...]) -> nn.Module:
    model = _model(kind, sample_shape, "adaptive")
    for activation, new_kind in zip(adaptive_activations(model).values(), ["prelu", "rational", "relu"] * 4):
        activation.set_kind(new_kind)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    F.cross_entropy(model(_inputs(sample_shape)), torch.zeros(6, dtype=torch.long)).backward()
    optimizer.step()
    return model.eval()


@pytest.mark.parametrize(("kind", "sample_shape"), MODELS)
def test_state_dict_round_trip_carries_the_choice(kind, sample_shape, tmp_path) -> None:  # (c)
    from safetensors.torch import load_file, save_file

    trained = _switched_and_trained(kind, sample_shape)
    save_file({name: value.contiguous() for name, value in trained.state_dict().items()}, str(tmp_path / "model.safetensors"))  # as predict reads it
    fresh = _model(kind, sample_shape, "adaptive", seed=5)
    assert set(activation_kinds(fresh).values()) == {"relu"}
    fresh.load_state_dict(load_file(str(tmp_path / "model.safetensors")), strict=True)
    fresh.eval()
    assert activation_kinds(fresh) == activation_kinds(trained)
    x = _inputs(sample_shape)
    assert torch.equal(fresh(x), trained(x))


def test_a_rollback_that_reloads_module_state_restores_the_kind() -> None:
    model = _model("cnn2d", (1, 8, 8), "adaptive").eval()
    x = _inputs((1, 8, 8))
    saved = {name: value.clone() for name, value in model.state_dict().items()}
    before = model(x)
    adaptive_activations(model)["features.1"].set_kind("prelu")
    assert not torch.equal(model(x), before)
    model.load_state_dict(saved)
    assert activation_kinds(model)["features.1"] == "relu"
    assert torch.equal(model(x), before)


def test_a_loaded_adaptive_model_exports_with_its_kinds() -> None:
    # torch.export (the ONNX exporter's front end) cannot branch on a buffer's value: the loaded
    # kinds must reach the trace without an eager forward first, as in `predict` -> export.
    trained = _switched_and_trained("cnn2d", (1, 8, 8))
    fresh = _model("cnn2d", (1, 8, 8), "adaptive", seed=5).eval()
    fresh.load_state_dict(trained.state_dict())
    exported = torch.export.export(fresh, (torch.zeros(2, 1, 8, 8),))
    x = _inputs((1, 8, 8))[:2]
    assert torch.allclose(exported.module()(x), trained(x), atol=1e-6)


# --- (d) what the advisor relies on: a dead ReLU unit comes back to life -------------------------


@pytest.mark.parametrize("kind", ACTIVATIONS)
def test_only_relu_leaves_a_dead_unit_without_gradient(kind) -> None:
    torch.manual_seed(0)
    hidden, activation, head = nn.Linear(4, 3), AdaptiveActivation(3, kind=kind), nn.Linear(3, 2)
    with torch.no_grad():
        hidden.bias[0] = -4.0  # unit 0: every pre-activation negative, as `watch_dead_units` would flag
    x = torch.randn(64, 4, generator=torch.Generator().manual_seed(1)) * 0.5
    pre_activation = hidden(x)
    assert (pre_activation[:, 0] < 0).all() and (pre_activation[:, 1:] > 0).any()
    F.cross_entropy(head(activation(pre_activation)), torch.randint(0, 2, (64,), generator=torch.Generator().manual_seed(2))).backward()
    dead_row_gradient = hidden.weight.grad[0].abs().sum() + hidden.bias.grad[0].abs()
    if kind == "relu":
        assert dead_row_gradient == 0
    else:
        assert dead_row_gradient > 1e-4


# State-dict keys of the relu models before activations became configurable (generated from the
# previous workers/models.py for the configs `_model` builds); saved runs and other code use them.
_CONV_KEYS = ["features.0.weight", "features.0.bias", "features.2.weight", "features.2.bias",
              "classifier.1.weight", "classifier.1.bias", "classifier.4.weight", "classifier.4.bias"]
_BN = ["weight", "bias", "running_mean", "running_var", "num_batches_tracked"]
TODAYS_KEYS = {
    "cnn2d": _CONV_KEYS,
    "cnn1d": _CONV_KEYS,
    "mlp": ["body.1.weight", "body.1.bias", "body.4.weight", "body.4.bias", "head.weight", "head.bias"],
    "resnet": [
        "stem.0.weight", *[f"stem.1.{s}" for s in _BN],
        "blocks.0.conv1.weight", *[f"blocks.0.bn1.{s}" for s in _BN], "blocks.0.conv2.weight", *[f"blocks.0.bn2.{s}" for s in _BN],
        "blocks.1.conv1.weight", *[f"blocks.1.bn1.{s}" for s in _BN], "blocks.1.conv2.weight", *[f"blocks.1.bn2.{s}" for s in _BN],
        "blocks.1.shortcut.0.weight", *[f"blocks.1.shortcut.1.{s}" for s in _BN],
        "head.3.weight", "head.3.bias",
    ],
}
