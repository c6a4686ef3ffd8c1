"""The loop's events and components: firing order, observers that must not change anything, and a component
registered from outside the project that a real run fires (without editing the loop)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import ClassVar

import pytest

from workers.events import Component, Components, Event, Intervention, Observer


class _Log:
    def __init__(self) -> None:
        self.lines: list[str] = []

    def log(self, message: str) -> None:
        self.lines.append(message)


class Recorder(Observer):
    name: ClassVar[str] = "recorder"
    events: ClassVar[frozenset[Event]] = frozenset({Event.EPOCH_END, Event.FIT_END})

    def __init__(self, seen: list[str]) -> None:
        self.seen = seen

    def on(self, event: Event, loop) -> None:
        self.seen.append(f"recorder:{event.value}")


class Halver(Intervention):
    name: ClassVar[str] = "halver"
    events: ClassVar[frozenset[Event]] = frozenset({Event.EPOCH_END})

    def __init__(self, seen: list[str]) -> None:
        self.seen = seen

    def on(self, event: Event, loop) -> list[str]:
        self.seen.append(f"halver:{event.value}")
        return ["halved the learning rate"]


class Chatty(Observer):
    name: ClassVar[str] = "chatty"
    events: ClassVar[frozenset[Event]] = frozenset({Event.EPOCH_END})

    def on(self, event: Event, loop):
        return ["changed something"]


def test_components_fire_in_registration_order_on_their_events_only() -> None:
    seen: list[str] = []
    loop = _Log()
    components = Components([Halver(seen), Recorder(seen)])
    assert components.fire(Event.EPOCH_END, loop) == ["halved the learning rate"]
    components.fire(Event.FIT_END, loop)
    components.fire(Event.BATCH, loop)
    assert seen == ["halver:epoch_end", "recorder:epoch_end", "recorder:fit_end"]
    assert loop.lines == ["halved the learning rate"]  # what an intervention changed is logged


def test_an_observer_that_reports_a_change_is_a_bug() -> None:
    with pytest.raises(AssertionError, match="observer chatty reported changes"):
        Components([Chatty()]).fire(Event.EPOCH_END, _Log())


def test_build_skips_components_a_run_does_not_need_and_find_returns_by_kind() -> None:
    seen: list[str] = []
    components = Components.build([lambda loop: None, lambda loop: Recorder(seen)], loop=_Log())
    assert [component.name for component in components.items] == ["recorder"]
    assert isinstance(components.find(Recorder), Recorder) and components.find(Halver) is None


def test_every_built_in_component_says_which_kind_it_is() -> None:
    from workers import components

    for factory in components.BUILT_IN:
        kind = factory.__self__
        assert issubclass(kind, (Observer, Intervention)) and kind.events, kind
        assert not (issubclass(kind, Observer) and issubclass(kind, Intervention))
    assert Component not in (factory.__self__ for factory in components.BUILT_IN)


class EpochCounter(Observer):
    """A trivial component defined here, outside the project: counts the epochs it sees on rank 0 and writes
    the sequence of events it heard to the run directory at the end."""

    name: ClassVar[str] = "epoch_counter"
    events: ClassVar[frozenset[Event]] = frozenset({Event.FIT_START, Event.EPOCH_START, Event.EPOCH_END, Event.CHECKPOINT, Event.FIT_END})

    def __init__(self) -> None:
        self.heard: list[str] = []
        self.epochs = 0

    @classmethod
    def create(cls, loop) -> EpochCounter | None:
        return cls() if loop.rank == 0 else None

    def on(self, event: Event, loop) -> None:
        self.heard.append(event.value)
        self.epochs += event is Event.EPOCH_END
        if event is Event.FIT_END:
            (loop.run_dir / "epochs_counted.json").write_text(json.dumps({"epochs": self.epochs, "heard": self.heard}))

    def final_metrics(self, loop) -> dict[str, object]:
        return {"epochs_counted": self.epochs}


@pytest.mark.e2e
def test_a_component_registered_from_outside_the_loop_is_fired_by_a_real_run(ray_local, tmp_path: Path) -> None:
    import sys

    from ray import cloudpickle

    from cluster.experiment import build_config
    from cluster.launch import execute_run, plan_run

    # This test file is not importable on Ray's workers (a Ray started by another module has another sys.path):
    # ship the component by value, as a user defining one in a notebook or script would.
    cloudpickle.register_pickle_by_value(sys.modules[__name__])
    config = build_config(recipe="smoke", overrides=["train.epochs=3", "train.checkpoint_every=2", "advisor.backend=none"])
    summary = execute_run(plan_run(config, tmp_path / "run"), components=(EpochCounter.create,))
    counted = json.loads((tmp_path / "run" / "epochs_counted.json").read_text())
    assert counted["epochs"] == summary["epochs"] == 3
    heard = counted["heard"]
    assert heard[0] == "fit_start" and heard[-1] == "fit_end"
    assert heard[1:-1] == ["epoch_start", "epoch_end", "epoch_start", "checkpoint", "epoch_end", "epoch_start", "checkpoint", "epoch_end"]
    final = json.loads((tmp_path / "run" / "final_metrics.json").read_text())
    assert final["epochs_counted"] == 3
