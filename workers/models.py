"""Plain `nn.Module` classifiers. They know nothing of Ray, DeepSpeed or distribution.

Every model keeps its dropout layers as `nn.Dropout` modules so the advisor can change their
probability live, and names its layers so parameter groups read well in prompts and ledgers.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from workers.config import ModelConfig


class CNN2d(nn.Module):
    """Conv stages (conv-ReLU, doubling channels, pooling after the second) then a 2-layer classifier."""

    def __init__(self, in_channels: int, num_classes: int, *, width: int = 32, depth: int = 2, hidden: int = 128, dropout: float = 0.1):
        super().__init__()
        layers: list[nn.Module] = []
        channels = in_channels
        for stage in range(depth):
            out = width * 2**stage
            layers += [nn.Conv2d(channels, out, kernel_size=3, padding=1), nn.ReLU()]
            if stage % 2 == 1:
                layers.append(nn.MaxPool2d(2, ceil_mode=True))
            channels = out
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(4)  # fixed 4x4 map whatever the input size
        self.classifier = nn.Sequential(
            nn.Flatten(), nn.Linear(channels * 16, hidden), nn.ReLU(), nn.Dropout(dropout), nn.Linear(hidden, num_classes)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.pool(self.features(x)))


class CNN1d(nn.Module):
    """1-D conv stages over a sequence (N, C, L) or a feature vector treated as one channel."""

    def __init__(self, in_channels: int, num_classes: int, *, width: int = 32, depth: int = 2, hidden: int = 128, dropout: float = 0.1):
        super().__init__()
        layers: list[nn.Module] = []
        channels = in_channels
        for stage in range(depth):
            out = width * 2**stage
            layers += [nn.Conv1d(channels, out, kernel_size=5, padding=2), nn.ReLU()]
            if stage % 2 == 1:
                layers.append(nn.MaxPool1d(2, ceil_mode=True))
            channels = out
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool1d(8)
        self.classifier = nn.Sequential(
            nn.Flatten(), nn.Linear(channels * 8, hidden), nn.ReLU(), nn.Dropout(dropout), nn.Linear(hidden, num_classes)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 2:
            x = x.unsqueeze(1)
        return self.classifier(self.pool(self.features(x)))


class MLP(nn.Module):
    """Fully connected layers with ReLU and dropout, for tabular data (N, F)."""

    def __init__(self, in_features: int, num_classes: int, *, width: int = 256, depth: int = 2, dropout: float = 0.1):
        super().__init__()
        layers: list[nn.Module] = [nn.Flatten()]
        features = in_features
        for _ in range(depth):
            layers += [nn.Linear(features, width), nn.ReLU(), nn.Dropout(dropout)]
            features = width
        self.body = nn.Sequential(*layers)
        self.head = nn.Linear(features, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


class BasicBlock(nn.Module):
    """The ResNet basic block: two 3x3 convs with batch norm and an identity (or 1x1) shortcut."""

    def __init__(self, in_channels: int, out_channels: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False), nn.BatchNorm2d(out_channels)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class ResNetSmall(nn.Module):
    """A small ResNet: a stem, two stages of `depth` basic blocks (the second strided), global pooling."""

    def __init__(self, in_channels: int, num_classes: int, *, width: int = 32, depth: int = 1, dropout: float = 0.1):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(in_channels, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU())
        blocks: list[nn.Module] = []
        channels = width
        for stage, out in enumerate((width, width * 2)):
            for index in range(depth):
                blocks.append(BasicBlock(channels, out, stride=2 if stage > 0 and index == 0 else 1))
                channels = out
        self.blocks = nn.Sequential(*blocks)
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(dropout), nn.Linear(channels, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(self.stem(x)))


def resolve_kind(kind: str, sample_shape: tuple[int, ...]) -> str:
    """The model kind for one sample's shape (without the batch dim) when `kind` is `auto`."""
    if kind != "auto":
        return kind
    return "cnn2d" if len(sample_shape) == 3 else "mlp"


def build_model(config: ModelConfig, sample_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    """Build the configured model for samples of `sample_shape` ((C, H, W) images or (F,) features)."""
    kind = resolve_kind(config.kind, sample_shape)
    config = config.for_kind(kind)
    if kind in ("cnn2d", "resnet") and len(sample_shape) != 3:
        raise ValueError(f"model.kind={kind!r} needs image samples (C, H, W), got sample shape {sample_shape}")
    if kind == "cnn2d":
        model: nn.Module = CNN2d(sample_shape[0], num_classes, width=config.width, depth=config.depth, hidden=config.hidden, dropout=config.dropout)
    elif kind == "resnet":
        model = ResNetSmall(sample_shape[0], num_classes, width=config.width, depth=config.depth, dropout=config.dropout)
    elif kind == "cnn1d":
        in_channels = sample_shape[0] if len(sample_shape) == 2 else 1
        model = CNN1d(in_channels, num_classes, width=config.width, depth=config.depth, hidden=config.hidden, dropout=config.dropout)
    else:
        model = MLP(math.prod(sample_shape), num_classes, width=config.width, depth=config.depth, dropout=config.dropout)
    initialize_weights(model, config.init)
    return model


def initialize_weights(model: nn.Module, scheme: str) -> None:
    """Re-initialise conv/linear weights (biases to zero) unless `scheme` is PyTorch's `default`."""
    if scheme == "default":
        return
    for module in model.modules():
        if not isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Linear)):
            continue
        if scheme == "zero":
            nn.init.zeros_(module.weight)
        elif scheme == "normal":
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        elif scheme == "xavier":
            nn.init.xavier_uniform_(module.weight)
        elif scheme == "kaiming":
            nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
        else:
            raise ValueError(f"model.init must be one of default, zero, normal, xavier, kaiming, got {scheme!r}")
        if module.bias is not None:
            nn.init.zeros_(module.bias)


def set_dropout(model: nn.Module, probability: float) -> int:
    """Set every dropout module's probability; returns how many were changed."""
    changed = 0
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = probability
            changed += 1
    return changed
