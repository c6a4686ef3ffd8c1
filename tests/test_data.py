"""Data: loaders, the stratified split, train-only normalisation and exact sharding."""

from __future__ import annotations

import re

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from workers.config import DataConfig
from workers.data import (DataError, Normalizer, load_csv, load_dataset, load_digits, load_image_folder, shard_batches, steps_per_epoch,
                          stratified_split)


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
    with pytest.raises(DataError, match=r"class '1' \(2 samples\): every class needs at least 3 samples"):
        stratified_split(np.array([0, 0, 0, 0, 1, 1]), val_fraction=0.1, test_fraction=0.1, seed=0)
    with pytest.raises(DataError, match=r"class 'dog' \(2 samples\)"):
        stratified_split(np.array([0, 0, 0, 0, 1, 1]), val_fraction=0.1, test_fraction=0.1, seed=0, classes=["cat", "dog"])
    # scikit-learn splits these 28 samples without error but leaves 'dog' out of the test split: refused
    with pytest.raises(DataError, match=r"class 'dog' \(5 samples\) would be missing from the test split; give each class at least 10 samples"):
        stratified_split(np.repeat([0, 1], [23, 5]), val_fraction=0.3, test_fraction=0.1, seed=0, classes=["cat", "dog"])


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
    dataset = load_csv(path, label_column="species")  # loads; too small to split, which load_dataset refuses
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
    dataset = load_image_folder(tmp_path, image_size=8, grayscale=False)  # loads; too small to split, which load_dataset refuses
    assert dataset.x.shape == (6, 3, 8, 8) and dataset.classes == ["circle", "square"]
    (tmp_path / "square" / "broken.png").write_bytes(b"not an image")
    with pytest.raises(DataError, match="broken.png"):
        load_dataset(DataConfig(path=str(tmp_path)))


def _npz(tmp_path, name, **arrays):
    path = tmp_path / name
    np.savez(path, **arrays)
    return path


def _truncated_npz(tmp_path):
    path = _npz(tmp_path, "cut.npz", x=np.random.default_rng(0).normal(size=(30, 4)), y=np.arange(30) % 3)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    return path


def _npy_named_npz(tmp_path):
    path = tmp_path / "single.npz"
    with open(path, "wb") as handle:
        np.save(handle, np.zeros((30, 2)))
    return path


def _csv(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text)
    return path


def _rows(label, n=30, feature=lambda i: i):
    return "".join(f"{i},{feature(i)},{label(i)}\n" for i in range(n))


def _images(tmp_path, counts, *, broken=None, truncated=None):
    """An image folder with `counts` images per class; `broken`/`truncated` add one bad .png to that class."""
    from PIL import Image

    root = tmp_path / "images"
    for name, count in counts.items():
        (root / name).mkdir(parents=True)
        for i in range(count):
            Image.new("RGB", (6, 6), (i * 20, 0, 0)).save(root / name / f"{i}.png")
    if broken:
        (root / broken / "text.png").write_text("this is text, not a PNG")
        return root, root / broken / "text.png"
    if truncated:
        bad = root / truncated / "cut.png"
        Image.new("RGB", (64, 64), (1, 2, 3)).save(bad)
        bad.write_bytes(bad.read_bytes()[: bad.stat().st_size // 2])
        return root, bad
    return root, root


Y30 = np.arange(30) % 3
X30 = np.zeros((30, 2))


# Each case makes a bad data file (or folder) and returns (data.path, the path the message must name).
BAD_DATA = {
    # wrong shapes
    "npz x 1-D": (lambda t: _npz(t, "x1.npz", x=np.zeros(30), y=Y30), r"x must be N×F, N×H×W or N×C×H×W, got shape \(30,\)"),
    "npz x 5-D": (lambda t: _npz(t, "x5.npz", x=np.zeros((30, 1, 2, 2, 2)), y=Y30), r"x must be .*got shape \(30, 1, 2, 2, 2\)"),
    "npz x/y length mismatch": (lambda t: _npz(t, "len.npz", x=X30, y=Y30[:29]), "x has 30 samples but y has 29"),
    "npz y 2-D": (lambda t: _npz(t, "y2.npz", x=X30, y=np.zeros((30, 2))), r"labels y must be one-dimensional \(N,\), got shape \(30, 2\)"),
    "npz y 0-D": (lambda t: _npz(t, "y0.npz", x=X30, y=np.int64(1)), r"labels y must be one-dimensional \(N,\), got shape \(\)"),
    "npz no samples": (lambda t: _npz(t, "none.npz", x=np.zeros((0, 2)), y=np.zeros(0)), r"no samples \(x has shape \(0, 2\)\)"),
    # NaN / inf values
    "npz x NaN": (lambda t: _npz(t, "nan.npz", x=np.where(np.arange(60).reshape(30, 2) == 9, np.nan, 0.0), y=Y30),
                  r"x contains NaN or infinite values \(1 of 30 samples, the first is sample 4\)"),
    "npz x inf": (lambda t: _npz(t, "inf.npz", x=np.full((30, 2), np.inf), y=Y30), "x contains NaN or infinite values"),
    "npz y NaN": (lambda t: _npz(t, "ynan.npz", x=X30, y=np.where(Y30 == 2, np.nan, Y30)), r"labels contain NaN or infinite values \(10 of 30\)"),
    "csv NaN feature": (lambda t: _csv(t, "nan.csv", "a,b,label\n" + _rows(lambda i: i % 3, feature=lambda i: "nan" if i == 3 else i)),
                        r"features contain missing or infinite values \(1 row\(s\); the first is column 'b' in data row 4\)"),
    "csv empty feature cell": (lambda t: _csv(t, "hole.csv", "a,b,label\n" + _rows(lambda i: i % 3, feature=lambda i: "" if i == 5 else i)),
                               r"features contain missing or infinite values .*column 'b' in data row 6"),
    "csv inf feature": (lambda t: _csv(t, "inf.csv", "a,b,label\n" + _rows(lambda i: i % 3, feature=lambda i: "inf" if i == 0 else i)),
                        r"features contain missing or infinite values .*column 'b' in data row 1"),
    "csv empty label cell": (lambda t: _csv(t, "nolabel.csv", "a,b,label\n" + _rows(lambda i: "" if i == 7 else ["cat", "dog"][i % 2])),
                             r"label column 'label' is empty in 1 row\(s\), the first is data row 8"),
    # a single class
    "npz single class": (lambda t: _npz(t, "one.npz", x=X30, y=np.zeros(30)), r"a single class \('0', 30 samples\): classification needs at least 2 classes"),
    "csv single class": (lambda t: _csv(t, "one.csv", "a,b,label\n" + _rows(lambda i: "cat")), r"a single class \('cat', 30 samples\)"),
    "image folder single class": (lambda t: _images(t, {"cat": 5}), r"expected one sub-folder per class \(at least 2\), found 1"),
    # a class too small to appear in every split
    "npz class of 1": (lambda t: _npz(t, "tiny1.npz", x=X30, y=np.r_[np.zeros(29), [7]]), r"too few samples in class '7' \(1 sample\): every class needs at least 3 samples"),
    "csv class of 2": (lambda t: _csv(t, "tiny2.csv", "a,b,label\n" + _rows(lambda i: "dog" if i < 2 else "cat")), r"too few samples in class 'dog' \(2 samples\): every class needs at least 3 samples"),
    "image class of 1": (lambda t: _images(t, {"cat": 5, "dog": 1}), r"too few samples in class 'dog' \(1 sample\): every class needs at least 3 samples"),
    "npz class of 5 in 200": (lambda t: _npz(t, "tiny5.npz", x=np.zeros((205, 2)), y=np.r_[np.zeros(200), np.full(5, 3)]),
                              r"cannot split 205 samples stratified into 80%/10%/10% so that every class appears in every split: too few samples in class '3' \(5 samples\); give each class at least 10 samples"),
    # an empty file
    "npz 0 bytes": (lambda t: _csv(t, "empty.npz", ""), r"the file is empty \(0 bytes\)"),
    "csv 0 bytes": (lambda t: _csv(t, "empty.csv", ""), r"the file is empty \(0 bytes\)"),
    "csv blank lines": (lambda t: _csv(t, "blank.csv", "\n\n"), r"the file is empty \(no header row, no data\)"),
    "csv header only": (lambda t: _csv(t, "header.csv", "a,b,label\n"), r"no data rows, only a header \(\['a', 'b', 'label'\]\)"),
    # a truncated or foreign .npz
    "npz truncated": (_truncated_npz, r"not a readable \.npz file, truncated"),
    "npz holding a bare .npy": (_npy_named_npz, r"not a readable \.npz file: it holds a single array"),
    # a CSV without the label column, or otherwise unreadable
    "csv without label column": (lambda t: _csv(t, "nolabelcol.csv", "a,b\n1,2\n3,4\n"), r"label column 'label' not found; columns are \['a', 'b'\]"),
    "csv ragged rows": (lambda t: _csv(t, "ragged.csv", "a,b,label\n1,2,0\n1,2,3,4\n"), r"not a readable CSV file \(.*Expected 3 fields"),
    # an image folder with unreadable files or empty classes
    "image not an image": (lambda t: _images(t, {"cat": 3, "dog": 3}, broken="dog"), r"not a readable image"),
    "image truncated png": (lambda t: _images(t, {"cat": 3, "dog": 3}, truncated="cat"), r"not a readable image"),
    "image empty class folder": (lambda t: (lambda root: (root, root / "dog"))(_images(t, {"cat": 3, "dog": 0})[0]), r"class folder holds no image files"),
}


@pytest.mark.parametrize("kind", list(BAD_DATA))
def test_bad_data_of_every_kind_names_the_file_and_the_problem(tmp_path, kind) -> None:
    make, problem = BAD_DATA[kind]
    made = make(tmp_path)
    data_path, named = made if isinstance(made, tuple) else (made, made)
    with pytest.raises(DataError, match=re.escape(str(named)) + ": " + problem):
        load_dataset(DataConfig(path=str(data_path)))


def test_an_empty_last_batch_keeps_the_epoch_loss_finite() -> None:
    """digits with 2 workers and batch 1: one rank's shard is a sample short, so its last batch is empty."""
    import torch

    from workers.epoch import batch_loss

    batches = shard_batches(1437, rank=1, world_size=2, batch_size=1, epoch=0, seed=0)
    assert len(batches[-1]) == 0
    logits = torch.randn(0, 10, requires_grad=True)
    loss = batch_loss(logits, torch.zeros(0, dtype=torch.long))
    loss.backward()
    assert loss.item() == 0.0 and torch.isfinite(loss)
    full = torch.randn(4, 10)
    target = torch.tensor([1, 2, 3, 4])
    assert torch.allclose(batch_loss(full, target), torch.nn.functional.cross_entropy(full, target))
    weights = torch.tensor([1.0, 2.0, 0.5, 1.0])
    assert torch.allclose(batch_loss(full, target, weights),
                          (weights * torch.nn.functional.cross_entropy(full, target, reduction="none")).mean())
