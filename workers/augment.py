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
    horizontal flip of half of them; `x` is (N, C, H, W) and is not changed in place. One padded copy and
    the output are all it allocates (large images: no index tensors the size of the batch)."""
    if x.ndim != 4 or len(x) == 0:
        return x
    count, height, width = len(x), x.shape[-2], x.shape[-1]
    flip = (torch.rand(count) < 0.5).tolist() if config.random_flip else [False] * count
    pad = config.random_crop_padding
    offsets = torch.randint(0, 2 * pad + 1, (count, 2)).tolist() if pad else [[0, 0]] * count
    source = F.pad(x, (pad, pad, pad, pad)) if pad else x
    out = torch.empty_like(x)
    for index, ((top, left), mirrored) in enumerate(zip(offsets, flip)):
        crop = source[index, :, top:top + height, left:left + width]
        out[index] = crop.flip(-1) if mirrored else crop
    return out
