"""The research modes a run may enable, on every rank alike: curriculum learning, batch selection,
adaptive activations and transfer learning (`workers.config`: `model.activation`, `model.pretrained`,
and the `modes` section, `ModesConfig`: `modes.curriculum`, `modes.batch_selection`, `modes.freeze_pretrained`, ...).

`TrainingModes` holds where each mode stands, draws each epoch's batches, adds the L2-SP penalty to
the loss, and carries out the `TrainingChange` of a proposal (`orchestration.protocol`). Its state is
small and plain (`state` / `load_state`), so a probation saves and restores it with the weights, and a
checkpoint carries it. What the advisor may change it tells in every snapshot as a `ModesView` (`view`);
what a proposal may do with that is `orchestration.fitting.fit`'s to say, here as in the validator.

Transfer learning freezes by blocks: a block is a conv/linear layer with what follows it up to the next
one (batch norm, activation parameters); the head is the last block. A frozen block keeps its weights
bit for bit: its learning rate is 0 (so no weight decay either) and a gradient hook zeroes its gradient
(so it takes no part in gradient clipping and its optimizer moments stay 0 until it thaws). The
optimizer has one parameter group per block, the head's first (`read_hyperparameters` reads group 0),
and an unfrozen block k below the head trains at `lr * modes.layer_lr_decay**k`.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from orchestration.fitting import fit, fit_weight_ops
from orchestration.protocol import FreeValues, ModesView, TrainingChange, WeightOp
from workers.config import ModelConfig, ModesConfig, TrainConfig

logger = logging.getLogger(__name__)

_CHANGE_FIELDS = tuple(change_field.name for change_field in fields(TrainingChange))
_INDEXED = re.compile(r"^(.*?\.\d+)\.")  # "features.0.weight" -> "features.0"; "blocks.1.conv1.weight" -> "blocks.1"


# --- transfer learning: pretrained weights, blocks, frozen blocks ----------------------------------


@dataclass(kw_only=True)
class PretrainedLoad:
    """What `load_pretrained` took from a checkpoint and what it left at its fresh initialisation."""

    source: str
    loaded: list[str] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)  # name -> why (missing, shape)


def pretrained_file(path: str | Path) -> Path:
    """The safetensors file `model.pretrained` names: a run directory's model.safetensors, or the file itself."""
    path = Path(path).expanduser()
    file = path / "model.safetensors" if path.is_dir() else path
    if not file.is_file():
        raise FileNotFoundError(f"model.pretrained: no model weights at {file} (give a finished run's directory or its model.safetensors)")
    return file


def load_pretrained(model: nn.Module, path: str | Path) -> PretrainedLoad:
    """Copy every tensor of the checkpoint whose name and shape match into `model` (parameters and buffers);
    the rest (a head for a different number of classes) keeps its fresh initialisation."""
    from safetensors.torch import load_file

    file = pretrained_file(path)
    saved = load_file(str(file))
    result = PretrainedLoad(source=str(file))
    own = model.state_dict()
    taken = {}
    for name, value in own.items():
        if name not in saved:
            result.skipped[name] = "not in the checkpoint"
        elif saved[name].shape != value.shape:
            result.skipped[name] = f"shape {tuple(saved[name].shape)} there, {tuple(value.shape)} here"
        else:
            taken[name] = saved[name].to(value.dtype)
            result.loaded.append(name)
    if not any(name in dict(model.named_parameters()) for name in result.loaded):
        raise ValueError(f"model.pretrained: {file} shares no parameter (by name and shape) with this model; is it a run of the same model kind?")
    model.load_state_dict(taken, strict=False)
    return result


def model_blocks(model: nn.Module) -> list[tuple[str, list[str]]]:
    """(block name, parameter names) in forward order; the last block is the head.

    A block starts at each module holding a conv or linear weight and takes the parameters that follow
    until the next one (batch norm, adaptive activations)."""
    layer_weights = {f"{name}.weight" for name, module in model.named_modules() if isinstance(module, (nn.Linear, nn.Conv1d, nn.Conv2d))}
    blocks: list[tuple[str, list[str]]] = []
    for name, _ in model.named_parameters():
        if name in layer_weights or not blocks:
            match = _INDEXED.match(name)
            block = match.group(1) if match else name.rsplit(".", 1)[0]
            if blocks and blocks[-1][0] == block:  # a second layer in the same indexed block (a residual block's conv2)
                blocks[-1][1].append(name)
                continue
            blocks.append((block, [name]))
        else:
            blocks[-1][1].append(name)
    return blocks


def optimizer_groups(model: nn.Module, blocks: list[tuple[str, list[str]]], *, lr: float, frozen: Iterable[str], layer_lr_decay: float) -> list[dict[str, Any]]:
    """One optimizer parameter group per block, head first, each with its learning rate (0 when frozen)."""
    named = dict(model.named_parameters())
    frozen = set(frozen)
    groups = []
    for depth, (block, names) in enumerate(reversed(blocks)):
        groups.append({"params": [named[name] for name in names], "name": block,
                       "lr": 0.0 if block in frozen else lr * layer_lr_decay**depth})
    return groups


# --- the modes -------------------------------------------------------------------------------------


@dataclass(kw_only=True)
class TrainingModes:
    """Where every enabled research mode stands on this rank (the same on every rank)."""

    config: ModesConfig
    train: TrainConfig  # read for lr, batch_size and grad_accum_steps
    model: nn.Module
    blocks: list[tuple[str, list[str]]] = field(default_factory=list)  # transfer only
    frozen: list[str] = field(default_factory=list)  # block names, in forward order
    pretrained: dict[str, torch.Tensor] = field(default_factory=dict)  # L2-SP anchors: backbone parameters as loaded
    pool_fraction: float = 0.0  # curriculum: fraction of the training set in this epoch's pool
    pace: float = 0.0
    selecting: bool = False
    free_group: str = ""  # gradient-free proposals: the parameter group the advisor may set explicitly (the last layer's bias)
    free_history: list[list[Any]] = field(default_factory=list)  # [val_loss, values] at each epoch end, oldest first
    engine: Any = None  # set by `attach`
    _hooks: list[Any] = field(default_factory=list)

    @classmethod
    def create(cls, config: ModesConfig, train: TrainConfig, model_config: ModelConfig, model: nn.Module, *,
               log=lambda message: None) -> TrainingModes:
        """Set the modes up on the bare model, before DeepSpeed wraps it (pretrained weights are loaded here).
        `train` is the run's training config as the workers use it (its batch size lowered on small data)."""
        modes = cls(config=config, train=train, model=model, pace=config.curriculum_pace, selecting=config.batch_selection == "on",
                    pool_fraction=config.curriculum_start if config.curriculum else 1.0)
        if model_config.pretrained:
            loaded = load_pretrained(model, model_config.pretrained)
            modes.blocks = model_blocks(model)
            head = set(modes.blocks[-1][1])
            modes.pretrained = {name: value.detach().clone() for name, value in model.named_parameters() if name in loaded.loaded and name not in head}
            if config.freeze_pretrained:
                modes.frozen = [block for block, _ in modes.blocks[:-1]]
            log(f"transfer: {len(loaded.loaded)} tensors from {loaded.source}, {len(loaded.skipped)} fresh ({', '.join(list(loaded.skipped)[:4])}); "
                f"{len(modes.frozen)} of {len(modes.blocks)} blocks frozen")
            for name, value in model.named_parameters():
                value.register_hook(modes._gradient_gate(name))
        if config.gradient_free:
            modes.free_group = free_values_group(model)
        if config.l2sp > 0 and not modes.pretrained:  # `ExperimentConfig` refuses the config; this is what the penalty needs
            raise ValueError("modes.l2sp pulls the backbone toward pretrained weights, and none were loaded: set model.pretrained too")
        return modes

    @property
    def transfer(self) -> bool:
        return bool(self.blocks)

    def optimizer_groups(self) -> list[dict[str, Any]] | None:
        """The optimizer's parameter groups (None: one group, as without transfer learning)."""
        if not self.transfer:
            return None
        return optimizer_groups(self.model, self.blocks, lr=self.train.lr, frozen=self.frozen, layer_lr_decay=self.config.layer_lr_decay)

    def attach(self, engine) -> None:
        self.engine = engine

    def _gradient_gate(self, name: str):
        block = next(block for block, names in self.blocks if name in names)

        def gate(gradient: torch.Tensor) -> torch.Tensor:
            return torch.zeros_like(gradient) if block in self.frozen else gradient
        return gate

    # --- what the loop asks each epoch ---

    @property
    def needs_scores(self) -> bool:
        """Whether each epoch's batches depend on per-sample losses (curriculum or batch selection)."""
        return self.config.curriculum or self.config.batch_selection != "off"

    def epoch_batches(self, scores: np.ndarray | None, *, num_samples: int, rank: int, world_size: int, epoch: int, seed: int,
                      probation: bool = False) -> tuple[list[np.ndarray], list[np.ndarray] | None]:
        """This rank's batches (positions in the train split) and importance weights (None = all 1) for an epoch
        or, with `probation`, for a probation (a different seed; the pool of the epoch to come). Curriculum
        epochs have as many steps as full ones, drawn from the pool, so the budget is the same."""
        from workers import sampling
        from workers.data import shard_batches, stable_seed

        batch_size, accumulation = self.train.batch_size, self.train.grad_accum_steps
        if probation:
            seed = stable_seed(seed, epoch, "probation")
        if self.selecting and scores is not None:
            return sampling.selected_batches(scores, rank=rank, world_size=world_size, batch_size=batch_size, epoch=epoch, seed=seed,
                                             floor=self.config.selection_floor, grad_accum_steps=accumulation)
        if self.config.curriculum and scores is not None and self.pool_fraction < 1.0:
            pool = sampling.curriculum_pool(scores, self.pool_fraction)
            return sampling.pool_batches(pool, num_samples=num_samples, rank=rank, world_size=world_size, batch_size=batch_size,
                                         epoch=epoch, seed=seed, grad_accum_steps=accumulation), None
        return shard_batches(num_samples, rank=rank, world_size=world_size, batch_size=batch_size, epoch=epoch, seed=seed,
                             grad_accum_steps=accumulation), None

    def penalty(self) -> torch.Tensor | None:
        """The L2-SP term, `l2sp / 2 * sum ||W - W_pretrained||^2` over the backbone, or None."""
        if self.config.l2sp <= 0 or not self.pretrained:
            return None
        named = dict(self.engine.module.named_parameters() if self.engine is not None else self.model.named_parameters())
        total = sum(((named[name] - anchor.to(named[name].device, named[name].dtype)) ** 2).sum() for name, anchor in self.pretrained.items())
        return 0.5 * self.config.l2sp * total

    def end_epoch(self, epoch: int, *, val_loss: float = math.nan, log=lambda message: None) -> None:
        """Advance the schedules: widen the curriculum's pool; thaw a block every `modes.unfreeze_every` epochs;
        remember the free group's values with the epoch's validation loss. Collective under ZeRO-3 (gradient-free)."""
        if self.free_group:
            from workers.engine import full_fp32_params

            values = [round(float(value), 5) for value in full_fp32_params(self.engine)[self.free_group].flatten()]
            self.free_history = [*self.free_history, [float(val_loss), values]][-FREE_HISTORY_KEPT:]
        if self.config.curriculum:
            from workers.sampling import next_pool_fraction

            self.pool_fraction = next_pool_fraction(self.pool_fraction, self.pace)
        if self.frozen and self.config.unfreeze_every and epoch % self.config.unfreeze_every == 0:
            log(f"transfer: unfroze {', '.join(self._unfreeze(1))} (every {self.config.unfreeze_every} epochs)")

    # --- the advisor's changes ---

    def view(self) -> ModesView:
        """What the advisor may change and where it stands; the snapshot carries it as `ModesView.to_dict` writes it."""
        from workers.models import adaptive_activations

        free = None
        if self.free_group:
            best = sorted((entry for entry in self.free_history if math.isfinite(entry[0])), key=lambda entry: entry[0])[:FREE_HISTORY_SHOWN]
            free = FreeValues(group=self.free_group, current=tuple(self.free_history[-1][1]) if self.free_history else (),
                              history=tuple((loss, tuple(values)) for loss, values in best))
        curriculum, transfer = self.config.curriculum, self.transfer
        return ModesView(
            curriculum_pace=round(self.pace, 4) if curriculum else None,
            curriculum_pool=round(self.pool_fraction, 4) if curriculum else None,
            batch_selection=("on" if self.selecting else "off") if self.config.batch_selection == "advised" else None,
            activations={name: module.kind for name, module in adaptive_activations(self._module()).items()},
            frozen_blocks=tuple(self.frozen) if transfer else None,
            trainable_blocks=tuple(block for block, _ in self.blocks if block not in self.frozen) if transfer else None,
            free_values=free,
        )

    def describe(self) -> dict[str, Any]:
        """`view()` as the snapshot carries it (`TrainingSnapshot.modes`)."""
        return self.view().to_dict()

    def apply(self, change: TrainingChange) -> list[str]:
        """Carry out a proposal's training change, clamped as `orchestration.fitting.fit` clamps it; raises ValueError
        (touching nothing) when `fit` would drop any part of it: a mode the run does not enable, a layer it lacks,
        a switch to the state it is already in."""
        from workers.models import adaptive_activations

        fitted, done = fit(change, self.view())
        if any(getattr(change, name) is not None and getattr(fitted, name) is None for name in _CHANGE_FIELDS):
            raise ValueError("; ".join(done))
        applied = []
        if fitted.curriculum_pace is not None:
            self.pace = fitted.curriculum_pace
            applied.append(f"curriculum pace {self.pace:g}")
        if fitted.batch_selection is not None:
            self.selecting = fitted.batch_selection
            applied.append(f"batch selection {'on' if self.selecting else 'off'}")
        if fitted.activation_layer is not None:
            adaptive_activations(self._module())[fitted.activation_layer].set_kind(fitted.activation)
            applied.append(f"{fitted.activation_layer} -> {fitted.activation}")
        if fitted.unfreeze is not None:
            applied.append(f"unfroze {', '.join(self._unfreeze(fitted.unfreeze))}")
        return applied

    def check_weight_ops(self, ops: Sequence[WeightOp]) -> None:
        """Frozen blocks keep their pretrained weights: a weight op on one (`orchestration.fitting.fit_weight_ops`)
        raises ValueError (recorded as not applicable)."""
        frozen = {name for block, names in self.blocks if block in self.frozen for name in names}
        _, done = fit_weight_ops(ops, frozen)
        if done:
            raise ValueError("; ".join(done))

    def _unfreeze(self, count: int) -> list[str]:
        """Thaw the `count` frozen blocks nearest the head: each gets `head lr * layer_lr_decay**depth` from now on."""
        thawed = self.frozen[-count:]
        self.frozen = self.frozen[:-count]
        if self.engine is not None:
            self._write_block_lrs()
        return thawed

    def _write_block_lrs(self) -> None:
        """Set each block's learning rate from the head's (group 0) and whether the block is frozen; a group whose
        rate is already right is not touched (a rollback must leave the schedule bit for bit)."""
        scheduler = self.engine.lr_scheduler
        groups = scheduler.optimizer.param_groups
        bases = list(scheduler.base_lrs)  # a new list: a probation's saved scheduler state holds the old one
        factor = scheduler.lr_lambdas[0](scheduler.last_epoch)
        for index, group in enumerate(groups):
            frozen = group["name"] in self.frozen
            if index == 0 or frozen == (bases[index] == 0.0):
                continue
            bases[index] = 0.0 if frozen else bases[0] * self.config.layer_lr_decay**index
            group["lr"] = bases[index] * factor
        scheduler.base_lrs = bases

    def _module(self) -> nn.Module:
        return self.engine.module if self.engine is not None else self.model

    # --- saved with probations and checkpoints ---

    def state(self) -> dict[str, Any]:
        """The modes' own state. Activation choices are not in it: each is a buffer of its module, saved and
        restored with the model's state (DeepSpeed checkpoints, a probation's rollback)."""
        return {"frozen": list(self.frozen), "pool_fraction": self.pool_fraction, "pace": self.pace, "selecting": self.selecting,
                "free_history": [list(entry) for entry in self.free_history]}

    def load_state(self, state: dict[str, Any] | None) -> None:
        if not state:
            return
        self.frozen = list(state["frozen"])
        self.pool_fraction, self.pace, self.selecting = state["pool_fraction"], state["pace"], state["selecting"]
        self.free_history = [list(entry) for entry in state.get("free_history", [])]
        if self.engine is not None and self.transfer:
            self._write_block_lrs()


FREE_HISTORY_KEPT = 50  # epochs of (val loss, values) remembered for gradient-free proposals
FREE_HISTORY_SHOWN = 5  # the best of them, shown to the advisor


def free_values_group(model: nn.Module) -> str:
    """The parameter group gradient-free proposals may set: the last linear layer's bias (one number per class)."""
    from orchestration.protocol import MAX_EXPLICIT_VALUES

    last = [name for name, module in model.named_modules() if isinstance(module, nn.Linear) and module.bias is not None]
    if not last:
        raise ValueError("modes.gradient_free needs a model whose last linear layer has a bias")
    group = f"{last[-1]}.bias"
    size = dict(model.named_parameters())[group].numel()
    if size > MAX_EXPLICIT_VALUES:
        raise ValueError(f"modes.gradient_free: {group} has {size} numbers, more than a proposal may set ({MAX_EXPLICIT_VALUES})")
    return group
