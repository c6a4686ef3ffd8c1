"""Models: plain modules with the right output shapes for each data shape."""

from __future__ import annotations

import pytest
import torch

from workers.config import ModelConfig
from workers.engine import warmup_cosine
from workers.models import build_model, resolve_kind, set_dropout


@pytest.mark.parametrize(
    ("kind", "sample_shape"),
    [("cnn2d", (1, 8, 8)), ("cnn2d", (3, 28, 28)), ("resnet", (3, 16, 16)), ("mlp", (20,)), ("mlp", (1, 8, 8)), ("cnn1d", (64,)), ("cnn1d", (4, 50))],
)
def test_output_shape(kind, sample_shape) -> None:
    model = build_model(ModelConfig(kind=kind), sample_shape, num_classes=7)
    assert model(torch.randn(5, *sample_shape)).shape == (5, 7)


def test_auto_kind_follows_the_data() -> None:
    assert resolve_kind("auto", (1, 8, 8)) == "cnn2d"
    assert resolve_kind("auto", (13,)) == "mlp"
    with pytest.raises(ValueError, match="needs image samples"):
        build_model(ModelConfig(kind="resnet"), (13,), 2)


@pytest.mark.parametrize("init", ["zero", "normal", "xavier", "kaiming"])
def test_init_schemes(init) -> None:
    torch.manual_seed(0)
    model = build_model(ModelConfig(kind="mlp", init=init), (10,), 3)
    weight = model.head.weight
    assert torch.all(model.head.bias == 0)
    assert (weight.abs().sum() == 0) == (init == "zero")


def test_set_dropout_changes_every_dropout() -> None:
    model = build_model(ModelConfig(kind="mlp", depth=3), (10,), 3)
    assert set_dropout(model, 0.4) == 3
    assert all(m.p == 0.4 for m in model.modules() if isinstance(m, torch.nn.Dropout))


def test_warmup_then_cosine() -> None:
    values = [warmup_cosine(step, warmup_steps=10, total_steps=110, min_lr_ratio=0.1) for step in range(111)]
    assert values[0] == pytest.approx(0.1) and values[9] == pytest.approx(1.0)
    assert values[10] == pytest.approx(1.0) and values[110] == pytest.approx(0.1)
    assert all(a >= b for a, b in zip(values[10:], values[11:]))


def test_mlp_width_sets_its_hidden_units() -> None:
    model = build_model(ModelConfig(kind="mlp", width=48, depth=2), (20,), 3)
    hidden = [module.out_features for module in model.modules() if isinstance(module, torch.nn.Linear)][:-1]
    assert hidden == [48, 48]


def test_unset_fields_take_the_kinds_defaults_and_set_ones_stay() -> None:
    from workers.config import KIND_DEFAULTS

    assert ModelConfig().for_kind("mlp") == ModelConfig(kind="mlp", **KIND_DEFAULTS["mlp"])
    assert ModelConfig(width=128, dropout=0.0).for_kind("mlp").depth == KIND_DEFAULTS["mlp"]["depth"]
    assert ModelConfig(width=128, dropout=0.0).for_kind("mlp").width == 128
    assert ModelConfig(width=128, dropout=0.0).for_kind("mlp").dropout == 0.0
    assert ModelConfig(kind="mlp").for_kind("mlp").depth != ModelConfig().for_kind("cnn2d").depth
    # build_model resolves them itself
    assert len([m for m in build_model(ModelConfig(), (30,), 2).modules() if isinstance(m, torch.nn.Linear)]) == KIND_DEFAULTS["mlp"]["depth"] + 1


def test_small_data_lowers_the_batch_so_an_epoch_has_enough_steps() -> None:
    from workers.config import TrainConfig, small_data_batch

    train = TrainConfig()  # batch 64, at least 8 steps an epoch
    assert small_data_batch(train, 455, 2).batch_size == 28  # 455 // (2 * 8)
    assert small_data_batch(train, 1437, 2) is train  # digits: 11 steps at 64 already
    assert small_data_batch(train, 40, 2).batch_size == 8  # never below 8 per worker
    assert small_data_batch(TrainConfig(min_steps_per_epoch=0), 455, 2).batch_size == 64  # off
    assert small_data_batch(TrainConfig(batch_size=16), 455, 2).batch_size == 16  # never raised
