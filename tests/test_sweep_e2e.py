"""Sweeps end to end: real Ray Tune over real Ray Train + DeepSpeed trials on an embedded Ray.

The PBT test is the one that matters most: it proves an exploited trial really continues from the
cloned weights of the better trial (hash of the restored model = hash recorded in the source's
checkpoint) and trains with its own, mutated learning rate (DeepSpeed's restore would otherwise
bring the source's back)."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from cluster.experiment import build_config
from cluster.report import write_report
from cluster.sweep import run_sweep

pytestmark = pytest.mark.e2e


def _digits_parquet(path: Path) -> Path:
    """scikit-learn's digits as Parquet files of 64 numeric feature columns and a label, in row groups of 300."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    frame = pd.DataFrame(digits.data.astype("float32"), columns=[f"pixel{i}" for i in range(64)]).assign(label=digits.target)
    path.mkdir()
    for part, first in enumerate(range(0, len(frame), 900)):
        frame.iloc[first:first + 900].to_parquet(path / f"part-{part}.parquet", row_group_size=300)
    return path


def test_pbt_smoke_sweep_exploits_with_cloned_weights_and_mutated_lr(ray_local, tmp_path, capsys) -> None:
    """Also LLM-guided explore
    with a scripted advisor whose answers alternate in bounds / out of bounds: the sweep goes on, and every
    explore is recorded as llm or fallback, none holding Tune's loop a second. The same advisor advises the
    trials themselves (within-run advice keeps working inside trials). The terminal shows hybridtrain's lines
    only; Tune's own output is in the sweep's log. Every trial streams its data (Ray Data shards), so an exploit
    clones a streamed trial."""
    script = tmp_path / "advisor.json"
    script.write_text(json.dumps([{"hyperparameters": {"lr_scale": 0.5}, "reason": "halve lr"},
                                  {"hyperparameters": {"lr_scale": 10.0}, "reason": "far too much"}]))
    # Far-apart learning rates, half the population in the bottom quantile and two perturbation points make an
    # exploit all but certain (asynchronous PBT skips one when the top trial has no checkpoint yet).
    config = build_config(recipe="smoke", sweep=True, overrides=["tune.space={train.lr: {loguniform: [1.0e-5, 1.0e-2]}}",
                                                                 "tune.quantile_fraction=0.5",
                                                                 "tune.llm_explore=true", "advisor.backend=scripted", f"advisor.script={script}",
                                                                 "coordinator.probation_steps=2", "train.num_workers=1",
                                                                 f"data.path={_digits_parquet(tmp_path / 'digits')}", "data.streaming=true"])
    summary = run_sweep(config, tmp_path / "pbt")
    sweep_dir = tmp_path / "pbt"
    assert summary["trials"] == 4 and summary["exploits"] >= 1, summary
    explores = pd.read_csv(sweep_dir / "explores.csv")
    checked = 0
    for row in explores.itertuples():
        restored = json.loads((Path(row.run_dir) / "restored_from.json").read_text())
        source_state = json.loads((Path(row.checkpoint) / "loop_state.json").read_text())
        # Cloned weights: the restored model is bit for bit the source trial's checkpoint.
        assert restored["params_sha256"] and restored["params_sha256"] == source_state["params_digest"]
        # Mutated learning rate: the exploited trial's schedule now peaks at its own configured lr.
        configured = json.loads(row.config)["train.lr"]
        assert restored["configured_now"]["lr"] == pytest.approx(configured)
        if "lr" in restored["changed"]:
            ratio = restored["lr_now"] / restored["lr_restored"]
            assert ratio == pytest.approx(configured / restored["configured_before"]["lr"], rel=1e-6)
            metrics = pd.read_csv(Path(row.run_dir) / "metrics.csv")
            after = metrics[metrics.epoch > row.epoch]
            assert len(after) and after.lr.iloc[0] != pytest.approx(restored["lr_restored"])  # not the source's lr
            checked += 1
    assert checked >= 1, explores.to_string()
    results = pd.read_csv(sweep_dir / "results.csv")
    assert len(results) == 4 and (results.status != "error").all(), results.to_string()
    for run_dir in results.run_dir:
        assert "(streamed)" in json.loads((Path(run_dir) / "summary.json").read_text())["data"]["source"], run_dir
    # Train keeps every checkpoint of a trial until Tune has copied it (a trial that fell behind once lost one to
    # Train's rotation), then the trial removes it: the last copied one and the final epoch's remain.
    for run_dir in results.run_dir:
        assert len([path for path in (Path(run_dir) / "ray" / "train").glob("checkpoint_*") if path.is_dir()]) <= 2, run_dir
    assert summary["best_run_dir"] and (Path(summary["best_run_dir"]) / "model.safetensors").is_file()
    decisions = [json.loads(line) for line in (sweep_dir / "explore_decisions.jsonl").read_text().splitlines()]
    assert len(decisions) == summary["exploits"] and {d["source"] for d in decisions} <= {"llm", "fallback"}
    assert all(d["problem"] for d in decisions if d["source"] == "fallback")
    assert all(d["waited_s"] < 1.0 for d in decisions), decisions  # the explore never stalls Tune's event loop
    terminal = capsys.readouterr()
    for noise in ("Configuration for experiment", "reuse_actors", "worker processes have been started", "operation took"):
        assert noise not in terminal.out + terminal.err, noise
    assert "[hybridtrain] sweep done" in terminal.out
    assert "Configuration for experiment" in (sweep_dir / "logs" / "tune.log").read_text()
    assert summary["llm_explores"] + summary["fallbacks"] == summary["exploits"]
    assert set(explores.source) <= {"llm", "fallback"}
    report = write_report(sweep_dir).read_text()  # each trial's curve with its exploits, the trial and explore tables
    assert "Exploits and explores" in report and report.count("data:image/png;base64,") == 1


@pytest.mark.parametrize("scheduler", ["asha", "pb2", "random"])
def test_other_schedulers_run_a_small_sweep(ray_local, tmp_path, scheduler) -> None:
    """In memory (the PBT test streams)."""
    overrides = [f"tune.scheduler={scheduler}", "tune.num_samples=2", "train.epochs=4", "tune.grace_period=2", "tune.perturbation_interval=2",
                 "tune.space={train.lr: {loguniform: [1.0e-4, 1.0e-2]}}"]
    summary = run_sweep(build_config(recipe="smoke", sweep=True, overrides=overrides), tmp_path / scheduler)
    results = pd.read_csv(tmp_path / scheduler / "results.csv")
    assert summary["trials"] == 2 and (results.status != "error").all(), results.to_string()
    assert summary["best_score"] is not None and 0.0 <= summary["best_score"] <= 1.0
    assert summary["trials_finished"] >= 1 and summary["best_test_accuracy"] > 0.5
    # the population's series in SWEEP_DIR/tensorboard: the best score never gets worse and ends at the sweep's best
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tmp_path / scheduler / "tensorboard"))
    events.Reload()
    best = [event.value for event in events.Scalars("population_best")]
    assert best == sorted(best) and best[-1] == pytest.approx(max(results.best_score.dropna()), abs=1e-6)
    assert len([tag for tag in events.Tags()["scalars"] if tag.startswith("trial_score/")]) == 2


def test_a_killed_sweep_resumes_without_rerunning_finished_trials(tmp_path) -> None:
    import os
    import signal
    import subprocess
    import sys
    import time

    root = Path(__file__).resolve().parents[1]
    sweep_dir = tmp_path / "sweep"
    sets = ["tune.scheduler=random", "tune.num_samples=3", "tune.max_concurrent_trials=1", "train.epochs=2", "cluster.num_cpus=4",
            "tune.space={train.lr: {loguniform: [1.0e-3, 1.0e-2]}}"]
    env = {key: value for key, value in os.environ.items() if key != "RAY_ADDRESS"} | {"TUNE_GLOBAL_CHECKPOINT_S": "1"}
    command = [sys.executable, "-m", "cluster.cli", "tune", "--recipe", "smoke", "--output", str(sweep_dir), *(f"--set={item}" for item in sets)]
    process = subprocess.Popen(command, cwd=root, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline and process.poll() is None and not list(sweep_dir.glob("trials/*/run-*/summary.json")):
        time.sleep(0.5)
    finished = [path.parent for path in sweep_dir.glob("trials/*/run-*/summary.json")]
    assert len(finished) == 1 and process.poll() is None, process.stdout.read()[-3000:] if process.poll() is not None else finished
    time.sleep(8)  # let Tune record the trial as terminated in its experiment state (saved every second here)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait(timeout=60)

    resumed = subprocess.run([sys.executable, "-m", "cluster.cli", "tune", "--resume", str(sweep_dir)], cwd=root, env=env,
                             capture_output=True, text=True, timeout=900)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    summary = json.loads((sweep_dir / "summary.json").read_text())
    assert summary["trials"] == 3 and summary["trials_finished"] == 3
    assert [path.name for path in finished[0].parent.glob("run-*")] == ["run-0"]  # not trained again
    assert (sweep_dir / "report" / "trials.png").is_file() and "could not write the report" not in resumed.stdout


def test_a_crashing_trial_is_reported_while_the_others_finish(ray_local, tmp_path) -> None:
    """One trial's training worker is SIGKILLed after its first epoch and it has no retries left: the trial
    fails, the sweep goes on, the other trial finishes and the failure is named in the summary."""
    import os
    import signal
    import threading
    import time

    sweep_dir = tmp_path / "crash"
    killed: dict[str, str] = {}

    def kill_one_trial() -> None:
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline and not killed:
            for placement in sweep_dir.glob("trials/*/run-*/placement.json"):
                if (placement.parent / "metrics.csv").is_file():
                    workers = json.loads(placement.read_text())["workers"]
                    os.kill(workers[-1]["pid"], signal.SIGKILL)
                    killed["trial"] = placement.parent.parent.name
                    return
            time.sleep(0.2)

    overrides = ["tune.scheduler=random", "tune.num_samples=2", "train.epochs=4", "train.max_failures=0", "tune.max_concurrent_trials=1",
                 "tune.space={train.lr: {loguniform: [1.0e-3, 3.0e-3]}}"]
    killer = threading.Thread(target=kill_one_trial, daemon=True)
    killer.start()
    summary = run_sweep(build_config(recipe="smoke", sweep=True, overrides=overrides), sweep_dir)
    killer.join(timeout=5)
    results = pd.read_csv(sweep_dir / "results.csv")
    assert killed and summary["trials"] == 2 and sorted(results.status) == ["error", "finished"], results.to_string()
    failed = results[results.status == "error"].trial.tolist()  # Tune's trial directory: the trial name and its parameters
    assert list(summary["trials_failed"]) == failed and len(failed) == 1 and failed[0].startswith(killed["trial"] + "_")
    assert summary["best_test_accuracy"] > 0.5  # the surviving trial's result is the sweep's
