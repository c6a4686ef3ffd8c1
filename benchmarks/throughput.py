"""Training throughput on digits: a plain PyTorch loop vs Ray Train (with and without DeepSpeed).

Prints samples/s (training steps only, median over epochs after the first) for:
  plain     a single-process PyTorch loop, the same model, data, batch size and optimizer
  ray       Ray Train, 1 worker, plain PyTorch (no DeepSpeed)
  ds Nw zK  Ray Train + DeepSpeed ZeRO-K with N workers (hybridtrain's own loop)
each with its ratio to the plain loop, and the test accuracy of each DeepSpeed run.

The end-to-end column is wall time per epoch in steady state (epochs 2..N, mean): for hybridtrain,
everything an epoch costs (training, validation, metrics, checkpoints at `train.checkpoint_every`,
reports); for the plain loop, training plus one validation pass and nothing saved.

    python benchmarks/throughput.py [--epochs 16] [--out /tmp/bench]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from workers.config import ModelConfig, TrainConfig
from workers.data import Normalizer, load_digits, shard_batches, stratified_split
from workers.models import build_model

BATCH = 64


def _digits_split() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    digits = load_digits()
    split = stratified_split(digits.y, val_fraction=0.1, test_fraction=0.1, seed=0)
    normalizer = Normalizer.fit(digits.x[split.train])
    return (torch.from_numpy(normalizer(digits.x[split.train])), torch.from_numpy(digits.y[split.train]),
            torch.from_numpy(normalizer(digits.x[split.val])), torch.from_numpy(digits.y[split.val]))


def plain_epoch_rates(epochs: int, *, world_rank: int = 0, world_size: int = 1, epoch_seconds: list[float] | None = None) -> list[float]:
    """Samples/s per epoch of the plainest loop we could write for the same job (training steps only).
    `epoch_seconds`, if given, receives each epoch's wall time with one validation pass (end to end)."""
    x, y, x_val, y_val = _digits_split()
    torch.manual_seed(0)
    model = build_model(ModelConfig(), tuple(x.shape[1:]), 10)
    if world_size > 1 or torch.distributed.is_initialized():
        model = torch.nn.parallel.DistributedDataParallel(model)
    train = TrainConfig()
    optimizer = torch.optim.AdamW(model.parameters(), lr=train.lr, weight_decay=train.weight_decay)
    rates = []
    for epoch in range(epochs):
        start = time.perf_counter()
        for batch in shard_batches(len(x), rank=world_rank, world_size=world_size, batch_size=BATCH, epoch=epoch, seed=0):
            index = torch.from_numpy(batch)
            loss = F.cross_entropy(model(x[index]), y[index])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), train.grad_clip)
            optimizer.step()
        rates.append(len(x) / world_size / (time.perf_counter() - start))
        if epoch_seconds is not None:
            model.eval()
            with torch.no_grad():
                float(F.cross_entropy(model(x_val), y_val))
            model.train()
            epoch_seconds.append(time.perf_counter() - start)
    return rates


def _ray_plain_worker(config: dict) -> None:
    import ray.train

    context = ray.train.get_context()
    rates = plain_epoch_rates(config["epochs"], world_rank=context.get_world_rank(), world_size=context.get_world_size())
    with tempfile.TemporaryDirectory() as directory:
        (Path(directory) / "rates.txt").write_text(",".join(map(str, rates)))
        ray.train.report({"median": statistics.median(rates[1:])}, checkpoint=ray.train.Checkpoint.from_directory(directory))


def ray_plain_rate(epochs: int, storage: Path) -> float:
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    result = TorchTrainer(
        _ray_plain_worker, train_loop_config={"epochs": epochs},
        scaling_config=ScalingConfig(num_workers=1), run_config=RunConfig(name="ray-plain", storage_path=str(storage)),
    ).fit()
    with result.checkpoint.as_directory() as directory:
        rates = [float(v) for v in (Path(directory) / "rates.txt").read_text().split(",")]
    return statistics.median(rates[1:])


def deepspeed_run(workers: int, stage: int, epochs: int, out: Path, *, extra: tuple[str, ...] = ()) -> tuple[float, float, float]:
    """(median training samples/s, mean end-to-end seconds per epoch over epochs 2..N, test accuracy)."""
    from cluster.experiment import build_config
    from cluster.launch import run_experiment

    run_dir = out / f"ds-{workers}w-z{stage}{''.join('-' + item.split('=')[-1] for item in extra)}"
    config = build_config(recipe="smoke", overrides=[f"train.num_workers={workers}", f"train.zero_stage={stage}", f"train.epochs={epochs}",
                                                     f"train.batch_size={BATCH}", "train.early_stopping_patience=0", "advisor.backend=none", *extra])
    summary = run_experiment(config, run_dir)
    metrics = pd.read_csv(run_dir / "metrics.csv")
    # wall_s of epoch k includes epoch k-1's checkpoint and report: epochs 2..N hold N-1 whole epochs.
    end_to_end = (metrics.wall_s.iloc[-1] - metrics.wall_s.iloc[0]) / (len(metrics) - 1)
    return statistics.median(metrics.samples_per_s.tolist()[1:]), end_to_end, summary["test_accuracy"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=16)
    parser.add_argument("--out", type=Path, default=Path(tempfile.mkdtemp(prefix="hybridtrain-bench-")))
    args = parser.parse_args()
    from cluster.runtime import ClusterConfig, connect

    torch.set_num_threads(1)  # what each Ray worker gets (OMP_NUM_THREADS=1 per 1-CPU worker)
    rows: list[tuple[str, float, float | None, float | None]] = []
    seconds_before: list[float] = []
    plain_before = statistics.median(plain_epoch_rates(args.epochs, epoch_seconds=seconds_before)[1:])
    connect(ClusterConfig(dashboard=False), min_cpus=3)
    rows.append(("Ray Train 1 worker, no DeepSpeed", ray_plain_rate(args.epochs, args.out), None, None))
    default_every = TrainConfig().checkpoint_every
    for workers in (1, 2):
        for stage in (0, 1, 2, 3):
            rate, seconds, accuracy = deepspeed_run(workers, stage, args.epochs, args.out)
            rows.append((f"Ray Train + DeepSpeed {workers}w ZeRO-{stage}", rate, seconds, accuracy))
            if (workers, stage) == (1, 0):  # what the checkpoint interval buys
                rate, seconds, accuracy = deepspeed_run(1, 0, args.epochs, args.out, extra=("train.checkpoint_every=1",))
                rows.append(("Ray Train + DeepSpeed 1w ZeRO-0, checkpoint every epoch", rate, seconds, accuracy))
    # The machine is shared and noisy: the plain loop is timed before and after, the ratio uses the mean.
    seconds_after: list[float] = []
    plain_after = statistics.median(plain_epoch_rates(args.epochs, epoch_seconds=seconds_after)[1:])
    plain = (plain_before + plain_after) / 2
    plain_seconds = (statistics.mean(seconds_before[1:]) + statistics.mean(seconds_after[1:])) / 2
    rows.insert(0, (f"plain PyTorch, 1 process ({plain_before:,.0f} before / {plain_after:,.0f} after)", plain, plain_seconds, None))
    print(f"\nthroughput on digits (batch {BATCH}/worker, {args.epochs} epochs, median of epochs 2..N; {torch.get_num_threads()} torch thread per process; "
          f"end to end: mean s/epoch over epochs 2..N, checkpoint every {default_every} epochs unless named)")
    print(f"{'configuration':58s} {'samples/s':>10s} {'vs plain':>9s} {'s/epoch e2e':>12s} {'vs plain':>9s} {'test acc':>9s}")
    for name, rate, seconds, accuracy in rows:
        e2e = f"{seconds:12.3f} {seconds / plain_seconds:9.2f}" if seconds is not None else f"{'':12s} {'':9s}"
        print(f"{name:58s} {rate:10,.0f} {rate / plain:9.2f} {e2e} {'' if accuracy is None else f'{accuracy:9.4f}'}")
    accuracies = [row[3] for row in rows if row[3] is not None]
    print(f"test accuracy spread across ZeRO stages and worker counts: {100 * (max(accuracies) - min(accuracies)):.2f} points")


if __name__ == "__main__":
    main()
