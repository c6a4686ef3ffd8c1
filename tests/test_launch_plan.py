"""`plan_run`: a run resolved without side effects, with an id and seeds that do not depend on the process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from cluster.experiment import build_config
from cluster.launch import plan_run, run_id
from orchestration.settings import ConfigError

ROOT = Path(__file__).resolve().parents[1]


def test_plan_writes_nothing_and_resolves_the_run(tmp_path) -> None:
    config = build_config(recipe="smoke", overrides=["advisor.backend=heuristic"])
    plan = plan_run(config, tmp_path / "run")
    assert not (tmp_path / "run").exists()
    assert plan.run_id == run_id(config) and plan.run_id.startswith("smoke-")
    assert plan.data["classes"] == 10 and plan.data["train"] > plan.data["val"] > 0
    assert plan.needed_cpus == 2  # two workers; the heuristic advisor runs inside the coordinator
    assert plan.resume_from is None and not plan.resume


def test_autoscaled_advisor_replicas_are_counted_at_their_maximum(tmp_path) -> None:
    config = build_config(overrides=["advisor.num_replicas=auto", "advisor.max_replicas=3", "advisor.num_cpus_per_replica=1",
                                     "train.num_workers=2"])
    assert plan_run(config, tmp_path / "run").needed_cpus == 2 + 3


def test_plan_refuses_bad_run_directories(tmp_path) -> None:
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "config.yaml").write_text("name: x\n")
    with pytest.raises(ConfigError, match="already holds a run"):
        plan_run(build_config(), tmp_path / "taken")
    with pytest.raises(ConfigError, match="not a run directory"):
        plan_run(None, tmp_path / "nothing", resume=True)


def _in_fresh_process(code: str, hash_seed: str) -> str:
    env = {**os.environ, "PYTHONHASHSEED": hash_seed}
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, check=True).stdout.strip()


def test_run_ids_and_seeds_are_the_same_in_every_process() -> None:
    """Python salts `hash()` of strings per process; ids and seeds must not depend on it."""
    code = ("from cluster.experiment import build_config; from cluster.launch import run_id; from workers.data import stable_seed; "
            "print(run_id(build_config(recipe='smoke')), stable_seed(0, 3, 1, 'probation'))")
    assert _in_fresh_process(code, "1") == _in_fresh_process(code, "2")


def test_the_cluster_section_does_not_change_the_run_id() -> None:
    assert run_id(build_config(overrides=["cluster.address=auto"])) == run_id(build_config())
    assert run_id(build_config(overrides=["train.seed=1"])) != run_id(build_config())


class _DeadMethod:
    def remote(self, *args, **kwargs):
        raise RuntimeError("The actor died unexpectedly before finishing this task.")


class _DeadCoordinator:
    def __getattr__(self, name):
        return _DeadMethod()


def test_an_unreachable_coordinator_stops_advice_and_leaves_a_record() -> None:
    from workers.coordinator_link import CoordinatorLink

    link = CoordinatorLink(handle=_DeadCoordinator(), run="r", call_timeout_s=1.0)
    assert link.on_epoch_end(object(), 0.0, epoch=3) == (False, None)
    assert not link.reachable and "unreachable" in link.disabled_reason
    assert link.incidents == [{"epoch": 3, "problem": link.disabled_reason + "; advice off for the rest of this attempt", "recorded": False}]
    assert link.on_epoch_end(object(), 0.0, epoch=4) == (False, None)  # no second attempt, no second record
    assert len(link.incidents) == 1


class _RaisingCoordinator:
    """`on_epoch_end` raises a task error; `report_incident` calls are recorded."""

    def __init__(self) -> None:
        self.reported: list[str] = []
        outer = self

        class _OnEpochEnd:
            def remote(self, run, *args, **kwargs):
                return "raises"

        class _ReportIncident:
            def remote(self, run, problem, **kwargs):
                outer.reported.append(problem)
                return "recorded"

        self.on_epoch_end, self.report_incident = _OnEpochEnd(), _ReportIncident()


def test_a_raising_coordinator_is_recorded_once(monkeypatch) -> None:
    import ray
    from ray.exceptions import RayTaskError

    from workers.coordinator_link import CoordinatorLink

    def get(ref, timeout=None):
        if ref == "raises":
            raise RayTaskError("call", "Traceback ...", AttributeError("no attribute 'x'"))
        return None

    monkeypatch.setattr(ray, "get", get)
    coordinator = _RaisingCoordinator()
    link = CoordinatorLink(handle=coordinator, run="r", call_timeout_s=1.0)
    assert link.on_epoch_end(object(), 0.0, epoch=3) == (False, None)
    assert link.reachable and len(coordinator.reported) == 1  # advice goes on; the ledger has the incident
    assert [incident["recorded"] for incident in link.incidents] == [True]  # so the driver does not add it again


@pytest.mark.e2e
def test_closing_advice_writes_incidents_and_falls_back_to_the_checkpointed_ledger(ray_local, tmp_path) -> None:
    import json

    import pandas as pd

    from cluster.launch import LEDGER, close_advice
    from orchestration.actor import get_or_create_coordinator
    from orchestration.config import CoordinatorConfig
    from orchestration.coordinator import Coordinator
    from workers.train_loop import ADVICE_STATE

    plan = plan_run(build_config(recipe="smoke", overrides=["advisor.backend=heuristic"]), tmp_path / "run")
    plan.run_dir.mkdir(parents=True)
    incident = {"epoch": 5, "problem": "coordinator unreachable in on_epoch_end: GetTimeoutError"}
    live = get_or_create_coordinator("close-advice-live", config=CoordinatorConfig())
    ray_local.get(live.open_run.remote(plan.run_key))
    recorded = {"epoch": 6, "problem": "coordinator.on_epoch_end raised: X", "recorded": True}  # already in the live ledger
    counts = close_advice(live, plan, incidents=[incident, recorded])
    ledger = pd.read_csv(plan.run_dir / LEDGER)
    assert list(ledger.kind) == ["error"] and ledger.reason[0] == incident["problem"]
    assert counts["errors"] == 1 and counts["advice_incidents"] == [incident["problem"], recorded["problem"]]

    # The coordinator is gone at the end: the ledger comes from the newest checkpoint, and the summary says so.
    checkpointed = Coordinator(CoordinatorConfig(), None, "r")
    checkpointed.report_incident("an earlier problem", epoch=2)
    checkpoint = plan.storage_path / "train" / "checkpoint_2026-01-01_00-00-00.000000"
    checkpoint.mkdir(parents=True)
    (checkpoint / ADVICE_STATE).write_text(json.dumps({"coordinator": checkpointed.to_state(), "incidents": []}))
    gone = get_or_create_coordinator("close-advice-gone", config=CoordinatorConfig())
    ray_local.kill(gone)
    counts = close_advice(gone, plan, incidents=[])
    assert "newest checkpoint" in counts["advisor_ledger_error"]
    assert list(pd.read_csv(plan.run_dir / LEDGER).reason) == ["an earlier problem"]


def test_the_latest_checkpoint_is_a_directory_not_trains_manager_snapshot(tmp_path) -> None:
    import os

    from cluster.launch import latest_checkpoint

    train = tmp_path / "train"
    older, newer = train / "checkpoint_2026-01-01_00-00-00.000000", train / "checkpoint_2026-01-01_00-00-05.000000"
    older.mkdir(parents=True)
    newer.mkdir()
    snapshot = train / "checkpoint_manager_snapshot.json"  # Ray Train V2 writes it beside the checkpoints, after them
    snapshot.write_text("{}")
    os.utime(older, (1, 1))
    os.utime(newer, (2, 2))
    assert latest_checkpoint(tmp_path) == newer
    assert latest_checkpoint(tmp_path / "nothing") is None


# ==== --resume: a torn summary is not a finish; a changed config or data file is refused ==========

def _started_run(run_dir: Path, config) -> Path:
    """A run directory as `execute_run` leaves it once started: config.yaml and fingerprint.json."""
    from cluster.experiment import write_config
    from cluster.fingerprint import FINGERPRINT, fingerprint
    from cluster.rundir import atomic_write_text

    run_dir.mkdir(parents=True)
    write_config(config, run_dir / "config.yaml")
    atomic_write_text(run_dir / FINGERPRINT, json.dumps(fingerprint(config)))
    return run_dir


@pytest.mark.parametrize("torn", ["", '{"name": "smoke", "test_acc'])
def test_resume_after_a_torn_summary_goes_on_and_says_so(tmp_path, capsys, torn: str) -> None:
    run_dir = _started_run(tmp_path / "run", build_config(recipe="smoke"))
    (run_dir / "summary.json").write_text(torn)
    assert plan_run(None, run_dir, resume=True).resume  # not refused as "already finished"
    said = capsys.readouterr().out
    assert "summary.json cannot be read" in said and "not finished" in said
    (run_dir / "summary.json").write_text('{"name": "smoke"}')  # whole: the run is finished
    with pytest.raises(ConfigError, match="already finished"):
        plan_run(None, run_dir, resume=True)


def test_resume_refuses_a_changed_config_naming_the_change_unless_allowed(tmp_path, capsys) -> None:
    config = build_config(recipe="smoke")
    run_dir = _started_run(tmp_path / "run", config)
    assert plan_run(None, run_dir, resume=True, address="auto").resume  # unchanged (the address does not count)
    text = (run_dir / "config.yaml").read_text()
    (run_dir / "config.yaml").write_text(text.replace("lr: 0.003", "lr: 0.01").replace("max_failures: 2", "max_failures: 5"))
    with pytest.raises(ConfigError, match=r"changed since it started:\n  train.lr: 0.003 -> 0.01\n.*--allow-changed") as refused:
        plan_run(None, run_dir, resume=True)
    assert "max_failures" not in str(refused.value)  # how safely it runs is not what it trains on
    capsys.readouterr()
    assert plan_run(None, run_dir, resume=True, allow_changed=True).resume
    assert "train.lr: 0.003 -> 0.01" in capsys.readouterr().out


def test_resume_refuses_a_changed_data_file(tmp_path) -> None:
    rows = ["a,b,label"] + [f"{i % 7},{i % 5},{i % 2}" for i in range(200)]
    data = tmp_path / "data.csv"
    data.write_text("\n".join(rows) + "\n")
    run_dir = _started_run(tmp_path / "run", build_config(recipe="smoke", overrides=[f"data.path={data}"]))
    assert plan_run(None, run_dir, resume=True).resume
    data.write_text("\n".join(rows[:-1] + ["6,4,0"]) + "\n")  # one label changed, same size
    with pytest.raises(ConfigError, match="data sha256"):
        plan_run(None, run_dir, resume=True)


def test_resume_of_a_run_without_a_fingerprint_goes_on_and_says_it_cannot_check(tmp_path, capsys) -> None:
    run_dir = _started_run(tmp_path / "run", build_config(recipe="smoke"))
    (run_dir / "fingerprint.json").unlink()
    assert plan_run(None, run_dir, resume=True).resume
    assert "cannot be checked" in capsys.readouterr().out


# ==== tune --resume: a sweep keeps a fingerprint too, tune.* included ==========================

def _started_sweep(sweep_dir: Path, config) -> Path:
    """A sweep directory as `run_sweep` leaves it once started: config.yaml and fingerprint.json (tune.* counted)."""
    from cluster.experiment import write_config
    from cluster.fingerprint import FINGERPRINT, fingerprint
    from cluster.rundir import atomic_write_text

    sweep_dir.mkdir(parents=True)
    write_config(config, sweep_dir / "config.yaml")
    atomic_write_text(sweep_dir / FINGERPRINT, json.dumps(fingerprint(config, sweep=True)))
    return sweep_dir


class _ReachedRay(Exception):
    """`run_sweep` got past its checks to the point where Ray would start."""


def test_tune_resume_refuses_a_changed_sweep_config_naming_the_change_unless_allowed(tmp_path, monkeypatch, capsys) -> None:
    import cluster.sweep
    from cluster.cli import main
    from cluster.fingerprint import fingerprint

    def reached_ray(*args, **kwargs):
        raise _ReachedRay

    monkeypatch.setattr(cluster.sweep, "connect", reached_ray)
    config = build_config(recipe="smoke", sweep=True)
    # A run's fingerprint leaves tune.* out (a run does not read it); a sweep's counts it.
    assert not any(key.startswith("tune.") for key in fingerprint(config)["config"])
    assert fingerprint(config, sweep=True)["config"]["tune.num_samples"] == 4
    sweep_dir = _started_sweep(tmp_path / "sweep", config)
    with pytest.raises(_ReachedRay):  # unchanged: it goes on to start Ray
        cluster.sweep.run_sweep(None, sweep_dir, resume=True)

    text = (sweep_dir / "config.yaml").read_text()
    (sweep_dir / "config.yaml").write_text(text.replace("num_samples: 4", "num_samples: 6").replace("max_failures: 2", "max_failures: 5"))
    with pytest.raises(ConfigError, match=r"the sweep's config or data changed since it started:\n  tune.num_samples: 4 -> 6\n.*--allow-changed") as refused:
        cluster.sweep.run_sweep(None, sweep_dir, resume=True)
    assert "max_failures" not in str(refused.value)
    # The command says the same and exits 2, before Ray starts; --allow-changed goes on and says what changed.
    assert main(["tune", "--resume", str(sweep_dir), "--no-report"]) == 2
    assert "tune.num_samples: 4 -> 6" in capsys.readouterr().err
    with pytest.raises(_ReachedRay):
        cluster.sweep.run_sweep(None, sweep_dir, resume=True, allow_changed=True)
    assert "resuming with a changed config or data (--allow-changed):\n  tune.num_samples: 4 -> 6" in capsys.readouterr().out
    assert main(["tune", "--recipe", "smoke", "--output", str(tmp_path / "new"), "--allow-changed"]) == 2
    assert "--allow-changed goes with --resume" in capsys.readouterr().err


def test_the_workers_get_the_drivers_split_and_refuse_it_for_other_data(tmp_path) -> None:
    import dataclasses

    import numpy as np

    from cluster.launch import worker_plan
    from orchestration.errors import DataError
    from workers.data import Split, load_digits, stratified_split
    from workers.loop import load_data

    plan = plan_run(build_config(recipe="smoke", overrides=["advisor.backend=none"]), tmp_path / "run")
    expected = stratified_split(load_digits().y, val_fraction=0.1, test_fraction=0.1, seed=0)
    for part in ("train", "val", "test"):
        assert np.array_equal(getattr(plan.split, part), getattr(expected, part))
    handed = worker_plan(plan, advice=None)
    data = load_data(handed)
    assert data.split is plan.split and len(data.features) == 1797
    short = Split(train=plan.split.train[:-5], val=plan.split.val, test=plan.split.test)
    with pytest.raises(DataError, match="1797 samples here, but the driver split 1792"):
        load_data(dataclasses.replace(handed, split=short))
    beyond = Split(train=np.append(plan.split.train[:-1], 5000), val=plan.split.val, test=plan.split.test)
    with pytest.raises(DataError, match="the data changed after the run checked it"):
        load_data(dataclasses.replace(handed, split=beyond))
    assert load_data(dataclasses.replace(handed, split=None)).split.size == 1797  # computed on the worker when not handed
