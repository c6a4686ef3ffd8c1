"""A run's life outside one Python process: a killed driver resumes with its ledger, and a seeded run
repeats itself exactly in a fresh process. Each test drives the real `hybridtrain` command (embedded
Ray, 2 DeepSpeed workers, the coordinator actor, a scripted advisor) in subprocesses."""

from __future__ import annotations

import json
import os
import random
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


def _kill_tree(process: subprocess.Popen) -> None:
    """SIGKILL the driver and every process it started (Ray's own and its workers, whatever their process group),
    and wait until all are gone: a worker outliving the kill could still finish a checkpoint."""
    import psutil

    root = psutil.Process(process.pid)
    tree = [root, *root.children(recursive=True)]
    os.killpg(process.pid, signal.SIGKILL)
    for member in tree:
        try:
            member.kill()
        except psutil.NoSuchProcess:
            continue
    _, alive = psutil.wait_procs(tree, timeout=60)
    assert not alive, f"still running after SIGKILL: {alive}"
    process.wait(timeout=60)


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
    _kill_tree(process)  # the driver and the embedded Ray it started, without any clean-up
    # Nothing writes any more: the newest intact checkpoint now is the one the resume must take.
    intact_epoch, checkpointed = _intact_ledger(run_dir)
    assert not (run_dir / "summary.json").exists()

    output = _run("run", "--resume", str(run_dir))
    resumed_epoch = int(re.search(r"resumed from checkpoint after epoch (\d+)", output).group(1))
    assert resumed_epoch == intact_epoch, output[-3000:]
    assert resumed_epoch >= 2 and sum(row["kind"] == "verdict" for row in checkpointed) >= 1
    summary = json.loads((run_dir / "summary.json").read_text())
    ledger = pd.read_csv(run_dir / "interventions.csv")
    before = _rows(pd.DataFrame(checkpointed))
    assert before <= _rows(ledger), f"rows lost: {before - _rows(ledger)}"
    assert summary["epochs"] == 10 and list(pd.read_csv(run_dir / "metrics.csv").epoch) == list(range(1, 11))
    assert summary["advisor_queries"] == (ledger.kind == "query").sum() > len([r for r in checkpointed if r["kind"] == "query"])


def _intact_ledger(run_dir: Path) -> tuple[int, list]:
    """The epoch and ledger of the newest checkpoint with every rank's manifest (what a resume restores)."""
    from workers.checkpoints import checkpoint_problem

    for path in sorted((run_dir / "ray" / "train").glob("checkpoint_*"), reverse=True):
        if path.is_dir() and checkpoint_problem(path) is None:
            return (json.loads((path / "loop_state.json").read_text())["epoch"],
                    json.loads((path / "advice_state.json").read_text())["coordinator"]["ledger"])
    return 0, []


def _stop_when(process: subprocess.Popen, marker: str | None, timeout: float = 420) -> str:
    """The driver's output until it exits; SIGTERM (to the driver alone, as `docker stop` sends it) once `marker` is printed."""
    lines, deadline = [], time.monotonic() + timeout
    for line in process.stdout:
        lines.append(line)
        if marker is not None and marker in line:
            process.send_signal(signal.SIGTERM)
            marker = None
        assert time.monotonic() < deadline, "".join(lines[-50:])
    process.wait(timeout=120)
    return "".join(lines)


def test_a_driver_stopped_by_sigterm_twice_resumes_and_audits_clean(tmp_path) -> None:
    """SIGTERM at two moments of one run, chosen with a seed (HYBRIDTRAIN_FAULT_SEED, default 0): one the driver is
    in (start-up, seen in its output, or its final report, after the test accuracy line) and one in a worker's epoch
    (mid-epoch or during a proposal's probation: faults.stop_driver_*). Each stop exits 143 with one line saying
    where it stopped and what it cleaned (Ray Train, the run's Serve app); each `--resume` goes on, the last finishes
    with every checkpointed ledger row, and `hybridtrain audit` finds nothing lost."""
    seed = int(os.environ.get("HYBRIDTRAIN_FAULT_SEED", "0"))
    rng = random.Random(seed)
    driver_moment, worker_moment, epoch = rng.choice(["start-up", "final"]), rng.choice(["epoch", "probation"]), rng.randint(2, 3)
    print(f"seed {seed}: SIGTERM at {driver_moment} and in epoch {epoch}'s {worker_moment}")
    run_dir = tmp_path / "run"
    first = _hybridtrain("run", "--recipe", "smoke", "--output", str(run_dir), "--set", "train.epochs=5", "--set", "advisor.serve=true",
                         "--set", f"advisor.script={_script(tmp_path)}", *(f"--set={item}" for item in ADVISED),
                         "--set", f"faults.stop_driver_epoch={epoch}", "--set", f"faults.stop_driver_in={worker_moment}")
    markers = {"start-up": [f"-> {run_dir}", None, None], "final": [None, "test accuracy", None]}[driver_moment]
    checkpointed, outputs = [], []
    for attempt, marker in enumerate(markers):
        process = first if attempt == 0 else _hybridtrain("run", "--resume", str(run_dir))
        output = _stop_when(process, marker)
        outputs.append(output)
        if attempt == 2 or process.returncode == 0:
            break
        assert process.returncode == 143, output[-4000:]
        line = output.strip().splitlines()[-1]
        assert line.startswith("hybridtrain: stopped by SIGTERM during "), output[-4000:]
        if (run_dir / "summary.json").exists():  # the final-report stop landed after the summary: the run had finished
            assert "The run had finished" in line and "the report" in line
            break
        assert f"The run directory is resumable: hybridtrain run --resume {run_dir}" in line
        assert re.search(r"the advisor's Serve application 'hybridtrain-advisor-smoke-\w+-\w+' deleted", line), line
        if "during training" in line:
            assert "Ray Train stopped" in line
        checkpointed.append(_intact_ledger(run_dir))
    assert len(outputs) >= 2 and process.returncode == 0, outputs[-1][-4000:]
    stops = [json.loads(line) for line in (run_dir / "stops.jsonl").read_text().splitlines()]
    assert len(stops) == len(outputs) - 1 >= 1 and all(stop["signal"] == "SIGTERM" for stop in stops)
    assert (run_dir / ".chaos_stopped_driver").exists()  # the worker's moment struck
    audit = _run("audit", str(run_dir))
    assert "nothing lost" in audit
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["epochs"] == 5 and list(pd.read_csv(run_dir / "metrics.csv").epoch) == [1, 2, 3, 4, 5]
    assert [stop["phase"] for stop in summary["stops"]] == [stop["phase"] for stop in stops]
    ledger = _rows(pd.read_csv(run_dir / "interventions.csv"))
    for resumed_epoch, rows in checkpointed:
        assert _rows(pd.DataFrame(rows, columns=["kind", "query_id", "epoch", "reason"])) <= ledger, f"rows of epoch {resumed_epoch} lost"


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
