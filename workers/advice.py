"""The worker side of advised training, at each epoch end: observe, ask, act on the decision.

Three parts, one job each:

- `AdviceObserver` (`workers.observer`): statistics hooks, reference weights, the snapshot;
- `CoordinatorLink` (`workers.coordinator_link`): rank 0's Ray calls to the coordinator actor;
- `ProbationRunner` (`workers.probation`): try an `Apply` on probation, keep it or roll back exactly.

`WorkerAdvice` wires them in the protocol's order (`orchestration.protocol`): rank 0 sends a
`TrainingSnapshot` and gets a `Decision`, every rank receives it by broadcast and carries it out
alike. It never judges a proposal itself: verdicts come from the coordinator, and a missing one
counts as a rejection with the reason recorded.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from orchestration.protocol import Apply, Continue, ModesView, NeuronGroup, ProbationMetrics, Verdict
from workers.coordinator_link import CoordinatorLink
from workers.engine import broadcast_from_rank0, full_fp32_params
from workers.observer import AdviceObserver
from workers.probation import ProbationRunner, WeightReferences

logger = logging.getLogger(__name__)


@dataclass(kw_only=True)
class AdviceSettings:
    """What the driver tells every worker about this run's advice (picklable; from `cluster.launch`)."""

    coordinator: str  # actor name
    namespace: str
    run_id: str
    run_key: str  # this run's key in the coordinator actor (which may serve a whole sweep)
    history_window: int  # epochs of curves in each snapshot (coordinator.history_window)
    verify_rollback: bool = False
    call_timeout_s: float = 180.0
    coordinator_config: Any = None  # the run's CoordinatorConfig: to open the run again in a restarted coordinator actor
    opening_state: dict[str, Any] | None = None  # the coordinator's state as the driver opened the run: a start without a checkpoint rewinds to it


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
    settings: AdviceSettings
    engine: Any
    rank: int
    model_kind: str
    total_epochs: int
    batch_size: int
    observer: AdviceObserver
    probation: ProbationRunner
    link: CoordinatorLink | None = None  # rank 0 only
    modes: Any = None  # the run's `workers.modes.TrainingModes`: described in each snapshot
    incidents: list[dict[str, Any]] = field(default_factory=list)  # carried over from earlier attempts
    # The first parameter group's configured peak lr (train.lr): read off the schedule when this is built, which is
    # before any checkpoint is restored (`train_loop_per_worker` builds the components first).
    configured_lr: float | None = None
    num_classes: int = 0  # in each snapshot: what chance is (a collapse to chance is read from it)

    def __post_init__(self) -> None:
        if self.configured_lr is None:
            self.configured_lr = float(self.engine.lr_scheduler.base_lrs[0])

    def lr_factor(self) -> float:
        """The schedule's peak lr over the configured one: the product of the lr changes accepted (and kept) so far,
        after a restart or a PBT exploit too (the restored schedule carries them; a mutated train.lr resets it)."""
        configured = self.configured_lr or 0.0
        return float(self.engine.lr_scheduler.base_lrs[0]) / configured if configured > 0 else 1.0

    @classmethod
    def create(cls, settings: AdviceSettings, engine: Any, *, rank: int, world_size: int, model_kind: str, total_epochs: int,
               batch_size: int, rollback_dir: Path, modes: Any = None, num_classes: int = 0) -> WorkerAdvice:
        link = (CoordinatorLink.connect(settings.coordinator, settings.namespace, run=settings.run_key, call_timeout_s=settings.call_timeout_s,
                                        config=settings.coordinator_config, run_id=settings.run_id, state=settings.opening_state)
                if rank == 0 else None)
        return cls(settings=settings, engine=engine, rank=rank, model_kind=model_kind, total_epochs=total_epochs, batch_size=batch_size,
                   observer=AdviceObserver(engine=engine, world_size=world_size), link=link, modes=modes, num_classes=num_classes,
                   probation=ProbationRunner(engine=engine, rank=rank, batch_size=batch_size, rollback_dir=rollback_dir,
                                             verify_rollback=settings.verify_rollback, modes=modes))

    def on_epoch_end(self, *, epoch: int, step: int, history: list[dict[str, float]], best_params: dict[str, torch.Tensor] | None,
                     initial_params: dict[str, torch.Tensor] | None = None, run_probation: Callable[[int], ProbationMetrics], epoch_metrics: ProbationMetrics) -> AdviceEvent:
        """Ask (rank 0), broadcast the decision, and carry it out on every rank. Collective."""
        params = full_fp32_params(self.engine)  # collective under ZeRO
        self.observer.update_ema(params)
        config = self.settings.coordinator_config
        if getattr(config, "neuron_groups", False) and (not self.observer.unit_groups or epoch % config.regroup_every == 0):
            self.observer.regroup(seed=epoch)  # the same statistics on every rank: the same groups
        decision: Any = Continue("not asked")
        if self.rank == 0:
            decision = self._ask(epoch=epoch, step=step, history=history, params=params)
        decision = broadcast_from_rank0(decision)
        self.observer.last_params = params
        if decision.asked_now:
            self.observer.query_params = params  # weight drift is measured from the last query
        if not isinstance(decision, Apply):
            return AdviceEvent(decision=decision.reason or "continue")

        references = WeightReferences(params=params, best=best_params, initial=initial_params, ema=self.observer.ema_params, dead_units=self.observer.dead_units,
                                      unit_groups=self.observer.unit_groups)

        def judge(candidate: ProbationMetrics | None, reference: ProbationMetrics, problem: str | None) -> Verdict:
            return self._judge(decision, candidate, reference, problem, epoch=epoch, step=step)

        result = self.probation.run(decision, references, run_probation=run_probation, epoch_metrics=epoch_metrics, judge=judge)
        return AdviceEvent(decision="apply", query_id=decision.query_id, accepted=result.accepted, reward=result.reward,
                           rollback_exact=result.rollback_exact, probation_s=result.probation_s)

    def _ask(self, *, epoch: int, step: int, history: list[dict[str, float]], params: dict[str, torch.Tensor]) -> Any:
        if self.link is None or not self.link.reachable:
            return Continue(self.link.disabled_reason if self.link else "advisor off")
        drift = self.observer.weight_drift(params)
        snapshot = self.observer.snapshot(run_id=self.settings.run_id, model_kind=self.model_kind, total_epochs=self.total_epochs,
                                          epoch=epoch, step=step, history=history, params=params,
                                          hyperparameters=self.probation.hyperparameters(), history_window=self.settings.history_window,
                                          modes=self._modes())
        snapshot.num_classes = self.num_classes
        snapshot.lr_factor = self.lr_factor()  # the coordinator caps lr raises by it (coordinator.max_lr_factor)
        reached, decision = self.link.on_epoch_end(snapshot, drift, epoch=epoch)
        return decision if reached else Continue(self.link.disabled_reason or "coordinator call failed")

    def _modes(self) -> dict[str, Any]:
        """The snapshot's `modes` (a `ModesView`'s wire form): the research modes' state and, with neuron-group
        coupling, the groups."""
        view = self.modes.view() if self.modes is not None else ModesView()
        if self.observer.unit_groups:
            groups = self.observer.describe_neuron_groups()
            view = replace(view, neuron_groups={layer: tuple(NeuronGroup(**group) for group in described)
                                                            for layer, described in groups.items()})
        return view.to_dict()

    def _judge(self, decision: Apply, candidate: ProbationMetrics | None, reference: ProbationMetrics, problem: str | None, *,
               epoch: int, step: int) -> Verdict:
        """The coordinator's verdict (rank 0); without one, a rejection that says why."""
        assert self.link is not None
        if problem is not None:
            self.link.report_apply_failed(decision.query_id, problem, epoch=epoch, step=step)
            return Verdict(accepted=False, reward=-math.inf, reason=problem)
        reached, verdict = self.link.report_probation(decision.query_id, candidate, reference, epoch=epoch, step=step)
        if not reached:
            logger.warning("proposal %s rolled back: no verdict", decision.query_id)
            return Verdict(accepted=False, reward=math.nan, reason=self.link.disabled_reason or "no verdict")
        return verdict

    def telemetry(self, *, epoch: int) -> dict[str, Any] | None:
        """The coordinator's advisor series (`Coordinator.telemetry`) on rank 0; None elsewhere or out of reach."""
        if self.link is None or not self.link.reachable:
            return None
        reached, values = self.link.telemetry(epoch=epoch)
        return values if reached else None

    # --- checkpointed state ----------------------------------------------------------------------

    def all_incidents(self) -> list[dict[str, Any]]:
        return self.incidents + (self.link.incidents if self.link else [])

    def state_tensors(self) -> dict[str, torch.Tensor]:
        return self.observer.state_tensors()

    def remember_state(self, *, epoch: int) -> None:
        """Fetch the coordinator's state at this epoch end (rank 0): what the next checkpoint holds, and
        what a restarted coordinator actor gets back, so its ledger matches the weights."""
        if self.link is not None and self.link.reachable:
            reached, state = self.link.to_state(epoch=epoch)
            if reached:
                self.link.state = state

    def checkpoint_state(self) -> dict[str, Any]:
        """JSON-able advice state for rank 0's checkpoint: the coordinator's state at this epoch's end
        (`remember_state`) and the incidents so far. Rank 0 only."""
        return {"coordinator": self.link.state if self.link is not None else None, "incidents": self.all_incidents()}

    def restore(self, state: dict[str, Any] | None, tensors: dict[str, torch.Tensor] | None) -> None:
        """Take back what `checkpoint_state` and `state_tensors` saved. The coordinator is rewound to
        the checkpoint too (rank 0), so the ledger and the weights tell the same story."""
        if tensors:
            self.observer.load_state_tensors(tensors)
        if not state:
            return
        self.incidents = list(state.get("incidents", []))
        if state.get("coordinator") is not None:
            self._rewind(state["coordinator"])

    def start_fresh(self) -> None:
        """A start without a checkpoint (the first, or a restart before any checkpoint): rewind the
        coordinator to the state the driver opened the run with, so an earlier attempt's rows go."""
        if self.settings.opening_state is not None:
            self._rewind(self.settings.opening_state)

    def _rewind(self, coordinator_state: dict[str, Any]) -> None:
        if self.link is not None:
            self.link.load_state(coordinator_state, epoch=-1)
            self.link.state = coordinator_state
