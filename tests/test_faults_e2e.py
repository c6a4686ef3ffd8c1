"""Faults of a real cluster, survived with nothing lost: a training worker killed during a proposal's
probation, and the coordinator actor killed mid-run. Real Ray Train + DeepSpeed workers, the real
coordinator actor, a scripted advisor (its answers are known, so what must happen is known).

"Nothing lost" is checked the same way for every fault (`cluster.audit.audit_run`): metrics.csv has each
epoch once, the ledger has no duplicate rows and every verdict its proposal, the summary's counts are
the ledger's, and the saved model loads and predicts the reported test accuracy.
"""

from __future__ import annotations

import json
import threading
import time

import pandas as pd
import pytest

from cluster.experiment import build_config
from cluster.launch import RAY_RUN_NAME, RAY_STORAGE, RunError, plan_run, run_experiment
from cluster.audit import audit_run

pytestmark = pytest.mark.e2e

ASK_EVERY_EPOCH = ["coordinator.ask_when_healthy=true", "train.num_workers=2", "train.early_stopping_patience=0", "coordinator.query_interval=1", "coordinator.burn_in_epochs=1",
                   "coordinator.probation_steps=4", "coordinator.cache_enabled=false", "advisor.backend=scripted"]
SHRINK = {"weights": [{"op": "shrink", "group": "classifier.4.weight", "amount": 0.3}], "reason": "shrink the head"}


def _script(tmp_path, *proposals) -> str:
    path = tmp_path / "script.json"
    path.write_text(json.dumps(list(proposals)))
    return str(path)


def assert_nothing_lost(run_dir, summary: dict, *, epochs: int) -> pd.DataFrame:
    """`audit_run` finds nothing, the run has all its epochs, and the ledger (empty without an advisor) comes back."""
    assert audit_run(run_dir) == []
    assert summary["epochs"] == epochs
    ledger_file = run_dir / "interventions.csv"
    return pd.read_csv(ledger_file, keep_default_na=False) if ledger_file.is_file() else pd.DataFrame()


def test_a_worker_killed_during_probation_resumes_from_the_pre_proposal_checkpoint(ray_local, tmp_path) -> None:
    run_dir = tmp_path / "killed-in-probation"
    # Asked at epochs 1 and 3 (never at the last, 5); each answer is tried at the next epoch end (2, 4). Killed in epoch 4's probation,
    # the run goes back to the epoch-2 checkpoint, before that proposal was even asked for.
    overrides = [*ASK_EVERY_EPOCH, "train.epochs=5", "train.checkpoint_every=2", "faults.kill_epoch=4", "faults.kill_in=probation",
                 "train.max_failures=1", f"advisor.script={_script(tmp_path, SHRINK)}"]
    summary = run_experiment(build_config(recipe="smoke", overrides=overrides), run_dir)

    progress = (run_dir / "progress.log").read_text()
    assert (run_dir / ".chaos_killed").exists()  # the kill happened, inside epoch 4's probation
    assert "resumed from checkpoint after epoch 2" in progress  # the last checkpoint before the proposal
    assert summary["restarts"] == 1
    ledger = assert_nothing_lost(run_dir, summary, epochs=5)
    # Epoch 4's proposal was asked for again from the restored state, tried and judged once.
    assert len(ledger[(ledger.kind == "verdict") & (ledger.epoch == 4)]) == 1
    assert summary["proposals_accepted"] + summary["proposals_rejected"] == 2


def test_a_killed_coordinator_actor_comes_back_with_the_runs_state(ray_local, tmp_path) -> None:
    import ray

    run_dir = tmp_path / "coordinator-killed"
    config = build_config(recipe="smoke", overrides=[*ASK_EVERY_EPOCH, "train.epochs=7", f"advisor.script={_script(tmp_path, SHRINK)}"])
    name = plan_run(config, run_dir).coordinator_name
    killed: dict[str, int] = {}

    def kill_after_epoch_2() -> None:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            try:
                epochs = len(pd.read_csv(run_dir / "metrics.csv"))
            except (OSError, ValueError):
                epochs = 0
            if epochs >= 2:
                killed["after_epoch"] = epochs
                ray.kill(ray.get_actor(name, namespace=ray.get_runtime_context().namespace), no_restart=False)
                return
            time.sleep(0.2)

    killer = threading.Thread(target=kill_after_epoch_2, daemon=True)
    killer.start()
    summary = run_experiment(config, run_dir)
    killer.join(timeout=5)

    assert 2 <= killed["after_epoch"] < 7, killed
    ledger = assert_nothing_lost(run_dir, summary, epochs=7)
    reopened = ledger[(ledger.kind == "error") & ledger.reason.str.contains("opened again in the restarted coordinator")]
    assert len(reopened) == 1, ledger[ledger.kind == "error"].reason.tolist()
    # Rows from before the kill are still there, and advice went on after it.
    assert ledger[ledger.kind == "query"].epoch.min() <= killed["after_epoch"]
    assert ledger[ledger.kind == "verdict"].epoch.max() > killed["after_epoch"] + 1
    assert not any("advice off" in problem for problem in summary["advice_incidents"])


def test_a_truncated_checkpoint_is_named_and_the_previous_one_used(ray_local, tmp_path) -> None:
    run_dir = tmp_path / "truncated"
    config = build_config(recipe="smoke", overrides=["train.epochs=4", "train.early_stopping_patience=0", "advisor.backend=none", "train.checkpoint_every=1",
                                                     "faults.kill_epoch=3", "train.max_failures=0"])
    with pytest.raises(RunError, match="--resume"):
        run_experiment(config, run_dir)
    storage = run_dir / RAY_STORAGE / RAY_RUN_NAME
    checkpoints = sorted(path for path in storage.glob("checkpoint_*") if path.is_dir())
    assert len(checkpoints) == 2  # epochs 1 and 2 (train.checkpoints_to_keep)
    damaged = max(checkpoints[-1].rglob("*.pt"), key=lambda path: path.stat().st_size)  # in the newest, which a resume tries first
    damaged.write_bytes(damaged.read_bytes()[: damaged.stat().st_size // 2])  # a disk that filled up mid-write

    summary = run_experiment(None, run_dir, resume=True)
    assert len(summary["checkpoint_problems"]) == 1
    assert str(damaged) in summary["checkpoint_problems"][0] and "truncated" in summary["checkpoint_problems"][0]
    progress = (run_dir / "progress.log").read_text()
    assert f"checkpoint unusable: {damaged}" in progress
    assert "resumed from checkpoint after epoch 1 (restart 1), the newest intact one" in progress
    assert_nothing_lost(run_dir, summary, epochs=4)

    # `hybridtrain audit` says the same, and notices a repeated epoch.
    from cluster.cli import main

    assert main(["audit", str(run_dir)]) == 0
    metrics = pd.read_csv(run_dir / "metrics.csv")
    pd.concat([metrics, metrics.tail(1)]).to_csv(run_dir / "metrics.csv", index=False)
    assert main(["audit", str(run_dir)]) == 1
    assert any("metrics.csv epochs" in problem for problem in audit_run(run_dir))


def test_a_full_disk_inside_a_checkpoint_and_at_the_summary_fails_clearly_and_resume_finishes(ray_local, tmp_path) -> None:
    """ENOSPC struck twice (`faults.disk_full`): inside epoch 3's checkpoint (DeepSpeed's files written, rank 0's copy
    to storage cut off), then writing summary.json at the end. Each fails the run with a clear error and loses nothing
    written whole; each `--resume` goes on from what is whole, and the third attempt finishes with every ledger row."""
    run_dir = tmp_path / "disk-full"
    overrides = [*ASK_EVERY_EPOCH, "train.epochs=5", "train.checkpoint_every=1", "train.max_failures=0",
                 "faults.disk_full=[checkpoint, summary.json]", "faults.disk_full_epoch=3", f"advisor.script={_script(tmp_path, SHRINK)}"]
    with pytest.raises(RunError, match=r"training failed: the disk is full \(ENOSPC\)(.|\n)*--resume") as failed:
        run_experiment(build_config(recipe="smoke", overrides=overrides), run_dir)
    assert "inside the checkpoint of epoch 3" in str(failed.value)
    storage = run_dir / RAY_STORAGE / RAY_RUN_NAME
    partial = [path for path in storage.glob("checkpoint_*") if path.is_dir() and not list(path.glob("manifest-rank*.json"))]
    assert len(partial) == 1  # the copy the full disk cut off
    assert list(pd.read_csv(run_dir / "metrics.csv").epoch) == [1, 2]
    intact = sorted(path for path in storage.glob("checkpoint_*") if path.is_dir() and path not in partial)
    checkpointed = json.loads((intact[-1] / "advice_state.json").read_text())["coordinator"]["ledger"]
    assert json.loads((intact[-1] / "loop_state.json").read_text())["epoch"] == 2 and any(row["kind"] == "verdict" for row in checkpointed)

    with pytest.raises(RunError, match=r"outputs could not be written: the disk is full \(ENOSPC\)(.|\n)*Nothing was lost(.|\n)*--resume"):
        run_experiment(None, run_dir, resume=True)
    progress = (run_dir / "progress.log").read_text()
    assert f"checkpoint unusable: {partial[0]}: no manifest" in progress and "resumed from checkpoint after epoch 2" in progress
    assert not (run_dir / "summary.json").exists() and not list(run_dir.glob(".*.tmp"))  # half of it is nowhere
    assert len(pd.read_csv(run_dir / "interventions.csv")) >= len(checkpointed)  # written whole before the summary failed

    summary = run_experiment(None, run_dir, resume=True)
    ledger = assert_nothing_lost(run_dir, summary, epochs=5)
    kept = {(row["kind"], row["query_id"], row["epoch"]) for row in checkpointed}
    assert kept <= {(row.kind, row.query_id, row.epoch) for row in ledger.itertuples()}
    assert summary["restarts"] == 2 and list(pd.read_csv(run_dir / "metrics.csv").epoch) == [1, 2, 3, 4, 5]
