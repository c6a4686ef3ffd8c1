"""The learning-rate-free peers, the LR range test and the collapsed run's rescue, end to end: real Ray Train +
DeepSpeed workers (2, gloo), the real coordinator, a scripted or the heuristic advisor, digits."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from cluster.experiment import build_config
from cluster.launch import run_experiment

pytestmark = pytest.mark.e2e

# Known to hurt: noise of half each weight's spread on the first conv and the first linear layer.
HURTFUL = {"weights": [{"op": "noise", "group": group, "amount": 0.5} for group in ("features.0.weight", "classifier.1.weight")],
           "reason": "shake"}
ADVISED_ROLLBACK = ["coordinator.ask_when_healthy=true", "coordinator.query_interval=1", "coordinator.burn_in_epochs=1",
                    "coordinator.probation_steps=3", "coordinator.cache_enabled=false", "coordinator.verify_rollback=true",
                    "coordinator.stability_alpha=1.0", "coordinator.alpha_max=1.0", "advisor.backend=scripted"]


def _rejected_and_rolled_back(summary: dict) -> None:
    assert summary["proposals_rejected"] >= 1
    assert summary["rollbacks_verified"] == summary["proposals_rejected"]  # weights, moments, Prodigy's d / schedule-free's sums hash back


def test_prodigy_at_zero3_rolls_a_rejected_proposal_back_exactly(ray_local, tmp_path) -> None:
    script = tmp_path / "script.json"
    script.write_text(json.dumps([HURTFUL]))
    # Asked after epoch 2: after epoch 1 Prodigy has barely moved (val accuracy 0.07), and the noise, whose draw depends
    # on the run id (and so on tmp_path), helped there in one CI run out of several.
    overrides = ["train.epochs=3", "train.zero_stage=3", "train.optimizer=prodigy", "train.lr=1.0", *ADVISED_ROLLBACK,
                 "coordinator.burn_in_epochs=2", f"advisor.script={script}"]
    summary = run_experiment(build_config(recipe="smoke", overrides=overrides), tmp_path / "run")
    _rejected_and_rolled_back(summary)
    assert summary["optimizer"] == "prodigy"
    assert summary["test_accuracy"] >= 0.85  # 3 epochs, no lr tuned; chance is 0.1


def test_schedule_free_at_zero1_with_the_lr_range_test(ray_local, tmp_path) -> None:
    script = tmp_path / "script.json"
    script.write_text(json.dumps([HURTFUL]))
    run_dir = tmp_path / "run"
    overrides = ["train.epochs=3", "train.zero_stage=1", "train.optimizer=schedulefree_adamw", "train.lr=find", *ADVISED_ROLLBACK,
                 f"advisor.script={script}"]
    summary = run_experiment(build_config(recipe="smoke", overrides=overrides), run_dir)
    _rejected_and_rolled_back(summary)
    found = summary["lr_find"]
    assert found["restored_exactly"] and found["fallback"] == ""
    assert 1e-4 <= found["lr"] <= 1e-1  # a sane rate for Adam on digits (the default is 3e-3)
    curve = pd.read_csv(run_dir / "lr_find.csv")
    assert len(curve) == found["steps_run"] and curve["lr"].is_monotonic_increasing
    assert json.loads((run_dir / "lr_find.json").read_text())["lr"] == found["lr"]
    assert summary["test_accuracy"] >= 0.85


def test_a_collapsed_start_is_restarted(ray_local, tmp_path) -> None:
    """lr 0.3 (100x the default) collapses the net to chance within two epochs; the heuristic advisor picks the
    restart, its probation (one epoch of steps) accepts it, and the run learns again."""
    run_dir = tmp_path / "run"
    overrides = ["train.epochs=10", "train.lr=0.3", "advisor.backend=heuristic", "coordinator.burn_in_epochs=1",
                 "coordinator.cache_enabled=false"]
    summary = run_experiment(build_config(recipe="smoke", overrides=overrides), run_dir)
    ledger = pd.read_csv(run_dir / "interventions.csv")
    restarts = ledger[(ledger.kind == "verdict") & ledger.proposal_summary.str.startswith("restart(")]
    assert len(restarts) >= 1 and (restarts.verdict == "accepted").any()
    metrics = pd.read_csv(run_dir / "metrics.csv")
    assert metrics.val_accuracy.iloc[-1] >= 0.5  # chance is 0.1: it learns again after the restart
    assert summary["test_accuracy"] >= 0.5
