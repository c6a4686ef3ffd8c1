"""Parquet tables and data.loader datasets: what loads, and an error naming the thing for what does not."""

from __future__ import annotations

import io

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from orchestration.errors import ConfigError, DataError
from orchestration.settings import build_section
from workers.config import DataConfig
from workers.data import load_dataset

HERE = "tests.test_tables"


def png(value: int, size: int = 6) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.full((size, size, 3), value, dtype=np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def image_frame(rows: int = 30) -> pd.DataFrame:
    labels = [["cat", "dog", "cow"][i % 3] for i in range(rows)]
    return pd.DataFrame({"image": [png(40 * (i % 3)) for i in range(rows)], "label": labels})


def test_a_parquet_of_encoded_images_loads_as_images(tmp_path) -> None:
    image_frame().to_parquet(tmp_path / "images.parquet")
    dataset = load_dataset(DataConfig(path=str(tmp_path / "images.parquet")))
    assert dataset.x.shape == (30, 3, 6, 6) and dataset.x.dtype == np.float32
    assert dataset.classes == ["cat", "cow", "dog"]
    cow = dataset.x[dataset.y == 1]
    assert np.allclose(cow, 80 / 255)  # row 2 of every 3 is a cow of value 80


def test_a_directory_of_parquet_files_is_one_table_and_hf_image_structs_load(tmp_path) -> None:
    frame = image_frame()
    frame["image"] = [{"bytes": value, "path": None} for value in frame["image"]]
    frame.iloc[:15].to_parquet(tmp_path / "part-0.parquet")
    frame.iloc[15:].to_parquet(tmp_path / "part-1.parquet")
    dataset = load_dataset(DataConfig(path=str(tmp_path), grayscale=True, image_size=4))
    assert dataset.x.shape == (30, 1, 4, 4)


def test_numeric_feature_columns_load_as_features_with_integer_labels(tmp_path) -> None:
    rng = np.random.default_rng(0)
    frame = pd.DataFrame(rng.normal(size=(40, 3)), columns=["a", "b", "c"]).assign(target=np.arange(40) % 2)
    frame.to_parquet(tmp_path / "table.parquet")
    dataset = load_dataset(DataConfig(path=str(tmp_path / "table.parquet"), label_column="target"))
    assert dataset.x.shape == (40, 3) and dataset.classes == ["0", "1"]
    assert np.allclose(dataset.x, frame[["a", "b", "c"]].to_numpy(dtype=np.float32))


@pytest.mark.parametrize(("change", "problem"), [
    (lambda f: f.drop(columns=["label"]), "label column 'label' not found; columns are \\['image'\\]"),
    (lambda f: f.assign(label=np.arange(len(f)) + 0.5), "non-integer numbers"),
    (lambda f: f.assign(label=[[1]] * len(f)), "must hold integers or strings, found ndarray"),
    (lambda f: f.assign(label=[None] + ["cat"] * (len(f) - 1)), "is empty in 1 row"),
    (lambda f: f.assign(image=[b"not an image"] + list(f["image"][1:])), "column 'image' row 0 is not a readable image"),
    (lambda f: f.assign(image=[None] + list(f["image"][1:])), "row 0 holds NoneType, not encoded image bytes"),
    (lambda f: f.drop(columns=["image"]).assign(note="x"), "feature columns must be numeric"),
])
def test_bad_tables_fail_naming_the_file_and_the_problem(tmp_path, change, problem) -> None:
    path = tmp_path / "bad.parquet"
    change(image_frame()).to_parquet(path)
    with pytest.raises(DataError, match=problem) as caught:
        load_dataset(DataConfig(path=str(path)))
    assert str(path) in str(caught.value)


def test_a_truncated_parquet_file_is_a_data_error(tmp_path) -> None:
    path = tmp_path / "cut.parquet"
    image_frame().to_parquet(path)
    path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(DataError, match="not a readable Parquet file"):
        load_dataset(DataConfig(path=str(path)))


def returns_a_list():
    return [1, 2, 3]


def returns_a_ray_dataset():
    import ray.data

    return ray.data.from_pandas(image_frame())


def test_a_loader_that_returns_the_wrong_type_is_a_data_error() -> None:
    with pytest.raises(DataError, match=f"data.loader '{HERE}:returns_a_list' returned a list, not a ray.data.Dataset"):
        load_dataset(DataConfig(loader=f"{HERE}:returns_a_list"))


def test_loader_config_is_checked(tmp_path) -> None:
    with pytest.raises(ConfigError, match="data.loader"):
        build_section(DataConfig, {"loader": "nope"}, "data")
    with pytest.raises(ConfigError, match="replaces data.path"):
        build_section(DataConfig, {"loader": f"{HERE}:returns_a_list", "path": "x.npz"}, "data")


@pytest.mark.e2e
def test_a_loader_returning_a_ray_dataset_loads(ray_local) -> None:
    dataset = load_dataset(DataConfig(loader=f"{HERE}:returns_a_ray_dataset"))
    assert dataset.x.shape == (30, 3, 6, 6) and dataset.classes == ["cat", "cow", "dog"]
