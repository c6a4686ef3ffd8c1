"""Datasets, the stratified split, train-only normalisation, and per-worker sharding.

Everything here is NumPy: a whole dataset fits in memory for the models this project trains, and
a plain array keeps sharding exact (each sample once per epoch across all workers).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from orchestration.errors import DataError
from workers.config import DataConfig

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp"}


@dataclass(kw_only=True)
class Dataset:
    """Samples `x` (N, C, H, W) images or (N, F) features, integer labels `y`, and class names."""

    x: np.ndarray
    y: np.ndarray
    classes: list[str]
    source: str

    @property
    def sample_shape(self) -> tuple[int, ...]:
        return tuple(self.x.shape[1:])


@dataclass(kw_only=True)
class Split:
    """Index arrays into a `Dataset`: disjoint, stratified, seeded."""

    train: np.ndarray
    val: np.ndarray
    test: np.ndarray

    @property
    def size(self) -> int:
        return len(self.train) + len(self.val) + len(self.test)


@dataclass(kw_only=True)
class Normalizer:
    """Per-channel (images) or per-feature (tabular) standardisation fitted on the train split only."""

    mean: np.ndarray
    std: np.ndarray

    @classmethod
    def fit(cls, x: np.ndarray) -> Normalizer:
        axes = (0, 2, 3) if x.ndim == 4 else (0,) if x.ndim == 2 else (0, 2)
        mean = x.mean(axis=axes, keepdims=True)[0]
        std = x.std(axis=axes, keepdims=True)[0]
        return cls(mean=mean.astype(np.float32), std=np.maximum(std, 1e-6).astype(np.float32))

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return ((x - self.mean) / self.std).astype(np.float32)

    def to_dict(self) -> dict[str, list]:
        return {"mean": self.mean.tolist(), "std": self.std.tolist()}

    @classmethod
    def from_dict(cls, data: dict[str, list]) -> Normalizer:
        return cls(mean=np.asarray(data["mean"], dtype=np.float32), std=np.asarray(data["std"], dtype=np.float32))


def load_dataset(config: DataConfig) -> Dataset:
    """Load the configured data; raise `DataError` naming the file and the problem."""
    from workers.tables import load_from_loader, load_parquet

    if config.loader is not None:
        dataset = load_from_loader(config)
    elif config.path is None:
        return load_digits()
    else:
        path = Path(config.path).expanduser()
        if not path.exists():
            raise DataError(f"data.path {str(path)!r} does not exist")
        if path.suffix == ".parquet" or (path.is_dir() and any(path.glob("*.parquet"))):
            dataset = load_parquet(path, config)
        elif path.is_dir():
            dataset = load_image_folder(path, image_size=config.image_size, grayscale=config.grayscale)
        elif path.suffix == ".npz":
            dataset = load_npz(path)
        elif path.suffix == ".csv":
            dataset = load_csv(path, label_column=config.label_column)
        else:
            raise DataError(f"data.path {str(path)!r}: unsupported file type {path.suffix!r}; use .npz, .csv, .parquet or a folder of class sub-folders")
    try:  # every class must reach the train, val and test splits; say so here, where the file is known
        stratified_split(dataset.y, val_fraction=config.val_fraction, test_fraction=config.test_fraction, seed=config.seed, classes=dataset.classes)
    except DataError as error:
        raise DataError(f"{dataset.source}: {error}") from error
    return dataset


def load_digits() -> Dataset:
    """scikit-learn's bundled 8x8 digits (1,797 images, 10 classes): no download needed.

    Read from the file scikit-learn ships (`sklearn/datasets/data/digits.csv.gz`, 64 pixels then the label per row),
    as its `load_digits` reads it, without importing scikit-learn: a train worker would spend 0.9 s (3 s on a loaded
    2-core machine) importing it for this file alone. `tests/test_epoch_metrics.py` checks it equals `sklearn.datasets.load_digits`."""
    import gzip
    import importlib.util

    spec = importlib.util.find_spec("sklearn")  # finds the package without running its __init__
    if spec is None or not spec.submodule_search_locations:
        raise DataError("the digits data set comes with scikit-learn, which is not installed (pip install scikit-learn)")
    path = Path(next(iter(spec.submodule_search_locations))) / "datasets" / "data" / "digits.csv.gz"
    with gzip.open(path, mode="rt", encoding="utf-8") as rows:
        table = np.loadtxt(rows, delimiter=",")
    x = (table[:, :-1].reshape(-1, 8, 8) / 16.0).astype(np.float32)[:, None, :, :]
    return Dataset(x=x, y=table[:, -1].astype(np.int64), classes=[str(c) for c in range(10)], source="sklearn:digits")


def _check_not_empty(path: Path) -> None:
    if path.is_file() and path.stat().st_size == 0:
        raise DataError(f"{path}: the file is empty (0 bytes)")


def _labels_to_indices(labels: np.ndarray, path: Path) -> tuple[np.ndarray, list[str]]:
    if labels.ndim != 1:
        raise DataError(f"{path}: labels must be one-dimensional, got shape {labels.shape}")
    if np.issubdtype(labels.dtype, np.floating):
        if not np.all(np.isfinite(labels)):
            raise DataError(f"{path}: labels contain NaN or infinite values ({int((~np.isfinite(labels)).sum())} of {len(labels)})")
        if not np.all(labels == np.round(labels)):
            raise DataError(f"{path}: labels must be integers (or class names), found non-integer values")
        labels = labels.astype(np.int64)
    classes, indices = np.unique(labels, return_inverse=True)
    return indices.astype(np.int64), [str(c) for c in classes]


def load_npz(path: Path) -> Dataset:
    """A `.npz` with `x` (N×H×W, N×C×H×W or N×F) and integer labels `y` (N,)."""
    _check_not_empty(path)
    try:
        loaded = np.load(path, allow_pickle=False)
    except Exception as error:  # zipfile/pickle/format errors all mean the same thing to a user
        raise DataError(f"{path}: not a readable .npz file, truncated or not written by numpy.savez ({error})") from error
    if not hasattr(loaded, "files"):  # np.load read a bare .npy array
        raise DataError(f"{path}: not a readable .npz file: it holds a single array (.npy format), not an archive with x and y")
    try:
        with loaded as archive:
            missing = {"x", "y"} - set(archive.files)
            if missing:
                raise DataError(f"{path}: missing array(s) {sorted(missing)}; found {sorted(archive.files)}")
            x, y = archive["x"], archive["y"]
    except DataError:
        raise
    except Exception as error:  # zipfile/pickle/format errors all mean the same thing to a user
        raise DataError(f"{path}: not a readable .npz file, truncated or corrupt ({error})") from error
    if x.ndim not in (2, 3, 4):
        raise DataError(f"{path}: x must be N×F, N×H×W or N×C×H×W, got shape {x.shape}")
    if y.ndim != 1:
        raise DataError(f"{path}: labels y must be one-dimensional (N,), got shape {y.shape}")
    if len(x) == 0:
        raise DataError(f"{path}: no samples (x has shape {x.shape})")
    if 0 in x.shape[1:]:
        raise DataError(f"{path}: x has shape {x.shape}: each sample is empty")
    if len(x) != len(y):
        raise DataError(f"{path}: x has {len(x)} samples but y has {len(y)}")
    if not np.issubdtype(x.dtype, np.number):
        raise DataError(f"{path}: x must be numeric, got dtype {x.dtype}")
    x = x.astype(np.float32)
    bad = ~np.isfinite(x).reshape(len(x), -1).all(axis=1)
    if bad.any():
        raise DataError(f"{path}: x contains NaN or infinite values ({int(bad.sum())} of {len(x)} samples, the first is sample {int(np.argmax(bad))})")
    if x.ndim == 3:
        x = x[:, None, :, :]
    indices, classes = _labels_to_indices(np.asarray(y), path)
    return Dataset(x=x, y=indices, classes=classes, source=str(path))


def load_csv(path: Path, *, label_column: str) -> Dataset:
    """A CSV with one label column and numeric feature columns (read with pandas)."""
    import pandas as pd

    _check_not_empty(path)
    try:
        frame = pd.read_csv(path)
    except pd.errors.EmptyDataError as error:
        raise DataError(f"{path}: the file is empty (no header row, no data)") from error
    except Exception as error:
        raise DataError(f"{path}: not a readable CSV file ({error})") from error
    if label_column not in frame.columns:
        raise DataError(f"{path}: label column {label_column!r} not found; columns are {list(frame.columns)} (set data.label_column)")
    if len(frame) == 0:
        raise DataError(f"{path}: no data rows, only a header ({list(frame.columns)})")
    missing_labels = frame[label_column].isna().to_numpy()
    if missing_labels.any():
        raise DataError(f"{path}: label column {label_column!r} is empty in {int(missing_labels.sum())} row(s), the first is data row {int(np.argmax(missing_labels)) + 1}")
    features = frame.drop(columns=[label_column])
    non_numeric = [c for c in features.columns if not pd.api.types.is_numeric_dtype(features[c])]
    if non_numeric:
        raise DataError(f"{path}: feature columns must be numeric, these are not: {non_numeric}")
    if features.shape[1] == 0:
        raise DataError(f"{path}: no feature columns besides {label_column!r}")
    x = features.to_numpy(dtype=np.float32)
    bad = ~np.isfinite(x)
    if bad.any():
        row, column = (int(i) for i in np.argwhere(bad)[0])
        raise DataError(f"{path}: features contain missing or infinite values ({int(bad.any(axis=1).sum())} row(s); the first is "
                        f"column {features.columns[column]!r} in data row {row + 1})")
    indices, classes = _labels_to_indices(frame[label_column].to_numpy(), path)
    return Dataset(x=x, y=indices, classes=classes, source=str(path))


def load_image_folder(path: Path, *, image_size: int | None, grayscale: bool) -> Dataset:
    """A folder with one sub-folder per class, each holding image files."""
    from PIL import Image, UnidentifiedImageError

    class_dirs = sorted(p for p in path.iterdir() if p.is_dir())
    if len(class_dirs) < 2:
        raise DataError(f"{path}: expected one sub-folder per class (at least 2), found {len(class_dirs)}")
    mode = "L" if grayscale else "RGB"
    images: list[np.ndarray] = []
    labels: list[int] = []
    size: tuple[int, int] | None = (image_size, image_size) if image_size else None
    for label, class_dir in enumerate(class_dirs):
        files = sorted(p for p in class_dir.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise DataError(f"{class_dir}: class folder holds no image files ({sorted(IMAGE_SUFFIXES)})")
        for file in files:
            try:
                with Image.open(file) as image:
                    image = image.convert(mode)
                    size = size or image.size
                    if image.size != size:
                        image = image.resize(size)
                    array = np.asarray(image, dtype=np.float32) / 255.0
            except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as error:
                raise DataError(f"{file}: not a readable image ({error})") from error
            images.append(array[None] if array.ndim == 2 else array.transpose(2, 0, 1))
            labels.append(label)
    return Dataset(x=np.stack(images), y=np.asarray(labels, dtype=np.int64), classes=[p.name for p in class_dirs], source=str(path))


def _describe_classes(counts: np.ndarray, which: np.ndarray, names: list[str]) -> str:
    """`class 'dog' (2 samples)` or `classes 'dog' (2 samples), 'cow' (1 sample)`, smallest first."""
    order = sorted(which.tolist(), key=lambda c: (counts[c], c))
    listed = ", ".join(f"{names[c]!r} ({counts[c]} sample{'' if counts[c] == 1 else 's'})" for c in order[:5])
    return ("class " if len(order) == 1 else "classes ") + listed + (f" and {len(order) - 5} more" if len(order) > 5 else "")


def _enough_per_class(val_fraction: float, test_fraction: float) -> int:
    """The fewest samples a class needs to be sure of landing in all three splits (rounding down at each cut)."""
    holdout = val_fraction + test_fraction
    for n in range(3, 10_000):
        rest = math.floor(n * holdout + 1e-9)
        if (math.floor(n * (1 - holdout) + 1e-9) >= 1 and rest >= 2
                and math.floor(rest * val_fraction / holdout + 1e-9) >= 1 and math.floor(rest * test_fraction / holdout + 1e-9) >= 1):
            return n
    return 10_000


def stratified_split(labels: np.ndarray, *, val_fraction: float, test_fraction: float, seed: int, classes: list[str] | None = None) -> Split:
    """Seeded, stratified train/val/test split (80/10/10 by default); every class lands in every split.

    `classes` (label names by index) only make the error messages name a class the way the data does.
    """
    from sklearn.model_selection import train_test_split

    if len(labels) == 0:
        raise DataError("no samples to split")
    counts = np.bincount(labels)
    names = list(classes) if classes is not None and len(classes) >= len(counts) else [str(c) for c in range(len(counts))]
    present = np.flatnonzero(counts)
    if len(present) < 2:
        raise DataError(f"a single class ({names[present[0]]!r}, {counts[present[0]]} samples): classification needs at least 2 classes")
    if counts[present].min() < 3:
        raise DataError(f"too few samples in {_describe_classes(counts, present[counts[present] < 3], names)}: every class needs "
                        f"at least 3 samples to appear in each of the train, val and test splits")
    indices = np.arange(len(labels))
    holdout = val_fraction + test_fraction
    shares = f"{1 - holdout:.0%}/{val_fraction:.0%}/{test_fraction:.0%}"
    enough = _enough_per_class(val_fraction, test_fraction)
    advice = f"give each class at least {enough} samples or change data.val_fraction/data.test_fraction"
    try:
        train, rest = train_test_split(indices, test_size=holdout, stratify=labels, random_state=seed)
        val, test = train_test_split(rest, test_size=test_fraction / holdout, stratify=labels[rest], random_state=seed)
    except ValueError as error:
        small = present[counts[present] < enough]
        if len(small) == 0:  # more classes than one of the splits has samples, not one small class
            raise DataError(f"cannot split {len(labels)} samples of {len(present)} classes stratified into {shares} so that every class "
                            f"appears in every split ({error}); change data.val_fraction/data.test_fraction or add samples") from error
        raise DataError(f"cannot split {len(labels)} samples stratified into {shares} so that every class appears in every split: "
                        f"too few samples in {_describe_classes(counts, small, names)}; {advice}") from error
    for part, chosen in (("train", train), ("val", val), ("test", test)):
        missing = np.setdiff1d(present, labels[chosen])
        if len(missing):
            raise DataError(f"cannot split {len(labels)} samples stratified into {shares}: {_describe_classes(counts, missing, names)} "
                            f"would be missing from the {part} split; {advice}")
    return Split(train=np.sort(train), val=np.sort(val), test=np.sort(test))


def steps_per_epoch(num_samples: int, *, world_size: int, batch_size: int, grad_accum_steps: int = 1) -> int:
    """Optimizer micro-steps each worker takes per epoch: equal on every rank, a multiple of accumulation."""
    per_rank = math.ceil(num_samples / world_size)
    steps = max(1, math.ceil(per_rank / batch_size))
    return math.ceil(steps / grad_accum_steps) * grad_accum_steps


def shard_batches(num_samples: int, *, rank: int, world_size: int, batch_size: int, epoch: int, seed: int, grad_accum_steps: int = 1, shuffle: bool = True) -> list[np.ndarray]:
    """This rank's batches for one epoch.

    All ranks shuffle with the same seeded permutation, take every `world_size`-th index, and cut
    their shard into the same number of batches, so each sample is seen exactly once per epoch and
    every rank takes the same number of steps (a rank with fewer steps would hang the collectives).
    """
    order = np.random.default_rng([seed, epoch]).permutation(num_samples) if shuffle else np.arange(num_samples)
    shard = order[rank::world_size]
    steps = steps_per_epoch(num_samples, world_size=world_size, batch_size=batch_size, grad_accum_steps=grad_accum_steps)
    return [batch for batch in np.array_split(shard, steps)]


def probation_batches(num_samples: int, *, rank: int, world_size: int, batch_size: int, epoch: int, seed: int, micro_steps: int) -> list[np.ndarray]:
    """The batches a probation trains on: a seeded draw of the train split, the same for both branches."""
    order = np.random.default_rng([seed, epoch, 7919]).permutation(num_samples)
    shard = order[rank::world_size]
    batches = [shard[i:i + batch_size] for i in range(0, len(shard), batch_size)]
    return [batches[i % len(batches)] for i in range(micro_steps)]


def stable_seed(*parts: object) -> int:
    """A seed in [0, 2**31) from `parts`, the same in every process and on every machine.

    Python's `hash()` of a string is salted per process (PYTHONHASHSEED), so it must never make seeds.
    """
    import hashlib

    return int.from_bytes(hashlib.sha256(repr(parts).encode()).digest()[:4], "little") % 2**31
