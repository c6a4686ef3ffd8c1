"""Rank 0's line to the run's coordinator actor: every Ray call of the advice path goes through here.

Two kinds of failure, told apart:

- the coordinator *raised* (a bug, a protocol mismatch): the call's answer is lost, the incident is
  recorded in the ledger (`report_incident`) and advice goes on;
- the coordinator *restarted* (its actor died and Ray brought it back empty): the link opens the run
  again, loads the coordinator state it last saw at an epoch end (`state`), records that in the
  ledger, and repeats the call once;
- the coordinator is *unreachable* (actor dead for good, call timed out): advice stops for the rest of this
  worker group's life and training goes on. The reason is kept in `incidents`, which the loop saves
  in every checkpoint and in the final metrics, and the driver adds to the ledger and the summary,
  so a run that lost its advisor says so.

Only rank 0 holds a link; the others get rank 0's decisions by broadcast.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from orchestration.protocol import Decision, ProbationMetrics, TrainingSnapshot, Verdict

if TYPE_CHECKING:
    from ray.exceptions import RayTaskError

logger = logging.getLogger(__name__)


@dataclass(kw_only=True)
class CoordinatorLink:
    handle: Any  # the coordinator's Ray actor handle, or None once unreachable
    run: str  # this run's key in the coordinator (one actor may coordinate a whole sweep)
    call_timeout_s: float = 60.0
    disabled_reason: str = ""
    incidents: list[dict[str, Any]] = field(default_factory=list)  # {"epoch", "problem", "recorded"}: what went wrong, oldest first
    config: Any = None  # the run's CoordinatorConfig and id, to open the run again in a restarted actor
    run_id: str = "run"
    state: dict[str, Any] | None = None  # the coordinator's state at the last epoch end (or as opened): what a restarted actor gets back
    reopened: int = 0  # times the run was opened again in a restarted actor

    @classmethod
    def connect(cls, name: str, namespace: str, *, run: str, call_timeout_s: float, config: Any = None, run_id: str = "run",
                state: dict[str, Any] | None = None) -> CoordinatorLink:
        import ray

        return cls(handle=ray.get_actor(name, namespace=namespace), run=run, call_timeout_s=call_timeout_s, config=config, run_id=run_id,
                   state=state)

    @property
    def reachable(self) -> bool:
        return self.handle is not None

    # --- the coordinator's run calls: each `(True, result)`, or `(False, None)` once the failure is
    # recorded (see the module docstring); `epoch` dates that record, it is not sent ---------------

    def on_epoch_end(self, snapshot: TrainingSnapshot, weight_drift: float, *, epoch: int) -> tuple[bool, Decision | None]:
        return self._call("on_epoch_end", lambda actor: actor.on_epoch_end.remote(self.run, snapshot, weight_drift), epoch=epoch)

    def report_probation(self, query_id: str, candidate: ProbationMetrics | None, reference: ProbationMetrics, *, epoch: int,
                         step: int = 0) -> tuple[bool, Verdict | None]:
        return self._call("report_probation", lambda actor: actor.report_probation.remote(self.run, query_id, candidate, reference, step=step),
                          epoch=epoch)

    def report_apply_failed(self, query_id: str, problem: str, *, epoch: int, step: int = 0) -> tuple[bool, None]:
        return self._call("report_apply_failed", lambda actor: actor.report_apply_failed.remote(self.run, query_id, problem, step=step),
                          epoch=epoch)

    def telemetry(self, *, epoch: int) -> tuple[bool, dict[str, Any] | None]:
        return self._call("telemetry", lambda actor: actor.telemetry.remote(self.run), epoch=epoch)

    def to_state(self, *, epoch: int) -> tuple[bool, dict[str, Any] | None]:
        return self._call("to_state", lambda actor: actor.to_state.remote(self.run), epoch=epoch)

    def load_state(self, state: dict[str, Any], *, epoch: int) -> tuple[bool, None]:
        return self._call("load_state", lambda actor: actor.load_state.remote(self.run, state), epoch=epoch)

    def _call(self, what: str, send: Callable[[Any], Any], *, epoch: int) -> tuple[bool, Any]:
        """Wait for the call `send(handle)` makes: `(True, result)`, or `(False, None)` after recording why there is
        no result (`what` names the call there). A restarted coordinator gets the run back and the call once more."""
        import ray
        from ray.exceptions import RayActorError, RayTaskError

        if self.handle is None:
            return False, None
        for attempt in (0, 1):
            try:
                return True, ray.get(send(self.handle), timeout=self.call_timeout_s)
            except RayTaskError as error:
                if attempt == 0 and _run_not_open(error) and self._reopen(f"the coordinator no longer knew this run ({what})", epoch=epoch):
                    continue
                return self._raised(what, error, epoch=epoch)
            except RayActorError as error:  # died with the call in flight; Ray restarts it (max_restarts)
                if attempt == 0 and self._reopen(f"the coordinator actor died during {what} ({type(error).__name__})", epoch=epoch):
                    continue
                return self._unreachable(what, error, epoch=epoch)
            except Exception as error:  # noqa: BLE001 - a dead or stuck coordinator must not take training down
                return self._unreachable(what, error, epoch=epoch)
        return False, None

    def _raised(self, what: str, error: Any, *, epoch: int) -> tuple[bool, Any]:
        problem = f"coordinator.{what} raised: {error.cause!r}" if getattr(error, "cause", None) else f"coordinator.{what} raised: {error}"
        logger.warning("%s", problem)
        self._note(epoch, problem, recorded=self.report(problem, epoch=epoch))
        return False, None

    def _unreachable(self, what: str, error: BaseException, *, epoch: int) -> tuple[bool, Any]:
        self.disabled_reason = f"coordinator unreachable in {what}: {type(error).__name__}: {error}"
        logger.warning("%s; training goes on without advice", self.disabled_reason)
        self._note(epoch, self.disabled_reason + "; advice off for the rest of this attempt")
        self.handle = None
        return False, None

    def _reopen(self, why: str, *, epoch: int, wait_s: float = 60.0) -> bool:
        """Open this run again in a restarted coordinator and give it back `state`; True if that worked.
        A restarting actor queues calls until it is up; one that stays dead raises, and advice stops."""
        import ray

        if self.config is None:
            return False
        from ray.exceptions import RayActorError

        deadline = time.monotonic() + wait_s
        while True:
            try:
                ray.get(self.handle.open_run.remote(self.run, self.config, self.run_id), timeout=wait_s)
                if self.state is not None:
                    ray.get(self.handle.load_state.remote(self.run, self.state), timeout=wait_s)
                break
            except RayActorError as error:  # still restarting
                if time.monotonic() > deadline:
                    logger.warning("the coordinator did not come back within %.0f s: %s", wait_s, error)
                    return False
                time.sleep(1.0)
            except Exception as error:  # noqa: BLE001
                logger.warning("could not reopen the run in the coordinator: %s: %s", type(error).__name__, error)
                return False
        self.reopened += 1
        rows = (self.state or {}).get("ledger") or []
        problem = (f"{why}; the run was opened again in the restarted coordinator with its state at the last epoch end "
                   f"({len(rows)} ledger rows); a query in flight then is lost")
        logger.warning("%s", problem)
        self._note(epoch, problem, recorded=self.report(problem, epoch=epoch))
        return True

    def report(self, problem: str, *, epoch: int, step: int = 0, query_id: str = "") -> bool:
        """Record a worker-side problem in the coordinator's ledger; True if it was recorded (best effort: a
        failure to do so is itself kept in `incidents`, for the driver to add to the ledger)."""
        import ray

        if self.handle is None:
            return False
        try:
            ray.get(self.handle.report_incident.remote(self.run, problem, epoch=epoch, step=step, query_id=query_id), timeout=self.call_timeout_s)
            return True
        except Exception as error:  # noqa: BLE001
            self._note(epoch, f"could not record an incident in the ledger ({type(error).__name__}): {problem}")
            return False

    def _note(self, epoch: int, problem: str, *, recorded: bool = False) -> None:
        """Keep `problem` for the summary; `recorded` says the ledger already holds it (the driver adds the rest)."""
        self.incidents.append({"epoch": epoch, "problem": problem, "recorded": recorded})


def _run_not_open(error: RayTaskError) -> bool:
    """The coordinator raised because it does not know the run: a restarted actor starts empty."""
    from orchestration.population import RunNotOpen  # here, not at the top: the worker loop does not load the coordinator

    return isinstance(error.cause, RunNotOpen)
