"""Rank 0's line to the run's coordinator actor: every Ray call of the advice path goes through here.

Two kinds of failure, told apart:

- the coordinator *raised* (a bug, a protocol mismatch): the call's answer is lost, the incident is
  recorded in the ledger (`report_incident`) and advice goes on;
- the coordinator is *unreachable* (actor dead, call timed out): advice stops for the rest of this
  worker group's life and training goes on. The reason is kept in `incidents`, which the loop saves
  in every checkpoint and in the final metrics, and the driver adds to the ledger and the summary,
  so a run that lost its advisor says so.

Only rank 0 holds a link; the others get rank 0's decisions by broadcast.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

logger = logging.getLogger(__name__)


@dataclass(kw_only=True)
class CoordinatorLink:
    handle: Any  # the coordinator's Ray actor handle, or None once unreachable
    run: str  # this run's key in the coordinator (one actor may coordinate a whole sweep)
    call_timeout_s: float = 60.0
    disabled_reason: str = ""
    incidents: list[dict[str, Any]] = field(default_factory=list)  # {"epoch", "problem", "recorded"}: what went wrong, oldest first

    @classmethod
    def connect(cls, name: str, namespace: str, *, run: str, call_timeout_s: float) -> CoordinatorLink:
        import ray

        return cls(handle=ray.get_actor(name, namespace=namespace), run=run, call_timeout_s=call_timeout_s)

    @property
    def reachable(self) -> bool:
        return self.handle is not None

    def call(self, method: str, *args: Any, epoch: int, **kwargs: Any) -> tuple[bool, Any]:
        """`(True, result)` of `coordinator.<method>(*args, **kwargs)`, or `(False, None)` after
        recording why there is no result (see the module docstring)."""
        import ray
        from ray.exceptions import RayTaskError

        if self.handle is None:
            return False, None
        try:
            return True, ray.get(self.handle.call.remote(self.run, method, *args, **kwargs), timeout=self.call_timeout_s)
        except RayTaskError as error:
            problem = f"coordinator.{method} raised: {error.cause!r}" if getattr(error, "cause", None) else f"coordinator.{method} raised: {error}"
            logger.warning("%s", problem)
            self._note(epoch, problem, recorded=self.report(problem, epoch=epoch))
            return False, None
        except Exception as error:  # noqa: BLE001 - a dead or stuck coordinator must not take training down
            self.disabled_reason = f"coordinator unreachable in {method}: {type(error).__name__}: {error}"
            logger.warning("%s; training goes on without advice", self.disabled_reason)
            self._note(epoch, self.disabled_reason + "; advice off for the rest of this attempt")
            self.handle = None
            return False, None

    def report(self, problem: str, *, epoch: int, step: int = 0, query_id: str = "") -> bool:
        """Record a worker-side problem in the coordinator's ledger; True if it was recorded (best effort: a
        failure to do so is itself kept in `incidents`, for the driver to add to the ledger)."""
        import ray

        if self.handle is None:
            return False
        try:
            ray.get(self.handle.call.remote(self.run, "report_incident", problem, epoch=epoch, step=step, query_id=query_id),
                    timeout=self.call_timeout_s)
            return True
        except Exception as error:  # noqa: BLE001
            self._note(epoch, f"could not record an incident in the ledger ({type(error).__name__}): {problem}")
            return False

    def _note(self, epoch: int, problem: str, *, recorded: bool = False) -> None:
        """Keep `problem` for the summary; `recorded` says the ledger already holds it (the driver adds the rest)."""
        self.incidents.append({"epoch": epoch, "problem": problem, "recorded": recorded})
