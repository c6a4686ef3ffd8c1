"""A sweep's terminal is as clean as a run's: `ray_output_to` sends what Ray and Tune print to the sweep's log
and leaves the terminal to hybridtrain. Tested without Ray: the same channels Ray and Tune use (print to
standard output, a warning, a logger's stream handler set up before the sweep, a message printed to
`sys.stdout` as it is at arrival) and hybridtrain's own table."""

from __future__ import annotations

import io
import logging
import sys
import warnings

from ray import cloudpickle

from cluster.sweep_callbacks import progress_table, ray_output_to


def test_ray_and_tune_output_goes_to_the_log_and_ours_to_the_terminal(tmp_path, monkeypatch) -> None:
    terminal = io.StringIO()
    monkeypatch.setattr(sys, "stdout", terminal)
    monkeypatch.setattr(sys, "stderr", terminal)
    ray_logger = logging.getLogger("test_sweep_output.ray")  # as Ray's: a stream handler holding the terminal's stream
    handler = logging.StreamHandler(sys.stderr)
    ray_logger.addHandler(handler)
    log_path = tmp_path / "logs" / "tune.log"
    try:
        with ray_output_to(log_path) as shown:
            print("+------ Configuration for experiment tune ------+")  # Tune's box at verbose=0
            warnings.warn("reuse_actors is set", UserWarning)
            ray_logger.warning("The `on_trial_result` operation took 20.000 s")
            print("(raylet) WARNING: 8 PYTHON worker processes have been started", file=sys.stderr)
            print("[hybridtrain] trial   status", file=shown)
        assert handler.stream is terminal  # put back
    finally:
        ray_logger.removeHandler(handler)
    log = log_path.read_text()
    for line in ("Configuration for experiment", "reuse_actors is set", "took 20.000 s", "worker processes have been started"):
        assert line in log and line not in terminal.getvalue()
    assert terminal.getvalue() == "[hybridtrain] trial   status\n"


def test_the_progress_table_prints_on_the_terminal_and_pickles(tmp_path, monkeypatch) -> None:
    class Trial:
        trial_id, status = "t0", "RUNNING"

        def __str__(self) -> str:
            return "trial_t0"

    shown = io.StringIO()
    monkeypatch.setattr(sys, "stdout", shown)
    table = progress_table("val_accuracy")
    with ray_output_to(tmp_path / "tune.log"):
        cloudpickle.dumps(table)  # Tune (cloud)pickles its callbacks with the experiment: no stream may be in them
        table.on_trial_result(1, [Trial()], Trial(), {"epoch": 2, "val_accuracy": 0.9, "lr": 1e-3})
    assert "trial_t0" in shown.getvalue() and "0.9000" in shown.getvalue()
    assert "trial_t0" not in (tmp_path / "tune.log").read_text()
