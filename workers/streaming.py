"""Parquet data streamed through Ray Data: no process ever holds the whole data set.

A streamed run (`data.streaming`: true, or auto when the Parquet files on disk take more than
`data.streaming_threshold_mb`) never loads its table. The driver scans it once, in record batches of
the label and the key columns (`scan`): the classes, each split's size, every image's header, and the
normalisation statistics of the first `data.normalize_sample` training rows. What it found travels to
the workers as a `StreamSource`; the data itself as four lazy Ray Datasets (`stream_datasets`), each
a `read_parquet` with one `prepare_rows` map that keeps its split's rows, decodes and normalises them:

- `train`: split across the workers by Ray Train (`streaming_split(equal=True)`: every worker gets the same
  number of rows, up to `num_workers - 1` rows a epoch are dropped to make them equal); each worker
  iterates its shard with `iter_torch_batches` and a local shuffle buffer (`data.shuffle_buffer` rows,
  seeded per epoch and rank), over the files in a seeded order that changes each epoch. Each training row
  is seen once per epoch across the workers, but for those dropped rows.
- `val` and `test`: not split; every worker streams them whole, in order, and evaluates every
  `num_workers`-th batch (the same batches on every attempt, so per-sample comparisons line up). A worker
  keeps its part of val in memory after the first pass when that part decodes to at most
  `data.val_in_memory_mb` (validation runs every epoch and in every probation); otherwise it streams each time.
- `probe`: the first `data.probe_rows` training rows, held in memory on every worker: a probation's fixed
  batches and the LR range test draw from it, so a proposal is judged on the same samples as before.

The split is a seeded hash of each row's content (the encoded image's bytes, or the feature values as
float64): the same on every machine and every read, without counting anything first. It is stratified only
in expectation: each class's rows fall into train/val/test with the configured fractions independently, so
on a class of n rows the val share varies by about sqrt(f(1-f)/n). Two rows with identical content always
land in the same split (no duplicate leaks from train into test).
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from orchestration.errors import ConfigError, DataError
from workers.config import DataConfig

TRAIN, VAL, TEST = 0, 1, 2
SPLITS = {"train": TRAIN, "val": VAL, "test": TEST}
IMAGE_COLUMN = "image"
SCAN_BATCH_ROWS = 2048  # rows per record batch of the driver's scan (only labels and keys are kept) and of a streamed block
BLOCK_BYTES = 16 * 2**20  # a streamed block (one record batch read, decoded) holds about this many bytes of samples
HELD_BYTES = 64 * 2**20  # the probe rows and a worker's shuffle buffer are capped to this many decoded bytes each
LARGE_ROW_GROUP_BYTES = 256 * 2**20  # a row group above this (uncompressed) is read whole into one Ray Data task's memory
PARQUET_SUFFIX = ".parquet"


@dataclass(frozen=True, kw_only=True)
class StreamSource:
    """What the driver's scan found; every worker builds the same decoding from it."""

    path: str  # absolute: a .parquet file or a directory of them
    files: tuple[str, ...]  # in name order
    row_groups: tuple[tuple[str, int], ...] = ()  # (file, row group) in order: the unit Ray Data's tasks read
    # Driver only (`without_codes` for what travels): each row group's split code per row, so the streams do not hash again.
    codes: tuple[np.ndarray, ...] = ()
    label_column: str
    image: bool  # an `image` column of encoded images; else `feature_columns`
    feature_columns: tuple[str, ...]
    classes: tuple[str, ...]
    label_kind: str  # "int" or "str": how the label column's values map onto `classes`
    sample_shape: tuple[int, ...]
    grayscale: bool
    counts: dict[str, int]  # rows per split
    class_counts: dict[str, list[int]]  # per split, rows per class
    normalizer: dict[str, list]  # `workers.data.Normalizer.to_dict()` of the first `normalize_sample` training rows
    normalize_rows: int
    probe_rows: int
    bytes_on_disk: int
    seed: int
    val_fraction: float
    test_fraction: float
    scan_s: float = 0.0
    notes: tuple[str, ...] = field(default_factory=tuple)

    @property
    def source(self) -> str:
        return f"{self.path} (streamed)"

    def without_codes(self) -> StreamSource:
        """What workers and Ray Data's tasks get: the codes stay on the driver (one byte per row)."""
        return dataclasses.replace(self, codes=())

    @property
    def read_columns(self) -> list[str]:
        return [self.label_column, IMAGE_COLUMN] if self.image else [self.label_column, *self.feature_columns]

    def summary(self) -> dict[str, Any]:
        return {"source": self.source, "sample_shape": list(self.sample_shape), "classes": len(self.classes), **self.counts,
                "streaming": {"files": len(self.files), "bytes_on_disk": self.bytes_on_disk, "normalize_rows": self.normalize_rows,
                              "probe_rows": self.probe_rows, "row_groups": len(self.row_groups), "split": "seeded content hash",
                              "scan_s": round(self.scan_s, 2), "notes": list(self.notes)}}


# --- which runs stream -------------------------------------------------------------------------------


def parquet_files(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    return sorted(entry for entry in path.rglob(f"*{PARQUET_SUFFIX}") if entry.is_file())


def is_parquet(path: Path) -> bool:
    return (path.is_file() and path.suffix == PARQUET_SUFFIX) or (path.is_dir() and bool(parquet_files(path)))


def wants_streaming(config: DataConfig) -> bool:
    """Whether `config` streams: `data.streaming` true, or auto and Parquet larger than the threshold on disk."""
    if config.streaming is False:
        return False
    if config.loader is not None:
        if config.streaming is True:
            raise ConfigError("data.streaming: true streams a Parquet data.path; a data.loader's dataset is read into memory "
                              "(streaming a loader's dataset is not supported yet)")
        return False
    path = Path(config.path).expanduser() if config.path is not None else None
    if path is None or not is_parquet(path):
        if config.streaming is True:
            raise ConfigError(f"data.streaming: true needs a Parquet data.path (a .parquet file or a directory of them), got {config.path!r}")
        return False
    if config.streaming is True:
        return True
    return sum(entry.stat().st_size for entry in parquet_files(path)) > config.streaming_threshold_mb * 2**20


# --- the split and the rows ----------------------------------------------------------------------------


def split_codes(keys: list[bytes], *, seed: int, val_fraction: float, test_fraction: float) -> np.ndarray:
    """TRAIN/VAL/TEST per row from a seeded BLAKE2b hash of its key: uniform in [0, 1), test below
    `test_fraction`, val below `test_fraction + val_fraction`."""
    salt = str(seed).encode()[:64]
    unit = np.fromiter((int.from_bytes(hashlib.blake2b(key, digest_size=8, key=salt).digest(), "little") for key in keys),
                       dtype=np.float64, count=len(keys)) / 2.0**64
    return np.where(unit < test_fraction, TEST, np.where(unit < test_fraction + val_fraction, VAL, TRAIN)).astype(np.int8)


def row_keys(table: Any, source: StreamSource, *, first_row: int = 0) -> list[bytes]:
    """Each row's content as bytes: the encoded image, or the feature values as float64 (`first_row`: the
    table's first row in the data, for errors)."""
    from workers.tables import encoded_image

    if source.image:
        return [bytes(encoded_image(value, where=source.path, row=first_row + offset)) for offset, value in enumerate(table.column(IMAGE_COLUMN).to_pylist())]
    features = np.ascontiguousarray(_features(table, source.feature_columns, where=source.path, first_row=first_row), dtype=np.float64)
    return [row.tobytes() for row in features]


def _features(table: Any, columns: tuple[str, ...], *, where: str, first_row: int = 0) -> np.ndarray:
    from workers.tables import finite_features

    x = np.column_stack([table.column(name).to_numpy(zero_copy_only=False).astype(np.float32) for name in columns]) if len(table) else \
        np.zeros((0, len(columns)), dtype=np.float32)
    return finite_features(x, columns, where=where, first_row=first_row)


def label_indices(values: list[Any], source: StreamSource, *, where: str) -> np.ndarray:
    lookup = {(int(name) if source.label_kind == "int" else name): index for index, name in enumerate(source.classes)}
    try:
        return np.fromiter((lookup[value] for value in values), dtype=np.int64, count=len(values))
    except KeyError as error:
        raise DataError(f"{where}: label {error.args[0]!r} was not in the data when the run scanned it (classes {list(source.classes)}); "
                        "the data changed under the run") from None


def prepare_rows(table: Any, source: StreamSource, split: int, *, normalize: bool = True, keep: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """The rows of `table` (a pyarrow Table of `source.read_columns`) in `split` (or the rows `keep`, positions in
    `table` the scan found in it): {"x": float32 samples, normalised with the run's statistics unless not
    `normalize`, "y": class indices}."""
    from workers.data import Normalizer
    from workers.tables import decode_images

    where = source.path
    if keep is None:
        keep = np.flatnonzero(split_codes(row_keys(table, source), seed=source.seed, val_fraction=source.val_fraction,
                                          test_fraction=source.test_fraction) == split)
    table = table.take(keep)
    y = label_indices(table.column(source.label_column).to_pylist(), source, where=where)
    if source.image:
        x = decode_images(table.column(IMAGE_COLUMN).to_pylist(), where=where, image_size=None, grayscale=source.grayscale,
                          size=(source.sample_shape[2], source.sample_shape[1])) if len(table) else \
            np.zeros((0, *source.sample_shape), dtype=np.float32)
    else:
        x = _features(table, source.feature_columns, where=where)
    if normalize and source.normalizer:
        x = Normalizer.from_dict(source.normalizer)(x)
    return {"x": x.astype(np.float32, copy=False), "y": y}


def _joined(parts: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    return parts[0] if len(parts) == 1 else {name: np.concatenate([part[name] for part in parts]) for name in parts[0]}


class ReadRowGroups:
    """Ray Data's `map_batches` function (pickled to its tasks): for each (file, row group) it is given, that row
    group's rows of one split, read with pyarrow a record batch at a time, decoded and normalised
    (`prepare_rows`), as one output block per record batch. pyarrow reads a row group's column chunks whole: the
    scan warns about row groups above `LARGE_ROW_GROUP_BYTES`."""

    def __init__(self, source: StreamSource, split: int) -> None:
        self.source, self.split = source, split

    def __call__(self, batch: dict[str, np.ndarray]) -> Iterator[dict[str, np.ndarray]]:
        import pyarrow as pa
        import pyarrow.parquet as pq

        rows = block_rows(self.source.sample_shape)
        pending: list[dict[str, np.ndarray]] = []
        for file, group, keep in zip(batch["file"], batch["group"], batch["rows"]):
            reader, start = pq.ParquetFile(str(file)), 0
            keep = np.asarray(keep, dtype=np.int64)
            for record_batch in reader.iter_batches(row_groups=[int(group)], columns=self.source.read_columns, batch_size=rows):
                end = start + record_batch.num_rows
                here = keep[(keep >= start) & (keep < end)] - start
                start = end
                if len(here):
                    pending.append(prepare_rows(pa.Table.from_batches([record_batch]), self.source, self.split, keep=here))
                if sum(len(part["y"]) for part in pending) >= rows:  # blocks of about BLOCK_BYTES, however sparse the split
                    yield _joined(pending)
                    pending = []
        if pending:
            yield _joined(pending)


# --- the driver's scan -------------------------------------------------------------------------------


def scan(config: DataConfig) -> StreamSource:
    """Read the Parquet data once, a record batch at a time, keeping only labels and split codes: the classes,
    each split's size, every image's header, and the normalisation statistics of the first training rows."""
    started = time.perf_counter()
    path = Path(config.path).expanduser().resolve()
    files = parquet_files(path)
    if not files:
        raise DataError(f"{path}: no .parquet files")
    image, features = _columns(path, files, config.label_column)
    probe = StreamSource(path=str(path), files=tuple(str(entry) for entry in files), label_column=config.label_column, image=image,
                         feature_columns=features, classes=(), label_kind="int", sample_shape=(), grayscale=config.grayscale, counts={},
                         class_counts={}, normalizer={}, normalize_rows=0, probe_rows=0, bytes_on_disk=0, seed=config.seed,
                         val_fraction=config.val_fraction, test_fraction=config.test_fraction)
    row_groups, notes = _row_groups(files)
    labels, group_codes, label_kind, sample_shape = _read_labels(probe, row_groups, config)
    sample_shape = sample_shape or (len(features),)
    classes, counts, class_counts = _split_sizes(path, labels, np.concatenate(group_codes), config)
    source = StreamSource(**{**probe.__dict__, "classes": tuple(str(c) for c in classes), "label_kind": label_kind,
                             "sample_shape": sample_shape, "counts": counts, "class_counts": class_counts,
                             "probe_rows": min(config.probe_rows, counts["train"], held_rows(sample_shape)),
                             "bytes_on_disk": sum(entry.stat().st_size for entry in files),
                             "row_groups": tuple(row_groups), "codes": tuple(group_codes), "notes": tuple(notes)})
    normalizer, rows = fit_normalizer(source, config.normalize_sample)
    return StreamSource(**{**source.__dict__, "normalizer": normalizer.to_dict(), "normalize_rows": rows, "scan_s": time.perf_counter() - started})


def _columns(path: Path, files: list[Path], label: str) -> tuple[bool, tuple[str, ...]]:
    """(whether the rows are encoded images, the feature columns of a table) from the first file's schema."""
    import pyarrow.parquet as pq
    import pyarrow.types as patypes

    try:
        schema = pq.read_schema(str(files[0]))
    except Exception as error:  # ArrowInvalid, OSError: a truncated or foreign file
        raise DataError(f"{path}: not readable Parquet ({type(error).__name__}: {error})") from error
    if label not in schema.names:
        raise DataError(f"{path}: label column {label!r} not found; columns are {schema.names} (set data.label_column)")
    if IMAGE_COLUMN in schema.names:
        return True, ()
    features = tuple(name for name in schema.names if name != label)
    if not features:
        raise DataError(f"{path}: no '{IMAGE_COLUMN}' column and no feature columns besides {label!r}")
    non_numeric = [name for name in features if not (patypes.is_integer(schema.field(name).type) or patypes.is_floating(schema.field(name).type))]
    if non_numeric:
        raise DataError(f"{path}: feature columns must be numeric (or give an '{IMAGE_COLUMN}' column of encoded images); these are not: {non_numeric}")
    return False, features


def _row_groups(files: list[Path]) -> tuple[list[tuple[str, int]], list[str]]:
    """Every (file, row group) in order, and notes on row groups too large to read comfortably in one task."""
    row_groups, notes = [], []
    for entry in files:
        metadata = _metadata(entry)
        for group in range(metadata.num_row_groups):
            row_groups.append((str(entry), group))
            size = metadata.row_group(group).total_byte_size
            if size > LARGE_ROW_GROUP_BYTES and len(notes) < 3:
                notes.append(f"{entry} row group {group} holds {size / 2**20:.0f} MiB uncompressed: each is read whole into one task's memory "
                             "(write smaller row groups, e.g. pyarrow's row_group_size)")
    return row_groups, notes


def _read_labels(probe: StreamSource, row_groups: list[tuple[str, int]], config: DataConfig) -> tuple[list, list[np.ndarray], str, tuple[int, ...] | None]:
    """One pass over the rows: (labels, each row group's split codes, the label kind, the image shape), checking
    labels and image headers on the way."""
    import pyarrow.parquet as pq

    from workers.tables import checked_labels

    where, label = probe.path, probe.label_column
    labels, group_codes, kinds = [], [], set()
    sample_shape: tuple[int, ...] | None = None
    try:
        for file, group in row_groups:
            codes = []
            for batch in pq.ParquetFile(file).iter_batches(row_groups=[group], columns=probe.read_columns, batch_size=SCAN_BATCH_ROWS):
                values, kind = checked_labels(batch.column(label).to_numpy(zero_copy_only=False), where=where, column=label, first_row=len(labels))
                kinds.add(kind)
                if probe.image:
                    shape = _check_headers(batch.column(IMAGE_COLUMN).to_pylist(), where=where, first_row=len(labels), grayscale=config.grayscale,
                                           image_size=config.image_size)
                    sample_shape = sample_shape or shape
                codes.append(split_codes(row_keys(batch, probe, first_row=len(labels)), seed=config.seed, val_fraction=config.val_fraction,
                                         test_fraction=config.test_fraction))
                labels.extend(values.tolist())
            group_codes.append(np.concatenate(codes) if codes else np.zeros(0, dtype=np.int8))
    except DataError:
        raise
    except Exception as error:
        raise DataError(f"{where}: not readable Parquet ({type(error).__name__}: {error})") from error
    if not labels:
        raise DataError(f"{where}: no rows")
    if len(kinds) > 1:
        raise DataError(f"{where}: label column {label!r} mixes integers and strings")
    return labels, group_codes, kinds.pop(), sample_shape


def _split_sizes(path: Path, labels: list, codes: np.ndarray, config: DataConfig) -> tuple[list, dict[str, int], dict[str, list[int]]]:
    """(the sorted classes, each split's size, each split's size per class); refuses an empty split or a class
    without training rows."""
    classes = sorted(set(labels))
    index = {value: position for position, value in enumerate(classes)}
    y = np.fromiter((index[value] for value in labels), dtype=np.int64, count=len(labels))
    class_counts = {name: np.bincount(y[codes == code], minlength=len(classes)).tolist() for name, code in SPLITS.items()}
    counts = {name: int(sum(per_class)) for name, per_class in class_counts.items()}
    for name, count in counts.items():
        if count == 0:
            raise DataError(f"{path}: the {name} split is empty ({len(labels)} rows, data.val_fraction {config.val_fraction}, "
                            f"data.test_fraction {config.test_fraction})")
    missing = [str(classes[i]) for i, count in enumerate(class_counts["train"]) if count == 0]
    if missing:
        raise DataError(f"{path}: classes {missing} have no training rows")
    return classes, counts, class_counts


def fit_normalizer(source: StreamSource, count: int) -> tuple[Any, int]:
    """`workers.data.Normalizer.fit` over the first `count` training rows, from running float64 sums a record
    batch at a time (per channel for images, per feature for tables); the rows are never held together."""
    from workers.data import Normalizer

    total = total_squares = None
    seen = values = 0
    for chunk in iter_split(source, TRAIN, normalize=False):
        x = chunk["x"][:count - seen].astype(np.float64)
        axes = (0, 2, 3) if x.ndim == 4 else (0,) if x.ndim == 2 else (0, 2)
        sums, squares = x.sum(axis=axes, keepdims=True)[0], (x * x).sum(axis=axes, keepdims=True)[0]
        total, total_squares = (sums, squares) if total is None else (total + sums, total_squares + squares)
        seen += len(x)
        values += x.size // sums.size
        if seen >= count:
            break
    mean = total / values
    std = np.sqrt(np.maximum(total_squares / values - mean * mean, 0.0))
    return Normalizer(mean=mean.astype(np.float32), std=np.maximum(std, 1e-6).astype(np.float32)), seen


def block_rows(sample_shape: tuple[int, ...]) -> int:
    """Rows per streamed block: about `BLOCK_BYTES` of float32 samples, at most `SCAN_BATCH_ROWS`."""
    return max(1, min(SCAN_BATCH_ROWS, BLOCK_BYTES // (4 * math.prod(sample_shape))))


def held_rows(sample_shape: tuple[int, ...]) -> int:
    """Rows of this shape that fit in `HELD_BYTES` as float32 (at least 1)."""
    return max(1, HELD_BYTES // (4 * math.prod(sample_shape)))


def _row_group_batches(row_groups: list[tuple[str, int]], columns: list[str], batch_size: int = SCAN_BATCH_ROWS) -> Iterator[Any]:
    """Record batches of each row group in turn."""
    import pyarrow.parquet as pq

    for file, group in row_groups:
        yield from pq.ParquetFile(file).iter_batches(row_groups=[group], columns=columns, batch_size=batch_size)


def _metadata(path: Path) -> Any:
    import pyarrow.parquet as pq

    try:
        return pq.ParquetFile(str(path)).metadata
    except Exception as error:
        raise DataError(f"{path}: not a readable Parquet file ({type(error).__name__}: {error})") from error


def first_rows(source: StreamSource, split: int, count: int, *, normalize: bool = True) -> dict[str, np.ndarray]:
    """The first `count` rows of `split` in file order, read a record batch at a time."""
    parts = {"x": [], "y": []}
    for chunk in iter_split(source, split, normalize=normalize):
        taken = min(count - sum(len(part) for part in parts["y"]), len(chunk["y"]))
        parts["x"].append(chunk["x"][:taken])
        parts["y"].append(chunk["y"][:taken])
        if sum(len(part) for part in parts["y"]) >= count:
            break
    return {name: np.concatenate(values) for name, values in parts.items()}


def iter_split(source: StreamSource, split: int, *, normalize: bool = True) -> Iterator[dict[str, np.ndarray]]:
    """`split`'s rows in file order, a record batch at a time, without Ray (audit, export's check, the scan)."""
    import pyarrow as pa

    for batch in _row_group_batches(list(source.row_groups), source.read_columns, block_rows(source.sample_shape)):
        chunk = prepare_rows(pa.Table.from_batches([batch]), source, split, normalize=normalize)
        if len(chunk["y"]):
            yield chunk


def _check_headers(values: list[Any], *, where: str, first_row: int, grayscale: bool, image_size: int | None) -> tuple[int, ...]:
    """Each image's header parses (its pixels are decoded as it streams); the shape samples will have."""
    from PIL import Image

    from workers.tables import encoded_image

    size = None
    for offset, value in enumerate(values):
        encoded = encoded_image(value, where=where, row=first_row + offset)
        try:
            with Image.open(io.BytesIO(encoded)) as opened:
                size = size or opened.size
        except Exception as error:  # UnidentifiedImageError and friends
            raise DataError(f"{where}: column '{IMAGE_COLUMN}' row {first_row + offset} is not a readable image "
                            f"({type(error).__name__}: {error})") from error
    width, height = (image_size, image_size) if image_size else size
    return (1 if grayscale else 3, height, width)


# --- the Ray Datasets (driver) and their shards (workers) ---------------------------------------------


def stream_datasets(source: StreamSource, *, seed: int) -> dict[str, Any]:
    """The lazy Ray Datasets a streamed run hands Ray Train: train (split across workers), val, test, probe.

    Each starts from the list of (file, row group) pairs, one block each, and reads them in Ray Data's tasks
    with pyarrow (`ReadRowGroups`): on a wide table of numeric features this was 8x faster per epoch than
    `read_parquet`, whose per-column work dominated. The training row groups come in a seeded order that
    changes every epoch (every epoch is a new execution)."""
    import ray.data

    travelling = source.without_codes()
    ray.data.DataContext.get_current().enable_progress_bars = False  # the datasets carry the context: no bars in the workers' output

    def read(split: int, *, shuffled: bool = False) -> Any:
        # Only the row groups holding rows of `split`, each with the positions of those rows (the scan's codes).
        items = [{"file": file, "group": group, "rows": np.flatnonzero(codes == split).astype(np.int32)}
                 for (file, group), codes in zip(source.row_groups, source.codes) if (codes == split).any()]
        groups = ray.data.from_items(items, override_num_blocks=len(items))
        if shuffled:
            groups = groups.randomize_block_order(seed=ray.data.RandomSeedConfig(seed=seed, reseed_after_execution=True))
        return groups.map_batches(ReadRowGroups(travelling, split), batch_size=1, batch_format="numpy")

    return {"train": read(TRAIN, shuffled=True), "val": read(VAL), "test": read(TEST), "probe": read(TRAIN).limit(source.probe_rows)}


def data_config() -> Any:
    """Ray Train's DataConfig for `stream_datasets`: only train is split; the others stream whole, in order."""
    import warnings

    from ray.train import DataConfig

    with warnings.catch_warnings():  # Ray 2.60's own defaults set a deprecated field (exclude_resources)
        warnings.filterwarnings("ignore", message=".*exclude_resources.*")
        ordered = DataConfig.default_ingest_options()
        train = DataConfig.default_ingest_options()
    ordered.preserve_order = True
    train.preserve_order = True  # with the seeded row-group order and shuffle buffer, a run repeats its batches
    return DataConfig(datasets_to_split=["train"], execution_options={"train": train, "val": ordered, "test": ordered, "probe": ordered})


@dataclass
class StreamShards:
    """One worker's streams (Ray Train's `get_dataset_shard`) and how many steps each takes."""

    source: StreamSource
    rank: int
    world_size: int
    shuffle_buffer: int
    iterators: dict[str, Any]
    val_in_memory: bool = False  # this rank keeps its val batches after the first pass
    dropped: int = 0  # training rows streamed beyond the steps every rank takes (logged once)
    reported_drop: bool = False

    _val: list[tuple[Any, Any]] | None = None

    @classmethod
    def open(cls, source: StreamSource, *, rank: int, world_size: int, shuffle_buffer: int, val_in_memory_mb: float) -> StreamShards:
        import ray.train

        val_bytes = source.counts["val"] * math.prod(source.sample_shape) * 4 / world_size
        return cls(source=source, rank=rank, world_size=world_size, shuffle_buffer=min(shuffle_buffer, held_rows(source.sample_shape)), val_in_memory=val_bytes <= val_in_memory_mb * 2**20,
                   iterators={name: ray.train.get_dataset_shard(name) for name in (*SPLITS, "probe")})

    def rows_per_rank(self) -> int:
        return self.source.counts["train"] // self.world_size  # streaming_split(equal=True)

    def train_steps(self, batch_size: int, grad_accum_steps: int = 1) -> int:
        steps = max(1, math.ceil(self.rows_per_rank() / batch_size))
        return math.ceil(steps / grad_accum_steps) * grad_accum_steps

    def probe(self) -> dict[str, np.ndarray]:
        """The probe rows (the same on every rank), whole."""
        parts = list(self.iterators["probe"].iter_batches(batch_size=None, batch_format="numpy"))
        x = np.concatenate([part["x"] for part in parts]) if parts else np.zeros((0, *self.source.sample_shape), dtype=np.float32)
        y = np.concatenate([part["y"] for part in parts]) if parts else np.zeros(0, dtype=np.int64)
        return {"x": x.astype(np.float32, copy=False), "y": y.astype(np.int64, copy=False)}

    def train_batches(self, *, epoch: int, seed: int, batch_size: int, steps: int) -> Iterator[tuple[Any, Any]]:
        """Exactly `steps` batches of this rank's shard (empty ones after it runs out; rows past `steps` batches are counted in `dropped`)."""
        import torch

        from workers.data import stable_seed

        stream = self.iterators["train"].iter_torch_batches(batch_size=batch_size, device="cpu", dtypes={"x": torch.float32, "y": torch.int64},
                                                            local_shuffle_buffer_size=min(self.shuffle_buffer, max(self.rows_per_rank(), 1)),
                                                            local_shuffle_seed=stable_seed(seed, epoch, self.rank), prefetch_batches=2)
        given = 0
        for batch in stream:
            if given < steps:
                given += 1
                yield batch["x"], batch["y"]
            else:
                self.dropped += len(batch["y"])
        for _ in range(steps - given):
            yield self.empty()

    def eval_steps(self, which: str, batch_size: int) -> int:
        return math.ceil(math.ceil(self.source.counts[which] / batch_size) / self.world_size)

    def eval_batches(self, which: str, batch_size: int) -> Iterator[tuple[Any, Any]]:
        """Every `world_size`-th batch of `which` (val or test) from this rank's offset, then empty ones up to `eval_steps`."""
        steps = self.eval_steps(which, batch_size)
        if which == "val" and self.val_in_memory:
            if self._val is None:
                self._val = list(self._own_batches(which, batch_size))
            mine = self._val
        else:
            mine = self._own_batches(which, batch_size)
        given = 0
        for batch in mine:
            given += 1
            yield batch
        for _ in range(steps - given):
            yield self.empty()

    def _own_batches(self, which: str, batch_size: int) -> Iterator[tuple[Any, Any]]:
        """This rank's batches as tensors; the other ranks' are skipped before any conversion."""
        import torch

        stream = self.iterators[which].iter_batches(batch_size=batch_size, batch_format="numpy", prefetch_batches=1)
        for index, batch in enumerate(stream):
            if index % self.world_size == self.rank:
                yield torch.from_numpy(np.ascontiguousarray(batch["x"], dtype=np.float32)), torch.from_numpy(batch["y"].astype(np.int64))

    def empty(self) -> tuple[Any, Any]:
        import torch

        return torch.zeros((0, *self.source.sample_shape), dtype=torch.float32), torch.zeros(0, dtype=torch.int64)
