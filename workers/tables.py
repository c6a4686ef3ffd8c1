"""Tables of samples: Parquet files and a `data.loader`'s Ray Dataset, as a `workers.data.Dataset`.

A table has a label column (`data.label_column`, default `label`: integers or strings) and either an
`image` column of encoded PNG/JPEG bytes (or Hugging Face's `{"bytes": ..., "path": ...}` structs) or
numeric feature columns. Errors name the file (or the loader), the column and the first bad row.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import numpy as np

from orchestration.errors import DataError
from workers.config import DataConfig

IMAGE_COLUMN = "image"


def load_parquet(path: Path, config: DataConfig):
    """One `.parquet` file or a directory of them (read as one table, files in name order)."""
    import pyarrow.parquet as pq

    if path.is_dir() and not sorted(path.glob("*.parquet")):
        raise DataError(f"{path}: the directory holds no .parquet files")
    try:
        frame = pq.read_table(path).to_pandas()
    except Exception as error:  # ArrowInvalid, OSError: a truncated or foreign file means the same to a user
        raise DataError(f"{path}: not a readable Parquet file or directory ({type(error).__name__}: {error})") from error
    return frame_to_dataset(frame, where=str(path), config=config)


def load_from_loader(config: DataConfig):
    """`data.loader()`: a `ray.data.Dataset` with the same columns as a Parquet table, read into memory."""
    import ray.data

    from workers.references import import_reference

    loader = import_reference(config.loader, "data.loader")
    where = f"data.loader {config.loader!r}"
    try:
        dataset = loader()
    except Exception as error:
        raise DataError(f"{where} raised {type(error).__name__}: {error}") from error
    if not isinstance(dataset, ray.data.Dataset):
        raise DataError(f"{where} returned a {type(dataset).__name__}, not a ray.data.Dataset")
    try:
        frame = dataset.to_pandas()
    except Exception as error:
        raise DataError(f"{where}: its dataset cannot be read ({type(error).__name__}: {error})") from error
    return frame_to_dataset(frame, where=where, config=config)


def frame_to_dataset(frame: Any, *, where: str, config: DataConfig):
    """A pandas frame of one label column and an image column or numeric features -> `Dataset`."""
    from workers.data import Dataset

    label = config.label_column
    if label not in frame.columns:
        raise DataError(f"{where}: label column {label!r} not found; columns are {list(frame.columns)} (set data.label_column)")
    if len(frame) == 0:
        raise DataError(f"{where}: no rows")
    labels, classes = table_labels(frame[label], where=where, column=label)
    if IMAGE_COLUMN in frame.columns:
        x = decode_images(frame[IMAGE_COLUMN], where=where, image_size=config.image_size, grayscale=config.grayscale)
    else:
        x = numeric_features(frame.drop(columns=[label]), where=where, label=label)
    return Dataset(x=x, y=labels, classes=classes, source=where)


def table_labels(series: Any, *, where: str, column: str) -> tuple[np.ndarray, list[str]]:
    """Integer or string labels -> class indices (sorted class names); anything else is a `DataError`."""
    values = series.to_numpy() if hasattr(series, "to_numpy") else np.asarray(series)
    values, _ = checked_labels(values, where=where, column=column)
    classes, indices = np.unique(values, return_inverse=True)
    return indices.astype(np.int64), [str(c) for c in classes]


def checked_labels(values: np.ndarray, *, where: str, column: str, first_row: int = 0) -> tuple[np.ndarray, str]:
    """(the labels as int64 or as str objects, "int" or "str"): integers, whole floats or strings, never empty;
    anything else is a `DataError` naming the first bad row (`first_row` is the first value's row). The same
    rules for tables read whole and for streamed record batches."""
    import pandas as pd

    missing = pd.isna(values)
    if missing.any():
        raise DataError(f"{where}: label column {column!r} is empty in {int(missing.sum())} row(s), the first is row {first_row + int(np.argmax(missing))}")
    if values.dtype.kind in "iu":
        return values.astype(np.int64, copy=False), "int"
    if values.dtype.kind == "f":
        whole = values == np.round(values)
        if not whole.all():
            raise DataError(f"{where}: label column {column!r} holds non-integer numbers (row {first_row + int(np.argmax(~whole))}: "
                            f"{values[np.argmax(~whole)]!r}); labels must be integers or strings")
        return values.astype(np.int64), "int"
    kinds = ["str" if isinstance(value, str) else "int" if isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_)) else None
             for value in values]
    if None in kinds:  # bools among them (numpy's bool is not an integer)
        row = kinds.index(None)
        raise DataError(f"{where}: label column {column!r} must hold integers or strings, found {type(values[row]).__name__} values "
                        f"(row {first_row + row}: {values[row]!r})")
    if len(set(kinds)) > 1:
        raise DataError(f"{where}: label column {column!r} mixes integers and strings")
    return (values.astype(np.int64), "int") if kinds and kinds[0] == "int" else (values, "str")


def numeric_features(features: Any, *, where: str, label: str) -> np.ndarray:
    import pandas as pd

    if features.shape[1] == 0:
        raise DataError(f"{where}: no '{IMAGE_COLUMN}' column and no feature columns besides {label!r}")
    non_numeric = [c for c in features.columns if not pd.api.types.is_numeric_dtype(features[c]) or pd.api.types.is_bool_dtype(features[c])]
    if non_numeric:
        raise DataError(f"{where}: feature columns must be numeric (or give an '{IMAGE_COLUMN}' column of encoded images); these are not: {non_numeric}")
    return finite_features(features.to_numpy(dtype=np.float32), list(features.columns), where=where)


def finite_features(x: np.ndarray, columns: list[str] | tuple[str, ...], *, where: str, first_row: int = 0) -> np.ndarray:
    """`x` (rows by `columns`) when every value is finite, else a `DataError` naming the first bad column and row."""
    bad = ~np.isfinite(x)
    if bad.any():
        row, column = (int(i) for i in np.argwhere(bad)[0])
        raise DataError(f"{where}: features contain missing or infinite values (column {columns[column]!r}, row {first_row + row})")
    return x


def encoded_image(value: Any, *, where: str, row: int) -> bytes | bytearray | memoryview:
    """A row's encoded image bytes (bare, or in Hugging Face's `{"bytes": ..., "path": ...}` struct)."""
    encoded = value.get("bytes") if isinstance(value, dict) else value
    if not isinstance(encoded, (bytes, bytearray, memoryview)) or len(encoded) == 0:
        raise DataError(f"{where}: column '{IMAGE_COLUMN}' row {row} holds {type(encoded).__name__}, not encoded image bytes")
    return encoded


def decode_images(column: Any, *, where: str, image_size: int | None, grayscale: bool, size: tuple[int, int] | None = None) -> np.ndarray:
    """Encoded PNG/JPEG bytes per row -> float32 (N, C, H, W) in [0, 1], every image at `size` (width, height),
    else at `data.image_size` square, else at the first one's size."""
    from PIL import Image

    mode = "L" if grayscale else "RGB"
    size = size or ((image_size, image_size) if image_size else None)
    images = []
    for row, value in enumerate(column):
        encoded = encoded_image(value, where=where, row=row)
        try:
            with Image.open(io.BytesIO(encoded)) as image:
                image = image.convert(mode)
                size = size or image.size
                array = np.asarray(image if image.size == size else image.resize(size), dtype=np.float32) / 255.0
        except Exception as error:  # PIL raises UnidentifiedImageError, OSError, SyntaxError, ValueError for bad bytes
            raise DataError(f"{where}: column '{IMAGE_COLUMN}' row {row} is not a readable image ({type(error).__name__}: {error})") from error
        images.append(array[None] if array.ndim == 2 else array.transpose(2, 0, 1))
    return np.stack(images)
