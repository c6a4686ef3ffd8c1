"""A driver asked to stop (SIGTERM) stops cleanly and leaves its run resumable.

    with stop_on_sigterm():            # the `hybridtrain run` driver, for its whole life
        set_phase("training")          # between steps: raises the stop if one came, names the phase otherwise
        with stopping_training(abort): # while Ray Train runs, a stop aborts it at once
            trainer.fit()

The handler only takes note: raising from a signal handler while the main thread is inside Ray's C++
(`ray.get`) comes out as a `SystemError` and training goes on (measured). So a stop is raised as
`DriverStopped` at the driver's next step (`set_phase`, `check_stop`), and while Ray Train runs the
handler aborts it (its controller's own abort, what Train does on Ctrl-C, from a thread), so `fit`
returns at once and the driver raises the stop there. `DriverStopped` is a `BaseException`, as
`KeyboardInterrupt` is, so no `except Exception` on the way swallows it. On its way out the driver
closes the run's advice (the ledger so far, written whole), deletes the run's Serve application,
collects the logs and appends why it stopped to `RUN_DIR/stops.jsonl` (`record_stop`); `hybridtrain`
prints one line and exits 128 + the signal's number (143). Every state file is written whole, so
nothing it leaves is torn and `hybridtrain run --resume` goes on from the last checkpoint. A second
SIGTERM while stopping is ignored, with a line saying so (SIGKILL still ends it at once).

`ray.init` replaces the process's SIGTERM handler with its own (`sys.exit`): `starting_ray` puts ours
back after it, and turns a SIGTERM that lands during `ray.init` into `DriverStopped` too.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from types import FrameType

STOPS = "stops.jsonl"  # in the run directory: one line per stop of its driver (signal, phase, epochs done)


class DriverStopped(BaseException):
    """The driver got a stop signal. `done` lists the clean-up done on the way out, `message` (set by
    `record_stop`) the line `hybridtrain` prints."""

    def __init__(self, signum: int, phase: str) -> None:
        self.signum, self.phase = signum, phase
        self.done: list[str] = []
        self.message = ""
        super().__init__(f"stopped by {self.signal_name} during {phase}")

    @property
    def signal_name(self) -> str:
        return signal.Signals(self.signum).name

    @property
    def exit_code(self) -> int:
        return 128 + self.signum  # what a shell reports for a process ended by that signal

    def __str__(self) -> str:
        return self.message or self.args[0]


class _Stopper:
    active = False  # our handler is the one SIGTERM reaches
    requested: DriverStopped | None = None  # the stop that came, raised at the driver's next step
    phase = "start-up"
    abort: Callable[[], str] | None = None  # while Ray Train runs: stops it, says how it went
    aborting: threading.Thread | None = None


_stopper = _Stopper()


def _on_signal(signum: int, frame: FrameType | None) -> None:
    # os.write, not print: the main thread may be inside a print, and print is not reentrant.
    name = signal.Signals(signum).name
    if _stopper.requested is not None:
        os.write(2, f"[hybridtrain] {name} again: still stopping cleanly (SIGKILL ends it at once)\n".encode())
        return
    _stopper.requested = DriverStopped(signum, _stopper.phase)
    os.write(2, f"[hybridtrain] {name}: stopping cleanly during {_stopper.phase} ...\n".encode())
    _start_abort()


def _start_abort() -> None:
    """Abort Ray Train from a thread (a signal handler must not block in Ray), once."""
    if _stopper.abort is not None and _stopper.aborting is None and _stopper.requested is not None:
        stop, abort = _stopper.requested, _stopper.abort
        _stopper.aborting = threading.Thread(target=lambda: stop.done.append(abort()), name="hybridtrain-stop", daemon=True)
        _stopper.aborting.start()


@contextlib.contextmanager
def stop_on_sigterm() -> Iterator[None]:
    """SIGTERM stops the driver cleanly while the context lasts (nested uses are one). Off the main thread (a
    Tune trial) it does nothing: signals reach the main thread only."""
    if _stopper.active or threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _on_signal)
    _stopper.active, _stopper.requested, _stopper.phase = True, None, "start-up"
    try:
        yield
    finally:
        _stopper.active = False
        signal.signal(signal.SIGTERM, previous)


def check_stop() -> None:
    """Raise the stop that came, if one did: call it between the driver's steps."""
    if _stopper.requested is not None and _stopper.active:
        raise _stopper.requested


def stop_requested() -> DriverStopped | None:
    return _stopper.requested if _stopper.active else None


def set_phase(phase: str) -> None:
    """The driver goes on to `phase` (`start-up`, `training`, ...): a stop that came is raised now, and a
    later one names this phase."""
    check_stop()
    _stopper.phase = phase


@contextlib.contextmanager
def stopping_training(abort: Callable[[], str]) -> Iterator[None]:
    """While the context lasts, a stop calls `abort` (from a thread) at once; it returns what it did, which the
    stop's `done` lists. The context waits for it at the end."""
    _stopper.abort, _stopper.aborting = abort, None
    _start_abort()
    try:
        yield
    finally:
        _stopper.abort = None
        if _stopper.aborting is not None:
            _stopper.aborting.join(timeout=90)
            _stopper.aborting = None


def training_runs() -> bool:
    """Whether the driver is inside `stopping_training` (Ray Train's `fit` has not returned)."""
    return _stopper.abort is not None


@contextlib.contextmanager
def starting_ray() -> Iterator[None]:
    """Around `ray.init`: it installs its own SIGTERM handler (`sys.exit(15)`); ours comes back after it, and a
    SIGTERM during it is a `DriverStopped` like any other."""
    try:
        yield
    except SystemExit as error:
        if _stopper.active and error.code == signal.SIGTERM:
            _stopper.requested = _stopper.requested or DriverStopped(signal.SIGTERM, _stopper.phase)
            raise _stopper.requested from None
        raise
    finally:
        if _stopper.active and threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, _on_signal)


def record_stop(run_dir: Path, stop: DriverStopped, *, epochs: int | None = None) -> None:
    """Say where `stop` found the run in `run_dir` (its `message`), and append it to `RUN_DIR/stops.jsonl` when
    the run had started (its config.yaml is there); a run that had not started leaves nothing to resume."""
    from cluster.rundir import UnreadableFileError, append_jsonl, read_json

    started = (run_dir / "config.yaml").is_file()
    done_epochs = _epochs_done(run_dir)
    phase = f"{stop.phase} ({done_epochs} of {epochs} epochs done)" if stop.phase == "training" and epochs else stop.phase
    try:
        finished = read_json(run_dir / "summary.json") is not None
    except UnreadableFileError:
        finished = False
    if started:
        append_jsonl(run_dir / STOPS, {"signal": stop.signal_name, "phase": phase, "epochs_done": done_epochs, "done": stop.done,
                                       "finished": finished, "pid": os.getpid(), "time": time.strftime("%Y-%m-%d %H:%M:%S")})
    if finished:
        outcome = f"The run had finished (summary.json is whole): {run_dir}"
    elif started:
        outcome = f"The run directory is resumable: hybridtrain run --resume {run_dir}"
    else:
        outcome = "The run had not started (nothing to resume): run it again"
    stop.message = f"stopped by {stop.signal_name} during {phase}" + (f"; {', '.join(stop.done)}" if stop.done else "") + f". {outcome}"


def _epochs_done(run_dir: Path) -> int:
    """Rows of rank 0's metrics.csv (whole: it is written atomically), 0 before the first epoch."""
    try:
        return max(len((run_dir / "metrics.csv").read_text().splitlines()) - 1, 0)
    except OSError:
        return 0
