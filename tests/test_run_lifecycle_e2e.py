"""A run's life outside one Python process: a killed driver resumes with its ledger, and a seeded run
repeats itself exactly in a fresh process. Each test drives the real `hybridtrain` command (embedded
Ray, 2 DeepSpeed workers, the coordinator actor, a scripted advisor) in subprocesses."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

pytestmark = pytest.mark.e2e
ROOT = Path(__file__).resolve().parents[1]
# Ask every epoch; each answer goes on probation, so the probation seed and the coordinator's state matter.
ADVISED = ["coordinator.ask_when_healthy=true", "train.num_workers=2", "train.early_stopping_patience=0", "coordinator.query_interval=1", "coordinator.burn_in_epochs=1",
           "coordinator.probation_steps=3", "coordinator.cache_enabled=false", "advisor.backend=scripted", "cluster.num_cpus=4",
           "cluster.dashboard=false", "train.checkpoint_every=1"]
PROPOSALS = [{"hyperparameters": {"lr_scale": 0.8}, "weights": [{"op": "shrink", "group": "classifier.4.weight", "amount": 0.05}],
              "reason": "a gentle step"},
             {"weights": [{"op": "noise", "group": "features.0.weight", "amount": 0.3}], "reason": "shake the first layer"}]


def _hybridtrain(*args: str, **popen) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("RAY_ADDRESS", None)
    return subprocess.Popen([sys.executable, "-m", "cluster.cli", *args], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, **popen)


def _run(*args: str, timeout: float = 600) -> str:
    process = _hybridtrain(*args)
    output, _ = process.communicate(timeout=timeout)
    assert process.returncode == 0, output[-4000:]
    return output


def _script(tmp_path: Path) -> str:
    path = tmp_path / "script.json"
    path.write_text(json.dumps(PROPOSALS))
    return str(path)


def _rows(frame: pd.DataFrame) -> set[tuple]:
    return {(row.kind, row.query_id, int(row.epoch), row.reason) for row in frame.itertuples()}


def test_a_killed_driver_resumes_with_every_checkpointed_ledger_row(tmp_path) -> None:
    run_dir = tmp_path / "run"
    process = _hybridtrain("run", "--recipe", "smoke", "--output", str(run_dir), "--set", "train.epochs=10",
                           "--set", f"advisor.script={_script(tmp_path)}", *(f"--set={item}" for item in ADVISED), start_new_session=True)
    # Keep the ledger of every checkpoint seen (by epoch) until one holds two verdicts and a newer one exists.
    ledgers: dict[int, list] = {}

    def scan() -> None:
        for path in (run_dir / "ray" / "train").glob("checkpoint_*"):
            try:
                epoch = json.loads((path / "loop_state.json").read_text())["epoch"]
                ledgers.setdefault(epoch, json.loads((path / "advice_state.json").read_text())["coordinator"]["ledger"])
            except (OSError, ValueError, KeyError):  # being written, or already rotated out (checkpoints_to_keep)
                continue

    deadline = time.monotonic() + 420
    while time.monotonic() < deadline and process.poll() is None:
        scan()
        full = [epoch for epoch, ledger in ledgers.items() if sum(row["kind"] == "verdict" for row in ledger) >= 2]
        if full and max(ledgers) > min(full):
            break
        time.sleep(0.2)
    assert ledgers and process.poll() is None, f"no checkpoint in time:\n{process.stdout.read()[-3000:] if process.poll() is not None else ''}"
    os.killpg(process.pid, signal.SIGKILL)  # the driver and the embedded Ray it started, without any clean-up
    process.wait(timeout=60)
    scan()  # a checkpoint written between the last look and the kill is one the resume may pick
    assert not (run_dir / "summary.json").exists()

    output = _run("run", "--resume", str(run_dir))
    # The checkpoint Ray Train resumed from is the last one it had registered (a newer directory may not be yet).
    resumed_epoch = int(re.search(r"resumed from checkpoint after epoch (\d+)", output).group(1))
    checkpointed = ledgers[resumed_epoch]
    assert resumed_epoch >= 2 and sum(row["kind"] == "verdict" for row in checkpointed) >= 1
    summary = json.loads((run_dir / "summary.json").read_text())
    ledger = pd.read_csv(run_dir / "interventions.csv")
    before = _rows(pd.DataFrame(checkpointed))
    assert before <= _rows(ledger), f"rows lost: {before - _rows(ledger)}"
    assert summary["epochs"] == 10 and list(pd.read_csv(run_dir / "metrics.csv").epoch) == list(range(1, 11))
    assert summary["advisor_queries"] == (ledger.kind == "query").sum() > len([r for r in checkpointed if r["kind"] == "query"])


def test_a_seeded_run_repeats_exactly_in_a_fresh_process(tmp_path) -> None:
    """Same config and seed, two processes (different PYTHONHASHSEED): the same run id, the same loss
    curves bit for bit, the same probation rewards. The schedule ends at lr 0 (min_lr_ratio 0), where
    an lr_scale cannot act: that is recorded in the ledger and the summary, not silently dropped."""
    runs, outputs = [], {}
    for attempt in ("a", "b"):
        run_dir = tmp_path / attempt
        os.environ["PYTHONHASHSEED"] = {"a": "11", "b": "22"}[attempt]
        try:  # b also shows Ray's and the workers' own logs; that must not change the run
            outputs[attempt] = _run("run", "--recipe", "smoke", "--output", str(run_dir), "--set", "train.epochs=6", "--set", "train.min_lr_ratio=0",
                                    "--set", f"advisor.script={_script(tmp_path)}", *(f"--set={item}" for item in ADVISED),
                                    *(["--verbose"] if attempt == "b" else []))
        finally:
            os.environ.pop("PYTHONHASHSEED", None)
        runs.append((json.loads((run_dir / "summary.json").read_text()), pd.read_csv(run_dir / "metrics.csv"),
                     pd.read_csv(run_dir / "interventions.csv")))
    # The terminal, as a new user meets it: the driver's own lines and rank 0's progress, no Ray internals.
    quiet = outputs["a"].splitlines()
    assert len(quiet) <= 40, outputs["a"]
    assert not [line for line in quiet if "pid=" in line or "TrainingReport" in line or "DeepSpeed" in line], outputs["a"]
    assert sum("[hybridtrain] epoch" in line for line in quiet) == 6 and "advisor proposal" in outputs["a"]
    assert "RayTrainWorker pid=" in outputs["b"]
    # ... and the full logs are in the run directory
    worker_logs = [path.read_text(errors="replace") for path in (tmp_path / "a" / "logs" / "ray").glob("worker-*.out")]
    assert any("[hybridtrain] epoch   6/6" in text for text in worker_logs)
    assert (tmp_path / "a" / "report" / "report.html").is_file() and "report.html" in quiet[-1]
    (summary_a, metrics_a, ledger_a), (summary_b, metrics_b, ledger_b) = runs
    assert summary_a["run_id"] == summary_b["run_id"]
    pd.testing.assert_frame_equal(metrics_a[["train_loss", "val_loss", "val_accuracy", "lr"]], metrics_b[["train_loss", "val_loss", "val_accuracy", "lr"]],
                                  check_exact=True)
    verdicts_a, verdicts_b = (ledger[ledger.kind == "verdict"] for ledger in (ledger_a, ledger_b))
    assert len(verdicts_a) >= 2 and list(verdicts_a.reward) == list(verdicts_b.reward)
    lr_zero = ledger_a[(ledger_a.kind == "error") & ledger_a.reason.str.contains("learning rate that is 0")]
    assert len(lr_zero) == 1 and summary_a["errors"] >= 1


def test_two_runs_started_at_once_on_one_machine_both_finish(tmp_path) -> None:
    """Two `hybridtrain run`s at once, each with its own embedded Ray, dashboard and a served advisor:
    the advisor is reached by handle (no HTTP proxy, no port 8000 to fight over) and each Ray takes free ports."""
    common = ["--recipe", "smoke", "--set", "train.epochs=3", "--set", "train.early_stopping_patience=0", "--set", "advisor.backend=heuristic",
              "--set", "advisor.serve=true", "--set", "cluster.num_cpus=4", "--set", "coordinator.query_interval=1", "--set", "coordinator.ask_when_healthy=true"]
    processes = {name: _hybridtrain("run", "--output", str(tmp_path / name), *common) for name in ("first", "second")}
    outputs = {name: process.communicate(timeout=900)[0] for name, process in processes.items()}
    for name, process in processes.items():
        assert process.returncode == 0, f"{name}:\n{outputs[name][-4000:]}"
        summary = json.loads((tmp_path / name / "summary.json").read_text())
        assert summary["epochs"] == 3 and summary["advisor_queries"] >= 1 and summary["test_accuracy"] > 0.5
    urls = [re.search(r"dashboard[^\n]*?(http://\S+)", output) for output in outputs.values()]
    if all(urls):  # each embedded Ray has its own dashboard
        assert urls[0].group(1) != urls[1].group(1)
