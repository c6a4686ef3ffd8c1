"""What the advisor sees of a worker: statistics hooks, reference weights and the snapshot. Observes only.

Every rank runs the same hooks (their reductions are collectives); rank 0 builds the snapshot.
The reference weights are advice state: they are saved in every checkpoint (`state_tensors`) and
reloaded on restart, so a resumed run measures drift and EMA exactly as an uninterrupted one.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from orchestration.protocol import LayerStats, TrainingSnapshot

EMA_DECAY = 0.9  # per epoch: the EMA weights the advisor may move toward
_REFERENCES = ("ema", "last", "query")


@dataclass(kw_only=True)
class AdviceObserver:
    """Per-layer gradient norms, dead units, and three sets of reference weights:

    - `ema_params`: exponential moving average of end-of-epoch weights (the target of `toward_ema`);
    - `last_params`: last epoch's weights (per-layer update ratios);
    - `query_params`: the weights when the coordinator last asked the advisor (weight drift).
    """

    engine: Any
    world_size: int
    grad_norms: dict[str, float] = field(default_factory=dict)  # RMS over ranks of local gradient norms
    dead_fraction: dict[str, float] = field(default_factory=dict)
    dead_units: dict[str, torch.Tensor] = field(default_factory=dict)
    unit_stats: dict[str, Any] = field(default_factory=dict)  # layer module -> (units, 2) numpy: mean output, fraction positive
    unit_groups: dict[str, Any] = field(default_factory=dict)  # layer module -> each unit's neuron group (numpy ints); empty unless coupling by groups
    ema_params: dict[str, torch.Tensor] | None = None
    last_params: dict[str, torch.Tensor] | None = None
    query_params: dict[str, torch.Tensor] | None = None

    @contextlib.contextmanager
    def watch_grad_norms(self):
        """Around one backward pass (the epoch's last micro-step): per-group gradient norms.

        Tensor hooks see each rank's local gradient before DeepSpeed reduces and partitions it,
        so the statistic costs one small all-reduce instead of one full gather per parameter:
        the root mean square over ranks of the local gradient norms (a little above the norm of
        the averaged gradient, which is all the advisor needs to see).
        """
        local: dict[str, torch.Tensor] = {}
        named = list(self.engine.module.named_parameters())
        handles = []
        for name, param in named:
            if param.requires_grad:
                handles.append(param.register_hook(lambda grad, name=name: local.__setitem__(name, grad.detach().float().pow(2).sum().cpu())))
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()
        squares = torch.stack([local.get(name, torch.zeros(())) for name, _ in named]).double()
        if dist.is_initialized():
            dist.all_reduce(squares)
            squares /= self.world_size
        self.grad_norms = {name: float(value.sqrt()) for (name, _), value in zip(named, squares)}

    @contextlib.contextmanager
    def watch_dead_units(self):
        """Around a forward pass (validation): record, per conv/linear layer but the last, which output units are
        never positive, i.e. dead behind the ReLU that follows them, and each unit's mean output and fraction of
        positive outputs (`unit_stats`, for neuron-group coupling). A layer followed by a PReLU or rational
        activation (`model.activation`, or an adaptive one switched) has no dead units: negative inputs still
        pass gradient."""
        from orchestration.menu import activation_after
        from workers.models import activation_kinds

        model = self.engine.module
        kinds = activation_kinds(model)
        order = [name for name, _ in model.named_parameters()]
        modules = [(name, m) for name, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d))][:-1]
        behind_relu = {name for name, _ in modules if kinds.get(activation_after(f"{name}.weight", kinds, order) or "", "relu") == "relu"}
        # per layer: [ever positive, positive count, output sum, output count] per unit
        sums: dict[str, torch.Tensor] = {}

        def hook(name):
            def record(_module, _inputs, output):
                values = output.detach().float().transpose(0, 1).reshape(output.shape[1], -1)
                positive = values > 0
                batch = torch.stack([positive.any(dim=1).double(), positive.sum(dim=1).double(), values.sum(dim=1).double(),
                                     torch.full((values.shape[0],), float(values.shape[1]), dtype=torch.float64)], dim=1).cpu()
                if name in sums:
                    sums[name][:, 0] = torch.maximum(sums[name][:, 0], batch[:, 0])
                    sums[name][:, 1:] += batch[:, 1:]
                else:
                    sums[name] = batch
            return record

        handles = [module.register_forward_hook(hook(name)) for name, module in modules]
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()
        seen = [name for name, _ in modules if name in sums]
        self.dead_fraction, self.dead_units, self.unit_stats = {}, {}, {}
        if not seen:
            return
        ever = torch.cat([sums[name][:, 0] for name in seen])
        totals = torch.cat([sums[name][:, 1:] for name in seen])
        if dist.is_initialized():  # two collectives for every layer
            dist.all_reduce(ever, op=dist.ReduceOp.MAX)
            dist.all_reduce(totals)
        sizes = [len(sums[name]) for name in seen]
        for name, alive, total in zip(seen, torch.split(ever, sizes), torch.split(totals, sizes)):
            count = total[:, 2].clamp(min=1)
            self.unit_stats[name] = torch.stack([total[:, 1] / count, total[:, 0] / count], dim=1).numpy()  # [mean, fraction positive]
            if name in behind_relu:
                dead = alive == 0
                for suffix in ("weight", "bias"):
                    self.dead_units[f"{name}.{suffix}"] = dead
                self.dead_fraction[f"{name}.weight"] = float(dead.float().mean())

    def regroup(self, *, seed: int) -> None:
        """Cluster each layer's units into neuron groups from the last `watch_dead_units` pass (`workers.coupling`)."""
        from workers.coupling import unit_groups

        self.unit_groups = unit_groups(self.unit_stats, seed=seed) if self.unit_stats else {}

    def describe_neuron_groups(self) -> dict[str, list[dict[str, Any]]]:
        """For the snapshot's modes: per layer module, each neuron group's size and activity."""
        from workers.coupling import describe_groups

        return {layer: describe_groups(labels, self.unit_stats[layer]) for layer, labels in self.unit_groups.items() if layer in self.unit_stats}

    def update_ema(self, params: dict[str, torch.Tensor]) -> None:
        """Fold this epoch's weights into the EMA: `ema = d * ema + (1 - d) * W`, `d = EMA_DECAY`."""
        self.ema_params = params if self.ema_params is None else {n: EMA_DECAY * self.ema_params[n] + (1 - EMA_DECAY) * params[n] for n in params}

    def weight_drift(self, params: dict[str, torch.Tensor]) -> float:
        """`||W - W_q|| / ||W_q||` over all parameters, `W_q` = the weights when the coordinator last
        asked (before any query: the first advised epoch's weights, so drift still accumulates)."""
        if self.query_params is None:
            self.query_params = params
            return 0.0
        delta = sum(float((params[n] - self.query_params[n]).norm() ** 2) for n in params)
        base = sum(float(self.query_params[n].norm() ** 2) for n in params)
        return (delta / max(base, 1e-12)) ** 0.5

    def snapshot(self, *, run_id: str, model_kind: str, total_epochs: int, epoch: int, step: int, history: list[dict[str, float]],
                 params: dict[str, torch.Tensor], hyperparameters: dict[str, float], history_window: int,
                 modes: dict[str, Any] | None = None) -> TrainingSnapshot:
        """The training state for the coordinator: the last `history_window` epochs of curves and,
        per parameter group, norms, gradient norm, update ratio since last epoch and dead fraction."""
        layers = []
        for name, value in params.items():
            previous = self.last_params.get(name) if self.last_params else None
            update = float((value - previous).norm() / max(float(previous.norm()), 1e-12)) if previous is not None else 0.0
            layers.append(LayerStats(name=name, num_params=value.numel(), weight_norm=float(value.norm()), grad_norm=self.grad_norms.get(name, 0.0),
                                     update_ratio=update, dead_fraction=self.dead_fraction.get(name, 0.0)))
        rows = history[-history_window:]
        return TrainingSnapshot(
            run_id=run_id, epoch=epoch, step=step, total_epochs=total_epochs, model_kind=model_kind,
            train_loss=[r["train_loss"] for r in rows], val_loss=[r["val_loss"] for r in rows],
            train_accuracy=[], val_accuracy=[r["val_accuracy"] for r in rows],
            hyperparameters=hyperparameters, layers=layers, modes=dict(modes or {}),
        )

    def state_tensors(self) -> dict[str, torch.Tensor]:
        """The reference weights as one flat dict (`ema/<name>`, `last/<name>`, `query/<name>`) for a checkpoint."""
        flat, seen = {}, set()
        for prefix in _REFERENCES:
            for name, value in (getattr(self, f"{prefix}_params") or {}).items():
                # The references often share tensors (last = query right after a query); safetensors
                # refuses shared storage, so repeats are written as copies.
                flat[f"{prefix}/{name}"] = value.clone() if id(value) in seen else value.contiguous()
                seen.add(id(value))
        return flat

    def load_state_tensors(self, flat: dict[str, torch.Tensor]) -> None:
        for prefix in _REFERENCES:
            values = {key.split("/", 1)[1]: value for key, value in flat.items() if key.startswith(prefix + "/")}
            setattr(self, f"{prefix}_params", values or None)
