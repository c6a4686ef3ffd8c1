"""Image augmentation on the fly (`data.random_crop_padding`, `data.random_flip`): training steps only, on the
normalised batch, drawn per sample from torch's generator, which the loop seeds per (seed, epoch, rank) and per
probation, so a resumed run and both branches of a probation draw the same crops and flips."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from orchestration.errors import ConfigError
from workers.config import DataConfig


def wants_augmentation(config: DataConfig) -> bool:
    return config.random_crop_padding > 0 or config.random_flip


def check_augmentation(config: DataConfig, sample_shape: tuple[int, ...] | Any) -> None:
    """Augmentation needs images (C, H, W); say so before any worker starts."""
    if wants_augmentation(config) and len(tuple(sample_shape)) != 3:
        raise ConfigError(f"data.random_crop_padding and data.random_flip augment images; this data's samples are shaped {tuple(sample_shape)} "
                          "(features or sequences): turn them off")


def augment(x: torch.Tensor, config: DataConfig) -> torch.Tensor:
    """A random crop of each image padded by `random_crop_padding` zeros (the normalised mean) and a random
    horizontal flip of half of them; `x` is (N, C, H, W) and is not changed in place."""
    if x.ndim != 4 or len(x) == 0:
        return x
    if config.random_flip:
        flip = torch.rand(len(x)) < 0.5
        x = torch.where(flip[:, None, None, None], x.flip(-1), x)
    pad = config.random_crop_padding
    if pad:
        height, width = x.shape[-2:]
        padded = F.pad(x, (pad, pad, pad, pad))
        offsets = torch.randint(0, 2 * pad + 1, (len(x), 2))
        rows = (offsets[:, 0, None] + torch.arange(height))[:, None, :, None]  # (N, 1, H, 1)
        columns = (offsets[:, 1, None] + torch.arange(width))[:, None, None, :]  # (N, 1, 1, W)
        batch = torch.arange(len(x))[:, None, None, None]
        channels = torch.arange(x.shape[1])[None, :, None, None]
        x = padded[batch, channels, rows, columns]
    return x
