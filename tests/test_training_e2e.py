"""End to end on a real embedded Ray: Ray Train workers, gloo, real DeepSpeed ZeRO."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from cluster.experiment import ConfigError, build_config
from cluster.predict import load_model, predict_arrays
from cluster.launch import RunError, run_experiment
from workers.data import load_digits, stratified_split

pytestmark = pytest.mark.e2e

def _reloaded_test_accuracy(run_dir) -> float:
    """Test accuracy of the saved model.safetensors, loaded strictly (full shapes) without Ray or DeepSpeed."""
    model, meta = load_model(run_dir)
    digits = load_digits()
    test = stratified_split(digits.y, val_fraction=0.1, test_fraction=0.1, seed=0).test
    predicted, _ = predict_arrays(model, meta, digits.x[test])
    return float(np.mean(predicted == digits.y[test]))


SMALL = ["train.epochs=4", "train.early_stopping_patience=0", "advisor.backend=none"]


def test_two_workers_zero2_writes_a_complete_run(ray_local, tmp_path) -> None:
    run_dir = tmp_path / "smoke"
    summary = run_experiment(build_config(recipe="smoke", overrides=["advisor.backend=none"]), run_dir)

    assert summary["test_accuracy"] >= 0.95
    assert summary["zero_stage"] == 2 and summary["num_workers"] == 2 and summary["epochs"] == 8
    for key in ("test_macro_f1", "best_val_loss", "wall_s"):
        assert key in summary
    assert json.loads((run_dir / "summary.json").read_text()) == summary
    metrics = pd.read_csv(run_dir / "metrics.csv")
    assert list(metrics.columns) == ["epoch", "train_loss", "train_accuracy", "val_loss", "val_accuracy", "lr", "samples_per_s", "wall_s", "probation_s"]
    assert list(metrics.epoch) == list(range(1, 9))
    assert metrics.train_loss.iloc[-1] < metrics.train_loss.iloc[0]
    assert (run_dir / "config.yaml").is_file()
    assert np.array(summary["test_confusion_matrix"]).sum() == summary["data"]["test"]

    # The consolidated fp32 model reproduces the reported test accuracy without Ray or DeepSpeed.
    assert _reloaded_test_accuracy(run_dir) == pytest.approx(summary["test_accuracy"])


def test_zero3_consolidates_partitioned_weights(ray_local, tmp_path) -> None:
    run_dir = tmp_path / "zero3"
    summary = run_experiment(build_config(recipe="smoke", overrides=["train.zero_stage=3", *SMALL]), run_dir)
    assert summary["zero_stage"] == 3
    assert summary["test_accuracy"] >= 0.85
    assert _reloaded_test_accuracy(run_dir) == pytest.approx(summary["test_accuracy"])  # every shard gathered


def test_run_survives_a_killed_worker_process(ray_local, tmp_path) -> None:
    run_dir = tmp_path / "chaos"
    config = build_config(recipe="smoke", overrides=[*SMALL, "faults.kill_epoch=3", "train.max_failures=1", "train.checkpoint_every=2"])
    summary = run_experiment(config, run_dir)
    assert (run_dir / ".chaos_killed").exists()  # the worker really was killed
    assert summary["restarts"] == 1
    assert summary["epochs"] == 4
    assert list(pd.read_csv(run_dir / "metrics.csv").epoch) == [1, 2, 3, 4]  # epoch 3 redone once, from the epoch-2 checkpoint
    assert "resumed from checkpoint after epoch 2" in (run_dir / "progress.log").read_text()
    assert summary["checkpoint_s"] > 0


def test_resume_continues_a_stopped_run(ray_local, tmp_path) -> None:
    run_dir = tmp_path / "stopped"
    config = build_config(recipe="smoke", overrides=[*SMALL, "faults.kill_epoch=3", "train.max_failures=0"])
    with pytest.raises(RunError, match="--resume"):
        run_experiment(config, run_dir)
    assert list(pd.read_csv(run_dir / "metrics.csv").epoch) == [1, 2]
    assert not (run_dir / "summary.json").exists()

    # The default interval (5) saved no checkpoint in 2 epochs: the run starts again from the beginning.
    summary = run_experiment(None, run_dir, resume=True)  # config comes from the run directory
    assert summary["epochs"] == 4 and summary["restarts"] == 1
    assert "restarting from the beginning" in (run_dir / "progress.log").read_text()
    assert list(pd.read_csv(run_dir / "metrics.csv").epoch) == [1, 2, 3, 4]
    assert summary["test_accuracy"] >= 0.85
    with pytest.raises(ConfigError, match="already finished"):
        run_experiment(None, run_dir, resume=True)  # a finished run is not trained again
