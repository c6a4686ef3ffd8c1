"""The maths of applying a proposal: pure torch functions, no Ray, no DeepSpeed.

A weight operation first turns a parameter tensor into a *proposed* tensor (`propose_tensor`),
then the proposed tensor is blended into the live one with a per-group factor alpha (`blend`).
Hyperparameter changes have their own pure helper (`apply_hyperparameter_change`).
All functions return new tensors/dicts and never modify their inputs.
"""

from __future__ import annotations

import logging
import math
import zlib
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from orchestration.protocol import NEURON_GROUP_MARK, HyperparameterChange, WeightOp, split_neuron_group

logger = logging.getLogger(__name__)

_KAIMING_GAIN = math.sqrt(2.0)  # gain of ReLU networks (He et al., 2015)


def blend(current: torch.Tensor, proposed: torch.Tensor, alpha: float) -> torch.Tensor:
    """Move `current` a fraction `alpha` of the way to `proposed`.

    `W_new = (1 - alpha) * W_current + alpha * W_proposed`, for `alpha` in [0, 1].

    Computed with `torch.lerp`, which is exact at both ends: `alpha == 0` returns a tensor
    bitwise equal to `current` (a no-op intervention changes nothing) and `alpha == 1` one equal
    to `proposed`; in between every element stays between its two endpoints.
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha!r}")
    if proposed.shape != current.shape:
        raise ValueError(f"proposed shape {tuple(proposed.shape)} differs from current {tuple(current.shape)}")
    proposed = proposed.to(device=current.device, dtype=current.dtype)
    if alpha == 0.0:
        return current.detach().clone()
    if alpha == 1.0:
        return proposed.detach().clone()
    return torch.lerp(current.detach(), proposed.detach(), alpha)


def propose_tensor(
    op: WeightOp,
    current: torch.Tensor,
    *,
    best: torch.Tensor | None = None,
    ema: torch.Tensor | None = None,
    dead_units: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """The tensor `op` asks for, before blending (`a` = `op.amount`).

    - shrink:      `W * (1 - a)`
    - noise:       `W + a * std(W) * N(0, 1)`                  (needs `generator`)
    - toward_best: `W + a * (W_best - W)`                       (needs `best`)
    - toward_ema:  `W + a * (W_ema - W)`                        (needs `ema`)
    - reinit_dead: a fraction `a` of the dead output units (rows where the bool mask `dead_units`
      over dim 0 is True, chosen at random) are re-drawn from `N(0, 2 / fan_in)` (Kaiming normal,
      `fan_in = prod(shape[1:])`); for 1-D tensors (biases) they are set to 0; other rows are
      unchanged                                                 (needs `dead_units`, `generator`)
    - values:      `op.values` reshaped to `current.shape`

    Raises ValueError when the reference the op needs is missing or does not fit.
    """
    current = current.detach()
    amount = op.amount
    if op.op == "shrink":
        return current * (1.0 - amount)
    if op.op == "noise":
        random_normal = _standard_normal(current, _require_generator(op, generator))
        return current + amount * current.float().std(correction=0).to(current.dtype) * random_normal
    if op.op == "toward_best":
        return torch.lerp(current, _require_reference(op, current, best, "best weights"), amount)
    if op.op == "toward_ema":
        return torch.lerp(current, _require_reference(op, current, ema, "EMA weights"), amount)
    if op.op == "reinit_dead":
        return _reinit_dead(op, current, dead_units, _require_generator(op, generator))
    if op.op == "values":
        if op.values is None or len(op.values) != current.numel():
            count = None if op.values is None else len(op.values)
            raise ValueError(f"values({op.group}) gives {count} numbers for a group of {current.numel()}")
        return torch.tensor(op.values, dtype=current.dtype, device=current.device).reshape(current.shape)
    raise ValueError(f"unknown weight op {op.op!r} on group {op.group!r}")


def apply_weight_ops(
    params: Mapping[str, torch.Tensor],
    ops: Sequence[WeightOp],
    alphas: Mapping[str, float],
    *,
    best: Mapping[str, torch.Tensor] | None = None,
    ema: Mapping[str, torch.Tensor] | None = None,
    dead_units: Mapping[str, torch.Tensor] | None = None,
    seed: int,
    unit_groups: Mapping[str, Any] | None = None,
) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Apply a proposal's weight ops: `(new_params, operations)`.

    Ops on the same group compose in order into one proposed tensor, which is then blended once:
    `W_new = blend(W, op_k(...op_1(W)), alphas[group])`. `new_params` holds only the groups that
    changed; `operations` says, one line per op, what was done or why it was skipped (unknown
    group, missing reference, alpha 0). Random ops draw from a generator seeded by `seed` and the
    group name, so results do not depend on op order across groups or on device.

    Neuron-group coupling (`unit_groups`: layer module -> each output unit's group): an op on
    "layer.weight#g" changes only the rows (output units) of group g, and a layer's rows blend with
    their own group's alpha (`alphas["layer.weight#g"]`, else the layer's).
    """
    unit_groups = unit_groups or {}
    proposed_by_group: dict[str, torch.Tensor] = {}
    ops_seen_per_group: dict[str, int] = {}
    operations: list[str] = []
    for op in ops:
        label = f"{op.op}({op.group},{op.amount:g})"
        name, neuron_group = split_neuron_group(op.group)
        rows = _group_rows(unit_groups, name, neuron_group, params.get(name))
        if name not in params or (neuron_group is not None and rows is None):
            operations.append(f"skipped {label}: no parameter group named {op.group!r}")
            continue
        if op.group not in alphas and not (neuron_group is None and _row_alphas(alphas, name, unit_groups, params[name]) is not None):
            raise ValueError(f"no alpha given for parameter group {op.group!r}")
        working = proposed_by_group.get(name, params[name])
        position = ops_seen_per_group.get(op.group, 0)
        ops_seen_per_group[op.group] = position + 1
        generator = torch.Generator().manual_seed(_group_seed(seed, op.group, position))
        try:
            proposed = propose_tensor(
                op,
                working,
                best=_lookup(best, name),
                ema=_lookup(ema, name),
                dead_units=_lookup(dead_units, name),
                generator=generator,
            )
        except ValueError as problem:
            logger.warning("skipping %s: %s", label, problem)
            operations.append(f"skipped {label}: {problem}")
            continue
        if rows is not None:  # one neuron group's rows take the op; the others keep what they had
            proposed = torch.where(_rows_like(rows, working), proposed, working)
        proposed_by_group[name] = proposed
        operations.append(label)

    new_params: dict[str, torch.Tensor] = {}
    for group, proposed in proposed_by_group.items():
        current = params[group]
        row_alphas = _row_alphas(alphas, group, unit_groups, current)
        if row_alphas is None:
            alpha = alphas[group]
            if alpha == 0.0:
                operations.append(f"unchanged {group}: alpha=0")
                continue
            with torch.no_grad():
                new_params[group] = blend(current, proposed, alpha)
            operations.append(f"blended {group} with alpha={alpha:g}")
            continue
        weight = row_alphas.to(current.dtype).reshape(-1, *([1] * (current.dim() - 1)))
        with torch.no_grad():  # lerp is exact at a row's alpha 0 (unchanged) and 1 (the proposed values)
            new_params[group] = torch.lerp(current.detach(), proposed.detach().to(current.dtype), weight.expand_as(current))
        operations.append(f"blended {group} per neuron group, alphas {sorted(set(row_alphas.tolist()))}")
    return new_params, operations


def _layer_of(name: str) -> str:
    return name.rpartition(".")[0]


def _group_rows(unit_groups: Mapping[str, Any], name: str, neuron_group: int | None, current: torch.Tensor | None) -> torch.Tensor | None:
    """The rows of `neuron_group` of the parameter `name` (a bool mask over dim 0), or None for a whole group
    (or a neuron group the layer does not have)."""
    labels = unit_groups.get(_layer_of(name))
    if neuron_group is None or labels is None or current is None or current.dim() == 0 or len(labels) != current.shape[0]:
        return None
    rows = torch.as_tensor(labels) == neuron_group
    return rows if bool(rows.any()) else None


def _rows_like(rows: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return rows.to(like.device).reshape(-1, *([1] * (like.dim() - 1))).expand_as(like)


def _row_alphas(alphas: Mapping[str, float], name: str, unit_groups: Mapping[str, Any], current: torch.Tensor) -> torch.Tensor | None:
    """Each row's alpha when the layer has neuron groups with alphas of their own (a group without one takes the
    layer's, else 0); None otherwise."""
    labels = unit_groups.get(_layer_of(name))
    if labels is None or current.dim() == 0 or len(labels) != current.shape[0]:
        return None
    keys = {int(group): f"{name}{NEURON_GROUP_MARK}{int(group)}" for group in set(labels.tolist())}
    if not any(key in alphas for key in keys.values()):
        return None
    fallback = alphas.get(name, 0.0)  # a row of a group without an alpha (an op on another group only) keeps its values
    per_group = {group: alphas.get(key, fallback) for group, key in keys.items()}
    return torch.tensor([per_group[int(group)] for group in labels.tolist()], dtype=torch.float64)


def apply_hyperparameter_change(
    current: Mapping[str, float], change: HyperparameterChange, *, alpha: float = 1.0
) -> tuple[dict[str, float], list[str]]:
    """Apply a proposal's hyperparameter change: `(new_hyperparameters, operations)`.

    `lr_new = lr * lr_scale ** alpha` (geometric, so alpha blends on the log scale);
    any other field `h_new = (1 - alpha) * h + alpha * h_proposed`, or `h_proposed` when `h` is
    not in `current`. `alpha = 1` applies the change as asked. Fields left `None` are untouched.
    An `lr_scale` other than 1 on a learning rate of 0 raises `ValueError`: it cannot do what it asks.
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha!r}")
    new = dict(current)
    operations: list[str] = []
    if change.lr_scale is not None:
        if "lr" not in current:
            operations.append("skipped lr_scale: no current lr")
        elif current["lr"] == 0 and change.lr_scale != 1:
            raise ValueError(f"lr_scale {change.lr_scale:g} cannot change a learning rate that is 0 now (a scaled 0 stays 0)")
        else:
            new["lr"] = current["lr"] * change.lr_scale**alpha
            operations.append(f"lr {current['lr']:g} -> {new['lr']:g}")
    for name in ("weight_decay", "dropout", "momentum"):
        proposed = getattr(change, name)
        if proposed is None:
            continue
        old = current.get(name)
        new[name] = proposed if old is None else (1.0 - alpha) * old + alpha * proposed
        operations.append(f"{name} {old if old is None else format(old, 'g')} -> {new[name]:g}")
    return new, operations


def _standard_normal(like: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """N(0, 1) noise shaped like `like`, drawn on CPU (device-independent) then moved."""
    noise = torch.randn(like.shape, generator=generator, dtype=torch.float32)
    return noise.to(device=like.device, dtype=like.dtype)


def _reinit_dead(
    op: WeightOp, current: torch.Tensor, dead_units: torch.Tensor | None, generator: torch.Generator
) -> torch.Tensor:
    if dead_units is None:
        raise ValueError(f"reinit_dead({op.group}) needs a dead-unit mask, none was given")
    mask = dead_units.detach().to("cpu", torch.bool).reshape(-1)
    if current.dim() == 0 or mask.numel() != current.shape[0]:
        raise ValueError(
            f"reinit_dead({op.group}) mask has {mask.numel()} entries, group has shape {tuple(current.shape)}"
        )
    dead_rows = torch.nonzero(mask).reshape(-1)
    chosen_count = round(op.amount * dead_rows.numel())
    proposed = current.clone()
    if chosen_count == 0:
        return proposed
    order = torch.randperm(dead_rows.numel(), generator=generator)
    chosen = dead_rows[order[:chosen_count]].to(current.device)
    if current.dim() == 1:
        proposed[chosen] = 0
        return proposed
    fan_in = math.prod(current.shape[1:])
    row_shape = (chosen_count, *current.shape[1:])
    fresh = torch.randn(row_shape, generator=generator, dtype=torch.float32) * (_KAIMING_GAIN / math.sqrt(fan_in))
    proposed[chosen] = fresh.to(device=current.device, dtype=current.dtype)
    return proposed


def _require_generator(op: WeightOp, generator: torch.Generator | None) -> torch.Generator:
    if generator is None:
        raise ValueError(f"{op.op}({op.group}) is random and needs a seeded generator")
    return generator


def _require_reference(
    op: WeightOp, current: torch.Tensor, reference: torch.Tensor | None, what: str
) -> torch.Tensor:
    if reference is None:
        raise ValueError(f"{op.op}({op.group}) needs {what}, none are available yet")
    if reference.shape != current.shape:
        raise ValueError(
            f"{op.op}({op.group}): {what} have shape {tuple(reference.shape)}, group has {tuple(current.shape)}"
        )
    return reference.detach().to(device=current.device, dtype=current.dtype)


def _lookup(tensors: Mapping[str, torch.Tensor] | None, group: str) -> torch.Tensor | None:
    return None if tensors is None else tensors.get(group)


def _group_seed(seed: int, group: str, position: int) -> int:
    """A seed per (run seed, group, position of the op within its group): each random op draws its own stream."""
    return (seed * 1_000_003 + zlib.crc32(group.encode()) + position * 7919) % (2**63)
