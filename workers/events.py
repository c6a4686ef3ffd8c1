"""Named events of the per-worker loop and the components fired on them (composer's Events and Algorithms).

The loop (`workers.train_loop`) trains and evaluates; everything else is a component listening to the
events it names, in registration order (`workers.components.BUILT_IN`):

    fit_start                       after the start or restore, before the first epoch
    epoch_start                     before the epoch's batches are drawn
    batch / batch_end               around each micro-step (`loop.batch` says which; also in a probation)
    eval_start / eval_end           around the epoch's validation pass (not a probation's)
    epoch_end                       the epoch's row is in `loop.row`; interventions happen here
    checkpoint                      a checkpoint is being written to `loop.checkpoint_dir`: add your files
    fit_end                         before the test split is evaluated

Two kinds of component. An `Observer` never changes training state: it watches, records and exports,
and returns nothing. An `Intervention` may change it (weights, hyperparameters, schedules, batches) and
returns, for every firing, what it changed as sentences; the loop logs them, so a run's log says every
change anything but backprop made. Each component owns its checkpointed state (`restore`, and files
written on `checkpoint`).

A component's `create(loop)` returns the component or None when the run does not need it (advice off,
no fault configured). Adding one is a new file and one line in `workers.components.BUILT_IN`; a
user adds theirs with `WorkerPlan.extra_components` (picklable factories).
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, ClassVar

# A component sees the rank's `workers.loop.Loop` (it sits above this module, so it is not imported here).
Loop = Any


class Event(str, enum.Enum):
    FIT_START = "fit_start"
    EPOCH_START = "epoch_start"
    BATCH = "batch"
    BATCH_END = "batch_end"
    EVAL_START = "eval_start"
    EVAL_END = "eval_end"
    EPOCH_END = "epoch_end"
    CHECKPOINT = "checkpoint"
    FIT_END = "fit_end"


class Component:
    """Base of every loop component; subclass `Observer` or `Intervention`, not this."""

    name: ClassVar[str] = "component"
    events: ClassVar[frozenset[Event]] = frozenset()

    def on(self, event: Event, loop: Loop) -> list[str] | None:
        """Called for each event in `events`."""
        raise NotImplementedError

    def restore(self, directory: Path, loop: Loop) -> None:
        """Take back this component's state from a checkpoint directory (what it wrote on `checkpoint`)."""

    def final_metrics(self, loop: Loop) -> dict[str, object]:
        """What this component adds to the run's final metrics (`final_metrics.json`, and so `summary.json`)."""
        return {}


class Observer(Component):
    """Watches the loop; never changes training state, so `on` returns None."""


class Intervention(Component):
    """Changes training state; `on` returns what it changed (empty when nothing)."""


ComponentFactory = Callable[[Loop], "Component | None"]


class Components:
    """The run's components in firing order."""

    def __init__(self, components: Iterable[Component]) -> None:
        self.items = list(components)

    def fire(self, event: Event, loop: Loop) -> list[str]:
        """Run every component listening to `event`, in order; returns the interventions' changes (also logged)."""
        changes: list[str] = []
        for component in self.items:
            if event not in component.events:
                continue
            said = component.on(event, loop)
            if isinstance(component, Observer):
                assert not said, f"observer {component.name} reported changes on {event.value}: {said}"
                continue
            for change in said or ():
                loop.log(change)
                changes.append(change)
        return changes

    def restore(self, directory: Path, loop: Loop) -> None:
        for component in self.items:
            component.restore(directory, loop)

    def final_metrics(self, loop: Loop) -> dict[str, object]:
        merged: dict[str, object] = {}
        for component in self.items:
            merged |= component.final_metrics(loop)
        return merged

    def find(self, kind: type[Component]) -> Component | None:
        return next((component for component in self.items if isinstance(component, kind)), None)

    @classmethod
    def build(cls, factories: Iterable[ComponentFactory], loop: Loop) -> Components:
        return cls(component for component in (factory(loop) for factory in factories) if component is not None)
