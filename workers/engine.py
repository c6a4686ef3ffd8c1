"""Everything DeepSpeed: the engine's config, optimizer and schedule, and full-parameter access.

This is the one place that knows about ZeRO. Models stay plain `nn.Module`s; the training loop
and the advice path talk to the engine only through the functions here: building it, reading and
writing full fp32 parameters, hyperparameters and optimizer state, checkpoint loading, and a
digest of the whole training state (for exact-rollback checks).

Checkpoints are loaded weights-only: DeepSpeed's own loader unpickles with `weights_only=False`, so a
crafted file in a checkpoint (`--resume`, a restart, a PBT exploit, probation's rollback directory)
would run its code. `load_engine_checkpoint` routes every file DeepSpeed reads through
`weights_only_load`, which allows tensors, containers and the few DeepSpeed classes its checkpoints
hold (`deepspeed_safe_globals`), and refuses anything else before it runs. The manifest beside the
files proves only that they are whole, not who wrote them.
"""

from __future__ import annotations

import math
import pickle
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from orchestration.errors import CheckpointError
from workers.config import TrainConfig
from workers.optimizers import PEER_OPTIMIZERS, build_peer_optimizer, effective_lr_factor, group_scalars, reset_value, schedule_multiplier


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


def build_optimizer(model: nn.Module, train: TrainConfig, groups: list[dict[str, Any]] | None = None, *, warmup_steps: int = 0,
                    sharded: bool = False) -> torch.optim.Optimizer:
    """The configured optimizer over `groups` (parameter groups with their own lr; `workers.modes`) or all parameters.
    `sharded`: each rank steps only its ZeRO partition (the peers' needs: `workers.optimizers`)."""
    params = groups if groups is not None else model.parameters()
    if train.optimizer in PEER_OPTIMIZERS:
        return build_peer_optimizer(train.optimizer, params, lr=train.lr, momentum=train.momentum, weight_decay=train.weight_decay,
                                    warmup_steps=warmup_steps, sharded=sharded)
    if train.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=train.lr, betas=(train.momentum, 0.999), weight_decay=train.weight_decay)
    if train.optimizer == "adam":
        return torch.optim.Adam(params, lr=train.lr, betas=(train.momentum, 0.999), weight_decay=train.weight_decay)
    if train.optimizer == "sgd":
        return torch.optim.SGD(params, lr=train.lr, momentum=train.momentum, weight_decay=train.weight_decay)
    if train.optimizer == "rmsprop":
        return torch.optim.RMSprop(params, lr=train.lr, momentum=train.momentum, weight_decay=train.weight_decay)
    raise ValueError(f"train.optimizer must be adamw, adam, sgd, rmsprop, prodigy or schedulefree_adamw, got {train.optimizer!r}")


def warmup_cosine(step: int, *, warmup_steps: int, total_steps: int, min_lr_ratio: float) -> float:
    """LR multiplier: linear warm-up to 1 over `warmup_steps`, then cosine decay to `min_lr_ratio`."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def build_engine(model: nn.Module, train: TrainConfig, *, world_size: int, micro_steps_per_epoch: int, device: torch.device,
                 param_groups: list[dict[str, Any]] | None = None):
    """Wrap `model` in a DeepSpeed engine with the configured ZeRO stage, optimizer and schedule.

    Import DeepSpeed here, inside the worker: importing it in a CPU-only driver can fail on some
    triton/torch pairs (ray#50406), and the driver never needs it.
    """
    import deepspeed

    precision = resolve_precision(train.precision, device)
    optimizer_steps_per_epoch = micro_steps_per_epoch // train.grad_accum_steps
    warmup_steps = round(train.warmup_epochs * optimizer_steps_per_epoch)
    total_steps = train.epochs * optimizer_steps_per_epoch
    optimizer = build_optimizer(model, train, param_groups, warmup_steps=warmup_steps, sharded=train.zero_stage > 0 and world_size > 1)

    def cosine(step: int) -> float:
        return warmup_cosine(step, warmup_steps=warmup_steps, total_steps=total_steps, min_lr_ratio=train.min_lr_ratio)

    # Schedule-free AdamW: warm-up, then constant (it needs no decay); every other optimizer: warm-up, then cosine.
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: schedule_multiplier(train.optimizer, step, warmup_steps=warmup_steps, cosine=cosine))
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


def deepspeed_safe_globals() -> list[type]:
    """The classes DeepSpeed 0.19's checkpoints hold besides tensors and builtin containers, measured with
    `torch.serialization.get_unsafe_globals_in_checkpoint` on fp32 and bf16 checkpoints of ZeRO 0-3: the
    ZeRO stage (an enum), the static loss scaler (ZeRO 1-3) and the fragment addresses of ZeRO 1-2 and bf16.
    Each is plain data to rebuild: no code of the checkpoint's choosing runs."""
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [ZeroStageEnum, LossScaler, fragment_address]


def weights_only_load(path: str, map_location: Any = None) -> Any:
    """`torch.load(path, weights_only=True)` allowing only `deepspeed_safe_globals`. A file that asks for
    anything else (a pickle payload's `os.system`, any class or function) is refused before it runs: a
    `CheckpointError` naming the file and what it asked for."""
    try:
        with torch.serialization.safe_globals(deepspeed_safe_globals()):
            return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as error:
        asked = str(error).split("\n\n")[0].split("\n")[-1].strip()
        raise CheckpointError(f"{path}: refused to load: it holds more than weights (a crafted or foreign checkpoint?): {asked}") from None


class WeightsOnlyLoads:
    """A DeepSpeed checkpoint engine whose every `load` is `weights_only_load`; saving and the rest are the
    wrapped engine's (DeepSpeed only calls its methods, it never checks its type)."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner

    def load(self, path: str, map_location: Any = None) -> Any:
        return weights_only_load(path, map_location=map_location)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


def load_engine_checkpoint(engine, directory: str, tag: str) -> None:
    """Load a DeepSpeed checkpoint (model, optimizer, scheduler) weights-only and leave the engine fully usable.

    DeepSpeed 0.19's ZeRO-1/2 load re-links the fp32 weight fragments but not the optimizer-state
    fragments (its lazy-link flag stays set), so `safe_get_full_optimizer_state` would fail after
    a load; reset the flag and link them again.
    """
    if not isinstance(engine.checkpoint_engine, WeightsOnlyLoads):
        engine.checkpoint_engine = WeightsOnlyLoads(engine.checkpoint_engine)
    path, _ = engine.load_checkpoint(directory, tag=tag, load_optimizer_states=True, load_lr_scheduler_states=True)
    if path is None:
        raise CheckpointError(f"DeepSpeed found no checkpoint under {directory} (tag {tag!r})")
    _link_optimizer_state(engine)


def _link_optimizer_state(engine) -> None:
    """Link every ZeRO-1/2 weight fragment to its optimizer-state fragment again.

    DeepSpeed 0.19 links them once, right after the first parameter group's first step, for all groups at
    once: with several groups (transfer learning's per-block rates) the later groups have no state yet then
    and stay unlinked. It links nothing again after a checkpoint load either."""
    optimizer = engine.optimizer
    if getattr(optimizer, "_hp_optimizer_states_linked", False) and hasattr(optimizer, "_lazy_init_hp_params_optimizer_state"):
        optimizer._hp_optimizer_states_linked = False
        optimizer._lazy_init_hp_params_optimizer_state()


# --- collectives every rank takes part in ------------------------------------------------------


def broadcast_from_rank0(value: Any) -> Any:
    """Rank 0's `value` on every rank (a picklable object); the value itself without a process group."""
    import torch.distributed as dist

    if not dist.is_initialized():
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather_to_all(value: Any) -> list[Any]:
    """Every rank's `value` (a picklable object), in rank order, on every rank; `[value]` without a process group."""
    import torch.distributed as dist

    if not dist.is_initialized():
        return [value]
    values: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(values, value)
    return values


def barrier() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        dist.barrier()


# --- hyperparameters and optimizer state, read and written in place --------------------------


def read_hyperparameters(engine, *, batch_size: int) -> dict[str, float]:
    """The hyperparameters an advisor may change, as the optimizer and the model hold them now."""
    group = engine.lr_scheduler.optimizer.param_groups[0]
    momentum = group["betas"][0] if "betas" in group else group.get("momentum", 0.0)
    dropout = next((m.p for m in engine.module.modules() if isinstance(m, nn.Dropout)), 0.0)
    # Prodigy's lr is a multiplier on its own estimate d: the step size it takes is d * lr (`workers.optimizers`).
    lr = float(engine.get_lr()[0]) * effective_lr_factor(engine.lr_scheduler.optimizer)
    return {"lr": lr, "weight_decay": float(group.get("weight_decay", 0.0)), "momentum": float(momentum),
            "dropout": float(dropout), "batch_size": float(batch_size)}


def write_hyperparameters(engine, values: dict[str, float], *, batch_size: int) -> None:
    """Set lr (by rescaling the schedule, so warm-up and decay keep their shape), weight decay,
    momentum (SGD/RMSprop momentum or Adam beta1) and dropout.

    A learning rate of 0 cannot be rescaled; asking to change it raises `ValueError` rather than
    being ignored, so the caller can record it.
    """
    from workers.models import set_dropout

    scheduler = engine.lr_scheduler
    current = read_hyperparameters(engine, batch_size=batch_size)
    if current["lr"] > 0:
        scale = values["lr"] / current["lr"]
    elif values["lr"] == current["lr"]:
        scale = 1.0
    else:
        raise ValueError(f"cannot set lr to {values['lr']:g}: the schedule's learning rate is 0 now, and a scale of 0 stays 0")
    scheduler.base_lrs = [lr * scale for lr in scheduler.base_lrs]
    for group in scheduler.optimizer.param_groups:
        group["lr"] *= scale
        group["weight_decay"] = values["weight_decay"]
        if "betas" in group:
            group["betas"] = (values["momentum"], group["betas"][1])
        elif "momentum" in group:
            group["momentum"] = values["momentum"]
    set_dropout(engine.module, values["dropout"])


def optimizer_state_keys(engine) -> list[str]:
    """The per-parameter tensors the optimizer keeps (exp_avg, momentum_buffer, ...), the same on
    every rank. Collective: a rank whose ZeRO partition is empty must still ask for the same keys."""
    if len(engine.lr_scheduler.optimizer.param_groups) > 1:
        _link_optimizer_state(engine)
    keys: set[str] = set()
    for per_param in engine.lr_scheduler.optimizer.state.values():
        keys.update(k for k, v in per_param.items() if torch.is_tensor(v) and v.dim() > 0)
    return broadcast_from_rank0(sorted(keys))


def full_optimizer_state(engine, param: torch.Tensor, key: str) -> torch.Tensor | None:
    """The full fp32 optimizer tensor `key` of `param` (collective under ZeRO 1-3)."""
    if engine.zero_optimization_stage() == 0:
        return engine.lr_scheduler.optimizer.state.get(param, {}).get(key)
    from deepspeed.utils import safe_get_full_optimizer_state

    return safe_get_full_optimizer_state(param, key)


def reset_optimizer_moments(engine, names: list[str]) -> None:
    """Restart the optimizer state of the named parameters (collective under ZeRO 1-3): every moment zeroed,
    schedule-free's `z` set to the weights, Prodigy's `p0` kept (`workers.optimizers.reset_value`)."""
    from deepspeed.utils import safe_set_full_optimizer_state

    named = dict(engine.module.named_parameters())
    keys = optimizer_state_keys(engine)
    optimizer = engine.lr_scheduler.optimizer
    params = full_fp32_params(engine) if any(key == "z" for key in keys) else {}
    for name in names:
        for key in keys:
            state = full_optimizer_state(engine, named[name], key)
            if state is None:
                continue
            value = reset_value(key, state, params.get(name, state), optimizer)
            if value is None:
                continue
            if engine.zero_optimization_stage() == 0:
                with torch.no_grad():
                    state.copy_(value)
            else:
                safe_set_full_optimizer_state(named[name], value, key)


def state_digest(engine, hyperparameters: dict[str, float]) -> str:
    """A SHA-256 of the full fp32 weights, every optimizer moment, the buffers and `hyperparameters`,
    identical on every rank (collective under ZeRO 1-3). Equal digests = bit-identical training state."""
    import hashlib

    digest = hashlib.sha256()
    for name, value in full_fp32_params(engine).items():
        digest.update(name.encode())
        digest.update(value.numpy().tobytes())
    keys = optimizer_state_keys(engine)
    for name, param in engine.module.named_parameters():
        for key in keys:
            state = full_optimizer_state(engine, param, key)
            if state is not None:
                digest.update(f"{name}/{key}".encode())
                digest.update(state.detach().float().cpu().numpy().tobytes())
    for name, buffer in engine.module.named_buffers():
        digest.update(name.encode())
        digest.update(buffer.detach().cpu().numpy().tobytes())
    # Group scalars: Prodigy's step-size estimate d, schedule-free's averaging weights, Adam's step when per group.
    digest.update(repr(group_scalars(engine.lr_scheduler.optimizer)).encode())
    digest.update(repr(sorted(hyperparameters.items())).encode())
    return digest.hexdigest()


def params_digest(params: dict[str, torch.Tensor]) -> str:
    """SHA-256 of full fp32 parameters (name and bytes, in name order): equal digests = identical weights."""
    import hashlib

    digest = hashlib.sha256()
    for name in sorted(params):
        digest.update(name.encode())
        digest.update(params[name].float().contiguous().numpy().tobytes())
    return digest.hexdigest()


def set_peak_lr(engine, peak_lr: float) -> None:
    """Make `peak_lr` the schedule's peak from here on, keeping the schedule's position (warm-up/decay):
    the first group's lr becomes `peak_lr * lr_lambda(step)`, the others keep their ratio to it (transfer
    learning's per-block rates; 0 for a frozen block). Used after restoring another run's checkpoint,
    whose scheduler state carries the old peak."""
    scheduler = engine.lr_scheduler
    head = scheduler.base_lrs[0]
    scheduler.base_lrs = [peak_lr * (base / head if head > 0 else 1.0) for base in scheduler.base_lrs]
    for group, base, lr_lambda in zip(scheduler.optimizer.param_groups, scheduler.base_lrs, scheduler.lr_lambdas):
        group["lr"] = base * lr_lambda(scheduler.last_epoch)
