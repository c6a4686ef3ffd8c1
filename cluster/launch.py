"""Launch one training run: `plan_run` (pure) decides what to run, `execute_run` runs it on Ray.

    plan = plan_run(config, run_dir)        # resolved config, run directory, run id, resume point; writes nothing
    summary = execute_run(plan)             # connect, start the advisor and coordinator, fit, summarise

A Ray Tune trial (`cluster.trial`) plans and executes its run with the same two calls, adding a
`TrialContext` (the sweep's shared coordinator, the checkpoint Tune handed it, the callbacks that
forward its reports), so a trial trains exactly as `hybridtrain run` does. The pieces a run and a
sweep share live here once: `resolve_output_dir`, `needed_cpus`, `deploy_served_advisor`. Ray Train
receives a frozen `workers.plan.WorkerPlan`, built by `worker_plan`.

A run directory holds `config.yaml` (the resolved config), `metrics.csv` (one row per epoch),
`interventions.csv` (the advisor ledger), `summary.json`, the final `model.safetensors` with
`model.json`, and `ray/` (Ray Train's storage: checkpoints that `--resume` and worker restarts
continue from; each one also holds the coordinator's state, so the ledger survives a killed driver).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import json
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Literal

from cluster.console import RAY_LOGS, ProgressTail, collect_ray_logs, since_now
from cluster.experiment import ConfigError, ExperimentConfig, read_config, write_config
from cluster.runtime import ClusterInfo, check_shared_storage, connect
from orchestration.errors import RunError
from orchestration.ledger import InterventionRecord, Ledger
from serve_llm.config import AdvisorConfig
from workers.advice import AdviceSettings
from workers.data import load_dataset, stratified_split
from workers.plan import WorkerPlan
from workers.train_loop import ADVICE_STATE, FINAL_METRICS, PROGRESS

logger = logging.getLogger(__name__)

RAY_STORAGE = "ray"
RAY_RUN_NAME = "train"
LEDGER = "interventions.csv"
TRIAL_CPU = 0.01  # a sweep trial's own request: it is only the Train driver (Tune refuses an empty request)


@dataclass(frozen=True, kw_only=True, slots=True)
class TrialContext:
    """What a sweep trial adds to a run; `hybridtrain run` has none.

    The sweep deployed the advisor and created one coordinator actor for the whole population, and
    checked its directory's storage once; Tune hands the trial a checkpoint to start from and wants
    every report forwarded with its checkpoint.
    """

    coordinator: tuple[str, str] | None  # the sweep's shared coordinator actor (name, namespace); None: trials are not advised
    initial_checkpoint: Path | None = None  # Tune's checkpoint for this start: its own after a pause, or a PBT clone
    callbacks: tuple[Any, ...] = ()  # Train callbacks: forward each report (metrics and checkpoint) to the trial thread
    digest_checkpoints: bool = True  # each checkpoint records a hash of its weights, so a PBT clone can be checked
    keep_all_checkpoints: bool = True  # Train rotates none away: the trial removes each one after Tune has its copy
    storage_checked: bool = True  # the sweep checked its whole directory's shared storage once, not each trial


@dataclass(frozen=True, kw_only=True)
class RunPlan:
    """Everything decided about a run before anything starts."""

    config: ExperimentConfig  # resolved: recipe, file and overrides applied (or read back from the run directory)
    run_dir: Path
    run_id: str  # `<name>-<digest of the config>`: the same config gives the same id, in any process
    resume: bool
    resume_from: Path | None  # the latest checkpoint Ray Train will hand the workers, if any
    data: dict[str, Any]  # what the data check found: source, shapes, split sizes
    needed_cpus: int  # train workers plus advisor replicas, at once

    @property
    def storage_path(self) -> Path:
        return self.run_dir / RAY_STORAGE

    @property
    def coordinator_name(self) -> str:
        """One coordinator actor per run directory (two runs of one config may run side by side)."""
        return f"hybridtrain-coordinator-{self.run_id}-{_digest(str(self.run_dir))}"

    @property
    def run_key(self) -> str:
        """This run's key in its coordinator actor (which may serve a whole sweep): its run directory."""
        return str(self.run_dir)


def plan_run(config: ExperimentConfig | None, run_dir: str | Path, *, resume: bool = False, address: str | None = None) -> RunPlan:
    """Check and resolve a run without side effects: nothing is written and Ray is not touched.

    On `resume` the config comes from `run_dir/config.yaml`; `address` (if given) replaces the
    cluster address saved there. Bad configs, data and run directories raise `ConfigError`/`DataError`.
    """
    config, run_dir = resolve_output_dir("run", config, run_dir, resume=resume, address=address)
    return RunPlan(config=config, run_dir=run_dir, run_id=run_id(config), resume=resume,
                   resume_from=latest_checkpoint(run_dir / RAY_STORAGE) if resume else None, data=check_data(config),
                   needed_cpus=needed_cpus(config))


_NEEDS_A_CONFIG = {"run": "plan_run", "sweep": "run_sweep"}  # the entry point of each kind, named when a new one comes without a config


def resolve_output_dir(kind: Literal["run", "sweep"], config: ExperimentConfig | None, path: str | Path, *, resume: bool = False,
                       address: str | None = None) -> tuple[ExperimentConfig, Path]:
    """The config and absolute directory of a new or resumed run or sweep; reads, never writes.

    On `resume` the config is the one saved in `path/config.yaml` (a run that already finished is
    refused: its summary is final); a new one needs `config` and a `path` that holds none yet.
    `address` (if given) replaces the cluster address in the config, which may name a cluster that is gone.
    """
    if kind not in _NEEDS_A_CONFIG:
        raise ValueError(f"kind must be one of {sorted(_NEEDS_A_CONFIG)}, got {kind!r}")
    path = Path(path).resolve()
    if resume:
        if not (path / "config.yaml").is_file():
            raise ConfigError(f"--resume {str(path)!r}: not a {kind} directory (no config.yaml)")
        if kind == "run" and (path / "summary.json").is_file():
            raise ConfigError(f"--resume {str(path)!r}: the run already finished (summary.json is there)")
        config = read_config(path / "config.yaml")
    elif config is None:
        raise ValueError(f"{_NEEDS_A_CONFIG[kind]} needs a config unless it resumes a {kind} directory")
    elif (path / "config.yaml").exists():
        raise ConfigError(f"{kind} directory {str(path)!r} already holds a {kind}; use --resume to continue it or choose another --output")
    else:
        config = dataclasses.replace(config)  # the caller's object stays theirs
    if address is not None:
        config = dataclasses.replace(config, cluster=dataclasses.replace(config.cluster, address=address))
    return config, path


def needed_cpus(config: ExperimentConfig, *, trials: int | None = None) -> int:
    """Logical CPUs that must be free at once: one run's train workers, or those of `trials` sweep trials
    (each trial also holds `TRIAL_CPU` as its Train driver; PBT needs the whole population running),
    plus the advisor's Serve replicas at their most (deployed once, shared by every trial)."""
    workers = config.train.num_workers * config.train.cpus_per_worker
    runs = workers if trials is None else trials * (workers + TRIAL_CPU)
    return math.ceil(runs + config.advisor.served_cpus)


def run_id(config: ExperimentConfig) -> str:
    """`<name>-<8 hex digits>` from everything that defines the run (not where it runs): stable across
    processes and machines, unlike Python's salted `hash()` of a string."""
    defining = {key: value for key, value in config.to_dict().items() if key not in ("cluster", "tune")}
    return f"{config.name}-{_digest(json.dumps(defining, sort_keys=True, default=str))}"


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:8]


def check_data(config: ExperimentConfig) -> dict[str, Any]:
    """Load and split the data once on the driver, so bad data fails before Ray starts."""
    dataset = load_dataset(config.data)
    split = stratified_split(dataset.y, val_fraction=config.data.val_fraction, test_fraction=config.data.test_fraction, seed=config.data.seed)
    return {"source": dataset.source, "sample_shape": list(dataset.sample_shape), "classes": len(dataset.classes),
            "train": len(split.train), "val": len(split.val), "test": len(split.test)}


def latest_checkpoint(storage_path: Path) -> Path | None:
    """The newest Ray Train checkpoint directory under `storage_path`, or None."""
    # Directories only: Train keeps its checkpoint manager's state beside them (checkpoint_manager_snapshot.json).
    checkpoints = sorted((path for path in storage_path.glob(f"{RAY_RUN_NAME}/checkpoint_*") if path.is_dir()), key=lambda path: path.stat().st_mtime)
    return checkpoints[-1] if checkpoints else None


def run_experiment(config: ExperimentConfig | None, run_dir: str | Path, *, resume: bool = False, cluster: ClusterInfo | None = None,
                   advisor_factory: Callable[[], Any] | None = None) -> dict[str, Any]:
    """`execute_run(plan_run(config, run_dir, resume=resume))`: train and return the summary."""
    return execute_run(plan_run(config, run_dir, resume=resume), cluster=cluster, advisor_factory=advisor_factory)


def execute_run(plan: RunPlan, *, cluster: ClusterInfo | None = None, advisor_factory: Callable[[], Any] | None = None,
                trial: TrialContext | None = None, components: tuple[Any, ...] = ()) -> dict[str, Any]:
    """Train `plan` into its run directory and return the summary (also written to `summary.json`).

    `components` are the caller's own loop components (picklable factories, `workers.events`), fired on
    every worker after the built-in ones.

    `advisor_factory` replaces the configured advisor with a custom client (anything with
    `submit(snapshot) -> Future`), built inside the coordinator actor. A sweep trial passes its
    `trial` context: the run opens in the sweep's shared coordinator, starts from the checkpoint Tune
    handed it and forwards each report (what else changes is listed on `TrialContext`).
    """
    config, run_dir = plan.config, plan.run_dir
    cluster = cluster or connect(config.cluster, min_cpus=plan.needed_cpus)
    run_dir.mkdir(parents=True, exist_ok=True)
    if trial is None or not trial.storage_checked:
        check_shared_storage(run_dir, cluster)  # workers on any node write checkpoints here
    write_config(config, run_dir / "config.yaml")
    use_gpu = resolve_use_gpu(config, cluster)
    data = plan.data
    print(f"[hybridtrain] run {config.name!r} ({plan.run_id}) -> {run_dir}  ({data['source']}: {data['train']}/{data['val']}/{data['test']} samples, "
          f"{data['classes']} classes)" + (f"; resuming from {plan.resume_from.name}" if plan.resume_from else ""), flush=True)

    coordinator = trial.coordinator if trial is not None else None
    handle, advice = start_advice(plan, advisor_factory, coordinator=coordinator)
    shared = coordinator is not None
    trainer = build_trainer(plan, advice=advice, use_gpu=use_gpu, trial=trial, components=components)
    started, logs_since = time.perf_counter(), since_now()
    # Rank 0's progress lines reach the terminal through the run directory, unless the workers' own
    # output does (--verbose); a sweep trial's progress stays in its run directory.
    tail = ProgressTail(run_dir / PROGRESS) if not config.cluster.verbose and trial is None else contextlib.nullcontext()
    try:  # whatever happens, the full Ray and worker logs end up in the run directory (they are off the terminal)
        try:
            with tail:
                result = trainer.fit()
        except Exception as error:  # Ray wraps worker errors; keep the cause and point at the resumable state
            close_advice(handle, plan, incidents=[], shared=shared)
            raise RunError(f"training failed: {error}\nThe last checkpoint is kept; continue with: hybridtrain run --resume {run_dir}"
                           f"\nWorker and Ray logs: {run_dir / RAY_LOGS}") from error
        final_file = run_dir / FINAL_METRICS
        if result.error is not None or not final_file.is_file():
            close_advice(handle, plan, incidents=[], shared=shared)
            raise RunError(f"training ended without its final evaluation ({result.error or 'no ' + FINAL_METRICS}); resume with: hybridtrain run --resume {run_dir}")
        metrics = json.loads(final_file.read_text())
        advice_counts = close_advice(handle, plan, incidents=metrics.get("advice_incidents", []), shared=shared)
        summary = summarize(plan, metrics, advice_counts, driver_wall_s=time.perf_counter() - started, use_gpu=use_gpu, cluster=cluster)
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    finally:
        collect_ray_logs(run_dir / RAY_LOGS, since=logs_since)
    print(f"[hybridtrain] done: test_accuracy {summary['test_accuracy']:.4f}, macro F1 {summary['test_macro_f1']:.4f}, "
          f"{summary['epochs']} epochs in {summary['wall_s']:.1f}s -> {run_dir}", flush=True)
    return summary


def resolve_use_gpu(config: ExperimentConfig, cluster: ClusterInfo) -> bool:
    use_gpu = cluster.use_gpu if config.train.use_gpu is None else config.train.use_gpu
    if use_gpu and not cluster.use_gpu:
        raise ConfigError("train.use_gpu is true but the cluster has no GPUs")
    return use_gpu


def worker_plan(plan: RunPlan, *, advice: AdviceSettings | None, trial: TrialContext | None = None,
                components: tuple[Any, ...] = ()) -> WorkerPlan:
    """What every worker of `plan` receives: its config sections, where it writes, and how it starts."""
    config = plan.config
    return WorkerPlan(data=config.data, model=config.model, train=config.train, modes=config.modes, run_dir=plan.run_dir,
                      checkpoint_root=plan.storage_path / RAY_RUN_NAME, advice=advice, faults=config.faults,
                      initial_checkpoint=trial.initial_checkpoint if trial is not None else None,
                      digest_checkpoints=trial is not None and trial.digest_checkpoints, extra_components=tuple(components))


def build_trainer(plan: RunPlan, *, advice: AdviceSettings | None, use_gpu: bool, trial: TrialContext | None = None,
                  components: tuple[Any, ...] = ()):
    """The Ray Train `TorchTrainer` for `plan`: `num_workers` DeepSpeed workers (gloo on CPU, NCCL on GPU).

    The same name and storage on `--resume` make Ray Train hand the latest checkpoint to the workers;
    without one, a sweep trial's workers start from its `initial_checkpoint` (Train V2 has no
    `resume_from_checkpoint`, so the path travels in the `WorkerPlan`).
    """
    from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from workers.train_loop import train_loop_per_worker

    train = plan.config.train
    resources = {"CPU": train.cpus_per_worker} | ({"GPU": 1} if use_gpu else {})
    keep_all = trial is not None and trial.keep_all_checkpoints
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config=worker_plan(plan, advice=advice, trial=trial, components=components).as_loop_config(),
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        scaling_config=ScalingConfig(num_workers=train.num_workers, use_gpu=use_gpu, resources_per_worker=resources),
        run_config=RunConfig(
            name=RAY_RUN_NAME,
            storage_path=str(plan.storage_path),
            failure_config=FailureConfig(max_failures=train.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=None if keep_all else train.checkpoints_to_keep),
            logging_config=LoggingConfig(log_level="WARNING"),  # our own progress lines say what matters
            callbacks=list(trial.callbacks) if trial is not None and trial.callbacks else None,
        ),
    )


def start_advice(plan: RunPlan, advisor_factory: Callable[[], Any] | None = None, *,
                 coordinator: tuple[str, str] | None = None) -> tuple[Any, AdviceSettings | None]:
    """Deploy the advisor (if it is a served LLM) and open this run in a coordinator actor.

    By default the run gets its own actor; a sweep trial passes the sweep's `coordinator` (name,
    namespace), shared by the population, and deploys nothing (the sweep deployed the advisor). A resumed run starts with a fresh coordinator state: the
    workers load its state from the checkpoint they resume from, so the ledger continues exactly
    where that checkpoint left it. Returns the actor handle (None without advice) and the workers' settings.
    """
    config = plan.config
    if config.advisor.backend == "none" and advisor_factory is None:
        return None, None
    import ray

    from orchestration.actor import get_or_create_coordinator
    from serve_llm.client import make_client

    if coordinator is not None:
        name, namespace = coordinator
        handle = ray.get_actor(name, namespace=namespace)
    else:
        if advisor_factory is None:
            deploy_served_advisor(config.advisor)
        name, namespace = plan.coordinator_name, ray.get_runtime_context().namespace
        handle = get_or_create_coordinator(name, namespace, config=config.coordinator,
                                           advisor_factory=advisor_factory or functools.partial(make_client, config.advisor))
    # Fail here, not in a worker, if the actor cannot start.
    ray.get(handle.open_run.remote(plan.run_key, config.coordinator, plan.run_id))
    opening_state = ray.get(handle.to_state.remote(plan.run_key))
    return handle, AdviceSettings(coordinator=name, namespace=namespace, run_id=plan.run_id, run_key=plan.run_key,
                                  history_window=config.coordinator.history_window, verify_rollback=config.coordinator.verify_rollback,
                                  call_timeout_s=max(config.coordinator.wait_for_answer_s, config.coordinator.wait_on_findings_s) + 120.0,
                                  coordinator_config=config.coordinator, opening_state=opening_state)


def deploy_served_advisor(advisor: AdvisorConfig, *, shared: bool = False) -> bool:
    """Deploy the advisor on Ray Serve if its backend is served; a sweep deploys it once, `shared` by every trial.
    Returns whether it deployed."""
    if not advisor.is_served:
        return False
    from serve_llm.deployment import deploy_advisor

    print(f"[hybridtrain] starting the {'shared ' if shared else ''}advisor ({advisor.backend}) on Ray Serve ...", flush=True)
    deploy_advisor(advisor, http=False)  # the trainers use its handle: no HTTP proxy, no port
    return True


def close_advice(coordinator: Any, plan: RunPlan, *, incidents: list[dict[str, Any]], shared: bool = False) -> dict[str, Any]:
    """Close this run in its coordinator, write the ledger (`interventions.csv`) and return the counts for `summary.json`.

    The ledger comes from the live coordinator, or, if it is gone, from the newest checkpoint (the
    summary then says so). Advice incidents the workers could not record (a coordinator that became
    unreachable) are added as `error` rows, so the ledger and the summary both show them. The run's
    own actor is stopped; a `shared` one (the sweep's) keeps serving the other trials.
    """
    if coordinator is None:
        return {}
    import ray

    counts: dict[str, Any] = {}
    try:
        state = ray.get(coordinator.close_run.remote(plan.run_key), timeout=60)
    except Exception as error:  # noqa: BLE001 - the run's own outputs matter more; fall back to the checkpoint
        state = _checkpointed_coordinator_state(plan)
        where = "the newest checkpoint" if state else "nowhere"
        counts["advisor_ledger_error"] = f"coordinator unreachable at the end ({type(error).__name__}); ledger taken from {where}"
        print(f"[hybridtrain] warning: {counts['advisor_ledger_error']}", flush=True)
    finally:
        if not shared:
            ray.kill(coordinator)
    ledger = Ledger.from_state(state["ledger"]) if state else Ledger()
    for incident in incidents:
        if not incident.get("recorded", False):  # the coordinator's ledger already holds the ones it was told of
            ledger.append(InterventionRecord(kind="error", epoch=int(incident.get("epoch", 0)), reason=str(incident["problem"])))
    ledger.write_csv(plan.run_dir / LEDGER)
    counts.update(ledger.counts())
    counts["advice_incidents"] = [incident["problem"] for incident in incidents]
    return counts


def _checkpointed_coordinator_state(plan: RunPlan) -> dict[str, Any] | None:
    checkpoint = latest_checkpoint(plan.storage_path)
    if checkpoint is None or not (checkpoint / ADVICE_STATE).is_file():
        return None
    return json.loads((checkpoint / ADVICE_STATE).read_text()).get("coordinator")


def summarize(plan: RunPlan, metrics: dict[str, Any], advice_counts: dict[str, Any], *, driver_wall_s: float, use_gpu: bool,
              cluster: ClusterInfo) -> dict[str, Any]:
    """`summary.json`: test metrics, how training went, what the advisor did, where it ran."""
    config = plan.config
    return {
        "name": config.name,
        "run_id": plan.run_id,
        "test_accuracy": metrics["test_accuracy"],
        "test_macro_f1": metrics["test_macro_f1"],
        "test_macro_precision": metrics["test_macro_precision"],
        "test_macro_recall": metrics["test_macro_recall"],
        "test_loss": metrics["test_loss"],
        "test_confusion_matrix": metrics["test_confusion_matrix"],
        "best_val_loss": metrics["best_val_loss"],
        "best_epoch": metrics["best_epoch"],
        "epochs": metrics["epoch"],
        "wall_s": metrics["wall_s"],
        "driver_wall_s": driver_wall_s,
        "zero_stage": metrics["zero_stage"],
        "precision": metrics["precision"],
        "num_workers": config.train.num_workers,
        "restarts": metrics["restarts"],
        "advisor": config.advisor.backend,
        **advice_counts,
        "probation_s": metrics["probation_s"],
        "checkpoint_s": metrics.get("checkpoint_s", 0.0),
        "checkpoint_problems": metrics.get("checkpoint_problems", []),
        "rollbacks_verified": metrics["rollbacks_verified"],
        "use_gpu": use_gpu,
        "data": plan.data,
        "cluster": {"address": cluster.address, "dashboard_url": cluster.dashboard_url},
    }
