"""The Train-to-Tune bridge: one Tune trial (`trial_main`) is one hybridtrain run.

Ray 2.60's V2 `TorchTrainer` is not a Tune trainable, so the trial is a Tune *function* trainable that
plans a run exactly as `hybridtrain run` does and executes it through `cluster.launch` (Ray's own
`train_tune_interop` pattern), with a `TrialContext` saying what the sweep adds:

- `execute_run` (so `TorchTrainer.fit()`) runs in a thread of the trial; a Train callback in the Train
  controller puts every epoch's report (metrics and checkpoint path) on a queue, and the trial thread
  re-reports it with `ray.tune.report(metrics, checkpoint=...)`. PBT exploits only trials that report a
  *Tune* checkpoint; forwarding metrics alone (Train's `TuneReportCallback`) makes it skip every exploit.
- Every start of a trial (first start, resume after a pause, restart after an exploit) trains into a
  fresh run directory `trials/<trial>/run-<n>` with its own Train storage, so Train never restores a
  stale checkpoint by run name; the checkpoint Tune hands the trial (its own, or the clone of a better
  trial's) goes to the workers as `initial_checkpoint`, and the trial's configured hyperparameters
  are written over the restored ones (DeepSpeed's load restores the old learning rate and schedule).
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import threading
import time
from pathlib import Path
from typing import Any

from cluster.experiment import ExperimentConfig, config_from_dict
from cluster.launch import RunPlan, TrialContext, execute_run, plan_run
from cluster.placement import free_placement_groups
from cluster.rundir import append_jsonl
from cluster.runtime import connect
from cluster.sweep_outputs import EXPLORES
from orchestration.settings import merge

REPORTED = ("epoch", "train_loss", "val_loss", "val_accuracy", "lr")  # what each epoch's Tune result holds, with the run directory


def nest(flat: dict[str, Any]) -> dict[str, Any]:
    """{"train.lr": 0.1} -> {"train": {"lr": 0.1}}"""
    nested: dict[str, Any] = {}
    for key, value in flat.items():
        section, _, name = key.partition(".")
        nested.setdefault(section, {})[name] = value
    return nested


def trial_config(base: dict[str, Any], params: dict[str, Any]) -> ExperimentConfig:
    """The run config of one trial: the sweep's base config with the trial's sampled values."""
    return config_from_dict(merge(base, nest({key: value for key, value in params.items() if "." in key})))


def trial_main(params: dict[str, Any], *, base: dict[str, Any], sweep_dir: str, coordinator: tuple[str, str] | None = None) -> None:
    """One trial: plan a run from the sampled `params`, train it, and report every epoch to Tune.
    `coordinator` is the sweep's shared coordinator actor (name, namespace), if trials are advised."""
    import ray
    from ray import tune
    from ray.util.queue import Queue

    context = tune.get_context()
    name = context.get_trial_name()
    plan = _plan_this_start(params, base=base, name=name, trial_root=Path(sweep_dir) / "trials" / name, coordinator=coordinator)
    checkpoint = tune.get_checkpoint()
    initial = checkpoint.path if checkpoint is not None else None
    if initial is not None:
        _record_start(Path(sweep_dir), name, Path(context.get_trial_dir()), initial, params, plan.run_dir)
    reports = Queue(actor_options={"num_cpus": 0})
    trial = TrialContext(coordinator=coordinator, initial_checkpoint=Path(initial) if initial is not None else None,
                         callbacks=(_report_callback(reports),))
    outcome: dict[str, Any] = {}

    def fit() -> None:
        try:
            outcome["summary"] = execute_run(plan, cluster=connect(plan.config.cluster, quiet=True), trial=trial)
        except BaseException as error:  # noqa: BLE001 - raised again in the trial thread below
            outcome["error"] = error

    thread = threading.Thread(target=fit, name="hybridtrain-trial", daemon=True)
    thread.start()
    last_row = _forward_reports(reports, thread, plan)
    thread.join()
    ray.kill(reports.actor)
    if "error" in outcome:
        raise outcome["error"]
    if last_row is not None:
        tune.report(last_row | {"done": True})


def _plan_this_start(params: dict[str, Any], *, base: dict[str, Any], name: str, trial_root: Path,
                     coordinator: tuple[str, str] | None) -> RunPlan:
    """The run of this start of the trial, in a fresh `run-<n>` directory, after freeing what the trial's
    earlier runs (killed by a pause, so never closed) still hold."""
    import ray

    config = dataclasses.replace(trial_config(base, params), name=name)
    # Every epoch a Tune checkpoint: a scheduler may pause, or PBT clone, a trial at any report.
    config = dataclasses.replace(config, train=dataclasses.replace(config.train, checkpoint_every=1))
    attempt = len(list(trial_root.glob("run-*")))
    free_placement_groups(trial_root)  # of this trial's earlier runs, killed by a pause
    if coordinator is not None:  # and their coordinator state, which no killed driver closed
        ray.get(ray.get_actor(coordinator[0], namespace=coordinator[1]).discard_under.remote(str(trial_root.resolve()) + os.sep))
    return plan_run(config, trial_root / f"run-{attempt}")


def _report_callback(report_queue):
    """A Train V2 callback (it runs in the Train controller) that hands each report to the trial thread."""
    from ray.train.v2.api.callback import UserCallback

    class ForwardReports(UserCallback):
        def after_report(self, run_context, metrics, checkpoint):
            report_queue.put((dict(metrics[0]), checkpoint.path if checkpoint is not None else None))

    return ForwardReports()


def _forward_reports(reports, fitting: threading.Thread, plan: RunPlan) -> dict[str, Any] | None:
    """Re-report to Tune every epoch the Train callback queued, with its checkpoint, until the run is over.
    Returns the last epoch's row, which is held back for the caller to report once the run has finished."""
    from ray import tune
    from ray.util.queue import Empty

    last_row: dict[str, Any] | None = None
    persisted: str | None = None  # the Train checkpoint Tune copied last
    while fitting.is_alive() or not reports.empty():
        try:
            metrics, path = reports.get(timeout=2.0)
        except Empty:
            continue
        if metrics.get("final"):
            continue  # the workers' closing report (test metrics): summary.json has it; Tune wants epochs only
        row = {key: metrics[key] for key in REPORTED if key in metrics} | {"run_dir": str(plan.run_dir)}
        if metrics.get("epoch", 0) >= plan.config.train.epochs:
            # Held back until the run has written its final model and summary, then reported as done:
            # a scheduler sees no result it could pause or stop the finishing trial on.
            last_row = row
        elif path is None:
            tune.report(row)
        else:
            tune.report(row, checkpoint=tune.Checkpoint.from_directory(path))
            # Tune holds its own copy now. Train keeps every checkpoint in a trial (a busy trial thread can fall
            # several reports behind, and a rotated-out one could not be copied); the one before this is
            # older than Train's latest, so it is removed here instead.
            if persisted is not None:
                shutil.rmtree(persisted, ignore_errors=True)
            persisted = path
    return last_row


def _record_start(sweep_dir: Path, trial: str, trial_dir: Path, checkpoint: str, params: dict[str, Any], run_dir: Path) -> None:
    """A trial started from a checkpoint: its own (resumed after a pause) or another trial's (a PBT exploit)."""
    source_dir = Path(checkpoint).parent
    if source_dir.name == trial_dir.name:
        return  # its own checkpoint: a pause, not an exploit
    source_params = json.loads((source_dir / "params.json").read_text()) if (source_dir / "params.json").is_file() else {}
    loop_state = json.loads((Path(checkpoint) / "loop_state.json").read_text())
    row = {"time": time.time(), "trial": trial, "source_trial": source_dir.name, "epoch": loop_state["epoch"], "checkpoint": checkpoint,
           "source_config": {k: v for k, v in source_params.items() if "." in k}, "config": {k: v for k, v in params.items() if "." in k},
           "source": "pbt", "run_dir": str(run_dir)}
    append_jsonl(sweep_dir / EXPLORES, row)  # trials on several nodes append here

