"""Everything DeepSpeed: the engine's config, optimizer and schedule, and full-parameter access.

This is the one place that knows about ZeRO. Models stay plain `nn.Module`s; the training loop
talks to the engine only through `build_engine`, `full_fp32_params` and `write_full_fp32_params`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from workers.config import TrainConfig


@dataclass(kw_only=True)
class EngineSpec:
    """What the engine was built with, for logs and the run record."""

    zero_stage: int
    precision: str
    optimizer_steps_per_epoch: int
    device: str


def resolve_precision(requested: str, device: torch.device) -> str:
    """fp32 on CPU (DeepSpeed's CPU accelerator has no fp16, and fp32 is what we validate against);
    bf16 on GPUs that support it when `auto`."""
    if requested != "auto":
        return requested
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return "bf16"
    return "fp32"


def deepspeed_config(train: TrainConfig, *, precision: str, world_size: int) -> dict[str, Any]:
    """The DeepSpeed JSON config for one run."""
    return {
        "train_micro_batch_size_per_gpu": train.batch_size,
        "gradient_accumulation_steps": train.grad_accum_steps,
        "train_batch_size": train.batch_size * train.grad_accum_steps * world_size,
        "gradient_clipping": train.grad_clip,
        "zero_optimization": {"stage": train.zero_stage},
        "bf16": {"enabled": precision == "bf16"},
        "fp16": {"enabled": False},
        # Our client optimizers are plain torch ones; DeepSpeed supports them under ZeRO but asks for consent.
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
    }


def build_optimizer(model: nn.Module, train: TrainConfig) -> torch.optim.Optimizer:
    params = model.parameters()
    if train.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=train.lr, betas=(train.momentum, 0.999), weight_decay=train.weight_decay)
    if train.optimizer == "adam":
        return torch.optim.Adam(params, lr=train.lr, betas=(train.momentum, 0.999), weight_decay=train.weight_decay)
    if train.optimizer == "sgd":
        return torch.optim.SGD(params, lr=train.lr, momentum=train.momentum, weight_decay=train.weight_decay)
    if train.optimizer == "rmsprop":
        return torch.optim.RMSprop(params, lr=train.lr, momentum=train.momentum, weight_decay=train.weight_decay)
    raise ValueError(f"train.optimizer must be adamw, adam, sgd or rmsprop, got {train.optimizer!r}")


def warmup_cosine(step: int, *, warmup_steps: int, total_steps: int, min_lr_ratio: float) -> float:
    """LR multiplier: linear warm-up to 1 over `warmup_steps`, then cosine decay to `min_lr_ratio`."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def build_engine(model: nn.Module, train: TrainConfig, *, world_size: int, micro_steps_per_epoch: int, device: torch.device):
    """Wrap `model` in a DeepSpeed engine with the configured ZeRO stage, optimizer and schedule.

    Import DeepSpeed here, inside the worker: importing it in a CPU-only driver can fail on some
    triton/torch pairs (ray#50406), and the driver never needs it.
    """
    import deepspeed

    precision = resolve_precision(train.precision, device)
    optimizer_steps_per_epoch = micro_steps_per_epoch // train.grad_accum_steps
    warmup_steps = round(train.warmup_epochs * optimizer_steps_per_epoch)
    total_steps = train.epochs * optimizer_steps_per_epoch
    optimizer = build_optimizer(model, train)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda step: warmup_cosine(step, warmup_steps=warmup_steps, total_steps=total_steps, min_lr_ratio=train.min_lr_ratio),
    )
    engine, _, _, _ = deepspeed.initialize(
        model=model,
        optimizer=optimizer,
        lr_scheduler=scheduler,
        config=deepspeed_config(train, precision=precision, world_size=world_size),
        dist_init_required=False,  # Ray Train already set up torch.distributed
    )
    spec = EngineSpec(zero_stage=train.zero_stage, precision=precision, optimizer_steps_per_epoch=optimizer_steps_per_epoch, device=str(device))
    return engine, spec


def input_dtype(spec: EngineSpec) -> torch.dtype:
    return torch.bfloat16 if spec.precision == "bf16" else torch.float32


def full_fp32_params(engine) -> dict[str, torch.Tensor]:
    """Every parameter's full fp32 master value, on CPU, on every rank. Collective under ZeRO 1-3.

    Under ZeRO the optimizer owns the fp32 master copy and (stage 3) the module holds only a shard,
    so `param.data` is not the truth; DeepSpeed's `safe_get_full_fp32_param` assembles it. Without
    ZeRO and in fp32, the module's parameters are the master weights.
    """
    from deepspeed.utils import safe_get_full_fp32_param

    # Under ZeRO 0-2 in fp32 every rank's module holds full parameters that the optimizer step
    # copies bit for bit from the fp32 master: read them without a collective per parameter.
    module_is_master = engine.zero_optimization_stage() < 3 and not engine.bfloat16_enabled() and not engine.fp16_enabled()
    full: dict[str, torch.Tensor] = {}
    for name, param in engine.module.named_parameters():
        value = None if module_is_master else safe_get_full_fp32_param(param)
        if value is None:
            value = param.detach()
        full[name] = value.detach().float().cpu().clone().reshape(_full_shape(param))
    return full


def _full_shape(param: torch.Tensor) -> torch.Size:
    return getattr(param, "ds_shape", None) or param.shape


def write_full_fp32_params(engine, values: dict[str, torch.Tensor]) -> None:
    """Set parameters (full fp32 values, identical on every rank) in both the optimizer's master
    copy and the module's working copy. Collective under ZeRO 3; every rank must call it.

    Writing `param.data` alone is not enough under ZeRO: the next optimizer step would copy the old
    master weights back over it.
    """
    import deepspeed
    from deepspeed.utils import safe_set_full_fp32_param

    stage = engine.zero_optimization_stage()
    named = dict(engine.module.named_parameters())
    unknown = sorted(set(values) - set(named))
    if unknown:
        raise KeyError(f"no such parameters: {unknown}")
    params = [named[name] for name in values]
    if stage == 3:
        for name, param in zip(values, params):
            safe_set_full_fp32_param(param, values[name].to(param.ds_tensor.device))
        # The module's working copy is partitioned too: gather, write on every rank, re-partition.
        with deepspeed.zero.GatheredParameters(params, modifier_rank=0):
            with torch.no_grad():
                for name, param in zip(values, params):
                    param.data.copy_(values[name].to(param.device, param.dtype))
        return
    with torch.no_grad():
        for name, param in zip(values, params):
            if stage > 0 or engine.bfloat16_enabled():
                safe_set_full_fp32_param(param, values[name].to(param.device))
            param.data.copy_(values[name].to(param.device, param.dtype))


def full_buffers(engine) -> dict[str, torch.Tensor]:
    """Module buffers (e.g. batch-norm statistics): never partitioned, identical on every rank."""
    return {name: buffer.detach().cpu().clone() for name, buffer in engine.module.named_buffers()}


def load_engine_checkpoint(engine, directory: str, tag: str) -> None:
    """Load a DeepSpeed checkpoint (model, optimizer, scheduler) and leave the engine fully usable.

    DeepSpeed 0.19's ZeRO-1/2 load re-links the fp32 weight fragments but not the optimizer-state
    fragments (its lazy-link flag stays set), so `safe_get_full_optimizer_state` would fail after
    a load; reset the flag and link them again.
    """
    path, _ = engine.load_checkpoint(directory, tag=tag, load_optimizer_states=True, load_lr_scheduler_states=True)
    if path is None:
        raise RuntimeError(f"DeepSpeed found no checkpoint under {directory} (tag {tag!r})")
    optimizer = engine.optimizer
    if getattr(optimizer, "_hp_optimizer_states_linked", False) and hasattr(optimizer, "_lazy_init_hp_params_optimizer_state"):
        optimizer._hp_optimizer_states_linked = False
        optimizer._lazy_init_hp_params_optimizer_state()
