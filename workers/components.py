"""The loop's built-in components and the one list that registers them (`BUILT_IN`, in firing order).

    FaultInjection   observer      batch                kill a worker on the configured step (testing aid; `workers.faults`)
    Advice           intervention  fit_start, batch(_end), eval_start/_end, epoch_end, checkpoint
                                                        observe, ask the coordinator, try a proposal on probation
    ResearchModes    intervention  epoch_end            advance curriculum / unfreezing schedules (`workers.modes`)
    EpochTelemetry   observer      fit_start, epoch_end, fit_end    Ray metrics and TensorBoard (rank 0)
    Checkpointing    observer      epoch_end            checkpoint and report (`workers.checkpointing`)
    EpochProgress    observer      epoch_end            metrics.csv and the epoch's progress line (rank 0)

The order matters at `epoch_end`: a proposal is tried before the schedules advance, the telemetry and
the checkpoint then hold the outcome, and the progress line comes last.
"""

from __future__ import annotations

import contextlib
import functools
import json
import time
from pathlib import Path
from typing import Any, ClassVar

from orchestration.protocol import ProbationMetrics
from orchestration.telemetry import Telemetry, advisor_series
from workers.advice import WorkerAdvice
from workers.checkpointing import Checkpointing
from workers.engine import gather_to_all
from workers.epoch import run_probation
from workers.events import ComponentFactory, Event, Intervention, Observer
from workers.faults import FaultInjection
from workers.files import atomic_write_text
from workers.loop import Loop

ADVICE_STATE = "advice_state.json"  # in each checkpoint: the coordinator's state and the advice incidents
ADVICE_TENSORS = "advice_tensors.safetensors"  # in each checkpoint: the observer's reference weights
TENSORBOARD = "tensorboard"  # in the run directory: rank 0's TensorBoard event files
METRIC_COLUMNS = ["epoch", "train_loss", "train_accuracy", "val_loss", "val_accuracy", "lr", "samples_per_s", "wall_s", "probation_s"]


class Advice(Intervention):
    """The worker side of advised training (`workers.advice.WorkerAdvice`) on the loop's events. It changes
    training state only through a proposal that its probation accepted (a rejected one is rolled back exactly)."""

    name: ClassVar[str] = "advice"
    events: ClassVar[frozenset[Event]] = frozenset({Event.FIT_START, Event.BATCH, Event.BATCH_END, Event.EVAL_START, Event.EVAL_END,
                                                    Event.EPOCH_END, Event.CHECKPOINT})

    def __init__(self, advice: WorkerAdvice) -> None:
        self.advice = advice
        self._watching = contextlib.ExitStack()

    @classmethod
    def create(cls, loop: Loop) -> Advice | None:
        settings = loop.plan.advice
        if settings is None:
            return None
        return cls(WorkerAdvice.create(settings, loop.engine, rank=loop.rank, world_size=loop.world_size, model_kind=loop.model_config.kind,
                                       total_epochs=loop.train.epochs, batch_size=loop.train.batch_size, rollback_dir=loop.run_dir / ".rollback",
                                       modes=loop.modes, num_classes=len(loop.data.dataset.classes)))

    def on(self, event: Event, loop: Loop) -> list[str]:
        if event is Event.FIT_START and loop.start == "fresh":  # rewind the coordinator: an earlier attempt's rows go
            self.advice.start_fresh()
        elif event is Event.BATCH and loop.batch.phase == "epoch" and loop.batch.last:
            self._watching.enter_context(self.advice.observer.watch_grad_norms())  # the epoch's last backward pass
        elif event is Event.EVAL_START:
            self._watching.enter_context(self.advice.observer.watch_dead_units())
        elif event in (Event.BATCH_END, Event.EVAL_END):
            self._watching.close()  # collective: each rank watched the same pass
        elif event is Event.EPOCH_END:
            return self._at_epoch_end(loop)
        elif event is Event.CHECKPOINT and loop.rank == 0:
            self._save(loop.checkpoint_dir)
        return []

    def _at_epoch_end(self, loop: Loop) -> list[str]:
        """Decided at the epoch boundary, carried out before the checkpoint so it holds the outcome."""
        row = loop.row
        event = self.advice.on_epoch_end(epoch=loop.epoch, step=loop.engine.global_steps, history=loop.state.history,
                                         best_params=loop.best_params, initial_params=loop.initial_params, run_probation=functools.partial(run_probation, loop),
                                         epoch_metrics=ProbationMetrics(val_loss=row["val_loss"], val_accuracy=row["val_accuracy"],
                                                                        train_loss=row["train_loss"]))
        loop.state.probation_s += event.probation_s
        loop.account_time()  # asking and probation are part of the epoch's cost
        row["wall_s"], row["probation_s"] = loop.state.wall_s, event.probation_s
        self.advice.remember_state(epoch=loop.epoch)
        if event.decision != "apply":
            return []
        verdict = "accepted" if event.accepted else "rejected, rolled back" + ("" if event.rollback_exact is None else f" (exact: {event.rollback_exact})")
        said = f"advisor proposal {event.query_id}: {verdict}, reward {event.reward:+.4f}, probation {event.probation_s:.1f}s"
        if event.rollback_exact is False:
            loop.log(said)
            raise RuntimeError(f"rollback of proposal {event.query_id} was not exact")
        loop.state.rollbacks_verified += int(bool(event.rollback_exact))
        return [said]

    def _save(self, directory: Path) -> None:
        from safetensors.torch import save_file

        atomic_write_text(directory / ADVICE_STATE, json.dumps(self.advice.checkpoint_state()))
        tensors = self.advice.state_tensors()
        if tensors:
            save_file(tensors, str(directory / ADVICE_TENSORS))

    def restore(self, directory: Path, loop: Loop) -> None:
        from safetensors.torch import load_file

        state_file, tensor_file = directory / ADVICE_STATE, directory / ADVICE_TENSORS
        self.advice.restore(json.loads(state_file.read_text()) if state_file.is_file() else None,
                            load_file(str(tensor_file)) if tensor_file.is_file() else None)

    def series(self, epoch: int) -> dict[str, Any] | None:
        return self.advice.telemetry(epoch=epoch)

    def final_metrics(self, loop: Loop) -> dict[str, object]:
        return {"advice_incidents": self.advice.all_incidents()}


class ResearchModes(Intervention):
    """Advances the research modes' schedules at each epoch end and keeps their state in the loop state (so
    in every checkpoint). The modes' batches and penalty are part of the epoch itself (`workers.epoch`)."""

    name: ClassVar[str] = "modes"
    events: ClassVar[frozenset[Event]] = frozenset({Event.EPOCH_END})

    @classmethod
    def create(cls, loop: Loop) -> ResearchModes:
        return cls()

    def on(self, event: Event, loop: Loop) -> list[str]:
        changes: list[str] = []
        loop.modes.end_epoch(loop.epoch, val_loss=loop.row["val_loss"], log=changes.append)
        loop.state.modes = loop.modes.state()
        return changes

    def restore(self, directory: Path, loop: Loop) -> None:
        loop.modes.load_state(loop.state.modes)


class EpochTelemetry(Observer):
    """Rank 0 exports the run's series (Ray metrics, TensorBoard); every rank sends it its throughput."""

    name: ClassVar[str] = "telemetry"
    events: ClassVar[frozenset[Event]] = frozenset({Event.FIT_START, Event.EPOCH_END, Event.FIT_END})

    def __init__(self) -> None:
        self.telemetry: Telemetry | None = None

    @classmethod
    def create(cls, loop: Loop) -> EpochTelemetry:
        return cls()

    def on(self, event: Event, loop: Loop) -> None:
        if event is Event.FIT_START and loop.rank == 0:
            self.telemetry = Telemetry({"run": loop.run_dir.name}, tensorboard_dir=loop.run_dir / TENSORBOARD if loop.train.tensorboard else None,
                                       first_step=loop.state.epoch + 1 if loop.state.epoch else None)
        elif event is Event.EPOCH_END:
            worker_rates = gather_to_all(loop.epoch_result.local_samples_per_s)  # collective
            if self.telemetry is not None:
                advice = loop.components.find(Advice)
                self._emit(loop, worker_rates, advisor=advice.series(loop.epoch) if isinstance(advice, Advice) else None)
        elif event is Event.FIT_END and self.telemetry is not None:
            self.telemetry.close()

    def _emit(self, loop: Loop, worker_rates: list[float], *, advisor: dict[str, Any] | None) -> None:
        row, epoch, telemetry = loop.row, loop.epoch, self.telemetry
        telemetry.emit({name: row[name] for name in ("train_loss", "train_accuracy", "val_loss", "val_accuracy", "lr", "samples_per_s", "probation_s")}
                       | {"epoch": epoch, "epoch_s": time.perf_counter() - loop.epoch_started}, step=epoch)
        telemetry.emit_tagged("worker_samples_per_s", dict(enumerate(worker_rates)), step=epoch)
        if advisor is not None:
            telemetry.emit(advisor_series(advisor), step=epoch)
            telemetry.emit_tagged("alpha", advisor["alphas"], step=epoch)


class EpochProgress(Observer):
    """Rank 0 rewrites `metrics.csv` and prints the epoch's line."""

    name: ClassVar[str] = "progress"
    events: ClassVar[frozenset[Event]] = frozenset({Event.EPOCH_END})

    @classmethod
    def create(cls, loop: Loop) -> EpochProgress | None:
        return cls() if loop.rank == 0 else None

    def on(self, event: Event, loop: Loop) -> None:
        row = loop.row
        write_metrics_csv(loop.run_dir, loop.state.history)
        loop.log(f"epoch {loop.epoch:3d}/{loop.train.epochs}  train_loss {row['train_loss']:.4f}  val_loss {row['val_loss']:.4f}  "
                 f"val_acc {row['val_accuracy']:.4f}  lr {row['lr']:.2e}  {row['samples_per_s']:,.0f} samples/s"
                 + ("  *" if loop.state.best_epoch == loop.epoch else ""))


def write_metrics_csv(run_dir: Path, history: list[dict[str, float]]) -> None:
    import pandas as pd

    # Whole or not at all: a reader (and a full disk) never leaves a half-written file, nor a stray temporary one.
    atomic_write_text(run_dir / "metrics.csv", pd.DataFrame(history, columns=METRIC_COLUMNS).to_csv(index=False))


# The one registration list: a new component is its own file and one line here.
BUILT_IN: tuple[ComponentFactory, ...] = (
    FaultInjection.create,
    Advice.create,
    ResearchModes.create,
    EpochTelemetry.create,
    Checkpointing.create,
    EpochProgress.create,
)
