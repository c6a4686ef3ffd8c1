"""cluster.stopping: SIGTERM is noted by the handler and raised at the driver's next step, aborts Ray Train while it
runs, and leaves a record and one line. Real signals to this process; no Ray."""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
import time
from pathlib import Path

import pytest

from cluster.stopping import (STOPS, DriverStopped, check_stop, record_stop, set_phase, starting_ray, stop_on_sigterm, stop_requested,
                              stopping_training, training_runs)


def _sigterm_self() -> None:
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(0.05)  # the handler runs in the main thread at its next bytecode


def test_sigterm_is_raised_at_the_next_step_naming_the_phase_and_a_second_one_is_ignored(capfd) -> None:
    before = signal.getsignal(signal.SIGTERM)
    with stop_on_sigterm():
        set_phase("start-up (the advisor)")
        _sigterm_self()
        _sigterm_self()  # while stopping: ignored, said
        with pytest.raises(DriverStopped) as stopped:
            set_phase("training")
    assert signal.getsignal(signal.SIGTERM) is before  # the previous handler is back
    assert stopped.value.phase == "start-up (the advisor)" and stopped.value.exit_code == 143
    assert str(stopped.value) == "stopped by SIGTERM during start-up (the advisor)"
    err = capfd.readouterr().err
    assert "SIGTERM: stopping cleanly during start-up (the advisor)" in err and "SIGTERM again: still stopping cleanly" in err
    with stop_on_sigterm():  # a new context starts clean
        check_stop()
        assert stop_requested() is None


def test_a_stop_while_training_runs_aborts_it_from_a_thread_at_once() -> None:
    aborted: list[str] = []

    def abort() -> str:
        aborted.append(threading.current_thread().name)
        return "Ray Train stopped"

    with stop_on_sigterm():
        set_phase("training")
        with pytest.raises(DriverStopped) as stopped:
            with stopping_training(abort):
                assert training_runs()
                _sigterm_self()
                deadline = time.monotonic() + 10
                while not aborted and time.monotonic() < deadline:  # fit would return now: its controller is gone
                    time.sleep(0.01)
            assert not training_runs()
            check_stop()
    assert aborted == ["hybridtrain-stop"] and stopped.value.done == ["Ray Train stopped"]


def test_a_sigterm_during_ray_init_is_a_stop_and_our_handler_comes_back() -> None:
    with stop_on_sigterm():
        ours = signal.getsignal(signal.SIGTERM)
        with pytest.raises(DriverStopped, match="during start-up"):
            with starting_ray():
                signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(signum))  # what ray.init installs
                _sigterm_self()
        assert signal.getsignal(signal.SIGTERM) is ours


def test_the_record_says_where_it_stopped_and_whether_there_is_anything_to_resume(tmp_path: Path) -> None:
    stop = DriverStopped(signal.SIGTERM, "start-up (connecting to Ray)")
    record_stop(tmp_path, stop)
    assert stop.message.endswith("The run had not started (nothing to resume): run it again") and not (tmp_path / STOPS).exists()

    (tmp_path / "config.yaml").write_text("name: smoke\n")
    (tmp_path / "metrics.csv").write_text("epoch\n1\n2\n3\n")
    stop = DriverStopped(signal.SIGTERM, "training")
    stop.done += ["Ray Train stopped", "the advisor's Serve application 'a' deleted"]
    record_stop(tmp_path, stop, epochs=10)
    assert stop.message == (f"stopped by SIGTERM during training (3 of 10 epochs done); Ray Train stopped, the advisor's Serve application 'a' "
                            f"deleted. The run directory is resumable: hybridtrain run --resume {tmp_path}")
    (tmp_path / "summary.json").write_text('{"epochs": 10}')
    record_stop(tmp_path, finished := DriverStopped(signal.SIGTERM, "the report"))
    assert "The run had finished (summary.json is whole)" in str(finished)
    rows = [json.loads(line) for line in (tmp_path / STOPS).read_text().splitlines()]
    assert [(row["phase"], row["epochs_done"], row["finished"]) for row in rows] == [("training (3 of 10 epochs done)", 3, False), ("the report", 3, True)]


def test_hybridtrain_run_prints_the_stop_and_exits_128_plus_the_signal(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    import cluster.launch
    from cluster.cli import main

    def stopped(*args, **kwargs):
        stop = DriverStopped(signal.SIGTERM, "training")
        stop.message = "stopped by SIGTERM during training; The run directory is resumable"
        raise stop

    monkeypatch.setattr(cluster.launch, "run_experiment", stopped)
    assert main(["run", "--recipe", "smoke", "--output", str(tmp_path / "run"), "--no-report"]) == 143
    assert capsys.readouterr().err == "hybridtrain: stopped by SIGTERM during training; The run directory is resumable\n"
