"""Fault injection: kill a worker the hard way, or fill the disk, at a chosen point, to prove that nothing is lost.

Off unless the `faults` config section sets `kill_epoch`, `stop_driver_epoch` or `disk_full` (the fault tests and
`benchmarks/soak.py` do). Each fault strikes once per run directory (a marker file remembers), so the
restart or `--resume` that follows runs clean:

- `kill_epoch`: the last rank's process gets SIGKILL half-way through the epoch's training steps or
  through a proposal's probation in that epoch (`kill_in`).
- `stop_driver_epoch`: at the same kind of moment (`stop_driver_in`; a probation: the first from that
  epoch on, since when an answer is tried depends on when it came), the last rank sends the run's
  driver SIGTERM (its pid and host are in the directory's claim, `LOCK_FILE`; same host only), which must
  stop cleanly and leave the run resumable (`cluster.stopping`).
- `disk_full`: the write points listed get `OSError(ENOSPC)`, as on a disk that fills up mid-write
  (`DISK_FULL_POINTS` says who writes each). A file point gets half its bytes into the temporary file of
  its atomic write (`workers.files.set_write_fault`), so the old file must survive whole. `checkpoint`
  strikes inside the first checkpoint from epoch `disk_full_epoch` on, after DeepSpeed wrote its
  files: rank 0 first leaves a partial copy of them in the run's checkpoint storage (one file cut in
  half, no manifests), as a copy interrupted by the full disk would, and every rank then raises.
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import json
import os
import shutil
import signal
import socket
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from orchestration.settings import require
from workers.events import Event, Loop, Observer
from workers.files import LOCK_FILE, set_write_fault

KILL_PHASES = ("epoch", "probation")
KILLED_MARKER = ".chaos_killed"  # in the run directory: the kill happened (holds the killed pid)
STOPPED_MARKER = ".chaos_stopped_driver"  # in the run directory: the driver was sent SIGTERM (holds its pid)
DISK_FULL_MARKER = ".chaos_disk_full-{point}"  # in the run directory: that write point ran out of disk once
DISK_FULL_POINTS = {  # write point -> who writes it, and when
    "checkpoint": "every rank, inside the first checkpoint from epoch disk_full_epoch on",
    "metrics.csv": "rank 0, writing metrics.csv after epoch disk_full_epoch",
    "model.safetensors": "rank 0, writing the final model",
    "final_metrics.json": "rank 0, writing the final evaluation",
    "interventions.csv": "the driver, writing the ledger at the end",
    "summary.json": "the driver, writing the summary at the end",
}
WORKER_FILES = ("metrics.csv", "model.safetensors", "final_metrics.json")
DRIVER_FILES = ("interventions.csv", "summary.json")


@dataclass(frozen=True, kw_only=True, slots=True)
class FaultConfig:
    """The `faults` section. Testing only."""

    kill_epoch: int | None = None  # SIGKILL the last rank's process once, mid-way through this epoch
    kill_in: str = "epoch"  # where in kill_epoch: "epoch" (its training steps) or "probation" (a proposal's)
    stop_driver_epoch: int | None = None  # SIGTERM the driver once, mid-way through this epoch or the first probation from it on
    stop_driver_in: str = "epoch"  # where in stop_driver_epoch: "epoch" or "probation", as kill_in
    disk_full: tuple[str, ...] = ()  # write points (DISK_FULL_POINTS) that run out of disk, each once
    disk_full_epoch: int = 1  # for the epoch's points (checkpoint, metrics.csv): from this epoch on

    def __post_init__(self) -> None:
        require(self.kill_in in KILL_PHASES, "faults.kill_in", self.kill_in, f"must be one of {KILL_PHASES}")
        require(self.kill_epoch is None or self.kill_epoch >= 1, "faults.kill_epoch", self.kill_epoch, "must be unset or >= 1")
        require(self.stop_driver_in in KILL_PHASES, "faults.stop_driver_in", self.stop_driver_in, f"must be one of {KILL_PHASES}")
        require(self.stop_driver_epoch is None or self.stop_driver_epoch >= 1, "faults.stop_driver_epoch", self.stop_driver_epoch, "must be unset or >= 1")
        points = (self.disk_full,) if isinstance(self.disk_full, str) else self.disk_full
        require(isinstance(points, (list, tuple)) and all(point in DISK_FULL_POINTS for point in points), "faults.disk_full", self.disk_full,
                f"must be a list of write points from {sorted(DISK_FULL_POINTS)}")
        object.__setattr__(self, "disk_full", tuple(points))  # a YAML list, or one point
        require(isinstance(self.disk_full_epoch, int) and self.disk_full_epoch >= 1, "faults.disk_full_epoch", self.disk_full_epoch, "must be >= 1")


class FaultInjection(Observer):
    """Kills its own worker on the configured batch, or fills the disk at the configured write points. An observer:
    it changes no training state, it ends the process or fails a write."""

    name: ClassVar[str] = "faults"
    events: ClassVar[frozenset[Event]] = frozenset({Event.BATCH, Event.CHECKPOINT})

    def __init__(self, config: FaultConfig, run_dir: Path, *, kills: bool, disk_full: frozenset[str]) -> None:
        self.config, self.run_dir, self.kills, self.disk_full = config, run_dir, kills, disk_full

    @classmethod
    def create(cls, loop: Loop) -> FaultInjection | None:
        config = loop.plan.faults
        kills = (config.kill_epoch is not None or config.stop_driver_epoch is not None) and loop.rank == loop.world_size - 1
        # Armed once, at the start: every rank sees the same markers, so every rank strikes a checkpoint together.
        armed = frozenset(point for point in config.disk_full if not (loop.run_dir / DISK_FULL_MARKER.format(point=point)).exists()
                          and (point == "checkpoint" or (point in WORKER_FILES and loop.rank == 0)))
        if not kills and not armed:
            return None
        injection = cls(config, loop.run_dir, kills=kills, disk_full=armed)
        if armed - {"checkpoint"}:
            set_write_fault(lambda path: path.parent == loop.run_dir and injection.fills(path.name, epoch=loop.epoch))  # rank 0's files
        return injection

    def on(self, event: Event, loop: Loop) -> None:
        if event is Event.CHECKPOINT:
            if "checkpoint" in self.disk_full and loop.epoch >= self.config.disk_full_epoch:
                self._fill_inside_checkpoint(loop)
            return
        batch, config = loop.batch, self.config
        if not self.kills or batch.step != batch.steps // 2:
            return
        where = "mid-epoch" if batch.phase == "epoch" else "during a proposal's probation"
        if batch.phase == config.stop_driver_in and config.stop_driver_epoch is not None and batch.epoch >= config.stop_driver_epoch:
            stop_driver_once(self.run_dir, f"{where} (epoch {batch.epoch})")
        if batch.phase == config.kill_in and batch.epoch == config.kill_epoch:
            kill_once(self.run_dir, where)

    def fills(self, point: str, *, epoch: int = 0) -> bool:
        """Whether the write of `point` runs out of disk now (once: the marker is written before it strikes)."""
        if point not in self.disk_full or (point == "metrics.csv" and epoch < self.config.disk_full_epoch):
            return False
        self.disk_full -= {point}
        strike(self.run_dir, point)
        return True

    def _fill_inside_checkpoint(self, loop: Loop) -> None:
        self.disk_full -= {"checkpoint"}
        if loop.rank == 0:
            strike(self.run_dir, "checkpoint")
            partial = leave_partial_copy(Path(loop.checkpoint_dir), Path(loop.plan.checkpoint_root))
            sys.__stdout__.write(f"[hybridtrain] chaos: disk full inside the checkpoint of epoch {loop.epoch}; partial copy left at {partial}\n")
            sys.__stdout__.flush()
        raise OSError(errno.ENOSPC, f"{os.strerror(errno.ENOSPC)} (injected: faults.disk_full, inside the checkpoint of epoch {loop.epoch})",
                      str(loop.checkpoint_dir))


def strike(run_dir: Path, point: str) -> None:
    """Remember that `point` ran out of disk in this run directory (it strikes once)."""
    (run_dir / DISK_FULL_MARKER.format(point=point)).write_text(str(os.getpid()))


def leave_partial_copy(source: Path, checkpoint_root: Path) -> Path:
    """Copy `source` into a new `checkpoint_<time>` under `checkpoint_root` as a copy cut off by a full disk
    leaves it: its largest file half-written, the manifests (written last) absent. Returns the copy."""
    target = checkpoint_root / f"checkpoint_{datetime.datetime.now().strftime('%Y-%m-%d_%H-%M-%S.%f')}"
    files = sorted((path for path in source.rglob("*") if path.is_file() and not path.name.startswith("manifest-rank")),
                   key=lambda path: path.stat().st_size)
    for path in files:
        copy = target / path.relative_to(source)
        copy.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, copy)
    if files:
        cut = target / files[-1].relative_to(source)
        cut.write_bytes(cut.read_bytes()[: cut.stat().st_size // 2])
    return target


@contextlib.contextmanager
def driver_disk_full(config: FaultConfig, run_dir: Path) -> Iterator[None]:
    """While the context lasts, the driver's own write points in `config.disk_full` (the ledger, the summary)
    run out of disk, each once per run directory."""
    armed = {point for point in config.disk_full if point in DRIVER_FILES and not (run_dir / DISK_FULL_MARKER.format(point=point)).exists()}
    if not armed:
        yield
        return

    def fills(path: Path) -> bool:
        if path.parent != run_dir or path.name not in armed:
            return False
        armed.discard(path.name)
        strike(run_dir, path.name)
        return True

    previous = set_write_fault(fills)
    try:
        yield
    finally:
        set_write_fault(previous)


def stop_driver_once(run_dir: Path, where: str) -> None:
    """SIGTERM the driver that claimed `run_dir`, once per run directory; a driver on another host cannot be
    reached from here, and that is said instead."""
    marker = run_dir / STOPPED_MARKER
    if marker.exists():
        return
    try:
        stamp = json.loads((run_dir / LOCK_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):  # a sweep trial's run directory: its driver claimed the sweep's
        sys.__stdout__.write(f"[hybridtrain] chaos: cannot stop the driver {where}: {run_dir} holds no driver's claim\n")
        return
    if stamp["host"] != socket.gethostname():
        sys.__stdout__.write(f"[hybridtrain] chaos: cannot stop the driver {where}: it runs on {stamp['host']}, not here\n")
        return
    marker.write_text(str(stamp["pid"]))
    sys.__stdout__.write(f"[hybridtrain] chaos: sending the driver (pid {stamp['pid']}) SIGTERM {where}\n")
    sys.__stdout__.flush()
    os.kill(int(stamp["pid"]), signal.SIGTERM)


def kill_once(run_dir: Path, where: str) -> None:
    """SIGKILL this process, once per run directory (a marker file remembers)."""
    marker = run_dir / KILLED_MARKER
    if marker.exists():
        return
    marker.write_text(str(os.getpid()))
    sys.__stdout__.write(f"[hybridtrain] chaos: killing worker process {os.getpid()} {where}\n")
    sys.__stdout__.flush()
    os.kill(os.getpid(), signal.SIGKILL)
