"""Load a run's consolidated model and predict on new samples, without Ray or DeepSpeed."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from orchestration.errors import NotFoundError
from workers.config import ModelConfig
from workers.data import DataError, Normalizer
from workers.models import build_model


def load_model(run_dir: str | Path) -> tuple[torch.nn.Module, dict]:
    run_dir = Path(run_dir)
    weights, meta_file = run_dir / "model.safetensors", run_dir / "model.json"
    for path in (weights, meta_file):
        if not path.is_file():
            raise NotFoundError(f"{path} not found: is {run_dir} a finished run directory?")
    from safetensors.torch import load_file

    meta = json.loads(meta_file.read_text())
    model = build_model(ModelConfig(**meta["model"]), tuple(meta["sample_shape"]), len(meta["classes"]))
    model.load_state_dict(load_file(str(weights)), strict=True)
    model.eval()
    return model, meta


def predict_arrays(model: torch.nn.Module, meta: dict, x: np.ndarray, *, batch_size: int = 1024) -> tuple[np.ndarray, np.ndarray]:
    """Class indices and probabilities for raw samples shaped like the training data."""
    sample_shape = tuple(meta["sample_shape"])
    x = np.asarray(x, dtype=np.float32)
    if x.shape[1:] != sample_shape and x.ndim == 3 and (1, *x.shape[1:]) == sample_shape:
        x = x[:, None]
    if x.shape[1:] != sample_shape:
        raise DataError(f"input samples have shape {x.shape[1:]}, the model expects {sample_shape}")
    x = Normalizer.from_dict(meta["normalizer"])(x)
    probabilities = []
    with torch.no_grad():
        for start in range(0, len(x), batch_size):
            probabilities.append(torch.softmax(model(torch.from_numpy(x[start:start + batch_size])), dim=1).numpy())
    probs = np.concatenate(probabilities) if probabilities else np.zeros((0, len(meta["classes"])), dtype=np.float32)
    return probs.argmax(axis=1), probs


def predict_file(run_dir: str | Path, input_path: str | Path, output_path: str | Path | None = None) -> Path:
    """Predict for `INPUT.npz` (array `x`) and write `predictions.npz` (index, label, probabilities)."""
    input_path = Path(input_path)
    if not input_path.is_file():
        raise DataError(f"{input_path} does not exist")
    try:
        with np.load(input_path, allow_pickle=False) as archive:
            if "x" not in archive.files:
                raise DataError(f"{input_path}: no array 'x' (found {archive.files})")
            x = archive["x"]
            y = archive["y"] if "y" in archive.files else None
    except DataError:
        raise
    except Exception as error:
        raise DataError(f"{input_path}: not a readable .npz file ({error})") from error
    model, meta = load_model(run_dir)
    predicted, probabilities = predict_arrays(model, meta, x)
    output_path = Path(output_path) if output_path else Path(run_dir) / f"predictions-{input_path.stem}.npz"
    labels = np.asarray(meta["classes"])[predicted] if len(predicted) else np.zeros(0, dtype=str)
    np.savez(output_path, prediction=predicted, label=labels, probabilities=probabilities)
    message = f"[hybridtrain] {len(predicted)} predictions -> {output_path}"
    if y is not None and len(y) == len(predicted):
        message += f"  (accuracy against the file's y, read as class names: {float(np.mean(labels == np.asarray(y).astype(str))):.4f})"
    print(message, flush=True)
    return output_path
