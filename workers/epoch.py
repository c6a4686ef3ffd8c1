"""The loop's arithmetic: one micro-step, one epoch of them, a probation, and evaluation over a split.

Plain functions of the `Loop`; the only events they fire are `batch` / `batch_end` around each
micro-step (`workers.events`), so fault injection and the advisor's gradient statistics stay out of here.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

from orchestration.protocol import ProbationMetrics
from workers.augment import augment, wants_augmentation
from workers.data import probation_batches, stable_seed
from workers.events import Event
from workers.loop import BatchInfo, Loop, positions_by_rank


@dataclass(kw_only=True)
class EvalResult:
    loss: float
    accuracy: float
    predictions: np.ndarray | None = None
    labels: np.ndarray | None = None
    sample_losses: np.ndarray | None = None  # per sample, ranks' shards in rank order (with `per_sample`)
    sample_correct: np.ndarray | None = None


@dataclass(frozen=True, kw_only=True)
class EpochResult:
    train_loss: float  # mean over every rank's samples
    train_accuracy: float
    samples: int  # over every rank
    local_samples_per_s: float  # this rank's training throughput
    train_seconds: float


Batch = np.ndarray | tuple[torch.Tensor, torch.Tensor]  # indices into the train split, or a streamed batch's samples and labels


def batch_tensors(loop: Loop, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
    """The (normalised) samples and labels of `batch`, on the CPU."""
    if isinstance(batch, tuple):
        return batch
    index = torch.from_numpy(loop.data.split.train[batch])
    return loop.data.features[index], loop.data.labels[index]


def train_step(loop: Loop, batch: Batch, weights: np.ndarray | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """One micro-step on `batch`; returns the detached loss and the number of samples the model got right
    (in training mode, before the step). Images are augmented first when the config says so. `weights` are
    batch selection's importance weights (the loss is the mean of w * loss); the research modes may add a
    penalty (L2-SP)."""
    engine, device = loop.engine, loop.device
    inputs, labels = batch_tensors(loop, batch)
    if wants_augmentation(loop.plan.data):
        inputs = augment(inputs, loop.plan.data)
    target = labels.to(device)
    logits = engine(inputs.to(device, loop.dtype)).float()
    loss = batch_loss(logits, target, None if weights is None else torch.from_numpy(weights).to(device, torch.float32))
    penalty = loop.modes.penalty()
    engine.backward(loss if penalty is None else loss + penalty)
    engine.step()
    return loss.detach(), (logits.detach().argmax(dim=1) == target).sum()


def batch_loss(logits: torch.Tensor, target: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
    """Mean cross-entropy over the batch (of `weights * loss` with batch selection's importance weights).

    A rank's last batch can be empty (every rank takes the same number of steps, and a shard can be one
    sample short): its loss is 0, not the NaN of a mean over nothing, and its gradients are zero, so the
    epoch's sample-weighted loss stays the mean over the samples seen."""
    losses = F.cross_entropy(logits, target, reduction="none")
    if weights is not None:
        losses = weights * losses
    return losses.sum() / max(len(target), 1)


def run_steps(loop: Loop, batches: Any, weights: list[np.ndarray] | None, *, phase: str, epoch: int,
              steps: int | None = None) -> list[tuple[torch.Tensor, torch.Tensor, int]]:
    """`train_step` on each batch (a list, or an iterator of `steps` streamed ones), firing `batch` before and
    `batch_end` after each one; returns each step's loss, samples right and samples."""
    results = []
    steps = len(batches) if steps is None else steps
    for step, batch in enumerate(batches):
        loop.batch = BatchInfo(phase=phase, epoch=epoch, step=step, steps=steps)
        loop.fire(Event.BATCH)
        loss, right = train_step(loop, batch, None if weights is None else weights[step])
        results.append((loss, right, len(batch[1]) if isinstance(batch, tuple) else len(batch)))
        loop.fire(Event.BATCH_END)
    loop.batch = None
    return results


def run_epoch(loop: Loop, epoch: int) -> EpochResult:
    """Train one epoch of this rank's shard. Dropout masks depend only on (seed, epoch, rank), so a resumed
    run replays the same randomness; the research modes may draw the batches (curriculum, batch selection)."""
    train, started = loop.train, time.perf_counter()
    torch.manual_seed(stable_seed(train.seed, epoch, loop.rank))
    loop.scores = sample_scores(loop)
    stream, steps = loop.data.stream, None
    if stream is not None:  # this rank's shard through Ray Data (curriculum and batch selection are refused with streaming)
        steps = stream.train_steps(train.batch_size, train.grad_accum_steps)
        batches, weights = stream.train_batches(epoch=epoch, seed=train.seed, batch_size=train.batch_size, steps=steps), None
    else:
        batches, weights = loop.modes.epoch_batches(loop.scores, num_samples=len(loop.data.split.train), rank=loop.rank,
                                                    world_size=loop.world_size, epoch=epoch, seed=train.seed)
    loop.engine.train()
    loss_sum = torch.zeros((), dtype=torch.float64)
    correct = torch.zeros((), dtype=torch.float64)
    seen = 0
    for loss, right, samples in run_steps(loop, batches, weights, phase="epoch", epoch=epoch, steps=steps):
        loss_sum += loss.double().cpu() * samples
        correct += right.double().cpu()
        seen += samples
    train_seconds = time.perf_counter() - started
    if stream is not None and stream.dropped and not stream.reported_drop:
        stream.reported_drop = True
        loop.log(f"warning: rank {loop.rank}'s stream gave {stream.dropped} training rows beyond its {steps} steps in epoch {epoch}; "
                 "they were not trained on (the scan's counts and Ray Data's split disagree)")
    loss_total, correct_total, samples = all_reduce_sums(loss_sum, correct, seen)
    return EpochResult(train_loss=loss_total / samples, train_accuracy=correct_total / samples, samples=int(samples),
                       local_samples_per_s=seen / train_seconds, train_seconds=train_seconds)


def sample_scores(loop: Loop) -> np.ndarray | None:
    """Each training sample's loss under the current model (curriculum and batch selection), by position in
    the train split, the same on every rank; None when no mode needs it."""
    if not loop.modes.needs_scores:
        return None
    split = loop.data.split
    result = evaluate(loop, "train", per_sample=True)
    scores = np.empty(len(split.train))
    scores[positions_by_rank(len(split.train), loop.world_size)] = result.sample_losses
    return scores


def validate(loop: Loop, *, per_sample: bool = False) -> EvalResult:
    return evaluate(loop, "val", per_sample=per_sample)


def run_probation(loop: Loop, micro_steps: int) -> ProbationMetrics:
    """Train `micro_steps` on this epoch's probation batches, then validate (the advice's two branches alike)."""
    train, epoch, num_samples = loop.train, loop.state.epoch, len(loop.data.split.train)
    torch.manual_seed(stable_seed(train.seed, epoch, loop.rank, "probation"))
    loop.engine.train()
    if loop.modes.needs_scores:  # drawn the way the next epoch would draw them (from this epoch's scores), with the branch's own mode state
        drawn, drawn_weights = loop.modes.epoch_batches(loop.scores, num_samples=num_samples, rank=loop.rank, world_size=loop.world_size,
                                                        epoch=epoch + 1, seed=train.seed, probation=True)
        batches = [drawn[i % len(drawn)] for i in range(micro_steps)]
        weights = None if drawn_weights is None else [drawn_weights[i % len(drawn_weights)] for i in range(micro_steps)]
    else:
        batches = probation_batches(num_samples, rank=loop.rank, world_size=loop.world_size, batch_size=train.batch_size, epoch=epoch,
                                    seed=train.seed, micro_steps=micro_steps)
        weights = None
    losses = [float(loss) for loss, _, _ in run_steps(loop, batches, weights, phase="probation", epoch=epoch)]
    train_loss, count = all_reduce_sums(sum(losses), len(losses))
    probe = validate(loop, per_sample=True)  # per-sample values: the verdict measures the comparison's own noise
    return ProbationMetrics(val_loss=probe.loss, val_accuracy=probe.accuracy, train_loss=train_loss / max(count, 1),
                            sample_losses=tuple(probe.sample_losses.tolist()), sample_correct=tuple(probe.sample_correct.tolist()))


def evaluate(loop: Loop, which: str, *, gather: bool = False, per_sample: bool = False) -> EvalResult:
    """Mean loss and accuracy over the `which` split (train, val or test), each rank taking a shard; all ranks get the result.
    `gather`: also the predictions and labels; `per_sample`: also each sample's loss and correctness.

    All ranks run the same number of forward passes, even on an empty shard, because under ZeRO-3
    every forward gathers parameters collectively. Schedule-free AdamW is evaluated at its average
    (`workers.optimizers.EvalWeights`), and the training point is back, bit for bit, when this returns.
    """
    loop.eval_weights.swap_in()  # schedule-free: evaluate its average x, not the training point (collective)
    try:
        return _evaluate(loop, which, gather=gather, per_sample=per_sample)
    finally:
        loop.eval_weights.swap_out()


def eval_chunks(loop: Loop, which: str, batch_size: int) -> Any:
    """This rank's (samples, labels) chunks of the `which` split: the same number on every rank (ZeRO-3 gathers
    parameters in every forward pass), some maybe empty. In memory: every `world_size`-th sample, cut evenly;
    streamed (val, test): every `world_size`-th batch of the stream."""
    stream = loop.data.stream
    if stream is not None and which != "train":
        yield from stream.eval_batches(which, batch_size)
        return
    indices = getattr(loop.data.split, which)
    shard = indices[loop.rank::loop.world_size]
    steps = math.ceil(math.ceil(len(indices) / loop.world_size) / batch_size)
    for chunk in np.array_split(shard, steps):
        index = torch.from_numpy(chunk)
        yield loop.data.features[index], loop.data.labels[index]


def _evaluate(loop: Loop, which: str, *, gather: bool, per_sample: bool) -> EvalResult:
    engine = loop.engine
    engine.eval()
    # 256 samples a forward pass, fewer when they are large (16 MiB of float32), never below the training batch.
    batch_size = max(loop.train.batch_size, min(256, (16 << 20) // (4 * math.prod(loop.data.dataset.sample_shape))))
    loss_sum = torch.zeros((), dtype=torch.float64)
    correct, seen = 0, 0
    predictions: list[np.ndarray] = []
    sample_losses: list[np.ndarray] = []
    local_labels: list[np.ndarray] = []
    device = next(engine.module.parameters()).device
    with torch.no_grad():
        for inputs, labels in eval_chunks(loop, which, batch_size):
            logits = engine(inputs.to(device, loop.dtype)).float()
            targets = labels.to(device)
            if len(labels):
                seen += len(labels)
                local_labels.append(labels.numpy())
                losses = F.cross_entropy(logits, targets, reduction="none").double().cpu()
                loss_sum += losses.sum()
                sample_losses.append(losses.numpy())
                predicted = logits.argmax(dim=1)
                correct += int((predicted == targets).sum())
                predictions.append(predicted.cpu().numpy())
    totals = torch.tensor([float(loss_sum), correct, seen], dtype=torch.float64)
    if dist.is_initialized():
        dist.all_reduce(totals)
    result = EvalResult(loss=float(totals[0] / totals[2]), accuracy=float(totals[1] / totals[2]))
    if gather or per_sample:
        _gather_samples(result, predictions, sample_losses, np.concatenate(local_labels) if local_labels else np.zeros(0, dtype=np.int64),
                        loop.world_size)
    return result


def _gather_samples(result: EvalResult, predictions: list[np.ndarray], sample_losses: list[np.ndarray], local_labels: np.ndarray,
                    world_size: int) -> None:
    """Every rank's predictions, labels and per-sample losses, in rank order, into `result`."""
    local_predictions = np.concatenate(predictions) if predictions else np.zeros(0, dtype=np.int64)
    local = (local_predictions, local_labels, np.concatenate(sample_losses) if sample_losses else np.zeros(0))
    gathered: list[Any] = [None] * world_size
    if dist.is_initialized():
        dist.all_gather_object(gathered, local)
    else:
        gathered = [local]
    result.predictions = np.concatenate([g[0] for g in gathered])
    result.labels = np.concatenate([g[1] for g in gathered])
    result.sample_losses = np.concatenate([g[2] for g in gathered])
    result.sample_correct = (result.predictions == result.labels).astype(np.int64)


def test_metrics(predictions: np.ndarray, labels: np.ndarray, num_classes: int) -> dict[str, Any]:
    """Accuracy, macro precision/recall/F1 and the confusion matrix (rows: true class).

    As scikit-learn's `precision_recall_fscore_support(average="macro", zero_division=0)` computes them (the mean over
    the classes that occur in `labels` or `predictions`; 0 where a ratio has no denominator), in NumPy: importing
    scikit-learn costs a train worker 0.9 s. `tests/test_epoch_metrics.py` checks them against scikit-learn."""
    confusion = np.bincount(labels.astype(np.int64) * num_classes + predictions.astype(np.int64),
                            minlength=num_classes * num_classes).reshape(num_classes, num_classes)
    hits, true, predicted = np.diag(confusion).astype(np.float64), confusion.sum(axis=1), confusion.sum(axis=0)
    occurring = (true + predicted) > 0

    def ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
        return np.divide(num, den, out=np.zeros_like(num, dtype=np.float64), where=den > 0)

    precision, recall = ratio(hits, predicted), ratio(hits, true)
    f1 = ratio(2 * hits, true + predicted)  # 2 TP / (2 TP + FP + FN), as scikit-learn computes it
    return {
        "test_accuracy": float((predictions == labels).mean()),
        "test_macro_precision": float(precision[occurring].mean()),
        "test_macro_recall": float(recall[occurring].mean()),
        "test_macro_f1": float(f1[occurring].mean()),
        "test_confusion_matrix": confusion.tolist(),
    }


def all_reduce_sums(*values: float | torch.Tensor) -> tuple[float, ...]:
    """Each value summed over the ranks (float64 on the CPU; gloo's and NCCL's sums alike)."""
    totals = torch.tensor([float(value) for value in values], dtype=torch.float64)
    if dist.is_initialized():
        dist.all_reduce(totals)
    return tuple(float(total) for total in totals)
