"""The per-worker training loop: one function, read top to bottom.

Ray Train runs `train_loop_per_worker` on every worker. Each worker loads the same data and model
(same seed), trains its shard of every epoch through a DeepSpeed engine, validates, and, in a fixed
order, checkpoints: every rank saves its shard, barrier, one `ray.train.report`. Rank 0 alone writes
files a person reads (metrics.csv, the final model) and prints progress.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import socket
import sys
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

from orchestration.protocol import ProbationMetrics
from orchestration.telemetry import Telemetry, advisor_series
from workers.config import DataConfig, ModelConfig, TrainConfig, small_data_batch
from workers.data import Normalizer, load_dataset, probation_batches, shard_batches, stable_seed, stratified_split
from workers.engine import (
    build_engine,
    full_buffers,
    full_fp32_params,
    gather_to_all,
    input_dtype,
    load_engine_checkpoint,
    params_digest,
    read_hyperparameters,
    set_peak_lr,
    write_full_fp32_params,
    write_hyperparameters,
)
from workers.advice import AdviceSettings, WorkerAdvice
from workers.checkpoints import checkpoint_problem, choose_checkpoint, write_manifest
from workers.models import build_model, resolve_kind
from workers.modes import TrainingModes

CHECKPOINT_TAG = "state"
ADVICE_STATE = "advice_state.json"  # in each checkpoint: the coordinator's state and the advice incidents
PLACEMENT_GROUP = "placement_group.txt"  # in the run directory: the id of the worker group's placement group
PLACEMENT = "placement.json"  # in the run directory: the node each rank of the (latest) worker group ran on
RESTORED_FROM = "restored_from.json"  # in the run directory: what an outside checkpoint brought, and what the config changed
STARTED = ".started"  # in the run directory: an attempt of this run has started (a later one without a checkpoint is a restart)
ADVICE_TENSORS = "advice_tensors.safetensors"  # in each checkpoint: the observer's reference weights
FINAL_METRICS = "final_metrics.json"
TENSORBOARD = "tensorboard"  # in the run directory: rank 0's TensorBoard event files
PROGRESS = "progress.log"  # in the run directory: rank 0's progress lines, which the driver prints live
METRIC_COLUMNS = ["epoch", "train_loss", "train_accuracy", "val_loss", "val_accuracy", "lr", "samples_per_s", "wall_s", "probation_s"]


@dataclass(kw_only=True)
class LoopState:
    """What the loop carries across epochs and restarts (saved in every checkpoint)."""

    epoch: int = 0  # last completed epoch
    best_val_loss: float = math.inf
    best_epoch: int = 0
    bad_epochs: int = 0  # epochs since the last val-loss improvement
    history: list[dict[str, float]] = field(default_factory=list)
    wall_s: float = 0.0  # training wall time over all attempts
    restarts: int = 0
    probation_s: float = 0.0  # of wall_s, time spent trying advisor proposals on probation
    checkpoint_s: float = 0.0  # of wall_s, time spent saving checkpoints and reporting them
    rollbacks_verified: int = 0  # rejected proposals whose rollback was checked bit for bit
    configured: dict[str, float] = field(default_factory=dict)  # lr, weight_decay, momentum, dropout as the config set them
    params_digest: str = ""  # SHA-256 of the checkpointed weights (sweep trials only: proves a PBT clone)
    nodes: list[str] = field(default_factory=list)  # the Ray node of each rank that wrote this state
    modes: dict[str, Any] = field(default_factory=dict)  # the research modes' state (`TrainingModes.state`)


@dataclass(kw_only=True)
class EvalResult:
    loss: float
    accuracy: float
    predictions: np.ndarray | None = None
    labels: np.ndarray | None = None
    sample_losses: np.ndarray | None = None  # per sample, ranks' shards in rank order (with `per_sample`)
    sample_correct: np.ndarray | None = None


def train_loop_per_worker(loop_config: dict[str, Any]) -> None:
    import ray.train
    import ray.train.torch
    import ray.util

    # DeepSpeed still calls torch collectives that torch marks deprecated, a warning at every ZeRO step.
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"torch\.distributed\.c10d_logger")
    context = ray.train.get_context()
    rank, world_size = context.get_world_rank(), context.get_world_size()
    os.environ.setdefault("LOCAL_RANK", str(context.get_local_rank()))  # DeepSpeed reads it
    data_config = DataConfig(**loop_config["data"])
    model_config = ModelConfig(**loop_config["model"])
    train = TrainConfig(**loop_config["train"])
    run_dir = Path(loop_config["run_dir"])
    device = ray.train.torch.get_device()
    if rank == 0:
        global _progress_file
        _progress_file = run_dir / PROGRESS
        # Which placement group Train reserved for this worker group: a sweep frees it if the run is killed
        # (a paused or stopped Tune trial) and Ray Train's own cleaner cannot (it needs the State API).
        group = ray.util.get_current_placement_group()
        if group is not None:
            (run_dir / PLACEMENT_GROUP).parent.mkdir(parents=True, exist_ok=True)
            (run_dir / PLACEMENT_GROUP).write_text(group.id.hex())
    here = {"rank": rank, "node_id": ray.get_runtime_context().get_node_id(), "hostname": socket.gethostname(), "pid": os.getpid()}
    workers = gather_to_all(here)
    nodes = [worker["node_id"] for worker in workers]
    if rank == 0:
        (run_dir / PLACEMENT).write_text(json.dumps({"workers": workers}, indent=1))

    # Every rank loads and splits identically (seeded), so shards line up without any exchange.
    dataset = load_dataset(data_config)
    split = stratified_split(dataset.y, val_fraction=data_config.val_fraction, test_fraction=data_config.test_fraction, seed=data_config.seed)
    normalizer = Normalizer.fit(dataset.x[split.train])
    features = torch.from_numpy(normalizer(dataset.x))
    labels = torch.from_numpy(dataset.y)

    model_config = model_config.for_kind(resolve_kind(model_config.kind, dataset.sample_shape))
    configured_batch = train.batch_size
    train = small_data_batch(train, len(split.train), world_size)
    torch.manual_seed(train.seed)  # the same initial weights on every rank
    model = build_model(model_config, dataset.sample_shape, len(dataset.classes))
    modes = TrainingModes.create(train, model_config, model, log=lambda message: _log(rank, message))
    micro_steps = len(shard_batches(len(split.train), rank=0, world_size=world_size, batch_size=train.batch_size, epoch=0, seed=train.seed, grad_accum_steps=train.grad_accum_steps))
    engine, spec = build_engine(model, train, world_size=world_size, micro_steps_per_epoch=micro_steps, device=device,
                                param_groups=modes.optimizer_groups())
    modes.attach(engine)
    dtype = input_dtype(spec)

    advice = _make_advice(loop_config.get("advice"), engine, rank=rank, world_size=world_size, run_dir=run_dir, train=train,
                          model_kind=model_config.kind, modes=modes)

    def train_step(batch: np.ndarray, watch_backward: contextlib.AbstractContextManager | None = None,
                   weights: np.ndarray | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """One micro-step on `batch` (indices into the train split); returns the detached loss and the number of
        samples the model got right (in training mode, before the step). `watch_backward` wraps the backward pass
        (the advisor's gradient-norm hooks); `weights` are batch selection's importance weights (mean of w * loss)."""
        index = torch.from_numpy(split.train[batch])
        target = labels[index].to(device)
        logits = engine(features[index].to(device, dtype)).float()
        if weights is None:
            loss = F.cross_entropy(logits, target)
        else:
            loss = (torch.from_numpy(weights).to(device, torch.float32) * F.cross_entropy(logits, target, reduction="none")).mean()
        penalty = modes.penalty()
        objective = loss if penalty is None else loss + penalty
        with watch_backward or contextlib.nullcontext():
            engine.backward(objective)
        engine.step()
        return loss.detach(), (logits.detach().argmax(dim=1) == target).sum()

    def sample_scores() -> np.ndarray | None:
        """Each training sample's loss under the current model (curriculum and batch selection), by position in
        the train split, the same on every rank; None when no mode needs it."""
        if not modes.needs_scores:
            return None
        result = evaluate(engine, features, labels, split.train, rank=rank, world_size=world_size, batch_size=max(256, train.batch_size),
                          dtype=dtype, per_sample=True)
        positions = np.concatenate([np.arange(len(split.train))[r::world_size] for r in range(world_size)])
        scores = np.empty(len(split.train))
        scores[positions] = result.sample_losses
        return scores

    def validate(per_sample: bool = False) -> EvalResult:
        return evaluate(engine, features, labels, split.val, rank=rank, world_size=world_size, batch_size=max(256, train.batch_size), dtype=dtype,
                        per_sample=per_sample)

    def run_probation(micro_steps: int) -> ProbationMetrics:
        """Train `micro_steps` on this epoch's probation batches, then validate (both branches alike)."""
        torch.manual_seed(stable_seed(train.seed, state.epoch, rank, "probation"))
        engine.train()
        if modes.needs_scores:  # drawn the way the next epoch would draw them, with the branch's own mode state
            drawn, weights = modes.epoch_batches(scores, num_samples=len(split.train), rank=rank, world_size=world_size, epoch=state.epoch + 1,
                                                 seed=train.seed, probation=True)
            batches = [drawn[i % len(drawn)] for i in range(micro_steps)]
            batch_weights = None if weights is None else [weights[i % len(weights)] for i in range(micro_steps)]
        else:
            batches = probation_batches(len(split.train), rank=rank, world_size=world_size, batch_size=train.batch_size, epoch=state.epoch, seed=train.seed, micro_steps=micro_steps)
            batch_weights = None
        losses = []
        for step, batch in enumerate(batches):
            if train.chaos_kill_in == "probation" and train.chaos_kill_epoch == state.epoch and step == len(batches) // 2 and rank == world_size - 1:
                _chaos_kill_once(run_dir, "during a proposal's probation")
            losses.append(float(train_step(batch, weights=None if batch_weights is None else batch_weights[step])[0]))
        train_loss, count = _all_reduce_sums(sum(losses), len(losses))
        probe = validate(per_sample=True)  # per-sample values: the verdict measures the comparison's own noise
        return ProbationMetrics(val_loss=probe.loss, val_accuracy=probe.accuracy, train_loss=train_loss / max(count, 1),
                                sample_losses=tuple(probe.sample_losses.tolist()), sample_correct=tuple(probe.sample_correct.tolist()))

    configured = {"lr": train.lr, "weight_decay": train.weight_decay, "momentum": train.momentum, "dropout": model_config.dropout}
    state = LoopState(configured=configured)
    best_params: dict[str, torch.Tensor] | None = None
    checkpoint = ray.train.get_checkpoint()
    initial = loop_config.get("initial_checkpoint")
    digest_checkpoints = bool(loop_config.get("digest_checkpoints"))
    # The newest intact checkpoint on disk, which may be newer than the one Train registered (or than none).
    chosen, checkpoint_problems = choose_checkpoint(loop_config.get("checkpoint_root"), checkpoint.path if checkpoint is not None else None)
    for problem in checkpoint_problems:
        _log(rank, f"checkpoint unusable: {problem}")
    if checkpoint is not None and chosen is None:
        raise RuntimeError(f"no intact checkpoint to resume from: {'; '.join(checkpoint_problems)}")
    scores: np.ndarray | None = None
    if chosen is not None:
        state, best_params = _restore(engine, chosen, advice)
        modes.load_state(state.modes)
        state.restarts += 1
        unregistered = checkpoint is None or Path(checkpoint.path) != chosen
        _log(rank, f"resumed from checkpoint after epoch {state.epoch} (restart {state.restarts})"
             + (f", the newest intact one ({chosen.name})" if checkpoint_problems else "")
             + (", which Ray Train had not registered yet" if unregistered and not checkpoint_problems else ""))
    elif initial:
        # A checkpoint handed over from outside this Train run: a sweep trial's own (after a pause) or a
        # better trial's (PBT exploit). Its hyperparameters are the old run's; this run's config wins.
        problem = checkpoint_problem(initial)
        if problem is not None:
            raise RuntimeError(f"the checkpoint this trial starts from is unusable: {problem}")
        state, best_params = _restore(engine, Path(initial), advice)
        modes.load_state(state.modes)
        restored_lr = engine.get_lr()[0]
        digest = params_digest(full_fp32_params(engine)) if digest_checkpoints else ""  # collective under ZeRO-3
        changed = _apply_configured_hyperparameters(engine, state.configured, configured, batch_size=train.batch_size)
        if rank == 0:
            (run_dir / RESTORED_FROM).write_text(json.dumps({
                "checkpoint": initial, "epoch": state.epoch, "params_sha256": digest, "lr_restored": restored_lr,
                "lr_now": engine.get_lr()[0], "configured_before": state.configured, "configured_now": configured, "changed": changed,
                "written_on": state.nodes, "read_on": nodes}))
        state.configured = configured
        _log(rank, f"started from {initial} after epoch {state.epoch}" + (f"; config changed {', '.join(changed)}" if changed else ""))
    else:
        if advice is not None:
            advice.start_fresh()
        earlier = run_dir / STARTED
        if rank == 0 and earlier.exists():  # an earlier attempt of this run died before its first checkpoint
            state.restarts = 1
            _log(rank, "restarting from the beginning: the last attempt saved no checkpoint")
        elif rank == 0:
            earlier.write_text(json.dumps({"pid": os.getpid()}))
        _log(rank, f"training {model_config.kind} (width {model_config.width}, depth {model_config.depth}, dropout {model_config.dropout:g}) on "
             f"{dataset.source}: {len(split.train)}/{len(split.val)}/{len(split.test)} samples, {world_size} workers, ZeRO-{spec.zero_stage}, "
             f"{spec.precision}, {spec.device}; batch {train.batch_size} per worker"
             + (f" (lowered from {configured_batch}: train.min_steps_per_epoch {train.min_steps_per_epoch})" if train.batch_size != configured_batch else ""))

    state.nodes = nodes
    # Rank 0 exports the run's series (Ray metrics, TensorBoard); the other ranks send it their throughput.
    telemetry = (Telemetry({"run": run_dir.name}, tensorboard_dir=run_dir / TENSORBOARD if train.tensorboard else None,
                           first_step=state.epoch + 1 if state.epoch else None) if rank == 0 else None)
    for epoch in range(state.epoch + 1, train.epochs + 1):
        epoch_start = time.perf_counter()
        # Dropout masks depend only on (seed, epoch, rank): a resumed run replays the same randomness.
        torch.manual_seed(stable_seed(train.seed, epoch, rank))
        scores = sample_scores()
        batches, batch_weights = modes.epoch_batches(scores, num_samples=len(split.train), rank=rank, world_size=world_size, epoch=epoch, seed=train.seed)
        engine.train()
        loss_sum = torch.zeros((), dtype=torch.float64)
        correct = torch.zeros((), dtype=torch.float64)
        seen = 0
        for step, batch in enumerate(batches):
            if train.chaos_kill_in == "epoch" and train.chaos_kill_epoch == epoch and step == len(batches) // 2 and rank == world_size - 1:
                _chaos_kill_once(run_dir, "mid-epoch")
            last_step = advice is not None and step == len(batches) - 1
            loss, right = train_step(batch, advice.observer.watch_grad_norms() if last_step else None,
                                     None if batch_weights is None else batch_weights[step])
            loss_sum += loss.double().cpu() * len(batch)
            correct += right.double().cpu()
            seen += len(batch)
        train_seconds = time.perf_counter() - epoch_start
        train_loss, train_correct, total_seen = _all_reduce_sums(loss_sum, correct, seen)
        with advice.observer.watch_dead_units() if advice is not None else contextlib.nullcontext():
            val = validate()

        improved = val.loss < state.best_val_loss - train.early_stopping_min_delta
        if improved:
            state.best_val_loss, state.best_epoch, state.bad_epochs = val.loss, epoch, 0
            best_params = full_fp32_params(engine)  # collective under ZeRO: every rank takes part
        else:
            state.bad_epochs += 1
        state.epoch = epoch
        state.wall_s += time.perf_counter() - epoch_start
        row = {
            "epoch": epoch,
            "train_loss": train_loss / total_seen,
            "train_accuracy": train_correct / total_seen,
            "val_loss": val.loss,
            "val_accuracy": val.accuracy,
            "lr": engine.get_lr()[0],
            "samples_per_s": total_seen / train_seconds,
            "wall_s": state.wall_s,
        }
        state.history.append(row)
        row["probation_s"] = 0.0
        if advice is not None:
            # Decided at the epoch boundary, carried out before the checkpoint so it holds the outcome.
            advice_start = time.perf_counter()
            event = advice.on_epoch_end(epoch=epoch, step=engine.global_steps, history=state.history, best_params=best_params, run_probation=run_probation,
                                        epoch_metrics=ProbationMetrics(val_loss=val.loss, val_accuracy=val.accuracy, train_loss=row["train_loss"]))
            state.probation_s += event.probation_s
            state.wall_s += time.perf_counter() - advice_start  # asking and probation are part of the epoch's cost
            row["wall_s"], row["probation_s"] = state.wall_s, event.probation_s
            if event.decision == "apply":
                verdict = "accepted" if event.accepted else "rejected, rolled back" + ("" if event.rollback_exact is None else f" (exact: {event.rollback_exact})")
                _log(rank, f"advisor proposal {event.query_id}: {verdict}, reward {event.reward:+.4f}, probation {event.probation_s:.1f}s")
                if event.rollback_exact is False:
                    raise RuntimeError(f"rollback of proposal {event.query_id} was not exact")
                state.rollbacks_verified += int(bool(event.rollback_exact))
        tail_start = time.perf_counter()
        modes.end_epoch(epoch, val_loss=val.loss, log=lambda message: _log(rank, message))
        state.modes = modes.state()
        if advice is not None:
            advice.remember_state(epoch=epoch)
        worker_rates = gather_to_all(seen / train_seconds)
        if telemetry is not None:
            _emit_epoch(telemetry, row, worker_rates, epoch_s=time.perf_counter() - epoch_start,
                        advisor=advice.telemetry(epoch=epoch) if advice is not None else None)
        stop = train.early_stopping_patience > 0 and state.bad_epochs >= train.early_stopping_patience
        save = epoch % train.checkpoint_every == 0 or stop or epoch == train.epochs
        if save and digest_checkpoints:
            state.params_digest = params_digest(full_fp32_params(engine))  # collective under ZeRO-3
        if save:
            # Only checkpoint epochs are reported: Train's controller takes one report per poll (2 s), so a
            # report every short epoch would hold each epoch to 2 s (measured: 1.9 s against 0.43 s of work).
            saving_start = time.perf_counter()
            _checkpoint_and_report(engine, state, best_params, row, rank=rank, advice=advice)
            state.checkpoint_s += time.perf_counter() - saving_start
        if rank == 0:
            _write_metrics_csv(run_dir, state.history)
            _log(rank, f"epoch {epoch:3d}/{train.epochs}  train_loss {row['train_loss']:.4f}  val_loss {val.loss:.4f}  "
                       f"val_acc {val.accuracy:.4f}  lr {row['lr']:.2e}  {row['samples_per_s']:,.0f} samples/s" + ("  *" if improved else ""))
        # The epoch's tail (throughput gather, metrics, checkpoint, report) is training wall time too: the
        # next row's wall_s includes this one's, so wall_s differences are whole epochs end to end.
        state.wall_s += time.perf_counter() - tail_start
        if stop:
            _log(rank, f"early stopping: no val-loss improvement for {state.bad_epochs} epochs (best {state.best_val_loss:.4f} at epoch {state.best_epoch})")
            break

    if telemetry is not None:
        telemetry.close()
    # The final model is the best-validation one; the test split is touched exactly once, here.
    if best_params is not None:
        write_full_fp32_params(engine, best_params)
    test = evaluate(engine, features, labels, split.test, rank=rank, world_size=world_size, batch_size=max(256, train.batch_size), dtype=dtype, gather=True)
    final_params = full_fp32_params(engine)
    final_metrics: dict[str, Any] = {"epoch": state.epoch, "final": True, "best_val_loss": state.best_val_loss, "best_epoch": state.best_epoch,
                                     "wall_s": state.wall_s, "restarts": state.restarts,
                                     "probation_s": state.probation_s, "checkpoint_s": state.checkpoint_s, "checkpoint_problems": checkpoint_problems, "rollbacks_verified": state.rollbacks_verified, "zero_stage": spec.zero_stage, "precision": spec.precision,
                                     "advice_incidents": advice.all_incidents() if advice is not None else []}
    if rank == 0:
        final_metrics.update(test_metrics(test.predictions, test.labels, len(dataset.classes)))
        final_metrics["test_loss"] = test.loss
        _save_model(run_dir, final_params, full_buffers(engine), model_config=model_config, dataset=dataset, normalizer=normalizer)
        # Ray Train V2's `Result.metrics` carries only checkpointed reports, so the driver reads this file.
        (run_dir / FINAL_METRICS).write_text(json.dumps(final_metrics))
        _log(rank, f"test accuracy {final_metrics['test_accuracy']:.4f}, macro F1 {final_metrics['test_macro_f1']:.4f} (best epoch {state.best_epoch})")
    ray.train.report(final_metrics)


def _apply_configured_hyperparameters(engine, before: dict[str, float], now: dict[str, float], *, batch_size: int) -> list[str]:
    """Write the hyperparameters whose configured value differs from the one the checkpoint was trained
    with (DeepSpeed's load restores the old lr and schedule; a PBT mutation must win). Values the
    advisor changed in the old run stay where the config did not change. Returns what was written."""
    changed = [name for name in ("lr", "weight_decay", "momentum", "dropout") if before.get(name) != now[name]]
    if "lr" in changed:
        set_peak_lr(engine, now["lr"])
    others = [name for name in changed if name != "lr"]
    if others:
        values = read_hyperparameters(engine, batch_size=batch_size) | {name: now[name] for name in others}
        write_hyperparameters(engine, values, batch_size=batch_size)
    return changed


def _make_advice(settings: AdviceSettings | None, engine, *, rank: int, world_size: int, run_dir: Path, train: TrainConfig, model_kind: str,
                 modes: TrainingModes):
    """The worker's advice agent, or None when the run trains without an advisor."""
    if settings is None:
        return None
    return WorkerAdvice.create(settings, engine, rank=rank, world_size=world_size, model_kind=model_kind, total_epochs=train.epochs,
                               batch_size=train.batch_size, rollback_dir=run_dir / ".rollback", modes=modes)


def evaluate(engine, features: torch.Tensor, labels: torch.Tensor, indices: np.ndarray, *, rank: int, world_size: int, batch_size: int, dtype: torch.dtype,
             gather: bool = False, per_sample: bool = False) -> EvalResult:
    """Mean loss and accuracy over `indices`, each rank taking a shard; all ranks get the result.
    `gather`: also the predictions and labels; `per_sample`: also each sample's loss and correctness.

    All ranks run the same number of forward passes, even on an empty shard, because under ZeRO-3
    every forward gathers parameters collectively.
    """
    engine.eval()
    shard = indices[rank::world_size]
    steps = math.ceil(math.ceil(len(indices) / world_size) / batch_size)
    loss_sum = torch.zeros((), dtype=torch.float64)
    correct = 0
    predictions: list[np.ndarray] = []
    sample_losses: list[np.ndarray] = []
    device = next(engine.module.parameters()).device
    with torch.no_grad():
        for chunk in np.array_split(shard, steps):
            index = torch.from_numpy(chunk)
            logits = engine(features[index].to(device, dtype)).float()
            targets = labels[index].to(device)
            if len(chunk):
                losses = F.cross_entropy(logits, targets, reduction="none").double().cpu()
                loss_sum += losses.sum()
                sample_losses.append(losses.numpy())
                predicted = logits.argmax(dim=1)
                correct += int((predicted == targets).sum())
                predictions.append(predicted.cpu().numpy())
    totals = torch.tensor([float(loss_sum), correct, len(shard)], dtype=torch.float64)
    if dist.is_initialized():
        dist.all_reduce(totals)
    result = EvalResult(loss=float(totals[0] / totals[2]), accuracy=float(totals[1] / totals[2]))
    if gather or per_sample:
        local_predictions = np.concatenate(predictions) if predictions else np.zeros(0, dtype=np.int64)
        local_labels = labels[torch.from_numpy(shard)].numpy()
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
    return result


def test_metrics(predictions: np.ndarray, labels: np.ndarray, num_classes: int) -> dict[str, Any]:
    """Accuracy, macro precision/recall/F1 and the confusion matrix (rows: true class)."""
    from sklearn.metrics import confusion_matrix, precision_recall_fscore_support

    precision, recall, f1, _ = precision_recall_fscore_support(labels, predictions, average="macro", zero_division=0)
    return {
        "test_accuracy": float((predictions == labels).mean()),
        "test_macro_precision": float(precision),
        "test_macro_recall": float(recall),
        "test_macro_f1": float(f1),
        "test_confusion_matrix": confusion_matrix(labels, predictions, labels=list(range(num_classes))).tolist(),
    }


def _all_reduce_sums(*values: float | torch.Tensor) -> tuple[float, ...]:
    """Each value summed over the ranks (float64 on the CPU; gloo's and NCCL's sums alike)."""
    totals = torch.tensor([float(value) for value in values], dtype=torch.float64)
    if dist.is_initialized():
        dist.all_reduce(totals)
    return tuple(float(total) for total in totals)


def _checkpoint_and_report(engine, state: LoopState, best_params: dict[str, torch.Tensor] | None, row: dict[str, float], *, rank: int,
                           advice=None) -> None:
    """Every rank saves its shard, barrier, one report (saving from rank 0 alone loses ZeRO shards, ray#33369).

    Rank 0 adds what is the same on every rank: the loop state, the best weights, and the advice
    state (the coordinator's alphas, cache, track record and ledger; the observer's reference
    weights), so a restart, a `--resume` or a PBT exploit carries all of it.
    """
    import ray.train
    from safetensors.torch import save_file

    with tempfile.TemporaryDirectory(prefix="hybridtrain-ckpt-") as directory:
        engine.save_checkpoint(directory, tag=CHECKPOINT_TAG, client_state={"loop_state": asdict(state)})
        if rank == 0:
            (Path(directory) / "loop_state.json").write_text(json.dumps(asdict(state)))
            if best_params is not None:
                save_file({k: v.contiguous() for k, v in best_params.items()}, str(Path(directory) / "best.safetensors"))
            if advice is not None:
                (Path(directory) / ADVICE_STATE).write_text(json.dumps(advice.checkpoint_state()))
                tensors = advice.state_tensors()
                if tensors:
                    save_file(tensors, str(Path(directory) / ADVICE_TENSORS))
        write_manifest(directory, rank=rank, world_size=dist.get_world_size() if dist.is_initialized() else 1)
        if dist.is_initialized():
            dist.barrier()
        ray.train.report(dict(row), checkpoint=ray.train.Checkpoint.from_directory(directory))


def _restore(engine, directory: Path, advice=None) -> tuple[LoopState, dict[str, torch.Tensor] | None]:
    from safetensors.torch import load_file

    load_engine_checkpoint(engine, str(directory), CHECKPOINT_TAG)
    state = LoopState(**json.loads((directory / "loop_state.json").read_text()))
    best_file = directory / "best.safetensors"
    best = load_file(str(best_file)) if best_file.exists() else None
    if advice is not None:
        state_file, tensor_file = directory / ADVICE_STATE, directory / ADVICE_TENSORS
        advice.restore(json.loads(state_file.read_text()) if state_file.is_file() else None,
                       load_file(str(tensor_file)) if tensor_file.is_file() else None)
    return state, best


def _emit_epoch(telemetry: Telemetry, row: dict[str, float], worker_rates: list[float], *, epoch_s: float, advisor: dict[str, Any] | None) -> None:
    epoch = int(row["epoch"])
    telemetry.emit({name: row[name] for name in ("train_loss", "train_accuracy", "val_loss", "val_accuracy", "lr", "samples_per_s", "probation_s")}
                   | {"epoch": epoch, "epoch_s": epoch_s}, step=epoch)
    telemetry.emit_tagged("worker_samples_per_s", dict(enumerate(worker_rates)), step=epoch)
    if advisor is not None:
        telemetry.emit(advisor_series(advisor), step=epoch)
        telemetry.emit_tagged("alpha", advisor["alphas"], step=epoch)


def _write_metrics_csv(run_dir: Path, history: list[dict[str, float]]) -> None:
    import pandas as pd

    path = run_dir / "metrics.csv"
    pd.DataFrame(history, columns=METRIC_COLUMNS).to_csv(path.with_suffix(".csv.tmp"), index=False)
    os.replace(path.with_suffix(".csv.tmp"), path)  # a reader never sees a half-written file


def _save_model(run_dir: Path, params: dict[str, torch.Tensor], buffers: dict[str, torch.Tensor], *, model_config: ModelConfig, dataset, normalizer: Normalizer) -> None:
    """The consolidated fp32 model, with what `predict` needs to rebuild and feed it."""
    from safetensors.torch import save_file

    tensors = {name: value.float().contiguous() for name, value in {**params, **buffers}.items() if value.is_floating_point()}
    tensors.update({name: value.contiguous() for name, value in buffers.items() if not value.is_floating_point()})
    save_file(tensors, str(run_dir / "model.safetensors"))
    meta = {
        "model": asdict(model_config),
        "sample_shape": list(dataset.sample_shape),
        "classes": dataset.classes,
        "normalizer": normalizer.to_dict(),
        "data_source": dataset.source,
    }
    (run_dir / "model.json").write_text(json.dumps(meta, indent=2))


def _chaos_kill_once(run_dir: Path, where: str) -> None:
    """Testing aid: kill this worker's process the hard way, once per run (a marker file remembers)."""
    marker = run_dir / ".chaos_killed"
    if marker.exists():
        return
    marker.write_text(str(os.getpid()))
    sys.__stdout__.write(f"[hybridtrain] chaos: killing worker process {os.getpid()} {where}\n")
    sys.__stdout__.flush()
    os.kill(os.getpid(), signal.SIGKILL)


_progress_file: Path | None = None  # rank 0 sets it to RUN_DIR/progress.log


def _log(rank: int, message: str) -> None:
    """Progress for people, from rank 0 only: appended to `RUN_DIR/progress.log`, which the driver prints
    as it grows, and written to the worker's real stdout (in Ray's logs; on the terminal with --verbose).
    Not `print`: Ray Train routes it through its logger, which would echo every line twice."""
    if rank != 0:
        return
    line = f"[hybridtrain] {message}\n"
    sys.__stdout__.write(line)
    sys.__stdout__.flush()
    if _progress_file is not None:
        try:
            with open(_progress_file, "a", encoding="utf-8") as progress:
                progress.write(line)
        except OSError:  # progress display is best effort; training goes on
            pass
