"""A CIFAR-sized image task the project makes itself (no download): 32x32 RGB, 10 classes, 25,000 images
(20,000 in the train split at the default 80/10/10), written as Parquet and as an image folder.

Each image is one of 10 patterns (disc, ring, square, frame, cross, plus, two bars, stripes, checkerboard)
in a random colour on a random background colour, at a random position and size, under pixel noise and a
random brightness; colour carries no information, so the network must see shape. Chance is 0.10.

    python benchmarks/cifar_like.py make DIR               # DIR/cifar_like.parquet and DIR/cifar_like/<class>/*.png
    python benchmarks/cifar_like.py train DIR --epochs 3   # a ResNet on it (hybridtrain run, advisor off), prints accuracy and samples/s
    python benchmarks/cifar_like.py stream DIR --epochs 2  # the same ResNet on the Parquet, in memory then streamed: samples/s, peak memory
"""

from __future__ import annotations

import argparse
import io
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.tasks import _shape  # noqa: E402

CLASSES = ("disc", "ring", "square", "frame", "cross", "plus", "hbar", "vbar", "stripes", "checker")
SIZE = 32


def _pattern(kind: int, rng: np.random.Generator) -> np.ndarray:
    """A (SIZE, SIZE) mask in [0, 1] for class `kind`."""
    if kind < 8:
        radius = rng.uniform(5.0, 11.0)
        cy, cx = rng.uniform(radius, SIZE - 1 - radius, size=2)
        return _shape(kind, SIZE, radius, cy, cx)
    y, x = np.mgrid[0:SIZE, 0:SIZE]
    period = int(rng.integers(4, 9))
    angle = rng.uniform(0, np.pi)
    if kind == 8:  # stripes at a random angle
        return ((np.cos(angle) * x + np.sin(angle) * y) % period < period / 2).astype(np.float32)
    return (((x // (period / 2)) + (y // (period / 2))) % 2).astype(np.float32)  # checkerboard


def make_images(samples: int = 25_000, seed: int = 0, noise: float = 0.12) -> tuple[np.ndarray, np.ndarray]:
    """uint8 images (N, 32, 32, 3) and labels (N,), classes balanced and shuffled."""
    rng = np.random.default_rng(seed)
    labels = np.arange(samples) % len(CLASSES)
    rng.shuffle(labels)
    images = np.empty((samples, SIZE, SIZE, 3), dtype=np.uint8)
    for index, kind in enumerate(labels):
        mask = _pattern(int(kind), rng)[..., None]
        foreground, background = rng.uniform(0, 1, 3), rng.uniform(0, 1, 3)
        while np.abs(foreground - background).sum() < 0.6:  # keep the pattern visible
            foreground = rng.uniform(0, 1, 3)
        image = mask * foreground + (1 - mask) * background
        image = image * rng.uniform(0.7, 1.0) + rng.normal(0.0, noise, image.shape)
        images[index] = (np.clip(image, 0, 1) * 255).astype(np.uint8)
    return images, labels


def _png(image: np.ndarray) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()


def make(folder: Path, samples: int = 25_000, seed: int = 0) -> tuple[Path, Path]:
    """Write the task as `folder/cifar_like.parquet` (image bytes, label) and `folder/cifar_like/<class>/<n>.png`."""
    import pandas as pd

    folder.mkdir(parents=True, exist_ok=True)
    parquet, images_dir = folder / "cifar_like.parquet", folder / "cifar_like"
    images, labels = make_images(samples, seed)
    encoded = [_png(image) for image in images]
    pd.DataFrame({"image": encoded, "label": [CLASSES[label] for label in labels]}).to_parquet(parquet, row_group_size=2_000)
    for name in CLASSES:
        (images_dir / name).mkdir(parents=True, exist_ok=True)
    for index, (data, label) in enumerate(zip(encoded, labels)):
        (images_dir / CLASSES[label] / f"{index:05d}.png").write_bytes(data)
    return parquet, images_dir


def train(folder: Path, *, epochs: int, source: str, workers: int, streaming: bool = False) -> dict:
    """A 2-worker ResNet run on the task (advisor off), its test accuracy, training throughput and workers' peak memory."""
    from cluster.experiment import build_config
    from cluster.launch import run_experiment

    data = folder / ("cifar_like.parquet" if source == "parquet" else "cifar_like")
    overrides = [f"data.path={data}", "model.kind=resnet", "model.width=16", "model.depth=1", f"train.epochs={epochs}",
                 f"train.num_workers={workers}", "train.batch_size=128", "train.lr=3e-3", "train.early_stopping_patience=0",
                 "advisor.backend=none", f"train.checkpoint_every={epochs}", f"data.streaming={'true' if streaming else 'false'}"]
    run_dir = folder / f"run-{source}{'-streamed' if streaming else ''}-{int(time.time())}"
    summary = run_experiment(build_config(overrides=overrides), run_dir)
    import pandas as pd

    metrics = pd.read_csv(run_dir / "metrics.csv")
    memory = summary.get("worker_memory", [])
    return {"source": source, "streaming": streaming, "test_accuracy": summary["test_accuracy"], "epochs": epochs, "wall_s": summary.get("wall_s"),
            "driver_wall_s": summary.get("driver_wall_s"),
            # per worker, each epoch's training steps only (validation excluded); the median over epochs
            "samples_per_s": float(metrics.samples_per_s.median()), "samples_per_s_by_epoch": metrics.samples_per_s.round(1).tolist(),
            "peak_uss_mb": max((m["peak_uss_mb"] for m in memory), default=None), "peak_rss_mb": max((m["peak_rss_mb"] for m in memory), default=None),
            "run_dir": str(run_dir)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("action", choices=("make", "train", "stream"))
    parser.add_argument("folder", type=Path)
    parser.add_argument("--samples", type=int, default=25_000)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--source", choices=("parquet", "folder"), default="parquet")
    parser.add_argument("--streaming", action="store_true", help="train: stream the Parquet through Ray Data")
    args = parser.parse_args()
    if args.action == "make":
        started = time.perf_counter()
        parquet, images_dir = make(args.folder, args.samples)
        print(f"wrote {parquet} ({parquet.stat().st_size / 2**20:.1f} MiB) and {images_dir}/ ({args.samples} PNGs) "
              f"in {time.perf_counter() - started:.1f}s")
        return
    if not (args.folder / "cifar_like.parquet").is_file():
        make(args.folder, args.samples)
    if args.action == "stream":
        import subprocess

        rows = []
        for streaming in (False, True):  # each in its own process and embedded Ray, sized for it (streaming keeps a CPU for Ray Data)
            command = [sys.executable, __file__, "train", str(args.folder), "--epochs", str(args.epochs), "--workers", str(args.workers),
                       *(["--streaming"] if streaming else [])]
            output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
            rows.append(json.loads(output[output.index("\n{") + 1:] if not output.startswith("{") else output))
        for row in rows:
            print(f"{'streamed ' if row['streaming'] else 'in memory'}: {row['samples_per_s']:8.1f} samples/s per worker (epochs {row['samples_per_s_by_epoch']}), "
                  f"peak USS {row['peak_uss_mb']} MB, RSS {row['peak_rss_mb']} MB, test accuracy {row['test_accuracy']:.4f}, train wall {row['wall_s']:.1f} s")
        print(f"streamed / in memory samples/s: {rows[1]['samples_per_s'] / rows[0]['samples_per_s']:.2f}")
        print(json.dumps(rows, indent=2))
        return
    print(json.dumps(train(args.folder, epochs=args.epochs, source=args.source, workers=args.workers, streaming=args.streaming), indent=2))


if __name__ == "__main__":
    main()
