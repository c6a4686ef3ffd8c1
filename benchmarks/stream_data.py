"""Image data sets of a chosen size for streaming, made here (no download): `stripes` draws 128x128 RGB images of
four classes (horizontal, vertical and the two diagonal stripes, at a random period, phase and pair of colours, drawn
at a quarter of the size and enlarged),
JPEG-encoded, into Parquet files of `rows_per_file` rows (row groups of 500). Each image decodes to 192 KiB of
float32, so 22,000 of them are 4 GiB in memory and about 190 MB on disk.

    python benchmarks/stream_data.py DIR --images 22000
"""

from __future__ import annotations

import argparse
import io
import time
from pathlib import Path

import numpy as np

CLASSES = ("horizontal", "vertical", "diagonal", "antidiagonal")
SIZE = 128


def stripes(count: int, rng: np.random.Generator, size: int = SIZE) -> tuple[np.ndarray, np.ndarray]:
    """uint8 images (count, size, size, 3) and their class indices."""
    labels = rng.integers(0, len(CLASSES), count)
    coarse = size // 4  # drawn at a quarter of the size, then each pixel repeated 4x4 (16x cheaper to make)
    y, x = np.mgrid[0:coarse, 0:coarse].astype(np.float32)
    coordinates = np.stack([y, x, (x + y) / np.sqrt(2), (x - y) / np.sqrt(2)])[labels]  # (count, coarse, coarse)
    period = rng.uniform(3, 8, (count, 1, 1)).astype(np.float32)
    phase = rng.uniform(0, 1, (count, 1, 1)).astype(np.float32)
    wave = ((coordinates / period + phase) % 1.0 < 0.5).repeat(4, axis=1).repeat(4, axis=2)[..., None]
    foreground = rng.integers(0, 256, (count, 1, 1, 3), dtype=np.uint8)
    background = rng.integers(0, 256, (count, 1, 1, 3), dtype=np.uint8)
    return np.where(wave, foreground, background), labels


def make_stripes(folder: Path, images: int, *, seed: int = 0, rows_per_file: int = 2000, size: int = SIZE) -> dict:
    """Write `images` images as `folder/part-NNNN.parquet` (columns image: JPEG bytes, label: class name)."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from PIL import Image

    started, rng = time.perf_counter(), np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for part, first in enumerate(range(0, images, rows_per_file)):
        pixels, labels = stripes(min(rows_per_file, images - first), rng, size)
        encoded = []
        for image in pixels:
            buffer = io.BytesIO()
            Image.fromarray(image).save(buffer, format="JPEG", quality=90)
            encoded.append(buffer.getvalue())
        table = pa.table({"image": pa.array(encoded, type=pa.binary()), "label": [CLASSES[label] for label in labels]})
        pq.write_table(table, folder / f"part-{part:04d}.parquet", row_group_size=500)
    on_disk = sum(path.stat().st_size for path in folder.glob("*.parquet"))
    return {"images": images, "size": size, "decoded_bytes": images * 3 * size * size * 4, "bytes_on_disk": on_disk,
            "seconds": round(time.perf_counter() - started, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folder", type=Path)
    parser.add_argument("--images", type=int, default=22_000)
    args = parser.parse_args()
    print(make_stripes(args.folder, args.images))


if __name__ == "__main__":
    main()
