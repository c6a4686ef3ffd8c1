"""The learning-rate-free peers as DeepSpeed client optimizers: Prodigy and schedule-free AdamW.

A user who does not know the right learning rate has these instead of the advisor; they must work
wherever AdamW does (ZeRO 0-3, probation, exact rollback, checkpoints), so what each needs lives here.

- **Prodigy** (`prodigyopt` 1.1.2, MIT; Mishchenko & Defazio 2023) estimates the step size `d` itself;
  the effective step is `d * lr`, where `lr` is a dimensionless multiplier (1.0 is the paper's choice,
  `train.lr` must be in [0.1, 10]). The schedule (warm-up + cosine) multiplies `lr`, as the authors
  recommend; with a warm-up, `safeguard_warmup` keeps `d` from growing on the warm-up's small steps.
  `d` comes from sums over *all* parameters: under ZeRO 1-3 each rank holds one partition, so the sums
  are all-reduced (`fsdp_in_use`). prodigyopt 1.1.2 builds that all-reduce's buffer with `.cuda()`, which
  a CPU-only worker has not got; `_HostCollectives` gives it a buffer on the CPU there (gloo) and is
  installed only in processes without CUDA. The advisor's `lr_scale` multiplies the multiplier (like a
  `d_coef` change, but one that the schedule keeps), so the effective step scales by it and `d` goes on
  estimating; `read_hyperparameters` reports `lr` as the effective step `d * lr`.
- **Schedule-free AdamW** (`schedulefree` 1.4.1, Apache-2.0; Defazio et al. 2024) trains the point `y`
  and evaluates the average `x = y + (1 - 1/beta1) (z - y)`. It needs no decay, so its schedule is the
  warm-up, then constant (`train.min_lr_ratio` does not apply). The package's `optimizer.eval()/train()`
  move `y` to `x` and back by two `lerp`s, which do not round-trip bit for bit, and under ZeRO 1-2 they
  would move only the fp32 master copy. So the optimizer stays in train mode and `EvalWeights` swaps the
  *full* weights instead: it keeps `y`, writes `x` for evaluation and writes the kept `y` back, exactly,
  at every ZeRO stage. The advisor's `lr_scale` multiplies the constant learning rate (the averaging
  weights use the largest lr so far, so a cut does not reweight the past).

Restarting either optimizer's moments (`reset_state`) is not zeroing everything: schedule-free's `z` is
a point (zeroed, `x` would be pulled to 0), so it becomes the weights now; Prodigy's `p0` (the start the
distance `d` is measured from) stays.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

logger = logging.getLogger(__name__)

PEER_OPTIMIZERS = ("prodigy", "schedulefree_adamw")
PRODIGY_LR_BOUNDS = (0.1, 10.0)  # Prodigy's lr is a multiplier on its own step-size estimate, not a step size


def is_schedule_free(optimizer: torch.optim.Optimizer) -> bool:
    return type(optimizer).__name__ == "AdamWScheduleFree"


def is_prodigy(optimizer: torch.optim.Optimizer) -> bool:
    return type(optimizer).__name__ == "Prodigy"


def build_peer_optimizer(name: str, params: Any, *, lr: float, momentum: float, weight_decay: float, warmup_steps: int,
                         sharded: bool) -> torch.optim.Optimizer:
    """Prodigy or schedule-free AdamW over `params`. `sharded`: each rank steps only its ZeRO partition
    (stage 1-3 with more than one rank), so Prodigy all-reduces its step-size sums."""
    if name == "prodigy":
        from prodigyopt import Prodigy

        if sharded and not torch.cuda.is_available():
            _install_host_collectives()
        return Prodigy(params, lr=lr, betas=(momentum, 0.999), weight_decay=weight_decay, decouple=True,
                       safeguard_warmup=warmup_steps > 0, fsdp_in_use=sharded)
    if name == "schedulefree_adamw":
        from schedulefree import AdamWScheduleFree

        # The warm-up is the run's schedule (LambdaLR), not the optimizer's own `warmup_steps`: one schedule to rescale.
        optimizer = AdamWScheduleFree(params, lr=lr, betas=(momentum, 0.999), weight_decay=weight_decay, warmup_steps=0)
        for group in optimizer.param_groups:
            group["train_mode"] = True  # and it stays there: `EvalWeights` does the eval swap exactly
        return optimizer
    raise ValueError(f"not a peer optimizer: {name!r} (one of {PEER_OPTIMIZERS})")


def schedule_multiplier(name: str, step: int, *, warmup_steps: int, cosine: Any) -> float:
    """The LR multiplier at `step`: schedule-free's is the linear warm-up, then 1; the others' is `cosine(step)`."""
    if name == "schedulefree_adamw":
        return (step + 1) / warmup_steps if warmup_steps > 0 and step < warmup_steps else 1.0
    return cosine(step)


def effective_lr_factor(optimizer: torch.optim.Optimizer) -> float:
    """What the first group's `lr` is multiplied by to give the step size: Prodigy's `d`, 1 for the others."""
    if is_prodigy(optimizer):
        return float(optimizer.param_groups[0]["d"])
    return 1.0


def group_scalars(optimizer: torch.optim.Optimizer) -> list[dict[str, Any]]:
    """Each parameter group's values but its parameters (Prodigy's `d`, `k`, schedule-free's `weight_sum`, ...), as
    plain Python numbers: part of the training state a rollback must restore and a digest must cover."""
    groups = []
    for group in optimizer.param_groups:
        values = {}
        for key, value in sorted(group.items()):
            if key == "params":
                continue
            if torch.is_tensor(value):
                value = value.tolist()
            values[key] = value
        groups.append(values)
    return groups


def reset_value(key: str, state: torch.Tensor, param: torch.Tensor, optimizer: torch.optim.Optimizer) -> torch.Tensor | None:
    """The value a restart gives optimizer tensor `key` of a parameter whose full weights are now `param`, or None to keep it:
    schedule-free's `z` becomes the weights (x = y = z, a fresh start from here), Prodigy's `p0` stays, any moment is zeroed."""
    if is_schedule_free(optimizer) and key == "z":
        return param.detach().to(state.dtype).reshape(state.shape).clone()
    if is_prodigy(optimizer) and key == "p0":
        return None
    return torch.zeros_like(state)


class EvalWeights:
    """Schedule-free evaluation at every ZeRO stage: `swap_in()` keeps the training point `y` and writes the
    average `x = lerp(y, z, 1 - 1/beta1)` into the engine (collective); `swap_out()` writes the kept `y` back,
    bit for bit. For every other optimizer both do nothing. `final()` leaves `x` in place for good (the run is over)."""

    def __init__(self, engine: Any) -> None:
        self.engine = engine
        self.active = is_schedule_free(engine.lr_scheduler.optimizer)
        self._kept: dict[str, torch.Tensor] | None = None
        self.finished = False

    def swap_in(self) -> None:
        if not self.active or self.finished or self._kept is not None:
            return
        from workers.engine import full_fp32_params, write_full_fp32_params

        training = full_fp32_params(self.engine)
        self._kept = training
        write_full_fp32_params(self.engine, self.averaged(training))

    def swap_out(self) -> None:
        if self._kept is None:
            return
        from workers.engine import write_full_fp32_params

        kept, self._kept = self._kept, None
        write_full_fp32_params(self.engine, kept)

    def averaged(self, training: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """`x` for each parameter from its training point `y` and `z` (collective under ZeRO 1-3); `y` where there is no `z` yet."""
        from workers.engine import full_optimizer_state

        beta1 = float(self.engine.lr_scheduler.optimizer.param_groups[0]["betas"][0])
        averaged = {}
        for name, param in self.engine.module.named_parameters():
            z = full_optimizer_state(self.engine, param, "z")
            y = training[name]
            averaged[name] = y if z is None else schedule_free_average(y, z.detach().float().cpu().reshape(y.shape), beta1)
        return averaged

    def evaluated_params(self) -> dict[str, torch.Tensor]:
        """The full weights evaluation uses: schedule-free's average x, the weights themselves otherwise (collective)."""
        from workers.engine import full_fp32_params

        params = full_fp32_params(self.engine)
        return self.averaged(params) if self.active and not self.finished else params

    def final(self) -> None:
        """From here on evaluation uses the weights as they are (the final model has been written)."""
        self._kept = None
        self.finished = True


def schedule_free_average(y: torch.Tensor, z: torch.Tensor, beta1: float) -> torch.Tensor:
    """Schedule-free's evaluation point: `x = y + (1 - 1/beta1) (z - y)`, as `AdamWScheduleFree.eval` computes it."""
    return torch.lerp(y, z, 1.0 - 1.0 / beta1)


def _install_host_collectives() -> None:
    """Make prodigyopt's all-reduce buffer (`torch.zeros(2).cuda()`) a CPU tensor in this CUDA-less process (gloo).
    Only prodigyopt.prodigy's view of `torch` changes, and only `zeros(...).cuda()`; said once in the log."""
    import prodigyopt.prodigy as module

    if isinstance(module.torch, _HostCollectives):
        return
    module.torch = _HostCollectives()
    logger.info("prodigyopt: sharded step-size sums all-reduced on the CPU (no CUDA in this process)")


class _HostCollectives:
    """`torch` as prodigyopt sees it: everything is torch's, but `zeros(...).cuda()` stays on the CPU."""

    def __getattr__(self, name: str) -> Any:
        return getattr(torch, name)

    @staticmethod
    def zeros(*size: Any, **kwargs: Any) -> _HostBuffer:
        return _HostBuffer(torch.zeros(*size, **kwargs))


class _HostBuffer:
    def __init__(self, tensor: torch.Tensor) -> None:
        self.tensor = tensor

    def cuda(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        return self.tensor
