"""model.factory: a user's own network, built from "package.module:function", and the errors for bad ones.

The factories live in this test file, outside the project's packages, and are named the way a user
names them: by import path from the working directory (`tests.test_model_factory:...`).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from orchestration.errors import ConfigError
from orchestration.settings import build_section
from workers.config import ModelConfig
from workers.models import build_model, check_model, first_dropout

HERE = "tests.test_model_factory"


class TinyNet(nn.Module):
    def __init__(self, in_channels: int, num_classes: int, width: int) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(in_channels, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(), nn.AdaptiveAvgPool2d(1))
        self.drop = nn.Dropout(0.3)
        self.head = nn.Linear(width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.drop(self.features(x).flatten(1)))


def tiny_net(sample_shape, num_classes, width=4):
    return TinyNet(sample_shape[0], num_classes, width)


def not_a_module(sample_shape, num_classes):
    return "a string"


def raises(sample_shape, num_classes):
    raise RuntimeError("the factory broke")


def wrong_outputs(sample_shape, num_classes):
    return nn.Sequential(nn.Flatten(), nn.Linear(sample_shape[0] * sample_shape[1] * sample_shape[2], num_classes + 1))


def frozen(sample_shape, num_classes):
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, num_classes))
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    return model


NOT_CALLABLE = 3


def test_a_factory_builds_the_users_module_with_its_options() -> None:
    config = build_section(ModelConfig, {"factory": f"{HERE}:tiny_net", "options": {"width": 6}}, "model")
    model = build_model(config, (3, 8, 8), 5)
    assert type(model).__name__ == "TinyNet" and model.head.in_features == 6
    assert check_model(config, (3, 8, 8), 5)["parameters"] == sum(p.numel() for p in model.parameters())
    assert config.for_kind("cnn2d").kind == "custom"  # auto never picks a built-in kind for a factory
    assert first_dropout(model) == pytest.approx(0.3)


def test_model_dropout_and_init_apply_to_a_factory_model() -> None:
    model = build_model(ModelConfig(factory=f"{HERE}:tiny_net", dropout=0.5, init="zero"), (1, 8, 8), 3)
    assert model.drop.p == 0.5
    assert torch.count_nonzero(model.head.weight) == 0


@pytest.mark.parametrize(("reference", "problem"), [
    (f"{HERE}:not_a_module", "returned a str, not a torch.nn.Module"),
    (f"{HERE}:raises", "raised RuntimeError: the factory broke"),
    (f"{HERE}:frozen", "no trainable parameters"),
    (f"{HERE}:NOT_CALLABLE", "is a int, not a function"),
    (f"{HERE}:missing", "has no attribute 'missing'"),
    ("no_such_package.models:net", "cannot import module 'no_such_package.models'"),
])
def test_a_bad_factory_is_a_config_error_naming_it(reference, problem) -> None:
    with pytest.raises(ConfigError, match="model.factory") as caught:
        check_model(ModelConfig(factory=reference), (1, 8, 8), 3)
    assert problem in str(caught.value)


def test_a_model_with_the_wrong_output_shape_fails_before_training() -> None:
    with pytest.raises(ConfigError, match=r"logits of shape \(batch, 3\).*gave \(2, 4\)"):
        check_model(ModelConfig(factory=f"{HERE}:wrong_outputs"), (1, 8, 8), 3)


@pytest.mark.parametrize(("values", "problem"), [
    ({"factory": "not a reference"}, "must read 'package.module:function'"),
    ({"factory": "pkg.mod"}, "must read 'package.module:function'"),
    ({"factory": f"{HERE}:tiny_net", "kind": "resnet"}, "must be auto"),
    ({"kind": "custom"}, "custom needs model.factory"),
    ({"options": {"width": 3}}, "apply only with model.factory"),
])
def test_factory_config_is_checked_before_anything_imports(values, problem) -> None:
    with pytest.raises(ConfigError, match=problem):
        build_section(ModelConfig, values, "model")
