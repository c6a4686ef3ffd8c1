"""Fault injection: kill a worker the hard way at a chosen point, to prove that nothing is lost.

Off unless the `faults` config section sets `kill_epoch` (the fault tests and `benchmarks/soak.py` do).
The last rank's process gets SIGKILL once per run directory (a marker file remembers), half-way
through the epoch's training steps or through a proposal's probation in that epoch.
"""

from __future__ import annotations

import os
import signal
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from orchestration.settings import require
from workers.events import Event, Loop, Observer

KILL_PHASES = ("epoch", "probation")
KILLED_MARKER = ".chaos_killed"  # in the run directory: the kill happened (holds the killed pid)


@dataclass(frozen=True, kw_only=True, slots=True)
class FaultConfig:
    """The `faults` section. Testing only."""

    kill_epoch: int | None = None  # SIGKILL the last rank's process once, mid-way through this epoch
    kill_in: str = "epoch"  # where in kill_epoch: "epoch" (its training steps) or "probation" (a proposal's)

    def __post_init__(self) -> None:
        require(self.kill_in in KILL_PHASES, "faults.kill_in", self.kill_in, f"must be one of {KILL_PHASES}")
        require(self.kill_epoch is None or self.kill_epoch >= 1, "faults.kill_epoch", self.kill_epoch, "must be unset or >= 1")


class FaultInjection(Observer):
    """Kills its own worker on the configured batch. An observer: it changes no training state, it ends the process."""

    name: ClassVar[str] = "faults"
    events: ClassVar[frozenset[Event]] = frozenset({Event.BATCH})

    def __init__(self, config: FaultConfig, run_dir: Path) -> None:
        self.config, self.run_dir = config, run_dir

    @classmethod
    def create(cls, loop: Loop) -> FaultInjection | None:
        config = loop.plan.faults
        if config.kill_epoch is None or loop.rank != loop.world_size - 1:
            return None
        return cls(config, loop.run_dir)

    def on(self, event: Event, loop: Loop) -> None:
        batch = loop.batch
        if batch.phase == self.config.kill_in and batch.epoch == self.config.kill_epoch and batch.step == batch.steps // 2:
            kill_once(self.run_dir, "mid-epoch" if batch.phase == "epoch" else "during a proposal's probation")


def kill_once(run_dir: Path, where: str) -> None:
    """SIGKILL this process, once per run directory (a marker file remembers)."""
    marker = run_dir / KILLED_MARKER
    if marker.exists():
        return
    marker.write_text(str(os.getpid()))
    sys.__stdout__.write(f"[hybridtrain] chaos: killing worker process {os.getpid()} {where}\n")
    sys.__stdout__.flush()
    os.kill(os.getpid(), signal.SIGKILL)
