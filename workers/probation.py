"""Trying a proposal on probation, on every rank alike, and leaving no trace unless it is kept.

    S0 = save(model, optimizer, scheduler, hyperparameters)           # DeepSpeed checkpoint, all shards
    reference = K steps on the probation batches from S0 (counterfactual mode) or the epoch's metrics
    candidate = K steps on the same batches from S0 + proposal
    restore S0                                                        # probation leaves no trace
    verdict = the coordinator's judgement of (candidate, reference)
    accepted -> apply the proposal to S0 again (deterministic); rejected -> stay at S0, bit for bit

So a rejected proposal costs only time, and a proposal whose blend factor is 0 changes nothing.
Weights are read and written as full fp32 master values (`workers.engine`), correct under ZeRO 1-3.
"""

from __future__ import annotations

import logging
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from orchestration.protocol import Apply, ProbationMetrics, Verdict
from workers.blending import apply_hyperparameter_change, apply_weight_ops
from workers.engine import (
    barrier,
    broadcast_from_rank0,
    load_engine_checkpoint,
    read_hyperparameters,
    reset_optimizer_moments,
    state_digest,
    write_full_fp32_params,
    write_hyperparameters,
)

logger = logging.getLogger(__name__)

ROLLBACK_TAG = "pre-proposal"

# rank 0's judge: (candidate or None, reference, problem or None) -> Verdict
Judge = Callable[[ProbationMetrics | None, ProbationMetrics, str | None], Verdict]


@dataclass(kw_only=True)
class ProbationResult:
    accepted: bool
    reward: float | None
    rollback_exact: bool | None  # None when not verified
    probation_s: float


@dataclass(kw_only=True)
class WeightReferences:
    """What weight ops may move toward or act on (see `workers.blending.apply_weight_ops`)."""

    params: dict[str, torch.Tensor]  # the weights the proposal is applied to
    best: dict[str, torch.Tensor] | None = None
    initial: dict[str, torch.Tensor] | None = None  # the weights the run started from (a restart's point when it never learned)
    ema: dict[str, torch.Tensor] | None = None
    dead_units: dict[str, torch.Tensor] | None = None
    unit_groups: dict[str, Any] | None = None  # layer module -> each output unit's neuron group (neuron-group coupling)


@dataclass(kw_only=True)
class ProbationRunner:
    engine: Any
    rank: int
    batch_size: int
    rollback_dir: Path
    verify_rollback: bool = False
    modes: Any = None  # `workers.modes.TrainingModes`: a proposal's training change, saved and restored with the weights

    def run(self, decision: Apply, references: WeightReferences, *, run_probation: Callable[[int], ProbationMetrics],
            epoch_metrics: ProbationMetrics, judge: Judge) -> ProbationResult:
        """Try `decision` on probation, get the verdict from `judge` (rank 0, broadcast), keep or roll back. Collective."""
        started = time.perf_counter()
        micro_steps = decision.probation_steps * self.engine.gradient_accumulation_steps()
        saved = self.save()
        if decision.reward_mode == "counterfactual":
            reference = run_probation(micro_steps)
            self.restore(saved)
        else:
            reference = epoch_metrics
        problem = self.apply(decision, references)
        candidate = run_probation(micro_steps) if problem is None else None
        self.restore(saved)
        verdict = judge(candidate, reference, problem) if self.rank == 0 else None
        verdict = broadcast_from_rank0(verdict)
        accepted = bool(verdict is not None and verdict.accepted)
        exact = None
        if accepted:
            again = self.apply(decision, references)  # deterministic: what the candidate ran with
            if again is not None:
                raise RuntimeError(f"proposal {decision.query_id} was accepted but could not be applied again: {again}")
        elif self.verify_rollback:
            exact = self.digest() == saved["digest"]
        return ProbationResult(accepted=accepted, reward=None if verdict is None else verdict.reward, rollback_exact=exact,
                               probation_s=time.perf_counter() - started)

    def apply(self, decision: Apply, references: WeightReferences) -> str | None:
        """Blend the proposal's weights and set its hyperparameters; a problem string if it cannot be applied."""
        proposal = decision.proposal
        try:
            if not proposal.hyperparameters.is_empty():  # checked first: a change that cannot be made touches nothing
                values, _ = apply_hyperparameter_change(self.hyperparameters(), proposal.hyperparameters)
                write_hyperparameters(self.engine, values, batch_size=self.batch_size)
            if proposal.restart:
                self.restart(proposal.restart, references)
            if proposal.weights and self.modes is not None:
                self.modes.check_weight_ops(proposal.weights)
            if proposal.weights:
                updated, operations = apply_weight_ops(references.params, proposal.weights, decision.alphas, best=references.best,
                                                       ema=references.ema, dead_units=references.dead_units, seed=decision.seed,
                                                       unit_groups=references.unit_groups)
                logger.debug("weight ops: %s", operations)
                if updated:
                    write_full_fp32_params(self.engine, updated)  # collective under ZeRO-3
                    if decision.reset_optimizer_moments:
                        reset_optimizer_moments(self.engine, list(updated))
            if not proposal.training.is_empty():
                if self.modes is None:
                    raise ValueError("this run has no research modes to change")
                logger.debug("training change: %s", self.modes.apply(proposal.training))
        except (ValueError, KeyError, RuntimeError) as error:
            return f"could not apply proposal: {error}"
        return None

    def restart(self, point: str, references: WeightReferences) -> None:
        """Write the `point` weights ("best" or "initial") back into every parameter and restart the optimizer's state
        (moments zeroed, schedule-free's z at the weights: `workers.optimizers.reset_value`). Collective under ZeRO."""
        weights = references.best if point == "best" else references.initial if point == "initial" else None
        if weights is None:
            raise ValueError(f"no {point} weights to restart from")
        write_full_fp32_params(self.engine, weights)
        reset_optimizer_moments(self.engine, list(weights))

    def hyperparameters(self) -> dict[str, float]:
        return read_hyperparameters(self.engine, batch_size=self.batch_size)

    def save(self) -> dict[str, Any]:
        """Every rank writes its shard of model, optimizer and scheduler state (a DeepSpeed
        checkpoint in a directory all ranks share), plus the hyperparameters DeepSpeed does not keep."""
        if self.rank == 0 and self.rollback_dir.exists():
            shutil.rmtree(self.rollback_dir)
        barrier()
        self.engine.save_checkpoint(str(self.rollback_dir), tag=ROLLBACK_TAG, save_latest=False)
        barrier()
        return {"hyperparameters": self.hyperparameters(), "scheduler": dict(self.engine.lr_scheduler.state_dict()),
                "modes": self.modes.state() if self.modes is not None else None,
                "digest": self.digest() if self.verify_rollback else None}

    def restore(self, saved: dict[str, Any]) -> None:
        load_engine_checkpoint(self.engine, str(self.rollback_dir), ROLLBACK_TAG)
        self.engine.lr_scheduler.load_state_dict(saved["scheduler"])
        write_hyperparameters(self.engine, saved["hyperparameters"], batch_size=self.batch_size)
        if self.modes is not None:
            self.modes.load_state(saved["modes"])
        barrier()

    def digest(self) -> str:
        return state_digest(self.engine, self.hyperparameters())
