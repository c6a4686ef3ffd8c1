"""The benchmark tasks, all offline: the CNN on digits, an MLP on a bundled tabular set, a generated image task.

- `digits`: scikit-learn's 8x8 digits (the default run's data), CNN.
- `tabular`: scikit-learn's breast-cancer set (569 rows, 30 numeric features) written as a CSV with text
  labels, the shape of data a new user brings; MLP.
- `shapes`: 16x16 grayscale images of 8 shapes (disc, ring, square, frame, cross, plus, two bars) at random
  positions and sizes under heavy pixel noise, made here; CNN. Chance is 0.125.

`anchors` fits scikit-learn baselines on the very split hybridtrain trains on (same seed, same fractions),
so a reader sees where the network stands.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

TASKS = ("digits", "tabular", "shapes")


def make_tabular(path: Path) -> Path:
    from sklearn.datasets import load_breast_cancer

    bunch = load_breast_cancer()
    names = [name.replace(" ", "_") for name in bunch.feature_names]
    labels = np.asarray(bunch.target_names)[bunch.target]
    lines = [",".join([*names, "label"])]
    lines += [",".join([*(f"{value:.6g}" for value in row), label]) for row, label in zip(bunch.data, labels)]
    path.write_text("\n".join(lines) + "\n")
    return path


def _shape(kind: int, size: int, radius: float, cy: float, cx: float) -> np.ndarray:
    y, x = np.mgrid[0:size, 0:size].astype(np.float32)
    dy, dx = y - cy, x - cx
    distance = np.sqrt(dy**2 + dx**2)
    box = np.maximum(np.abs(dy), np.abs(dx))
    thin = max(radius * 0.35, 1.0)
    masks = [
        distance <= radius,  # disc
        np.abs(distance - radius) <= 0.9,  # ring
        box <= radius,  # square
        np.abs(box - radius) <= 0.9,  # frame
        (np.abs(np.abs(dy) - np.abs(dx)) <= 0.9) & (box <= radius),  # cross (x)
        ((np.abs(dy) <= thin / 2) | (np.abs(dx) <= thin / 2)) & (box <= radius),  # plus
        (np.abs(dy) <= thin / 2) & (np.abs(dx) <= radius),  # horizontal bar
        (np.abs(dx) <= thin / 2) & (np.abs(dy) <= radius),  # vertical bar
    ]
    return masks[kind].astype(np.float32)


def make_shapes(path: Path, *, samples: int = 2400, size: int = 16, noise: float = 0.9, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    y = np.arange(samples) % 8
    rng.shuffle(y)
    x = np.empty((samples, 1, size, size), dtype=np.float32)
    for index, kind in enumerate(y):
        radius = rng.uniform(2.5, 5.0)
        cy, cx = rng.uniform(radius, size - 1 - radius, size=2)
        x[index, 0] = _shape(int(kind), size, radius, cy, cx) * rng.uniform(0.6, 1.0) + rng.normal(0.0, noise, (size, size))
    np.savez(path, x=x, y=y.astype(np.int64))
    return path


def task_overrides(task: str, folder: Path) -> list[str]:
    """`--set` overrides that point a run at `task` (its data file is made in `folder` if missing)."""
    folder.mkdir(parents=True, exist_ok=True)
    if task == "digits":
        return []
    if task == "tabular":
        path = folder / "breast_cancer.csv"
        if not path.is_file():
            make_tabular(path)
        return [f"data.path={path}", "model.kind=mlp"]
    if task == "shapes":
        path = folder / "shapes.npz"
        if not path.is_file():
            make_shapes(path)
        return [f"data.path={path}", "model.kind=cnn2d"]
    raise ValueError(f"task must be one of {TASKS}, got {task!r}")


def anchors(task: str, folder: Path, *, seed: int = 0, val_fraction: float = 0.1, test_fraction: float = 0.1) -> dict[str, float]:
    """Test accuracy of scikit-learn baselines on hybridtrain's own split of `task`."""
    from sklearn.ensemble import HistGradientBoostingClassifier
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    from workers.config import DataConfig
    from workers.data import load_dataset, stratified_split

    overrides = dict(item.split("=", 1) for item in task_overrides(task, folder))
    dataset = load_dataset(DataConfig(path=overrides.get("data.path"), seed=seed, val_fraction=val_fraction, test_fraction=test_fraction))
    split = stratified_split(dataset.y, val_fraction=val_fraction, test_fraction=test_fraction, seed=seed)
    flat = dataset.x.reshape(len(dataset.x), -1)
    train = np.concatenate([split.train])  # the network's validation split only chooses epochs: baselines fit on train alone
    results = {}
    for name, model in (("logistic regression", make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000))),
                        ("gradient boosting", HistGradientBoostingClassifier(random_state=seed))):
        model.fit(flat[train], dataset.y[train])
        results[name] = float((model.predict(flat[split.test]) == dataset.y[split.test]).mean())
    return results
