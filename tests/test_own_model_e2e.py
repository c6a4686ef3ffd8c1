"""A user's own network on a user's own Parquet data, end to end: the factory and the data live here, in a
test file, not in the project. Real Ray Train + DeepSpeed workers and the coordinator; a scripted advisor
whose proposal is known to hurt, so it is rejected and rolled back (checked bit for bit); then `predict`
and `export` rebuild the factory's model from the run directory."""

from __future__ import annotations

import io
import json

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image
from torch import nn

from cluster.experiment import build_config
from cluster.export import export_onnx
from cluster.launch import run_experiment
from cluster.predict import predict_file

pytestmark = pytest.mark.e2e

FACTORY = "tests.test_own_model_e2e:small_convnet"


class SmallConvNet(nn.Module):
    """Not one of the built-in kinds: its own layer names, batch norm, a dropout layer."""

    def __init__(self, in_channels: int, num_classes: int, channels: int) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(in_channels, channels, 3, padding=1), nn.BatchNorm2d(channels), nn.ReLU())
        self.body = nn.Sequential(nn.Conv2d(channels, 2 * channels, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(2))
        self.dropout = nn.Dropout(0.1)
        self.fc = nn.Linear(8 * channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.dropout(self.body(self.stem(x)).flatten(1)))


def small_convnet(sample_shape, num_classes, channels=8):
    return SmallConvNet(sample_shape[0], num_classes, channels)


def _digits_parquet(path) -> np.ndarray:
    """scikit-learn's digits as a Parquet table of PNG bytes and string labels; returns the images."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = (digits.images * 255 / 16).astype(np.uint8)
    encoded = []
    for image in images:
        buffer = io.BytesIO()
        Image.fromarray(image, mode="L").save(buffer, format="PNG")
        encoded.append(buffer.getvalue())
    pd.DataFrame({"image": encoded, "label": [f"digit-{d}" for d in digits.target]}).to_parquet(path)
    return images


HURTFUL = {"weights": [{"op": "noise", "group": group, "amount": 10.0} for group in ("stem.0.weight", "body.0.weight", "fc.weight")],
           "reason": "shake everything"}


def test_a_factory_model_on_parquet_is_advised_rolled_back_predicted_and_exported(ray_local, tmp_path) -> None:
    data = tmp_path / "digits.parquet"
    images = _digits_parquet(data)
    script = tmp_path / "script.json"
    script.write_text(json.dumps([HURTFUL]))
    run_dir = tmp_path / "run"
    overrides = [f"data.path={data}", "data.grayscale=true", f"model.factory={FACTORY}", "model.options.channels=6",
                 "train.num_workers=2", "train.epochs=4", "train.early_stopping_patience=0", "train.zero_stage=3",
                 "coordinator.ask_when_healthy=true", "coordinator.query_interval=1", "coordinator.burn_in_epochs=1",
                 "coordinator.probation_steps=4", "coordinator.cache_enabled=false", "coordinator.verify_rollback=true",
                 "coordinator.stability_alpha=1.0", "coordinator.alpha_max=1.0",
                 "advisor.backend=scripted", f"advisor.script={script}"]
    summary = run_experiment(build_config(recipe="smoke", overrides=overrides), run_dir)
    assert summary["proposals_rejected"] >= 1
    assert summary["rollbacks_verified"] == summary["proposals_rejected"]  # full fp32 weights and moments hash back
    assert summary["test_accuracy"] >= 0.6  # 4 epochs of a 6-channel net; chance is 0.1
    meta = json.loads((run_dir / "model.json").read_text())
    assert meta["model"]["factory"] == FACTORY and meta["model"]["options"] == {"channels": 6} and meta["model"]["kind"] == "custom"
    assert meta["classes"][0] == "digit-0"

    samples = tmp_path / "samples.npz"
    np.savez(samples, x=images[:64].astype(np.float32) / 255.0)
    predictions = np.load(predict_file(run_dir, samples))
    assert predictions["probabilities"].shape == (64, 10)
    export = export_onnx(run_dir, check_samples=32)
    assert export.comparison.passed and export.path.is_file()
