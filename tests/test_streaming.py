"""Streamed data without Ray (`workers.streaming`, `workers.augment`): the hash split, the driver's scan and its
errors, the rows a stream prepares, which runs stream, and augmentation."""

from __future__ import annotations

import io

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from orchestration.errors import ConfigError, DataError
from workers.augment import augment, check_augmentation
from workers.config import DataConfig
from workers.data import Normalizer
from workers.streaming import (TEST, TRAIN, VAL, ReadRowGroups, first_rows, iter_split, scan, split_codes, wants_streaming)


def _png(value: int, size: int = 8) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.full((size, size, 3), value, dtype=np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def _images(path, rows: int = 600, *, files: int = 2, labels=None):
    rng = np.random.default_rng(0)
    path.mkdir()
    labels = labels if labels is not None else [f"class-{i % 3}" for i in range(rows)]
    # Distinct images (a random grey level and noise), so their hashes differ.
    encoded = []
    for _ in range(rows):
        buffer = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(buffer, format="PNG")
        encoded.append(buffer.getvalue())
    frame = pd.DataFrame({"image": encoded, "label": labels})
    for part in range(files):
        frame.iloc[part::files].to_parquet(path / f"part-{part}.parquet", row_group_size=100)
    return frame


def test_the_hash_split_is_seeded_stable_and_near_its_fractions() -> None:
    keys = [f"row-{i}".encode() for i in range(20_000)]
    codes = split_codes(keys, seed=0, val_fraction=0.1, test_fraction=0.2)
    assert np.array_equal(codes, split_codes(keys, seed=0, val_fraction=0.1, test_fraction=0.2))
    assert not np.array_equal(codes, split_codes(keys, seed=1, val_fraction=0.1, test_fraction=0.2))
    shares = np.bincount(codes, minlength=3) / len(keys)
    assert shares[VAL] == pytest.approx(0.1, abs=0.01) and shares[TEST] == pytest.approx(0.2, abs=0.01)
    assert split_codes([b"same", b"same"], seed=3, val_fraction=0.3, test_fraction=0.3).tolist() in ([0, 0], [1, 1], [2, 2])


def test_the_scan_counts_every_row_once_and_the_stream_rows_match_it(tmp_path) -> None:
    _images(tmp_path / "data")
    config = DataConfig(path=str(tmp_path / "data"), streaming=True, normalize_sample=250, probe_rows=50)
    source = scan(config)
    assert source.classes == ("class-0", "class-1", "class-2") and source.sample_shape == (3, 8, 8) and source.label_kind == "str"
    assert sum(source.counts.values()) == 600 and len(source.row_groups) == 6 and source.probe_rows == 50 and source.normalize_rows == 250
    assert [sum(per_class) for per_class in source.class_counts.values()] == list(source.counts.values())
    # The rows each split streams: the same as the scan counted, and disjoint.
    seen = {name: [chunk for chunk in iter_split(source, code)] for name, code in (("train", TRAIN), ("val", VAL), ("test", TEST))}
    assert {name: sum(len(c["y"]) for c in chunks) for name, chunks in seen.items()} == source.counts
    # The Ray Data task's reading (positions from the scan's codes) gives the same rows as hashing them again.
    read = ReadRowGroups(source.without_codes(), VAL)
    batches = [batch for (file, group), codes in zip(source.row_groups, source.codes)
               for batch in read({"file": [file], "group": [group], "rows": [np.flatnonzero(codes == VAL)]})]
    assert np.array_equal(np.concatenate([b["x"] for b in batches]), np.concatenate([c["x"] for c in seen["val"]]))
    # The statistics are those of the first training rows, as Normalizer.fit would find them.
    sample = first_rows(source, TRAIN, 250, normalize=False)
    expected = Normalizer.fit(sample["x"])
    assert np.allclose(source.normalizer["mean"], expected.mean, atol=1e-5) and np.allclose(source.normalizer["std"], expected.std, atol=1e-5)


def test_integer_labels_and_numeric_features_stream_too(tmp_path) -> None:
    rng = np.random.default_rng(1)
    (tmp_path / "t").mkdir()
    frame = pd.DataFrame(rng.normal(size=(300, 5)).astype("float32"), columns=list("abcde")).assign(label=rng.integers(0, 4, 300) * 10)
    frame.to_parquet(tmp_path / "t" / "x.parquet", row_group_size=64)
    source = scan(DataConfig(path=str(tmp_path / "t"), streaming=True))
    assert source.classes == ("0", "10", "20", "30") and source.label_kind == "int" and source.sample_shape == (5,)
    chunk = next(iter_split(source, TRAIN))
    assert chunk["x"].shape[1] == 5 and set(chunk["y"]) <= {0, 1, 2, 3}


@pytest.mark.parametrize("change, message", [
    (lambda f: f.drop(columns=["label"]), "label column 'label' not found"),
    (lambda f: f.assign(label=[1.5] * len(f)), "holds non-integer numbers"),
    (lambda f: f.assign(label=[None] + [1] * (len(f) - 1)), "is empty in 1 row\(s\), the first is row 0"),
    (lambda f: f.assign(image=[b"not an image"] + list(f.image[1:])), "row 0 is not a readable image"),
    (lambda f: f.drop(columns=["image"]).assign(text=["a"] * len(f)), "feature columns must be numeric"),
])
def test_bad_tables_are_named_before_training(tmp_path, change, message) -> None:
    frame = pd.DataFrame({"image": [_png(i) for i in range(60)], "label": [i % 2 for i in range(60)]})
    (tmp_path / "d").mkdir()
    change(frame).to_parquet(tmp_path / "d" / "bad.parquet")
    with pytest.raises(DataError, match=message):
        scan(DataConfig(path=str(tmp_path / "d"), streaming=True))


@pytest.mark.parametrize("labels", [[i % 2 for i in range(60)], [float(i % 2) for i in range(60)], [f"c{i % 2}" for i in range(60)],
                                    [0.5] * 60, [True, False] * 30, [None] + [1] * 59])
def test_a_table_streams_exactly_when_it_loads_whole(tmp_path, labels) -> None:
    """One set of label rules (`workers.tables.checked_labels`): a table is read whole and scanned to stream
    with the same classes, or refused by both with the same message."""
    from workers.tables import load_parquet

    (tmp_path / "d").mkdir()
    pd.DataFrame({"a": np.arange(60.0), "b": np.ones(60), "label": labels}).to_parquet(tmp_path / "d" / "t.parquet")
    config = DataConfig(path=str(tmp_path / "d"), streaming=True)
    outcomes = []
    for read in (lambda: load_parquet(tmp_path / "d", config).classes, lambda: list(scan(config).classes)):
        try:
            outcomes.append(read())
        except DataError as error:
            outcomes.append(str(error).split(": ", 1)[1])
    assert outcomes[0] == outcomes[1]


def test_which_runs_stream(tmp_path) -> None:
    _images(tmp_path / "data", rows=60)
    path = str(tmp_path / "data")
    assert wants_streaming(DataConfig(path=path, streaming=True))
    assert not wants_streaming(DataConfig(path=path))  # auto: far below 256 MB
    assert wants_streaming(DataConfig(path=path, streaming="auto", streaming_threshold_mb=0.001))
    assert not wants_streaming(DataConfig(path=path, streaming=False, streaming_threshold_mb=0))
    assert not wants_streaming(DataConfig())  # the bundled digits
    with pytest.raises(ConfigError, match="needs a Parquet data.path"):
        wants_streaming(DataConfig(streaming=True))
    with pytest.raises(ConfigError, match="must be true, false or auto"):
        DataConfig(streaming="yes")


def test_augmentation_crops_and_flips_per_sample_from_the_seed() -> None:
    config = DataConfig(random_crop_padding=2, random_flip=True)
    x = torch.arange(4 * 3 * 6 * 6, dtype=torch.float32).reshape(4, 3, 6, 6)
    torch.manual_seed(0)
    first = augment(x, config)
    torch.manual_seed(0)
    assert torch.equal(first, augment(x, config)) and first.shape == x.shape and not torch.equal(first, x)
    assert torch.equal(augment(x, DataConfig()), x)
    flipped = augment(x, DataConfig(random_flip=True))
    for image, original in zip(flipped, x):  # each image is itself or its mirror
        assert torch.equal(image, original) or torch.equal(image, original.flip(-1))
    with pytest.raises(ConfigError, match="augment images"):
        check_augmentation(config, (64,))


def test_a_streamed_run_without_a_cpu_for_ray_data_is_refused_before_it_hangs() -> None:
    from cluster.experiment import build_config
    from cluster.launch import check_stream_cpus
    from cluster.runtime import ClusterInfo

    config = build_config(overrides=["train.num_workers=2"])
    cluster = ClusterInfo(address="local", embedded=True, dashboard_url=None, num_cpus=2, num_gpus=0)
    with pytest.raises(ConfigError, match="needs 1 CPU beyond the 2 the train workers hold"):
        check_stream_cpus(config, cluster)
    check_stream_cpus(config, ClusterInfo(address="local", embedded=True, dashboard_url=None, num_cpus=3, num_gpus=0))
