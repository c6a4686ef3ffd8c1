"""Data: loaders, the stratified split, train-only normalisation and exact sharding."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from workers.config import DataConfig
from workers.data import DataError, Normalizer, load_dataset, load_digits, shard_batches, steps_per_epoch, stratified_split


def test_split_is_stratified_disjoint_and_seeded() -> None:
    labels = load_digits().y
    split = stratified_split(labels, val_fraction=0.1, test_fraction=0.1, seed=0)
    parts = [split.train, split.val, split.test]
    assert sum(len(p) for p in parts) == len(labels)
    assert len(np.unique(np.concatenate(parts))) == len(labels)  # disjoint and complete
    assert abs(len(split.train) / len(labels) - 0.8) < 0.01
    overall = np.bincount(labels) / len(labels)
    for part in parts:
        share = np.bincount(labels[part], minlength=len(overall)) / len(part)
        assert np.abs(share - overall).max() < 0.02  # every class in proportion
    again = stratified_split(labels, val_fraction=0.1, test_fraction=0.1, seed=0)
    other = stratified_split(labels, val_fraction=0.1, test_fraction=0.1, seed=1)
    assert np.array_equal(split.test, again.test)
    assert not np.array_equal(split.test, other.test)


def test_split_refuses_tiny_classes() -> None:
    with pytest.raises(DataError, match="at least 3 samples"):
        stratified_split(np.array([0, 0, 0, 0, 1, 1]), val_fraction=0.1, test_fraction=0.1, seed=0)


@settings(max_examples=60, deadline=None)
@given(num_samples=st.integers(1, 500), world_size=st.integers(1, 8), batch_size=st.integers(1, 64), accum=st.integers(1, 4), epoch=st.integers(0, 5))
def test_shards_cover_each_sample_once_with_equal_steps(num_samples, world_size, batch_size, accum, epoch) -> None:
    per_rank = [shard_batches(num_samples, rank=r, world_size=world_size, batch_size=batch_size, epoch=epoch, seed=3, grad_accum_steps=accum) for r in range(world_size)]
    steps = {len(batches) for batches in per_rank}
    assert steps == {steps_per_epoch(num_samples, world_size=world_size, batch_size=batch_size, grad_accum_steps=accum)}
    assert next(iter(steps)) % accum == 0
    seen = np.concatenate([b for batches in per_rank for b in batches])
    assert np.array_equal(np.sort(seen), np.arange(num_samples))
    assert max(len(b) for batches in per_rank for b in batches) <= batch_size


def test_normalizer_uses_train_statistics_only() -> None:
    x = np.concatenate([np.zeros((10, 1, 2, 2)), np.full((10, 1, 2, 2), 100.0)]).astype(np.float32)
    normalizer = Normalizer.fit(x[:10] + np.arange(10)[:, None, None, None])
    assert normalizer.mean.shape == (1, 1, 1)
    assert float(normalizer.mean.squeeze()) == pytest.approx(4.5)
    round_trip = Normalizer.from_dict(normalizer.to_dict())
    assert np.allclose(round_trip(x), normalizer(x))


def test_npz_shapes(tmp_path) -> None:
    rng = np.random.default_rng(0)
    for shape, expected in [((30, 6, 6), (1, 6, 6)), ((30, 3, 6, 6), (3, 6, 6)), ((30, 7), (7,))]:
        path = tmp_path / f"d{len(shape)}.npz"
        np.savez(path, x=rng.normal(size=shape), y=np.arange(30) % 3)
        dataset = load_dataset(DataConfig(path=str(path)))
        assert dataset.sample_shape == expected and dataset.classes == ["0", "1", "2"]


@pytest.mark.parametrize(
    ("arrays", "message"),
    [
        ({"x": np.zeros((5, 2))}, "missing array"),
        ({"x": np.zeros((5, 2)), "y": np.zeros(4)}, "5 samples but y has 4"),
        ({"x": np.zeros(5), "y": np.zeros(5)}, "x must be"),
        ({"x": np.full((5, 2), np.nan), "y": np.zeros(5)}, "NaN"),
        ({"x": np.zeros((5, 2)), "y": np.array([0.5, 1, 2, 3, 4])}, "integers"),
    ],
)
def test_npz_errors_name_the_file(tmp_path, arrays, message) -> None:
    path = tmp_path / "bad.npz"
    np.savez(path, **arrays)
    with pytest.raises(DataError, match=message) as error:
        load_dataset(DataConfig(path=str(path)))
    assert str(path) in str(error.value)


def test_csv_loader(tmp_path) -> None:
    path = tmp_path / "t.csv"
    path.write_text("a,b,species\n1,2,cat\n3,4,dog\n5,6,cat\n")
    dataset = load_dataset(DataConfig(path=str(path), label_column="species"))
    assert dataset.x.shape == (3, 2) and dataset.classes == ["cat", "dog"] and list(dataset.y) == [0, 1, 0]
    with pytest.raises(DataError, match="label column 'label' not found"):
        load_dataset(DataConfig(path=str(path)))
    path.write_text("a,b,label\n1,x,0\n")
    with pytest.raises(DataError, match="must be numeric"):
        load_dataset(DataConfig(path=str(path)))


def test_image_folder_loader(tmp_path) -> None:
    from PIL import Image

    for name, value in [("circle", 0), ("square", 255)]:
        (tmp_path / name).mkdir()
        for i in range(3):
            Image.new("RGB", (10, 12), (value, i, 0)).save(tmp_path / name / f"{i}.png")
    dataset = load_dataset(DataConfig(path=str(tmp_path), image_size=8))
    assert dataset.x.shape == (6, 3, 8, 8) and dataset.classes == ["circle", "square"]
    (tmp_path / "square" / "broken.png").write_bytes(b"not an image")
    with pytest.raises(DataError, match="broken.png"):
        load_dataset(DataConfig(path=str(tmp_path)))
