"""`train.lr: find`: an LR range test before the run (Smith 2015, "Cyclical Learning Rates"), as Lightning's
`Tuner.lr_find` does it, on the run's own engine, leaving no trace but the learning rate it picks.

    lr_i      = min_lr * (max_lr / min_lr) ** (i / (steps - 1))          i = 0 .. steps - 1   (1e-8 .. 1, 100 steps)
    avg_i     = beta * avg_{i-1} + (1 - beta) * loss_i                   beta = 0.98
    smooth_i  = avg_i / (1 - beta ** (i + 1))                            (bias-corrected)
    stop after step i > 0 when smooth_i > 4 * min(smooth_0..i) or the loss is not finite
    suggest   = lr_j, j = argmin of d smooth / d log(lr) over the points up to the lowest smoothed loss, the first 10
                and the last 1 skipped: past the lowest loss the rate is too high, and a fall there is the loss coming back
                down from a blow-up (schedule-free AdamW on digits fell from 27 back to 2.4 at lr 0.4-1: "suggested" 0.48)

Lightning (2.x) takes the gradient with respect to lr itself; on an exponential range that weighs each step by
its lr and leans to the largest rates, so this takes it with respect to log(lr) (the slope per decade, what
fastai's and Lightning 1.x's `np.gradient(loss)` computed on the same exponential points).

Where: on every rank, on the engine the run trains (ZeRO 0-3 alike), before the first epoch. The state is saved
as a DeepSpeed checkpoint first and loaded back after (weights, optimizer moments, buffers, scheduler), and a
digest of the whole training state proves the restore exact (`LrFindResult.restored_exactly`; a mismatch
raises). The curve goes to `RUN_DIR/lr_find.csv`, the choice to `RUN_DIR/lr_find.json`; a restarted attempt
reads the choice back instead of testing again.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

MIN_LR, MAX_LR = 1e-8, 1.0
SMOOTHING = 0.98
EARLY_STOP_THRESHOLD = 4.0
SKIP_BEGIN, SKIP_END = 10, 1
LR_FIND_CSV = "lr_find.csv"
LR_FIND_JSON = "lr_find.json"
_TAG = "lr-find-start"


def exponential_lrs(steps: int, min_lr: float = MIN_LR, max_lr: float = MAX_LR) -> list[float]:
    """`steps` learning rates from `min_lr` to `max_lr`, evenly spaced in log."""
    if steps < 2:
        raise ValueError(f"an LR range test needs at least 2 steps, got {steps}")
    return [min_lr * (max_lr / min_lr) ** (i / (steps - 1)) for i in range(steps)]


def smoothed(losses: Sequence[float], beta: float = SMOOTHING) -> list[float]:
    """The bias-corrected exponential moving average of `losses` (Lightning's `_LRCallback`)."""
    average, out = 0.0, []
    for step, loss in enumerate(losses):
        average = beta * average + (1 - beta) * loss
        out.append(average / (1 - beta ** (step + 1)))
    return out


def should_stop(smooth: Sequence[float], threshold: float = EARLY_STOP_THRESHOLD) -> bool:
    """Stop once the latest smoothed loss is not finite or passes `threshold` x the best so far (after the first step)."""
    latest = smooth[-1]
    if not math.isfinite(latest):
        return True
    return len(smooth) > 1 and latest > threshold * min(smooth)


def suggest(lrs: Sequence[float], smooth: Sequence[float], skip_begin: int = SKIP_BEGIN, skip_end: int = SKIP_END) -> int | None:
    """The index of the steepest descent of `smooth` per log(lr) up to its lowest point, the first `skip_begin` and last
    `skip_end` points left out and non-finite ones dropped; None when fewer than 2 points are left (the test stopped too early)."""
    finite = [i for i in range(len(smooth)) if math.isfinite(smooth[i])]
    lowest = min(finite, key=lambda i: smooth[i]) if finite else -1
    end = min(len(smooth) - skip_end, lowest + 1)
    kept = [i for i in range(skip_begin, end) if math.isfinite(smooth[i])]
    if len(kept) < 2:
        return None
    slopes = np.gradient(np.array([smooth[i] for i in kept]), np.log(np.array([lrs[i] for i in kept])))
    return kept[int(np.argmin(slopes))]


@dataclass(kw_only=True)
class LrFindResult:
    """What the range test found and chose; written to `lr_find.json` and the run's final metrics."""

    lr: float  # the learning rate the run trains with
    suggested: float | None  # the steepest-descent point; None when the test could not suggest one
    fallback: str = ""  # why `lr` is not the suggestion ("" when it is)
    steps_run: int = 0
    steps_planned: int = 0
    stopped_early: bool = False
    min_lr: float = MIN_LR
    max_lr: float = MAX_LR
    restored_exactly: bool = False
    seconds: float = 0.0
    curve: list[dict[str, float]] = field(default_factory=list, repr=False)  # step, lr, loss, smoothed (the CSV)

    def record(self) -> dict[str, Any]:
        return {key: value for key, value in asdict(self).items() if key != "curve"}


def choose(lrs: Sequence[float], losses: Sequence[float], *, fallback_lr: float, planned: int) -> LrFindResult:
    """The result for a finished curve (pure): the suggestion, or `fallback_lr` with the reason when there is none."""
    smooth = smoothed(losses)
    index = suggest(lrs, smooth)
    curve = [{"step": i, "lr": lrs[i], "loss": losses[i], "smoothed": smooth[i]} for i in range(len(losses))]
    stopped = len(losses) < planned
    if index is None:
        why = (f"the range test stopped after {len(losses)} of {planned} steps, too few past the first {SKIP_BEGIN} to suggest a rate; "
               f"training with {fallback_lr:g} instead")
        return LrFindResult(lr=fallback_lr, suggested=None, fallback=why, steps_run=len(losses), steps_planned=planned, stopped_early=stopped,
                            curve=curve)
    return LrFindResult(lr=float(lrs[index]), suggested=float(lrs[index]), steps_run=len(losses), steps_planned=planned, stopped_early=stopped,
                        curve=curve)


# --- on the workers ------------------------------------------------------------------------------


def find_learning_rate(loop: Any, *, fallback_lr: float) -> LrFindResult:
    """Run the range test on `loop.engine` (every rank, collective), restore the state exactly and return the choice.
    Rank 0 writes the curve and the choice into the run directory."""
    import torch

    from workers.data import shard_batches
    from workers.engine import barrier, load_engine_checkpoint, read_hyperparameters, state_digest
    from workers.epoch import all_reduce_sums, train_step

    engine, train, started = loop.engine, loop.train, time.perf_counter()
    scheduler = engine.lr_scheduler
    hyperparameters = read_hyperparameters(engine, batch_size=train.batch_size)
    before = state_digest(engine, hyperparameters)
    directory = loop.run_dir / ".lr_find"
    if loop.rank == 0 and directory.exists():
        shutil.rmtree(directory)
    barrier()
    engine.save_checkpoint(str(directory), tag=_TAG, save_latest=False)
    barrier()
    saved_schedule = dict(scheduler.state_dict())
    lambdas, base_lrs = scheduler.lr_lambdas, list(scheduler.base_lrs)

    lrs = exponential_lrs(train.lr_find_steps)
    # Each group keeps its ratio to the first (transfer learning's per-block rates; 0 for a frozen block).
    ratios = [base / base_lrs[0] if base_lrs[0] > 0 else 1.0 for base in base_lrs]
    scheduler.base_lrs = ratios
    scheduler.lr_lambdas = [lambda step: lrs[min(step, len(lrs) - 1)] for _ in ratios]
    scheduler.last_epoch = 0
    for group, ratio in zip(scheduler.optimizer.param_groups, ratios):
        group["lr"] = ratio * lrs[0]
    losses: list[float] = []
    engine.train()
    torch.manual_seed(train.seed)
    epoch = 0
    batches: list[np.ndarray] = []
    try:
        while len(losses) < len(lrs):
            step_loss = 0.0
            for _ in range(train.grad_accum_steps):  # one optimizer step = grad_accum_steps micro-steps
                if not batches:  # the epochs' batches in turn, as training would draw them
                    batches = list(shard_batches(len(loop.data.split.train), rank=loop.rank, world_size=loop.world_size,
                                                 batch_size=train.batch_size, epoch=epoch, seed=train.seed, grad_accum_steps=train.grad_accum_steps))
                    epoch += 1
                loss, _ = train_step(loop, batches.pop(0))
                step_loss += float(loss) / train.grad_accum_steps
            total, count = all_reduce_sums(step_loss, 1)
            losses.append(total / count)
            if should_stop(smoothed(losses)):
                break
    finally:
        scheduler.lr_lambdas, scheduler.base_lrs = lambdas, base_lrs
        load_engine_checkpoint(engine, str(directory), _TAG)
        scheduler.load_state_dict(saved_schedule)
        scheduler.lr_lambdas = lambdas  # LambdaLR's state holds no lambdas: the run's own schedule again
        barrier()
        if loop.rank == 0:
            shutil.rmtree(directory, ignore_errors=True)
    after = state_digest(engine, read_hyperparameters(engine, batch_size=train.batch_size))
    if after != before:
        raise RuntimeError("the LR range test did not leave the training state as it found it (state digest differs after the restore)")
    result = choose(lrs, losses, fallback_lr=fallback_lr, planned=len(lrs))
    result.restored_exactly = True
    result.seconds = time.perf_counter() - started
    if loop.rank == 0:
        write_result(loop.run_dir, result)
    return result


def write_result(run_dir: Path, result: LrFindResult) -> None:
    import pandas as pd

    from workers.files import atomic_write_text

    atomic_write_text(run_dir / LR_FIND_CSV, pd.DataFrame(result.curve, columns=["step", "lr", "loss", "smoothed"]).to_csv(index=False))
    atomic_write_text(run_dir / LR_FIND_JSON, json.dumps(result.record(), indent=1))


def read_result(run_dir: Path) -> LrFindResult | None:
    """The choice an earlier attempt of this run made (`lr_find.json`), or None."""
    path = run_dir / LR_FIND_JSON
    if not path.exists():
        return None
    return LrFindResult(**json.loads(path.read_text()))
