"""Launch one training run: `plan_run` (pure) decides what to run, `execute_run` runs it on Ray.

    plan = plan_run(config, run_dir)        # resolved config, run directory, run id, resume point; writes nothing
    summary = execute_run(plan)             # connect, start the advisor and coordinator, fit, summarise

Ray Tune trials (`tune_search`) call the same pieces with their own storage and reporting, so a
trial trains exactly as `hybridtrain run` does. A run directory holds `config.yaml` (the resolved
config), `metrics.csv` (one row per epoch), `interventions.csv` (the advisor ledger),
`summary.json`, the final `model.safetensors` with `model.json`, and `ray/` (Ray Train's storage:
checkpoints that `--resume` and worker restarts continue from; each one also holds the
coordinator's state, so the ledger survives a killed driver).
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
from typing import Any, Callable

from cluster.console import RAY_LOGS, ProgressTail, collect_ray_logs, since_now
from cluster.experiment import ConfigError, ExperimentConfig, read_config, write_config
from cluster.runtime import ClusterInfo, check_shared_storage, connect
from orchestration.errors import RunError
from orchestration.ledger import InterventionRecord, Ledger
from workers.advice import AdviceSettings
from workers.data import load_dataset, stratified_split
from workers.train_loop import ADVICE_STATE, FINAL_METRICS, PROGRESS

logger = logging.getLogger(__name__)

RAY_STORAGE = "ray"
RAY_RUN_NAME = "train"
LEDGER = "interventions.csv"


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
    run_dir = Path(run_dir).resolve()
    if resume:
        if not (run_dir / "config.yaml").is_file():
            raise ConfigError(f"--resume {str(run_dir)!r}: not a run directory (no config.yaml)")
        if (run_dir / "summary.json").is_file():
            raise ConfigError(f"--resume {str(run_dir)!r}: the run already finished (summary.json is there)")
        config = read_config(run_dir / "config.yaml")
    else:
        if config is None:
            raise ValueError("plan_run needs a config unless it resumes a run directory")
        if (run_dir / "config.yaml").exists():
            raise ConfigError(f"run directory {str(run_dir)!r} already holds a run; use --resume to continue it or choose another --output")
        config = dataclasses.replace(config)
    if address is not None:
        config = dataclasses.replace(config, cluster=dataclasses.replace(config.cluster, address=address))
    return RunPlan(config=config, run_dir=run_dir, run_id=run_id(config), resume=resume,
                   resume_from=latest_checkpoint(run_dir / RAY_STORAGE) if resume else None, data=check_data(config),
                   needed_cpus=math.ceil(config.train.num_workers * config.train.cpus_per_worker + config.advisor.served_cpus))


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
                coordinator: tuple[str, str] | None = None, initial_checkpoint: str | None = None,
                callbacks: list[Any] | None = None, digest_checkpoints: bool = False, check_storage: bool = True,
                keep_all_checkpoints: bool = False) -> dict[str, Any]:
    """Train `plan` into its run directory and return the summary (also written to `summary.json`).

    `advisor_factory` replaces the configured advisor with a custom client (anything with
    `submit(snapshot) -> Future`), built inside the coordinator actor. A sweep trial passes the
    sweep's shared `coordinator` actor (name, namespace) to open its run in (the sweep deployed the
    advisor once), the checkpoint Tune handed it (`initial_checkpoint`), Train callbacks that forward
    each report, `digest_checkpoints` (each checkpoint records a hash of its weights, so a PBT clone
    can be checked), `check_storage=False` (the sweep checked its directory) and
    `keep_all_checkpoints` (Train rotates none away: the trial removes each one after Tune has its copy).
    """
    config, run_dir = plan.config, plan.run_dir
    cluster = cluster or connect(config.cluster, min_cpus=plan.needed_cpus)
    run_dir.mkdir(parents=True, exist_ok=True)
    if check_storage:  # a sweep checks its whole directory once, not each trial
        check_shared_storage(run_dir, cluster)  # workers on any node write checkpoints here
    write_config(config, run_dir / "config.yaml")
    use_gpu = resolve_use_gpu(config, cluster)
    data = plan.data
    print(f"[hybridtrain] run {config.name!r} ({plan.run_id}) -> {run_dir}  ({data['source']}: {data['train']}/{data['val']}/{data['test']} samples, "
          f"{data['classes']} classes)" + (f"; resuming from {plan.resume_from.name}" if plan.resume_from else ""), flush=True)

    handle, advice = start_advice(plan, advisor_factory, coordinator=coordinator)
    shared = coordinator is not None
    trainer = build_trainer(plan, advice=advice, use_gpu=use_gpu, initial_checkpoint=initial_checkpoint, callbacks=callbacks,
                            digest_checkpoints=digest_checkpoints, keep_all_checkpoints=keep_all_checkpoints)
    started, logs_since = time.perf_counter(), since_now()
    # Rank 0's progress lines reach the terminal through the run directory, unless the workers' own
    # output does (--verbose); a sweep trial's progress stays in its run directory.
    tail = ProgressTail(run_dir / PROGRESS) if not config.cluster.verbose and coordinator is None else contextlib.nullcontext()
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


def build_trainer(plan: RunPlan, *, advice: AdviceSettings | None, use_gpu: bool, initial_checkpoint: str | None = None,
                  callbacks: list[Any] | None = None, digest_checkpoints: bool = False, keep_all_checkpoints: bool = False):
    """The Ray Train `TorchTrainer` for `plan`: `num_workers` DeepSpeed workers (gloo on CPU, NCCL on GPU).

    The same name and storage on `--resume` make Ray Train hand the latest checkpoint to the workers;
    without one, the workers start from `initial_checkpoint` if given (Train V2 has no
    `resume_from_checkpoint`, so the path travels in the loop config).
    """
    from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from workers.train_loop import train_loop_per_worker

    config, train = plan.config, plan.config.train
    resources = {"CPU": train.cpus_per_worker} | ({"GPU": 1} if use_gpu else {})
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"data": dataclasses.asdict(config.data), "model": dataclasses.asdict(config.model),
                           "train": dataclasses.asdict(train), "run_dir": str(plan.run_dir), "advice": advice,
                           "initial_checkpoint": initial_checkpoint, "digest_checkpoints": digest_checkpoints,
                           "checkpoint_root": str(plan.storage_path / RAY_RUN_NAME)},
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        scaling_config=ScalingConfig(num_workers=train.num_workers, use_gpu=use_gpu, resources_per_worker=resources),
        run_config=RunConfig(
            name=RAY_RUN_NAME,
            storage_path=str(plan.storage_path),
            failure_config=FailureConfig(max_failures=train.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=None if keep_all_checkpoints else train.checkpoints_to_keep),
            logging_config=LoggingConfig(log_level="WARNING"),  # our own progress lines say what matters
            callbacks=callbacks or None,
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
        if config.advisor.is_served and advisor_factory is None:
            from serve_llm.deployment import deploy_advisor

            print(f"[hybridtrain] starting the advisor ({config.advisor.backend}) on Ray Serve ...", flush=True)
            deploy_advisor(config.advisor, http=False)  # the trainers use its handle: no HTTP proxy, no port
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
