"""The per-worker training loop, read top to bottom.

Ray Train runs `train_loop_per_worker` on every worker with a `WorkerPlan`. Each rank builds the same
data, model and DeepSpeed engine (`workers.loop.prepare`), starts fresh or restores
(`restore_or_begin`), then trains epoch after epoch (`workers.epoch.run_epoch`) and validates. All else
(advice, research modes, telemetry, checkpoints, progress, fault injection) is a component fired on
the loop's named events (`workers.events`, `workers.components`). At the end the best-validation weights
are evaluated once on the test split; rank 0 alone writes the files a person reads.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
import warnings
from pathlib import Path
from typing import Any

from workers.checkpoints import CheckpointError, agree_on_checkpoint, checkpoint_problem
from workers.checkpointing import restore
from workers.components import ADVICE_STATE, BUILT_IN, TENSORBOARD
from workers.config import LR_FIND
from workers.engine import broadcast_from_rank0, full_buffers, gather_to_all, full_fp32_params, params_digest, read_hyperparameters, set_peak_lr, write_full_fp32_params, write_hyperparameters
from workers.epoch import run_epoch, test_metrics, validate
from workers.files import atomic_write_bytes, atomic_write_text
from workers.events import Components, Event
from workers.lr_find import find_learning_rate, read_result
from workers.loop import PLACEMENT, PLACEMENT_GROUP, PROGRESS, Loop, LoopState, prepare
from workers.memory import MemoryWatch
from workers.plan import WorkerPlan

__all__ = ["ADVICE_STATE", "FINAL_METRICS", "PLACEMENT", "PLACEMENT_GROUP", "PROGRESS", "TENSORBOARD", "LoopState", "train_loop_per_worker"]

RESTORED_FROM = "restored_from.json"  # in the run directory: what an outside checkpoint brought, and what the config changed
STARTED = ".started"  # in the run directory: an attempt of this run has started (a later one without a checkpoint is a restart)
FINAL_METRICS = "final_metrics.json"


def train_loop_per_worker(loop_config: dict[str, Any]) -> None:
    import ray.train

    # DeepSpeed still calls torch collectives that torch marks deprecated, a warning at every ZeRO step.
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"torch\.distributed\.c10d_logger")
    plan = WorkerPlan.from_loop_config(loop_config)
    memory = MemoryWatch().start()  # after the imports, before the data: what the worker holds for its data shows as growth
    memory.phase = "start-up (data, model, engine)"
    loop = prepare(plan)
    loop.memory = memory
    if plan.train.lr == LR_FIND:
        find_lr(loop)
    # Built before restoring: the advice reads the configured peak lr off the fresh schedule (`WorkerAdvice.configured_lr`).
    loop.components = Components.build((*BUILT_IN, *plan.extra_components), loop)
    problems = restore_or_begin(loop)
    loop.state.nodes = loop.nodes
    loop.fire(Event.FIT_START)
    last_epoch = loop.train.epochs
    if loop.start == "resumed" and stopped_early(loop):  # the driver died after the stop: evaluate, do not train on
        loop.log(f"the run stopped early after epoch {loop.state.epoch}: no more epochs")
        last_epoch = loop.state.epoch
    for epoch in range(loop.state.epoch + 1, last_epoch + 1):
        loop.epoch, loop.epoch_started = epoch, time.perf_counter()
        loop.start_clock()
        loop.fire(Event.EPOCH_START)
        memory.phase = f"epoch {epoch}"
        loop.epoch_result = run_epoch(loop, epoch)
        loop.fire(Event.EVAL_START)
        memory.phase = f"validation {epoch}"
        val = validate(loop)
        loop.fire(Event.EVAL_END)
        end_epoch(loop, val)
        memory.phase = f"end of epoch {epoch} (advice, checkpoint)"
        loop.fire(Event.EPOCH_END)
        # The epoch's tail (telemetry, checkpoint, report) is training wall time too: the next row's
        # wall_s includes this one's, so wall_s differences are whole epochs end to end.
        loop.account_time()
        if loop.stop:
            state = loop.state
            loop.log(f"early stopping: no val-loss improvement for {state.bad_epochs} epochs (best {state.best_val_loss:.4f} at epoch {state.best_epoch})")
            break
    loop.fire(Event.FIT_END)
    memory.phase = "the test and the final model"
    ray.train.report(finish(loop, problems))


def find_lr(loop: Loop) -> None:
    """`train.lr: find`: the LR range test's choice becomes the run's peak lr (an earlier attempt's choice, when there
    was one: a restart must not train with another rate). Before the components are built: the advice reads its
    configured lr off the schedule."""
    result = read_result(loop.run_dir) if loop.rank == 0 else None
    result = broadcast_from_rank0(result)
    if result is not None:
        loop.log(f"lr find: the earlier attempt's choice, lr {result.lr:.3g}")
    else:
        result = find_learning_rate(loop, fallback_lr=loop.train.lr)
        loop.log(f"lr find: {result.steps_run} steps from {result.min_lr:g} to {result.max_lr:g}"
                 + (", stopped when the smoothed loss passed 4x its best" if result.stopped_early else "")
                 + (f"; steepest descent at lr {result.suggested:.3g}" if result.suggested is not None else f"; {result.fallback}")
                 + f"; state restored exactly ({result.seconds:.1f} s)")
    loop.lr_find = result
    loop.train = dataclasses.replace(loop.train, lr=result.lr)
    if getattr(loop.modes, "train", None) is not None:
        loop.modes.train = loop.train
    loop.configured["lr"] = result.lr
    loop.state.configured = dict(loop.configured)
    set_peak_lr(loop.engine, result.lr)


def stopped_early(loop: Loop) -> bool:
    """Whether `loop.state` is that of a run that stopped early (no val-loss improvement for the patience)."""
    patience = loop.train.early_stopping_patience
    return patience > 0 and loop.state.bad_epochs >= patience


def end_epoch(loop: Loop, val) -> None:
    """Book the epoch: best weights, stopping, its metrics row; decide whether it checkpoints."""
    state, train, result = loop.state, loop.train, loop.epoch_result
    if val.loss < state.best_val_loss - train.early_stopping_min_delta:
        state.best_val_loss, state.best_epoch, state.bad_epochs = val.loss, loop.epoch, 0
        loop.best_params = loop.eval_weights.evaluated_params()  # what validation measured (schedule-free: x); collective under ZeRO
    else:
        state.bad_epochs += 1
    state.epoch = loop.epoch
    loop.account_time()
    loop.row = {"epoch": loop.epoch, "train_loss": result.train_loss, "train_accuracy": result.train_accuracy, "val_loss": val.loss,
                "val_accuracy": val.accuracy, "lr": loop.engine.get_lr()[0], "samples_per_s": result.samples / result.train_seconds,
                "wall_s": state.wall_s}
    state.history.append(loop.row)
    loop.row["probation_s"] = 0.0
    loop.stop = stopped_early(loop)
    loop.save = loop.epoch % train.checkpoint_every == 0 or loop.stop or loop.epoch == train.epochs


def restore_or_begin(loop: Loop) -> list[str]:
    """Start this attempt: from the newest intact checkpoint of this run (a worker restart or `--resume`;
    it may be newer than the one Train registered), from a checkpoint a sweep handed over, or fresh.
    Sets `loop.start`, `loop.state` and `loop.best_params`; returns the checkpoints found unusable."""
    import ray.train

    registered = ray.train.get_checkpoint()
    # Rank 0 chooses for all (collective): each rank's own look at shared storage could find another newest one.
    chosen, problems = agree_on_checkpoint(loop.plan.checkpoint_root, registered.path if registered is not None else None,
                                           rank=loop.rank, share=broadcast_from_rank0)
    for problem in problems:
        loop.log(f"checkpoint unusable: {problem}")
    if registered is not None and chosen is None:
        raise CheckpointError(f"no intact checkpoint to resume from: {'; '.join(problems)}")
    if chosen is not None:
        loop.start = "resumed"
        restore(loop, chosen)
        loop.state.restarts += 1
        unregistered = registered is None or Path(registered.path) != chosen
        loop.log(f"resumed from checkpoint after epoch {loop.state.epoch} (restart {loop.state.restarts})"
                 + (f", the newest intact one ({chosen.name})" if problems else "")
                 + (", which Ray Train had not registered yet" if unregistered and not problems else ""))
    elif loop.plan.initial_checkpoint is not None:
        loop.start = "handed over"
        _begin_from_handed_over(loop, loop.plan.initial_checkpoint)
    else:
        loop.start = "fresh"
        _begin_fresh(loop)
    return problems


def _begin_from_handed_over(loop: Loop, initial: Path) -> None:
    """A checkpoint from outside this Train run: a sweep trial's own (after a pause) or a better trial's (PBT
    exploit). Its hyperparameters are the old run's; this run's config wins."""
    problem = checkpoint_problem(initial)
    if problem is not None:
        raise CheckpointError(f"the checkpoint this trial starts from is unusable: {problem}")
    restore(loop, Path(initial))
    state = loop.state
    restored_lr = loop.engine.get_lr()[0]
    digest = params_digest(full_fp32_params(loop.engine)) if loop.plan.digest_checkpoints else ""  # collective under ZeRO-3
    changed = apply_configured_hyperparameters(loop.engine, state.configured, loop.configured, batch_size=loop.train.batch_size)
    if loop.rank == 0:
        atomic_write_text(loop.run_dir / RESTORED_FROM, json.dumps({
            "checkpoint": str(initial), "epoch": state.epoch, "params_sha256": digest, "lr_restored": restored_lr,
            "lr_now": loop.engine.get_lr()[0], "configured_before": state.configured, "configured_now": loop.configured, "changed": changed,
            "written_on": state.nodes, "read_on": loop.nodes}))
    state.configured = loop.configured
    loop.log(f"started from {initial} after epoch {state.epoch}" + (f"; config changed {', '.join(changed)}" if changed else ""))


def _begin_fresh(loop: Loop) -> None:
    earlier = loop.run_dir / STARTED
    if loop.rank == 0 and earlier.exists():  # an earlier attempt of this run died before its first checkpoint
        loop.state.restarts = 1
        loop.log("restarting from the beginning: the last attempt saved no checkpoint")
    elif loop.rank == 0:
        earlier.write_text(json.dumps({"pid": os.getpid()}))
    model, data, train, spec = loop.model_config, loop.data, loop.train, loop.spec
    shape = f"{model.factory}, options {model.options}" if model.factory else f"width {model.width}, depth {model.depth}"
    loop.log(f"training {model.kind} ({shape}, dropout {loop.configured['dropout']:g}) on "
             f"{data.dataset.source}: {data.count('train')}/{data.count('val')}/{data.count('test')} samples, {loop.world_size} workers, ZeRO-{spec.zero_stage}, "
             f"{spec.precision}, {spec.device}; batch {train.batch_size} per worker"
             + (f" (lowered from {loop.plan.train.batch_size}: train.min_steps_per_epoch {train.min_steps_per_epoch})"
                if train.batch_size != loop.plan.train.batch_size else ""))


def apply_configured_hyperparameters(engine, before: dict[str, float], now: dict[str, float], *, batch_size: int) -> list[str]:
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


def finish(loop: Loop, checkpoint_problems: list[str]) -> dict[str, Any]:
    """The final model is the best-validation one; the test split is touched exactly once, here."""
    from workers.epoch import evaluate

    state, spec = loop.state, loop.spec
    final = loop.best_params if loop.best_params is not None else loop.eval_weights.evaluated_params()
    write_full_fp32_params(loop.engine, final)
    loop.eval_weights.final()  # the engine holds the evaluated weights now (schedule-free: its average x)
    test = evaluate(loop, "test", gather=True)
    final_params = full_fp32_params(loop.engine)
    final_metrics: dict[str, Any] = {"epoch": state.epoch, "final": True, "best_val_loss": state.best_val_loss, "best_epoch": state.best_epoch,
                                     "wall_s": state.wall_s, "restarts": state.restarts, "probation_s": state.probation_s,
                                     "checkpoint_s": state.checkpoint_s, "checkpoint_problems": checkpoint_problems,
                                     "rollbacks_verified": state.rollbacks_verified, "zero_stage": spec.zero_stage, "precision": spec.precision,
                                     "advice_incidents": []}
    if loop.lr_find is not None:
        final_metrics["lr_find"] = loop.lr_find.record()
    final_metrics |= loop.components.final_metrics(loop)
    memory = gather_to_all(loop.memory.stop() if loop.memory is not None else {})  # collective: every rank's figures
    final_metrics["worker_memory"] = [{"rank": rank, **figures} for rank, figures in enumerate(memory)]
    if loop.rank == 0:
        final_metrics.update(test_metrics(test.predictions, test.labels, len(loop.data.dataset.classes)))
        final_metrics["test_loss"] = test.loss
        save_model(loop, final_params, full_buffers(loop.engine))
        # Ray Train V2's `Result.metrics` carries only checkpointed reports, so the driver reads this file.
        atomic_write_text(loop.run_dir / FINAL_METRICS, json.dumps(final_metrics))
        loop.log(f"test accuracy {final_metrics['test_accuracy']:.4f}, macro F1 {final_metrics['test_macro_f1']:.4f} (best epoch {state.best_epoch})")
    return final_metrics


def save_model(loop: Loop, params: dict[str, Any], buffers: dict[str, Any]) -> None:
    """The consolidated fp32 model, with what `predict` needs to rebuild and feed it."""
    from dataclasses import asdict

    from safetensors.torch import save

    tensors = {name: value.float().contiguous() for name, value in {**params, **buffers}.items() if value.is_floating_point()}
    tensors.update({name: value.contiguous() for name, value in buffers.items() if not value.is_floating_point()})
    atomic_write_bytes(loop.run_dir / "model.safetensors", save(tensors))
    dataset = loop.data.dataset
    meta = {
        "model": asdict(loop.model_config),
        "sample_shape": list(dataset.sample_shape),
        "classes": dataset.classes,
        "normalizer": loop.data.normalizer.to_dict(),
        "data_source": dataset.source,
    }
    atomic_write_text(loop.run_dir / "model.json", json.dumps(meta, indent=2))
