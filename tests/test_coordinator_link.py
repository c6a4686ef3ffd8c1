"""Rank 0's link to the coordinator actor, on a scripted handle: a restarted actor is told by `RunNotOpen`."""

from __future__ import annotations

import pytest

from orchestration.config import CoordinatorConfig
from orchestration.population import RunNotOpen
from orchestration.protocol import Continue


class _Remote:
    """One actor method: `.remote(...)` records the call and returns what `answer(...)` gives (a fake object ref)."""

    def __init__(self, calls: list, name: str, answer) -> None:
        self.calls, self.name, self.answer = calls, name, answer

    def remote(self, *args, **kwargs):
        self.calls.append((self.name, args, kwargs))
        return self.answer(*args, **kwargs)


class _ForgetfulCoordinator:
    """An actor that restarted empty: it raises `error` for the first `on_epoch_end`, then answers."""

    def __init__(self, error: Exception) -> None:
        self.calls: list = []
        self.error = error
        self.forgotten = True

        def on_epoch_end(run, snapshot, weight_drift):
            if self.forgotten:
                return ("raise", self.error)
            return ("value", Continue("no query trigger"))

        def open_run(run, config, run_id):
            self.forgotten = False
            return ("value", True)

        self.on_epoch_end = _Remote(self.calls, "on_epoch_end", on_epoch_end)
        self.open_run = _Remote(self.calls, "open_run", open_run)
        self.load_state = _Remote(self.calls, "load_state", lambda run, state: ("value", None))
        self.report_incident = _Remote(self.calls, "report_incident", lambda run, problem, **kwargs: ("value", None))


@pytest.fixture
def scripted_ray_get(monkeypatch):
    """`ray.get` on the fake refs: raises a `RayTaskError` around the scripted cause, or returns the value."""
    import ray
    from ray.exceptions import RayTaskError

    def get(ref, timeout=None):
        kind, value = ref
        if kind == "raise":
            raise RayTaskError("on_epoch_end", "Traceback ...", value)
        return value

    monkeypatch.setattr(ray, "get", get)


def _link(handle):
    from workers.coordinator_link import CoordinatorLink

    return CoordinatorLink(handle=handle, run="r", call_timeout_s=1.0, config=CoordinatorConfig(), run_id="run-r",
                           state={"ledger": [{"kind": "query"}]})


def test_a_run_not_open_reopens_the_run_with_its_state_and_repeats_the_call(scripted_ray_get) -> None:
    handle = _ForgetfulCoordinator(RunNotOpen("r", []))
    link = _link(handle)
    assert link.on_epoch_end(object(), 0.25, epoch=5) == (True, Continue("no query trigger"))
    assert [name for name, _, _ in handle.calls] == ["on_epoch_end", "open_run", "load_state", "report_incident", "on_epoch_end"]
    assert handle.calls[2][1] == ("r", {"ledger": [{"kind": "query"}]}) and handle.calls[-1][1][1:] == (handle.calls[0][1][1], 0.25)
    assert link.reopened == 1 and link.reachable
    assert "no longer knew this run (on_epoch_end)" in link.incidents[0]["problem"] and link.incidents[0]["recorded"]


def test_a_key_error_that_only_reads_like_one_is_a_raise_not_a_restart(scripted_ray_get) -> None:
    """The link tells a restart by the exception's class, not its text."""
    handle = _ForgetfulCoordinator(KeyError("run 'r' is not open in this coordinator (open: [])"))
    link = _link(handle)
    assert link.on_epoch_end(object(), 0.0, epoch=5) == (False, None)
    assert "open_run" not in [name for name, _, _ in handle.calls] and link.reopened == 0
    assert link.reachable and link.incidents[0]["problem"].startswith("coordinator.on_epoch_end raised: KeyError")
