"""Run a Ray Tune sweep whose trials are full hybridtrain runs.

Composition (Ray 2.60, Train V2): each trial is a Tune *function* trainable (`trial_main`) that plans
a run exactly as `hybridtrain run` does and drives its `TorchTrainer` through `cluster.launch`.
`Tuner(trainer)` is deprecated and a V2 trainer is not a Tune trainable, so the trial function is the
bridge (Ray's own `train_tune_interop` pattern):

- `execute_run` (so `TorchTrainer.fit()`) runs in a thread of the trial; a Train callback in the Train
  controller puts every epoch's report (metrics and checkpoint path) on a queue, and the trial thread
  re-reports it with `ray.tune.report(metrics, checkpoint=...)`. PBT exploits only trials that report a
  *Tune* checkpoint; forwarding metrics alone (Train's `TuneReportCallback`) makes it skip every exploit.
- Every start of a trial (first start, resume after a pause, restart after an exploit) trains into a
  fresh run directory `trials/<trial>/run-<n>` with its own Train storage, so Train never restores a
  stale checkpoint by run name; the checkpoint Tune hands the trial (its own, or the clone of a better
  trial's) goes to the workers as `initial_checkpoint`, and the trial's configured hyperparameters
  are written over the restored ones (DeepSpeed's load restores the old learning rate and schedule).
- One advisor deployment and one coordinator actor serve the whole population: the sweep deploys
  the advisor and creates the coordinator (`POPULATION_COORDINATOR`) before Tune starts; every
  trial run opens its own coordinator state in it (alphas, track record, ledger, under its own,
  possibly tuned, settings), and all of them share the advisor client and the response cache.
- The trial function reserves no CPU: it is only the Train driver, and Train reserves the workers'
  placement group from `ScalingConfig` itself. `max_concurrent_trials` is the whole population, and
  the cluster must fit it at once (asynchronous PBT pauses trials while any is pending).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import shutil
import threading
import time
from pathlib import Path
from typing import Any

from cluster.experiment import ExperimentConfig, config_from_dict, write_config
from cluster.launch import TRIAL_CPU, TrialContext, deploy_served_advisor, execute_run, needed_cpus, plan_run, resolve_output_dir
from cluster.runtime import check_shared_storage, connect
from workers.train_loop import PLACEMENT_GROUP, TENSORBOARD
from orchestration.telemetry import Telemetry
from orchestration.settings import ConfigError, merge
from tune_search.config import TuneConfig, extreme_values
from tune_search.search import build_scheduler, param_space

TUNE_STORAGE = "ray"
TUNE_RUN_NAME = "tune"
EXPLORES = "explores.jsonl"  # written by trials: every start from another trial's checkpoint
EXPLORE_DECISIONS = "explore_decisions.jsonl"  # written by the LLM explorer: every explore it decided
POPULATION_COORDINATOR = "hybridtrain-population-{digest}"  # the sweep's shared coordinator actor, by sweep directory
WORKER_START_TIMEOUT_ENV = "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S"
_REPORTED = ("epoch", "train_loss", "val_loss", "val_accuracy", "lr")


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


def check_space(config: ExperimentConfig) -> None:
    """Every value the space can produce must make a valid run config: fail before Ray starts, naming the key."""
    if config.tune.llm_explore and config.advisor.backend == "none":
        raise ConfigError("tune.llm_explore needs an advisor, but advisor.backend is 'none'")
    base = config.to_dict()
    for key, spec in config.tune.space.items():
        for value in extreme_values(spec):
            try:
                trial_config(base, {key: value})
            except ConfigError as error:
                raise ConfigError(f"tune.space.{key}: value {value!r} does not make a valid run config: {error}") from error


def free_placement_groups(root: Path) -> int:
    """Remove the placement groups of the Train runs under `root` whose workers are gone.

    A paused or stopped Tune trial is killed with its Train controller; Ray Train's cleaner frees the
    workers' placement group only through the State API (the dashboard), so without it the CPUs stay
    reserved and the next trials wait forever for them. Every run records its group's id
    (`workers.train_loop.PLACEMENT_GROUP`); a run's own trial, or the sweep at its end, frees it here.
    """
    import ray
    from ray.util.placement_group import PlacementGroup, remove_placement_group

    table = ray.util.placement_group_table()
    freed = 0
    for path in root.rglob(PLACEMENT_GROUP):
        group_id = path.read_text().strip()
        if table.get(group_id, {}).get("state") not in (None, "REMOVED"):
            remove_placement_group(PlacementGroup(ray.PlacementGroupID(bytes.fromhex(group_id))))
            freed += 1
        path.unlink()
    return freed


def _report_callback(report_queue):
    """A Train V2 callback (it runs in the Train controller) that hands each report to the trial thread."""
    from ray.train.v2.api.callback import UserCallback

    class ForwardReports(UserCallback):
        def after_report(self, run_context, metrics, checkpoint):
            report_queue.put((dict(metrics[0]), checkpoint.path if checkpoint is not None else None))

    return ForwardReports()


def trial_main(params: dict[str, Any], *, base: dict[str, Any], sweep_dir: str, coordinator: tuple[str, str] | None = None) -> None:
    """One trial: plan a run from the sampled `params`, train it, and report every epoch to Tune.
    `coordinator` is the sweep's shared coordinator actor (name, namespace), if trials are advised."""
    import ray
    from ray import tune
    from ray.util.queue import Empty, Queue

    context = tune.get_context()
    name = context.get_trial_name()
    config = dataclasses.replace(trial_config(base, params), name=name)
    # Every epoch a Tune checkpoint: a scheduler may pause, or PBT clone, a trial at any report.
    config = dataclasses.replace(config, train=dataclasses.replace(config.train, checkpoint_every=1))
    trial_root = Path(sweep_dir) / "trials" / name
    attempt = len(list(trial_root.glob("run-*")))
    free_placement_groups(trial_root)  # of this trial's earlier runs, killed by a pause
    if coordinator is not None:  # and their coordinator state, which no killed driver closed
        ray.get(ray.get_actor(coordinator[0], namespace=coordinator[1]).discard_under.remote(str(trial_root.resolve()) + os.sep))
    checkpoint = tune.get_checkpoint()
    initial = checkpoint.path if checkpoint is not None else None
    plan = plan_run(config, trial_root / f"run-{attempt}")
    if initial is not None:
        _record_start(Path(sweep_dir), name, Path(context.get_trial_dir()), initial, params, plan.run_dir)
    reports = Queue(actor_options={"num_cpus": 0})
    trial = TrialContext(coordinator=coordinator, initial_checkpoint=Path(initial) if initial is not None else None,
                         callbacks=(_report_callback(reports),))
    outcome: dict[str, Any] = {}

    def fit() -> None:
        try:
            outcome["summary"] = execute_run(plan, cluster=connect(config.cluster, quiet=True), trial=trial)
        except BaseException as error:  # noqa: BLE001 - raised again in the trial thread below
            outcome["error"] = error

    thread = threading.Thread(target=fit, name="hybridtrain-trial", daemon=True)
    thread.start()
    last_row: dict[str, Any] | None = None
    persisted: str | None = None  # the Train checkpoint Tune copied last
    while thread.is_alive() or not reports.empty():
        try:
            metrics, path = reports.get(timeout=2.0)
        except Empty:
            continue
        if metrics.get("final"):
            continue  # the workers' closing report (test metrics): summary.json has it; Tune wants epochs only
        row = {key: metrics[key] for key in _REPORTED if key in metrics} | {"run_dir": str(plan.run_dir)}
        if metrics.get("epoch", 0) >= config.train.epochs:
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
    thread.join()
    ray.kill(reports.actor)
    if "error" in outcome:
        raise outcome["error"]
    if last_row is not None:
        tune.report(last_row | {"done": True})


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
    with open(sweep_dir / EXPLORES, "a") as log:
        log.write(json.dumps(row) + "\n")


def _explore_feed(explorer):
    """Feeds every trial result to the LLM explorer, which keeps the population table and asks ahead."""
    from ray.tune import Callback

    class ExploreFeed(Callback):
        def on_trial_result(self, iteration, trials, trial, result, **info):
            explorer.observe(trial.trial_id, trial.config, result)

    return ExploreFeed()


def _progress_callback(metric: str, every_s: float = 10.0):
    """A compact live table (trial, status, epoch, score, lr) instead of Ray's raw log stream."""
    from ray.tune import Callback

    class ProgressTable(Callback):
        def __init__(self) -> None:
            self.rows: dict[str, dict[str, Any]] = {}
            self.printed = 0.0

        def on_trial_result(self, iteration, trials, trial, result, **info):
            self.rows[trial.trial_id] = {"trial": str(trial), "epoch": result.get("epoch"), "score": result.get(metric), "lr": result.get("lr")}
            if time.monotonic() - self.printed >= every_s:
                self.show(trials)

        def on_experiment_end(self, trials, **info):
            self.show(trials)

        def show(self, trials) -> None:
            self.printed = time.monotonic()
            lines = [f"[hybridtrain] {'trial':<28} {'status':<11} {'epoch':>5} {metric:>12} {'lr':>9}"]
            for trial in trials:
                row = self.rows.get(trial.trial_id, {})
                score, lr = row.get("score"), row.get("lr")
                lines.append(f"[hybridtrain] {str(trial):<28} {trial.status:<11} {row.get('epoch') or '-':>5} "
                             f"{'-' if score is None else f'{score:.4f}':>12} {'-' if lr is None else f'{lr:.2e}':>9}")
            print("\n".join(lines), flush=True)

    return ProgressTable()


def _telemetry_callback(sweep_dir: Path, name: str, metric: str, mode: str):
    """The population's series (best score, each trial's score, exploits, trials running) to Ray's metrics and to
    SWEEP_DIR/tensorboard; each trial's run writes its own series under its run directory."""
    from ray.tune import Callback

    class SweepSeries(Callback):
        def __init__(self) -> None:
            self.telemetry = Telemetry({"sweep": name}, tensorboard_dir=sweep_dir / TENSORBOARD)
            self.best: float | None = None
            self.results = 0  # the x axis of the population's series: results received so far

        def on_trial_result(self, iteration, trials, trial, result, **info):
            score = result.get(metric)
            if score is None or not math.isfinite(score):
                return
            if self.best is None or (score > self.best if mode == "max" else score < self.best):
                self.best = score
            self.results += 1
            running = sum(1 for item in trials if item.status == "RUNNING")
            self.telemetry.emit({"population_best": self.best, "exploits": _count_lines(sweep_dir / EXPLORES), "trials_running": running},
                                step=self.results)
            self.telemetry.emit_tagged("trial_score", {trial.trial_id: score}, step=self.results)

        def on_experiment_end(self, trials, **info):
            self.telemetry.close()

    return SweepSeries()


def trial_generator(tune_config: TuneConfig) -> Any:
    """Tune's variant generator, seeded (the same trials for the same seed) and limited to the sweep's concurrency."""
    from ray.tune.search import BasicVariantGenerator

    return BasicVariantGenerator(random_state=tune_config.seed, max_concurrent=tune_config.concurrency)


def run_sweep(config: ExperimentConfig | None, sweep_dir: str | Path, *, resume: bool = False, address: str | None = None) -> dict[str, Any]:
    """Run `config.tune` into `sweep_dir` (or, with `resume`, continue the sweep there) and return its summary."""
    from ray import tune

    config, sweep_dir = resolve_output_dir("sweep", config, sweep_dir, resume=resume, address=address)
    check_space(config)
    # Starting a whole population at once on a small machine takes a while: give Train's worker groups
    # longer than its 60 s default to come up (read by Train controllers of an embedded Ray, which
    # inherit this process's environment; set it on the cluster's nodes otherwise).
    os.environ.setdefault(WORKER_START_TIMEOUT_ENV, "600")
    cluster = connect(config.cluster, min_cpus=needed_cpus(config, trials=config.tune.concurrency))
    sweep_dir.mkdir(parents=True, exist_ok=True)
    check_shared_storage(sweep_dir, cluster)  # trials on any node write here and read each other's checkpoints
    if not resume:
        write_config(config, sweep_dir / "config.yaml")
    deploy_served_advisor(config.advisor, shared=True)
    population = start_population(config, sweep_dir)
    tune_config = config.tune
    callbacks = [_progress_callback(tune_config.metric), _telemetry_callback(sweep_dir, config.name, tune_config.metric, tune_config.mode)]
    explorer = None
    if tune_config.llm_explore:
        import functools

        from serve_llm.client import make_client
        from tune_search.explore import LLMExplorer

        explorer = LLMExplorer(tune_config, functools.partial(make_client, config.advisor), sweep_dir / EXPLORE_DECISIONS)
        callbacks.append(_explore_feed(explorer))
    # A trial is only the Train driver: a token share of a CPU (Tune refuses an empty request); the workers'
    # resources are reserved once, by Train, from ScalingConfig.
    trainable = tune.with_resources(tune.with_parameters(trial_main, base=config.to_dict(), sweep_dir=str(sweep_dir),
                                                         coordinator=population[:2] if population else None), {"CPU": TRIAL_CPU})
    experiment = sweep_dir / TUNE_STORAGE / TUNE_RUN_NAME
    print(f"[hybridtrain] sweep {config.name!r}: {tune_config.scheduler}, {tune_config.num_samples} trials of {config.train.epochs} epochs "
          f"-> {sweep_dir}", flush=True)
    started = time.perf_counter()
    if resume and tune.Tuner.can_restore(str(experiment)):
        tuner = tune.Tuner.restore(str(experiment), trainable=trainable, resume_errored=True)
    else:
        tuner = tune.Tuner(
            trainable,
            param_space=param_space(tune_config),
            # The concurrency limit goes to the generator: Tune ignores `max_concurrent_trials` (with only a warning)
            # once a search algorithm is given, and all trials then start at once.
            tune_config=tune.TuneConfig(num_samples=tune_config.num_samples,
                                        search_alg=trial_generator(tune_config),
                                        scheduler=build_scheduler(tune_config, max_epochs=config.train.epochs, custom_explore_fn=explorer)),
            run_config=tune.RunConfig(name=TUNE_RUN_NAME, storage_path=str(sweep_dir / TUNE_STORAGE), verbose=0,
                                      # Keep every checkpoint: PBT may clone a top trial's checkpoint after that
                                      # trial has moved on, and a rotated-out one fails the exploited trial.
                                      checkpoint_config=tune.CheckpointConfig(num_to_keep=None),
                                      callbacks=callbacks),
        )
    try:
        results = tuner.fit()
    finally:
        free_placement_groups(sweep_dir / "trials")  # of trials stopped early (ASHA) or killed last
        coordinator_stats = stop_population(population)
    summary = write_sweep_outputs(config, sweep_dir, results, wall_s=time.perf_counter() - started, coordinator=coordinator_stats)
    for trial, error in summary["trials_failed"].items():
        print(f"[hybridtrain] warning: trial {trial} failed ({error}); the others went on. Its log: {sweep_dir / TUNE_STORAGE / TUNE_RUN_NAME / trial}",
              flush=True)
    best = summary["best_score"]
    print(f"[hybridtrain] sweep done: best {tune_config.metric} {best if best is None else f'{best:.4f}'} "
          f"in {summary['best_run_dir']}; {summary['exploits']} exploits, {summary['trials']} trials -> {sweep_dir}", flush=True)
    return summary


def start_population(config: ExperimentConfig, sweep_dir: Path) -> tuple[str, str, Any] | None:
    """The sweep's one coordinator actor (name, namespace, handle), or None when trials are not advised.

    It holds the population's advisor client and response cache; its settings for the cache are the
    sweep's base `coordinator` section (each trial brings its own for the rest). A resumed sweep gets
    a fresh one; the trials bring their coordinator state back from their checkpoints.
    """
    if config.advisor.backend == "none":
        return None
    import functools

    import ray

    from orchestration.actor import get_or_create_coordinator
    from serve_llm.client import make_client

    name = POPULATION_COORDINATOR.format(digest=hashlib.sha256(str(sweep_dir).encode()).hexdigest()[:8])
    namespace = ray.get_runtime_context().namespace
    handle = get_or_create_coordinator(name, namespace, config=config.coordinator, advisor_factory=functools.partial(make_client, config.advisor))
    ray.get(handle.stats.remote())  # fail here, not in a trial, if it cannot start
    return name, namespace, handle


def stop_population(population: tuple[str, str, Any] | None) -> dict[str, Any] | None:
    """The shared coordinator's statistics (runs served, shared-cache hits), then stop it."""
    if population is None:
        return None
    import ray

    handle = population[2]
    try:
        stats = ray.get(handle.stats.remote(), timeout=60)
        stats["node_id"] = ray.get(handle.node_id.remote(), timeout=60)
    except Exception as error:  # noqa: BLE001 - the trials' own outputs matter more
        stats = {"error": f"shared coordinator unreachable at the end: {type(error).__name__}: {error}"}
        print(f"[hybridtrain] warning: {stats['error']}", flush=True)
    ray.kill(handle)
    stats.pop("runs_open", None)
    return stats


def write_sweep_outputs(config: ExperimentConfig, sweep_dir: Path, results, *, wall_s: float,
                        coordinator: dict[str, Any] | None = None) -> dict[str, Any]:
    """`results.csv` (one row per trial), `explores.csv` (exploit/explore decisions) and `summary.json`."""
    import pandas as pd

    metric, mode = config.tune.metric, config.tune.mode
    sign = 1.0 if mode == "max" else -1.0
    rows = []
    for result in results:
        history = result.metrics_dataframe if result.metrics_dataframe is not None else pd.DataFrame()
        scores = history[metric].dropna() if metric in history else pd.Series(dtype=float)
        last = result.metrics or {}
        run_dir = last.get("run_dir")
        # The run that finished may have trained no epoch of its own (restarted at the last epoch), so look
        # through all of the trial's runs, newest first.
        finals = sorted(Path(run_dir).parent.glob("run-*/summary.json"), key=lambda path: int(path.parent.name[4:])) if run_dir else []
        summary_file = finals[-1] if finals else None
        finished = summary_file is not None
        run_dir = str(summary_file.parent) if finished else run_dir
        error = _first_line(result.error) if result.error else None
        row = {"trial": Path(result.path).name, "status": "error" if result.error else ("finished" if finished else "stopped"), "error": error,
               "best_score": float(scores.max() if mode == "max" else scores.min()) if len(scores) else None,
               "last_score": last.get(metric), "epochs": last.get("epoch"), "run_dir": run_dir,
               "test_accuracy": json.loads(summary_file.read_text())["test_accuracy"] if finished else None}
        row.update({f"config/{key}": value for key, value in (result.config or {}).items()})
        rows.append(row)
    frame = pd.DataFrame(rows)
    frame.to_csv(sweep_dir / "results.csv", index=False)
    explores = _explores(sweep_dir, metric, config.tune.perturbation_interval)
    explores.to_csv(sweep_dir / "explores.csv", index=False)
    finished = [row for row in rows if row["status"] == "finished" and row["last_score"] is not None]
    candidates = finished or [row for row in rows if row["last_score"] is not None]
    best = max(candidates, key=lambda row: sign * row["last_score"]) if candidates else None
    summary = {
        "name": config.name,
        "scheduler": config.tune.scheduler,
        "metric": metric,
        "mode": mode,
        "best_score": None if best is None else best["last_score"],
        "best_test_accuracy": None if best is None else best["test_accuracy"],
        "best_config": None if best is None else {k.removeprefix("config/"): v for k, v in best.items() if k.startswith("config/")},
        "best_run_dir": None if best is None else best["run_dir"],
        "trials": len(rows),
        "trials_finished": len(finished),
        "trials_failed": {row["trial"]: row["error"] for row in rows if row["status"] == "error"},  # trial -> what went wrong
        "exploits": int(len(explores)),
        "llm_explores": int((explores.source == "llm").sum()) if len(explores) else 0,
        "fallbacks": int((explores.source == "fallback").sum()) if len(explores) else 0,
        "explore_decisions": _count_lines(sweep_dir / EXPLORE_DECISIONS),
        "coordinator": coordinator,  # the shared coordinator: runs served, response-cache hits (shared: across runs)
        "wall_s": wall_s,
    }
    (sweep_dir / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    return summary


def _explores(sweep_dir: Path, metric: str, interval: int):
    """The decisions log, with each exploited trial's score one perturbation interval later."""
    import pandas as pd

    path, decisions_path = sweep_dir / EXPLORES, sweep_dir / EXPLORE_DECISIONS
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []
    decisions = [json.loads(line) for line in decisions_path.read_text().splitlines() if line.strip()] if decisions_path.is_file() else []
    for row in rows:
        # Which explore produced this trial's config: the LLM's proposal, or PBT's perturbation after a fallback.
        match = next((d for d in reversed(decisions) if d["config"] == {k: row["config"].get(k) for k in d["config"]}), None)
        row["source"] = match["source"] if match else "pbt"
        row["proposal"] = match["proposal"] if match else None
        row["problem"] = match["problem"] if match else None
        row["score_after"] = None
        metrics_file = Path(row["run_dir"]) / "metrics.csv"
        if metrics_file.is_file():
            frame = pd.read_csv(metrics_file)
            later = frame[frame.epoch >= row["epoch"] + interval]
            if metric in frame and len(later):
                row["score_after"] = float(later[metric].iloc[0])
        row["source_config"] = json.dumps(row["source_config"])
        row["config"] = json.dumps(row["config"])
    columns = ["time", "trial", "source_trial", "epoch", "source", "proposal", "problem", "source_config", "config", "score_after", "run_dir",
               "checkpoint"]
    return pd.DataFrame(rows, columns=columns)


def _first_line(error: BaseException) -> str:
    """`Type: message` of the error a trial died of, unwrapped from Ray's task error, first line only."""
    cause = getattr(error, "cause", None) or error
    text = str(cause).strip().splitlines()
    return f"{type(cause).__name__}: {text[0] if text else ''}"[:300]


def _count_lines(path: Path) -> int:
    return sum(1 for line in path.read_text().splitlines() if line.strip()) if path.is_file() else 0
