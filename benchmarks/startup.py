"""Where the driver's time goes: a run's (or a sweep trial restart's) wall time, phase by phase.

    python benchmarks/startup.py                       # a default `hybridtrain run`, then its table
    python benchmarks/startup.py --recipe smoke        # a smoke run
    python benchmarks/startup.py --py-spy              # also sample the driver and print where it waits
    python benchmarks/startup.py --analyze RUN_DIR DRIVER_LOG   # the table of a run already made
    python benchmarks/startup.py --sweep SWEEP_DIR     # each trial restart of a finished sweep

The run is the real CLI in a subprocess; every line it prints is stamped on arrival (`DRIVER_LOG`:
`<epoch seconds> <line>`). The phases come from timestamps the code and Ray already write, nothing
added to the run: the driver's own lines, the GCS log (Ray's start), the advisor replica's Serve log
(model load), the Train controller's JSON log (controller, worker group, torch process group), the
progress lines and `metrics.csv` (epochs), `summary.json` (training and checkpoint seconds). Each
phase ends where the next one's first timestamp is, so the phases add up to the driver's wall time.

A sweep trial restart (a PBT exploit or a pause) is measured from Tune's results: the first result
after a (re)start took `time_this_iter_s` from the trial function's start; minus the trial's median
epoch, that is what the restart cost.
"""

from __future__ import annotations

import argparse
import collections
import datetime
import json
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
PY_SPY = Path(sys.executable).with_name("py-spy")
OURS = re.compile(r"\((cluster|workers|serve_llm|orchestration|tune_search)/")
EPOCH_LINE = re.compile(r"\[hybridtrain\] epoch +(\d+)")


def run_cli(argv: list[str], log_path: Path, *, py_spy: Path | None = None) -> tuple[float, float]:
    """Run `python -m cluster.cli *argv` from the repository, echo and stamp every line it prints into
    `log_path`; return its (start, end) in epoch seconds. With `py_spy`, sample the driver into that file."""
    command = [sys.executable, "-u", "-m", "cluster.cli", *argv]
    if py_spy is not None:
        command = [str(PY_SPY), "record", "--idle", "--rate", "25", "--format", "raw", "--output", str(py_spy), "--", *command]
    started = time.time()
    with open(log_path, "w", encoding="utf-8") as log:
        process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1)
        for line in process.stdout:
            log.write(f"{time.time():.3f} {line}")
            sys.stdout.write(line)
        process.wait()
    return started, time.time()


def read_driver_log(path: Path) -> list[tuple[float, str]]:
    lines = []
    for raw in path.read_text(encoding="utf-8", errors="replace").splitlines():
        stamp, _, text = raw.partition(" ")
        try:
            lines.append((float(stamp), text))
        except ValueError:
            continue
    return lines


def first(lines: list[tuple[float, str]], pattern: str) -> float | None:
    return next((stamp for stamp, text in lines if re.search(pattern, text)), None)


def _log_time(text: str) -> float:
    """`2026-12-02 18:23:10,238` (local time, as Ray's text logs write it) in epoch seconds."""
    return datetime.datetime.strptime(text, "%Y-%m-%d %H:%M:%S,%f").timestamp()


def ray_events(run_dir: Path) -> dict[str, float]:
    """Epoch-second timestamps of start-up milestones in the Ray logs the run copied to RUN_DIR/logs/ray."""
    logs, events = run_dir / "logs" / "ray", {}
    gcs = logs / "gcs_server.out"
    if gcs.is_file():
        match = re.search(r"\[(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d),(\d{3})", gcs.read_text(errors="replace"))
        if match:
            events["ray_init"] = _log_time(f"{match.group(1)},{match.group(2)}")
    for replica in sorted(logs.glob("serve/replica_*AdvisorDeployment*.log")):
        for line in replica.read_text(errors="replace").splitlines():
            match = re.search(r"(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) .* -- (Started|Finished) initializing replica", line)
            if match:
                events.setdefault(f"replica_{match.group(2).lower()}", _log_time(match.group(1)))
    controller_marks = {"Requesting resources": "controller_started", "worker actors created": "worker_actors",
                        "Train context initialized": "process_group", "Train function launched": "train_launched"}
    for controller in sorted(logs.glob("train/ray-train-sys-controller-*.log")):
        for line in controller.read_text(errors="replace").splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            for mark, name in controller_marks.items():
                if mark in record.get("message", ""):
                    events.setdefault(name, record["timestamp_ns"] / 1e9)  # the first attempt's
    return events


def run_phases(run_dir: Path, lines: list[tuple[float, str]], started: float, ended: float) -> list[tuple[str, float]]:
    """The driver's wall time of one run in consecutive phases (seconds), in the order they happen."""
    import pandas as pd

    events, summary = ray_events(run_dir), json.loads((run_dir / "summary.json").read_text())
    metrics = pd.read_csv(run_dir / "metrics.csv")
    epochs = [(stamp, int(match.group(1))) for stamp, text in lines if (match := EPOCH_LINE.search(text))]
    first_epoch_s = float(metrics.wall_s.iloc[0])
    # The tail prints an epoch's line within half a second of rank 0 writing it; the first epoch began its wall_s earlier.
    first_epoch_end = epochs[0][0] if epochs else None
    marks = [
        ("Python start, imports, config, data check", started),
        ("Ray start (ray.init)", events.get("ray_init")),
        ("run directory, fingerprint, coordinator", first(lines, r"embedded local Ray|Ray cluster at")),
        ("advisor: Serve deployment and model load", first(lines, r"starting the (shared )?advisor")),
        ("Train controller start", events.get("replica_finished")),
        ("worker group: placement and worker actors", events.get("controller_started")),
        ("worker group: torch process group (gloo)", events.get("worker_actors")),
        ("worker group: callbacks, train function launch", events.get("process_group")),
        ("data, model, DeepSpeed initialise, restore", events.get("train_launched")),
        ("first epoch", first_epoch_end - first_epoch_s if first_epoch_end else None),
        ("remaining epochs", first_epoch_end),
        ("final evaluation, model, ledger, summary, logs", epochs[-1][0] if epochs else None),
    ]
    done, reported = first(lines, r"\[hybridtrain\] done:"), first(lines, r"\[hybridtrain\] report:")
    marks += [("report", done), ("shut-down (Ray, Serve, interpreter)", reported)] if reported else [("shut-down (Ray, Serve, interpreter)", done)]
    present = [(name, stamp) for name, stamp in marks if stamp is not None]
    stamps = [stamp for _, stamp in present] + [ended]
    phases = [(name, max(0.0, stamps[index + 1] - stamp)) for index, (name, stamp) in enumerate(present)]
    phases.append(("  of which checkpoints (inside the epochs)", float(summary.get("checkpoint_s", 0.0))))
    phases.append(("  of which advisor replica __init__ (model load)",
                   events["replica_finished"] - events["replica_started"] if {"replica_started", "replica_finished"} <= set(events) else 0.0))
    return phases


def table(title: str, phases: list[tuple[str, float]], total: float, training: float) -> str:
    rows = [title, f"{'phase':<52} {'seconds':>8} {'share':>6}"]
    for name, seconds in phases:
        rows.append(f"{name:<52} {seconds:8.1f} {seconds / total:6.1%}")
    rows.append(f"{'driver wall time':<52} {total:8.1f} {1:6.0%}")
    rows.append(f"{'training wall time (summary wall_s)':<52} {training:8.1f} {training / total:6.1%}   driver/training {total / training:.1f}x")
    return "\n".join(rows)


def where_it_waits(raw: Path, top: int = 12) -> str:
    """The driver's py-spy samples (all threads, idle included) by the deepest hybridtrain frame and the call below it."""
    seconds: collections.Counter[str] = collections.Counter()
    for line in raw.read_text(errors="replace").splitlines():
        stack, _, count = line.rpartition(" ")
        frames = stack.split(";")
        ours = [index for index, frame in enumerate(frames) if OURS.search(frame)]
        if ours and not any("ProgressTail._run" in frame for frame in frames):  # the tail's thread sleeps by design
            seconds[" > ".join(frames[ours[-1]:ours[-1] + 2])] += int(count) / 25
    return "\n".join(f"{value:7.1f}s  {key[:200]}" for key, value in seconds.most_common(top))


def restarts(sweep_dir: Path) -> list[dict[str, Any]]:
    """Every (re)start of every trial in a finished sweep: its first result's seconds, the trial's median
    epoch, and the difference (what the restart cost)."""
    found = []
    for result_file in sorted((sweep_dir / "ray" / "tune").glob("*/result.json")):
        results = [json.loads(line) for line in result_file.read_text().splitlines() if line.strip()]
        epochs = [result["time_this_iter_s"] for result in results if result.get("iterations_since_restore", 1) > 1]
        median_epoch = statistics.median(epochs) if epochs else 0.0
        for result in results:
            if result.get("iterations_since_restore") == 1:
                found.append({"trial": result_file.parent.name[:40], "epoch": result.get("epoch"), "first_result_s": result["time_this_iter_s"],
                              "median_epoch_s": median_epoch, "restart_s": result["time_this_iter_s"] - median_epoch})
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", help="run recipe (default: the default run)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--out", type=Path, default=None, help="where the run and its driver log go (default: a temporary directory)")
    parser.add_argument("--py-spy", action="store_true", help="sample the driver with py-spy and show where it waits")
    parser.add_argument("--analyze", nargs=2, type=Path, metavar=("RUN_DIR", "DRIVER_LOG"), help="table of a run already made")
    parser.add_argument("--sweep", type=Path, metavar="SWEEP_DIR", help="restart costs of a finished sweep")
    args = parser.parse_args()
    if args.sweep:
        found = restarts(args.sweep)
        for row in found:
            print(f"{row['trial']:<40} epoch {row['epoch']:>3}: first result {row['first_result_s']:6.1f}s, epoch {row['median_epoch_s']:5.1f}s, "
                  f"restart {row['restart_s']:6.1f}s")
        if found:
            print(f"median restart {statistics.median(row['restart_s'] for row in found):.1f}s over {len(found)} (re)starts")
        return
    if args.analyze:
        run_dir, log_path = args.analyze
        lines = read_driver_log(log_path)
        started, ended = lines[0][0], lines[-1][0]
    else:
        out = args.out or Path(tempfile.mkdtemp(prefix="hybridtrain-startup-"))
        out.mkdir(parents=True, exist_ok=True)
        run_dir, log_path = out / "run", out / "driver.log"
        argv = ["run", "--output", str(run_dir)] + (["--recipe", args.recipe] if args.recipe else [])
        argv += [item for override in args.overrides for item in ("--set", override)]
        started, ended = run_cli(argv, log_path, py_spy=out / "driver.raw" if args.py_spy else None)
        lines = read_driver_log(log_path)
    summary = json.loads((run_dir / "summary.json").read_text())
    title = f"\nwhere the driver's time goes: {summary['name']} ({summary['epochs']} epochs, advisor {summary['advisor']}) -> {run_dir}"
    print(table(title, run_phases(run_dir, lines, started, ended), ended - started, float(summary["wall_s"])))
    if not args.analyze and args.py_spy:
        print("\nwhere the driver waits (py-spy, seconds sampled):\n" + where_it_waits(out / "driver.raw"))


if __name__ == "__main__":
    main()
