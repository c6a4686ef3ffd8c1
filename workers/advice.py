"""The worker side of advised training: observe, ask the coordinator, act on its decision.

At each epoch end rank 0 sends a `TrainingSnapshot` to the coordinator actor and every rank gets
its `Decision` by broadcast. An `Apply` runs on probation, the same way on every rank:

    S0 = snapshot(model, optimizer, scheduler, hyperparameters)      # DeepSpeed checkpoint, all shards
    reference = K steps on the probation batches from S0 (counterfactual mode) or the epoch's metrics
    candidate = K steps on the same batches from S0 + proposal
    restore S0                                                      # probation leaves no trace
    verdict = coordinator.report_probation(candidate, reference)
    accepted -> apply the proposal to S0 again (deterministic); rejected -> stay at S0, bit for bit

So a rejected proposal costs only time, and a proposal whose blend factor is 0 changes nothing.
All weight reads and writes go through the full fp32 master weights (`workers.engine`), correct
under ZeRO 1-3.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from orchestration.acceptance import ProbationMetrics, Verdict
from orchestration.blending import apply_hyperparameter_change, apply_weight_ops
from orchestration.coordinator import Apply, Continue
from serve_llm.schema import LayerStats, TrainingSnapshot
from workers.engine import full_fp32_params, load_engine_checkpoint, write_full_fp32_params
from workers.models import set_dropout

logger = logging.getLogger(__name__)

ROLLBACK_TAG = "pre-proposal"
EMA_DECAY = 0.9  # per epoch: the EMA weights the advisor may move toward


@dataclass(kw_only=True)
class AdviceEvent:
    """What happened at one epoch end, for the worker's log."""

    decision: str
    query_id: str = ""
    accepted: bool | None = None
    reward: float | None = None
    rollback_exact: bool | None = None
    probation_s: float = 0.0


@dataclass(kw_only=True)
class WorkerAdvice:
    """Per-worker advice state: statistics, reference weights and the link to the coordinator."""

    engine: Any
    rank: int
    world_size: int
    run_id: str
    model_kind: str
    total_epochs: int
    batch_size: int
    rollback_dir: Path
    coordinator: Any = None  # actor handle, rank 0 only
    verify_rollback: bool = False
    call_timeout_s: float = 60.0
    grad_norms: dict[str, float] = field(default_factory=dict)  # RMS over ranks of local gradient norms
    dead_fraction: dict[str, float] = field(default_factory=dict)
    dead_units: dict[str, torch.Tensor] = field(default_factory=dict)
    last_params: dict[str, torch.Tensor] | None = None
    query_params: dict[str, torch.Tensor] | None = None
    ema_params: dict[str, torch.Tensor] | None = None
    disabled_reason: str = ""

    # ---- observation -------------------------------------------------------------------------

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
        """Around a forward pass (validation): record, per conv/linear layer but the last, which
        output units are never positive, i.e. dead behind the ReLU that follows them."""
        modules = [(name, m) for name, m in self.engine.module.named_modules() if isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d))][:-1]
        ever_positive: dict[str, torch.Tensor] = {}

        def hook(name):
            def record(_module, _inputs, output):
                positive = (output.detach() > 0).transpose(0, 1).reshape(output.shape[1], -1).any(dim=1).cpu()
                ever_positive[name] = ever_positive.get(name, torch.zeros_like(positive)) | positive
            return record

        handles = [module.register_forward_hook(hook(name)) for name, module in modules]
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()
        fractions, masks = {}, {}
        seen = [name for name, _ in modules if name in ever_positive]
        if not seen:
            self.dead_fraction, self.dead_units = fractions, masks
            return
        alive_all = torch.cat([ever_positive[name] for name in seen]).to(torch.int32)
        if dist.is_initialized():
            dist.all_reduce(alive_all, op=dist.ReduceOp.MAX)  # one collective for every layer
        for name, alive in zip(seen, torch.split(alive_all, [len(ever_positive[name]) for name in seen])):
            dead = alive == 0
            for suffix in ("weight", "bias"):
                masks[f"{name}.{suffix}"] = dead
            fractions[f"{name}.weight"] = float(dead.float().mean())
        self.dead_fraction, self.dead_units = fractions, masks

    def snapshot(self, *, epoch: int, step: int, history: list[dict[str, float]], params: dict[str, torch.Tensor], hyperparameters: dict[str, float], recent: int = 8) -> tuple[TrainingSnapshot, float]:
        """The training state for the advisor, and the relative weight drift since the last query."""
        layers = []
        for name, value in params.items():
            previous = self.last_params.get(name) if self.last_params else None
            norm = float(value.norm())
            update = float((value - previous).norm() / max(float(previous.norm()), 1e-12)) if previous is not None else 0.0
            layers.append(LayerStats(name=name, num_params=value.numel(), weight_norm=norm, grad_norm=self.grad_norms.get(name, 0.0),
                                     update_ratio=update, dead_fraction=self.dead_fraction.get(name, 0.0)))
        reference = self.query_params or self.last_params
        drift = 0.0
        if reference:
            delta = sum(float((params[n] - reference[n]).norm() ** 2) for n in params)
            base = sum(float(reference[n].norm() ** 2) for n in params)
            drift = (delta / max(base, 1e-12)) ** 0.5
        rows = history[-recent:]
        snapshot = TrainingSnapshot(
            run_id=self.run_id, epoch=epoch, step=step, total_epochs=self.total_epochs, model_kind=self.model_kind,
            train_loss=[r["train_loss"] for r in rows], val_loss=[r["val_loss"] for r in rows],
            train_accuracy=[], val_accuracy=[r["val_accuracy"] for r in rows],
            hyperparameters=hyperparameters, layers=layers,
        )
        return snapshot, drift

    # ---- the epoch-end protocol -----------------------------------------------------------------

    def on_epoch_end(self, *, epoch: int, step: int, history: list[dict[str, float]], best_params: dict[str, torch.Tensor] | None,
                     run_probation: Callable[[int], ProbationMetrics], epoch_metrics: ProbationMetrics) -> AdviceEvent:
        """Ask (rank 0), broadcast the decision, and carry it out on every rank. Collective."""
        params = full_fp32_params(self.engine)  # collective under ZeRO
        self.ema_params = params if self.ema_params is None else {n: EMA_DECAY * self.ema_params[n] + (1 - EMA_DECAY) * params[n] for n in params}
        decision: Any = Continue("not asked")
        if self.rank == 0:
            decision = self._ask(epoch=epoch, step=step, history=history, params=params)
        decision = _broadcast(decision)
        self.last_params = params
        if not isinstance(decision, Apply):
            return AdviceEvent(decision=decision.reason or "continue")

        self.query_params = params
        started = time.perf_counter()
        probation_micro_steps = decision.probation_steps * self.engine.gradient_accumulation_steps()
        saved = self._save_state()
        if decision.reward_mode == "counterfactual":
            reference = run_probation(probation_micro_steps)
            self._restore_state(saved)
        else:
            reference = epoch_metrics
        problem = self._apply(decision, params, best_params)
        candidate = run_probation(probation_micro_steps) if problem is None else None
        self._restore_state(saved)
        verdict = None
        if self.rank == 0:
            verdict = self._report(decision, candidate, reference, problem, epoch=epoch, step=step)
        verdict = _broadcast(verdict)
        accepted = bool(verdict is not None and verdict.accepted)
        exact = None
        if accepted:
            self._apply(decision, params, best_params)
        elif self.verify_rollback:
            exact = self._state_digest() == saved["digest"]
        return AdviceEvent(decision="apply", query_id=decision.query_id, accepted=accepted, reward=None if verdict is None else verdict.reward,
                           rollback_exact=exact, probation_s=time.perf_counter() - started)

    def _ask(self, *, epoch: int, step: int, history, params) -> Any:
        if self.coordinator is None:
            return Continue(self.disabled_reason or "advisor off")
        snapshot, drift = self.snapshot(epoch=epoch, step=step, history=history, params=params, hyperparameters=self.hyperparameters())
        reached, decision = self._call_coordinator("on_epoch_end", snapshot, drift)
        return decision if reached else Continue(self.disabled_reason)

    def _report(self, decision: Apply, candidate: ProbationMetrics | None, reference: ProbationMetrics, problem: str | None, *, epoch: int, step: int):
        if problem is not None:
            reached, _ = self._call_coordinator("report_apply_failed", decision.query_id, problem, epoch=epoch, step=step)
            verdict = Verdict(accepted=False, reward=float("-inf"), reason=problem)
        else:
            reached, verdict = self._call_coordinator("report_probation", decision.query_id, candidate, reference, epoch=epoch, step=step)
        if not reached:
            logger.warning("proposal %s rolled back", decision.query_id)
            return Verdict(accepted=False, reward=float("nan"), reason=self.disabled_reason)
        return verdict

    def _call_coordinator(self, method: str, *args, **kwargs) -> tuple[bool, Any]:
        """`(True, result)` of a coordinator call, or `(False, None)` once it is unreachable: a dead or
        stuck coordinator must not take training down with it, so advice stops and training goes on."""
        import ray

        try:
            return True, ray.get(getattr(self.coordinator, method).remote(*args, **kwargs), timeout=self.call_timeout_s)
        except Exception as error:
            self.disabled_reason = f"coordinator unreachable: {type(error).__name__}: {error}"
            logger.warning("%s; training goes on without advice", self.disabled_reason)
            self.coordinator = None
            return False, None

    # ---- acting ------------------------------------------------------------------------------------

    def hyperparameters(self) -> dict[str, float]:
        group = self.engine.lr_scheduler.optimizer.param_groups[0]
        momentum = group["betas"][0] if "betas" in group else group.get("momentum", 0.0)
        dropout = next((m.p for m in self.engine.module.modules() if isinstance(m, nn.Dropout)), 0.0)
        return {"lr": float(self.engine.get_lr()[0]), "weight_decay": float(group.get("weight_decay", 0.0)), "momentum": float(momentum),
                "dropout": float(dropout), "batch_size": float(self.batch_size)}

    def _set_hyperparameters(self, values: dict[str, float]) -> None:
        scheduler = self.engine.lr_scheduler
        current = self.hyperparameters()
        scale = values["lr"] / current["lr"] if current["lr"] > 0 else 1.0
        scheduler.base_lrs = [lr * scale for lr in scheduler.base_lrs]
        for group in scheduler.optimizer.param_groups:
            group["lr"] *= scale
            group["weight_decay"] = values["weight_decay"]
            if "betas" in group:
                group["betas"] = (values["momentum"], group["betas"][1])
            elif "momentum" in group:
                group["momentum"] = values["momentum"]
        set_dropout(self.engine.module, values["dropout"])

    def _apply(self, decision: Apply, params: dict[str, torch.Tensor], best_params) -> str | None:
        """Blend the proposal's weights and set its hyperparameters; a problem string if it cannot be applied."""
        proposal = decision.proposal
        try:
            if proposal.weights:
                updated, operations = apply_weight_ops(params, proposal.weights, decision.alphas, best=best_params, ema=self.ema_params,
                                                       dead_units=self.dead_units, seed=decision.seed)
                logger.debug("weight ops: %s", operations)
                if updated:
                    write_full_fp32_params(self.engine, updated)  # collective under ZeRO-3
                    if decision.reset_optimizer_moments:
                        self._reset_moments(list(updated))
            if not proposal.hyperparameters.is_empty():
                values, _ = apply_hyperparameter_change(self.hyperparameters(), proposal.hyperparameters)
                self._set_hyperparameters(values)
        except (ValueError, KeyError, RuntimeError) as error:
            return f"could not apply proposal: {error}"
        return None

    def _reset_moments(self, names: list[str]) -> None:
        from deepspeed.utils import safe_get_full_optimizer_state, safe_set_full_optimizer_state

        named = dict(self.engine.module.named_parameters())
        keys = self._optimizer_state_keys()
        for name in names:
            for key in keys:
                state = safe_get_full_optimizer_state(named[name], key)
                if state is not None:
                    safe_set_full_optimizer_state(named[name], torch.zeros_like(state), key)

    # ---- exact snapshots ------------------------------------------------------------------------

    def _save_state(self) -> dict[str, Any]:
        """Every rank writes its shard of model, optimizer and scheduler state (a DeepSpeed
        checkpoint in a directory all ranks share), plus the hyperparameters DeepSpeed does not keep."""
        if self.rank == 0 and self.rollback_dir.exists():
            shutil.rmtree(self.rollback_dir)
        _barrier()
        self.engine.save_checkpoint(str(self.rollback_dir), tag=ROLLBACK_TAG, save_latest=False)
        _barrier()
        return {"hyperparameters": self.hyperparameters(), "scheduler": dict(self.engine.lr_scheduler.state_dict()),
                "digest": self._state_digest() if self.verify_rollback else None}

    def _restore_state(self, saved: dict[str, Any]) -> None:
        load_engine_checkpoint(self.engine, str(self.rollback_dir), ROLLBACK_TAG)
        self.engine.lr_scheduler.load_state_dict(saved["scheduler"])
        self._set_hyperparameters(saved["hyperparameters"])
        _barrier()

    def _state_digest(self) -> str:
        """A hash of the full fp32 weights and every optimizer moment, identical on every rank."""
        from deepspeed.utils import safe_get_full_optimizer_state

        digest = hashlib.sha256()
        for name, value in full_fp32_params(self.engine).items():
            digest.update(name.encode())
            digest.update(value.numpy().tobytes())
        keys = self._optimizer_state_keys()
        for name, param in self.engine.module.named_parameters():
            for key in keys:
                state = safe_get_full_optimizer_state(param, key) if self.engine.zero_optimization_stage() > 0 else self._stage0_state(param, key)
                if state is not None:
                    digest.update(f"{name}/{key}".encode())
                    digest.update(state.detach().float().cpu().numpy().tobytes())
        for name, buffer in self.engine.module.named_buffers():
            digest.update(name.encode())
            digest.update(buffer.detach().cpu().numpy().tobytes())
        digest.update(repr(sorted(self.hyperparameters().items())).encode())
        return digest.hexdigest()

    def _optimizer_state_keys(self) -> list[str]:
        """The per-parameter tensors the optimizer keeps (exp_avg, momentum_buffer, ...), the same on every rank."""
        keys: set[str] = set()
        for per_param in self.engine.lr_scheduler.optimizer.state.values():
            keys.update(k for k, v in per_param.items() if torch.is_tensor(v) and v.dim() > 0)
        keys = sorted(keys)
        return _broadcast(keys)  # a rank whose ZeRO partition is empty must still ask for the same keys

    def _stage0_state(self, param, key: str):
        return self.engine.lr_scheduler.optimizer.state.get(param, {}).get(key)


def _broadcast(value: Any) -> Any:
    if not dist.is_initialized():
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def probation_batches(num_samples: int, *, rank: int, world_size: int, batch_size: int, epoch: int, seed: int, micro_steps: int) -> list[np.ndarray]:
    """The batches a probation trains on: a seeded draw of the train split, the same for both branches."""
    order = np.random.default_rng([seed, epoch, 7919]).permutation(num_samples)
    shard = order[rank::world_size]
    batches = [shard[i:i + batch_size] for i in range(0, len(shard), batch_size)]
    return [batches[i % len(batches)] for i in range(micro_steps)]
