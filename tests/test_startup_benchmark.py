"""benchmarks/startup.py reads a run's phases from the timestamps the run and Ray leave behind: checked on a
run directory written by hand (no Ray), so the table's arithmetic is known to be right."""

from __future__ import annotations

import datetime
import importlib.util
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("startup_benchmark", ROOT / "benchmarks" / "startup.py")
startup = importlib.util.module_from_spec(spec)
spec.loader.exec_module(startup)

T0 = datetime.datetime(2026, 12, 2, 18, 0, 0).timestamp()


def _stamp(seconds: float) -> str:
    return datetime.datetime.fromtimestamp(T0 + seconds).strftime("%Y-%m-%d %H:%M:%S,%f")[:-3]


def fake_run(run_dir: Path) -> list[tuple[float, str]]:
    logs = run_dir / "logs" / "ray"
    (logs / "serve").mkdir(parents=True)
    (logs / "train").mkdir()
    (logs / "gcs_server.out").write_text(f"[{_stamp(10)} I 1 1] (gcs_server) starting\n")
    (logs / "serve" / "replica_app_AdvisorDeployment_x.log").write_text(
        f"INFO {_stamp(22)} app -- Started initializing replica.\nINFO {_stamp(50)} app -- Finished initializing replica.\n")
    marks = {"Requesting resources: x": 55, "2 worker actors created in 5s": 60, "Train context initialized on workers in 3s": 63,
             "Train function launched on workers in 1s": 64}
    (logs / "train" / "ray-train-sys-controller-1.log").write_text(
        "".join(json.dumps({"message": message, "timestamp_ns": int((T0 + at) * 1e9)}) + "\n" for message, at in marks.items()))
    (run_dir / "summary.json").write_text(json.dumps({"name": "smoke", "epochs": 2, "advisor": "smollm2", "wall_s": 4.0, "checkpoint_s": 0.5}))
    (run_dir / "metrics.csv").write_text("epoch,wall_s\n1,2.0\n2,4.0\n")
    return [(T0 + at, text) for at, text in [(20, "[hybridtrain] embedded local Ray: 2 CPUs"), (21, "[hybridtrain] starting the advisor (smollm2)"),
                                              (72, "[hybridtrain] epoch   1/2  train_loss 1.0"), (74, "[hybridtrain] epoch   2/2  train_loss 0.5"),
                                              (80, "[hybridtrain] done: test_accuracy 0.9")]]


def test_the_phases_follow_each_other_and_add_up_to_the_driver_wall_time(tmp_path) -> None:
    lines = fake_run(tmp_path)
    phases = dict(startup.run_phases(tmp_path, lines, T0, T0 + 85))
    assert phases["Python start, imports, config, data check"] == 10
    assert phases["Ray start (ray.init)"] == 10
    assert abs(phases["advisor: Serve deployment and model load"] - 29) < 1e-3  # from the driver's line to the replica's end
    assert abs(phases["  of which advisor replica __init__ (model load)"] - 28) < 1e-3
    assert abs(phases["data, model, DeepSpeed initialise, restore"] - 6) < 1e-3  # launched at 64, epoch 1 (2 s) ended at 72
    assert phases["first epoch"] == 2 and phases["remaining epochs"] == 2
    assert phases["shut-down (Ray, Serve, interpreter)"] == 5
    consecutive = sum(seconds for name, seconds in phases.items() if not name.startswith("  of which"))
    assert abs(consecutive - 85) < 1e-3


def test_a_restart_costs_its_first_result_less_an_epoch(tmp_path) -> None:
    trial = tmp_path / "ray" / "tune" / "trial_0"
    trial.mkdir(parents=True)
    results = [{"epoch": 1, "iterations_since_restore": 1, "time_this_iter_s": 30.0}, {"epoch": 2, "iterations_since_restore": 2, "time_this_iter_s": 2.0},
               {"epoch": 3, "iterations_since_restore": 1, "time_this_iter_s": 14.0}, {"epoch": 4, "iterations_since_restore": 2, "time_this_iter_s": 2.0}]
    (trial / "result.json").write_text("".join(json.dumps(result) + "\n" for result in results))
    assert [row["restart_s"] for row in startup.restarts(tmp_path)] == [28.0, 12.0]
