"""Launch one training run: `plan_run` (pure) decides what to run, `execute_run` runs it on Ray.

    plan = plan_run(config, run_dir)        # resolved config, run directory, run id, resume point; writes nothing
    summary = execute_run(plan)             # connect, start the advisor and coordinator, fit, summarise

A Ray Tune trial (`cluster.trial`) plans and executes its run with the same two calls, adding a
`TrialContext` (the sweep's shared coordinator, the checkpoint Tune handed it, the callbacks that
forward its reports), so a trial trains exactly as `hybridtrain run` does. The pieces a run and a
sweep share live here once: `resolve_output_dir`, `needed_cpus`, `deploy_served_advisor`. Ray Train
receives a frozen `workers.plan.WorkerPlan`, built by `worker_plan`.

A run directory holds `config.yaml` (the resolved config), `metrics.csv` (one row per epoch),
`interventions.csv` (the advisor ledger), `summary.json` (written whole, last: the run is finished),
`fingerprint.json` (what it trains on: `--resume` refuses a changed config or data), the final
`model.safetensors` with `model.json`, and `ray/` (Ray Train's storage: checkpoints that `--resume` and worker restarts
continue from; each one also holds the coordinator's state, so the ledger survives a killed driver).
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import functools
import hashlib
import json
import logging
import math
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Literal

from cluster.console import RAY_LOGS, ProgressTail, collect_ray_logs, since_now
from cluster.experiment import ConfigError, ExperimentConfig, read_config, write_config
from cluster.fingerprint import FINGERPRINT, changes, fingerprint
from cluster.rundir import UnreadableFileError, atomic_write_text, claim_directory, read_json, read_jsonl
from cluster.runtime import ClusterInfo, check_shared_storage, connect
from cluster.stopping import (STOPS, DriverStopped, check_stop, record_stop, set_phase, stop_on_sigterm, stop_requested, stopping_training,
                              training_runs)
from orchestration.errors import RunError
from orchestration.ledger import InterventionRecord, Ledger
from serve_llm.config import AdvisorConfig
from workers.advice import AdviceSettings
from workers.data import Split, load_dataset, stratified_split
from workers.faults import driver_disk_full
from workers.models import check_model
from workers.augment import check_augmentation
from workers.plan import WorkerPlan
from workers.streaming import StreamSource, data_config, scan, stream_datasets, wants_streaming
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
    stream: StreamSource | None = None  # streamed data: the driver's scan (`workers.streaming`); None: in memory
    split: Split | None = None  # data in memory: the driver's train/val/test split, handed to the workers
    fingerprint: dict[str, Any] = dataclasses.field(default_factory=dict)  # what it trains on (`cluster.fingerprint`), kept in the run directory

    @property
    def storage_path(self) -> Path:
        return self.run_dir / RAY_STORAGE

    @property
    def coordinator_name(self) -> str:
        """One coordinator actor per run directory (two runs of one config may run side by side)."""
        return f"hybridtrain-coordinator-{self.run_id}-{_digest(str(self.run_dir))}"

    @property
    def advisor(self) -> AdvisorConfig:
        """The advisor this run deploys: its Serve application is named for this run directory (as the
        coordinator is), so two runs on one cluster never redeploy each other's, and a `--resume` finds its own."""
        return named_advisor(self.config.advisor, f"{self.run_id}-{_digest(str(self.run_dir))}")

    @property
    def run_key(self) -> str:
        """This run's key in its coordinator actor (which may serve a whole sweep): its run directory."""
        return str(self.run_dir)


def plan_run(config: ExperimentConfig | None, run_dir: str | Path, *, resume: bool = False, address: str | None = None,
             allow_changed: bool = False) -> RunPlan:
    """Check and resolve a run without side effects: nothing is written and Ray is not touched.

    On `resume` the config comes from `run_dir/config.yaml`; `address` (if given) replaces the
    cluster address saved there. A resume whose config or data differ from what the run started
    with is refused, saying what changed, unless `allow_changed`. Bad configs, data and run
    directories raise `ConfigError`/`DataError`.
    """
    config, run_dir = resolve_output_dir("run", config, run_dir, resume=resume, address=address)
    stream = scan(config.data) if wants_streaming(config.data) else None
    data, split = check_data(config, stream)
    current = fingerprint(config)
    if resume:
        check_unchanged(run_dir, current, allow_changed=allow_changed)
    return RunPlan(config=config, run_dir=run_dir, run_id=run_id(config), resume=resume,
                   resume_from=latest_checkpoint(run_dir / RAY_STORAGE) if resume else None, data=data,
                   needed_cpus=needed_cpus(config), fingerprint=current, stream=stream, split=split)


def check_unchanged(run_dir: Path, current: dict[str, Any], *, allow_changed: bool = False, kind: Literal["run", "sweep"] = "run") -> list[str]:
    """What changed in the config and data since the run (or sweep) in `run_dir` started (its `fingerprint.json`).

    A change raises `ConfigError` naming each one, unless `allow_changed` (then it is printed and
    returned). A run from before fingerprints were kept cannot be checked: that is said, not refused.
    """
    try:
        recorded = read_json(run_dir / FINGERPRINT)
    except UnreadableFileError as error:
        recorded, found = None, [f"{FINGERPRINT}: {error}"]
    else:
        if recorded is None:
            print(f"[hybridtrain] warning: {run_dir} has no {FINGERPRINT} (a {kind} from an older version): "
                  f"whether its config or data changed cannot be checked", flush=True)
            return []
        found = changes(recorded, current)
    if found and not allow_changed:
        raise ConfigError(f"--resume {str(run_dir)!r}: the {kind}'s config or data changed since it started:\n  " + "\n  ".join(found)
                          + f"\nResuming would train the rest of the {kind} on them. Restore them, or pass --allow-changed to go on with them")
    if found:
        print("[hybridtrain] warning: resuming with a changed config or data (--allow-changed):\n  " + "\n  ".join(found), flush=True)
    return found


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
        if kind == "run" and _finished(path):
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


def _finished(run_dir: Path) -> bool:
    """Whether the run wrote its final `summary.json`. A torn one (0 bytes or cut off: the disk filled or the
    driver died while it was written) is not a finish: the run resumes from its last checkpoint and writes it again."""
    try:
        return read_json(run_dir / "summary.json") is not None
    except UnreadableFileError as error:
        print(f"[hybridtrain] warning: {error}. Treating the run as not finished: resuming from its last checkpoint writes it again", flush=True)
        return False


STREAM_READ_CPUS = 1  # a streamed run keeps this many CPUs free for Ray Data's read and decode tasks


def check_stream_cpus(config: ExperimentConfig, cluster: ClusterInfo) -> None:
    """A streamed run's Ray Data tasks need CPUs the train workers do not hold: with none left, the first epoch
    would wait for them forever. Fail now, saying so."""
    workers = config.train.num_workers * config.train.cpus_per_worker
    if cluster.num_cpus < workers + STREAM_READ_CPUS:
        raise ConfigError(f"streamed data (data.streaming) needs {STREAM_READ_CPUS} CPU beyond the {workers:g} the train workers hold, "
                          f"for Ray Data's read tasks; the cluster has {cluster.num_cpus:g}: lower train.num_workers or "
                          "train.cpus_per_worker, add CPUs (cluster.num_cpus on an embedded Ray), or set data.streaming: false")


def needed_cpus(config: ExperimentConfig, *, trials: int | None = None) -> int:
    """Logical CPUs that must be free at once: one run's train workers, or those of `trials` sweep trials
    (each trial also holds `TRIAL_CPU` as its Train driver; PBT needs the whole population running),
    plus the advisor's Serve replicas at their most (deployed once, shared by every trial)."""
    workers = config.train.num_workers * config.train.cpus_per_worker
    runs = workers if trials is None else trials * (workers + TRIAL_CPU)
    # Streamed data is read and decoded by Ray Data's tasks, beside the workers: one CPU for them at least.
    reading = STREAM_READ_CPUS if wants_streaming(config.data) else 0
    return math.ceil(runs + config.advisor.served_cpus + reading)


def run_id(config: ExperimentConfig) -> str:
    """`<name>-<8 hex digits>` from everything that defines the run (not where it runs): stable across
    processes and machines, unlike Python's salted `hash()` of a string."""
    defining = {key: value for key, value in config.to_dict().items() if key not in ("cluster", "tune")}
    return f"{config.name}-{_digest(json.dumps(defining, sort_keys=True, default=str))}"


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:8]


def check_data(config: ExperimentConfig, stream: StreamSource | None = None) -> tuple[dict[str, Any], Split | None]:
    """Load and split the data once on the driver (streamed data: the scan's findings) and build the model
    once, so bad data or a bad `model.factory` fails before Ray starts. A `data.loader` needs Ray to read
    its dataset: it is checked on the workers, before training (the model with it).

    Returns what was found and, for data in memory, the split, which the workers get with their plan: it is the
    split they would compute, and they need not import scikit-learn for it."""
    split = None
    if config.data.loader is not None:
        return {"source": f"data.loader {config.data.loader}", "checked": "on the workers"}, None
    if stream is not None:
        if config.modes.curriculum or config.modes.batch_selection != "off":
            raise ConfigError("modes.curriculum and modes.batch_selection rank every training sample each epoch; streamed data "
                              "(data.streaming) cannot: set data.streaming: false or turn the mode off")
        summary, sample_shape, classes = stream.summary(), stream.sample_shape, len(stream.classes)
    else:
        dataset = load_dataset(config.data)
        split = stratified_split(dataset.y, val_fraction=config.data.val_fraction, test_fraction=config.data.test_fraction, seed=config.data.seed)
        summary, sample_shape, classes = ({"source": dataset.source, "sample_shape": list(dataset.sample_shape), "classes": len(dataset.classes),
                                           "train": len(split.train), "val": len(split.val), "test": len(split.test)},
                                          dataset.sample_shape, len(dataset.classes))
    check_augmentation(config.data, sample_shape)
    model = check_model(config.model, sample_shape, classes)
    return summary | {"parameters": model["parameters"]}, split


def latest_checkpoint(storage_path: Path) -> Path | None:
    """The newest Ray Train checkpoint directory under `storage_path`, or None."""
    # Directories only: Train keeps its checkpoint manager's state beside them (checkpoint_manager_snapshot.json).
    checkpoints = sorted((path for path in storage_path.glob(f"{RAY_RUN_NAME}/checkpoint_*") if path.is_dir()), key=lambda path: path.stat().st_mtime)
    return checkpoints[-1] if checkpoints else None


def run_experiment(config: ExperimentConfig | None, run_dir: str | Path, *, resume: bool = False, cluster: ClusterInfo | None = None,
                   advisor_factory: Callable[[], Any] | None = None, address: str | None = None,
                   allow_changed: bool = False) -> dict[str, Any]:
    """Claim `run_dir` (`cluster.rundir.claim_directory`: a second driver on it is refused), then
    `execute_run(plan_run(...))`: train and return the summary. This is what `hybridtrain run` does.

    From the main thread, a SIGTERM stops the run cleanly (`cluster.stopping`): `DriverStopped` is raised
    once Ray Train is stopped and the run's advisor deleted, with why recorded in `RUN_DIR/stops.jsonl`."""
    with stop_on_sigterm(), claim_directory(run_dir, "run") as directory:
        epochs = config.train.epochs if config is not None else None
        try:
            plan = plan_run(config, directory, resume=resume, address=address, allow_changed=allow_changed)
            epochs = plan.config.train.epochs
            summary = execute_run(plan, cluster=cluster, advisor_factory=advisor_factory)
            check_stop()  # one that came after the summary was written: the run finished, and its driver stops now
            return summary
        except DriverStopped as stop:
            record_stop(directory, stop, epochs=epochs)
            raise


def execute_run(plan: RunPlan, *, cluster: ClusterInfo | None = None, advisor_factory: Callable[[], Any] | None = None,
                trial: TrialContext | None = None, components: tuple[Any, ...] = ()) -> dict[str, Any]:
    """Train `plan` into its run directory and return the summary (also written to `summary.json`).

    `components` are the caller's own loop components (picklable factories, `workers.events`), fired on
    every worker after the built-in ones.

    `advisor_factory` replaces the configured advisor with a custom client (anything with
    `submit(snapshot) -> Future`), built inside the coordinator actor. A sweep trial passes its
    `trial` context: the run opens in the sweep's shared coordinator, starts from the checkpoint Tune
    handed it and forwards each report (what else changes is listed on `TrialContext`). A served
    advisor the run deployed itself is deleted from Serve when the run ends, however it ends.
    """
    config, run_dir = plan.config, plan.run_dir
    set_phase("start-up (connecting to Ray)")
    cluster = cluster or connect(config.cluster, min_cpus=plan.needed_cpus)
    run_dir.mkdir(parents=True, exist_ok=True)
    if trial is None or not trial.storage_checked:
        check_shared_storage(run_dir, cluster)  # workers on any node write checkpoints here
    write_config(config, run_dir / "config.yaml")
    atomic_write_text(run_dir / FINGERPRINT, json.dumps(plan.fingerprint, indent=1))  # what --resume compares with
    use_gpu = resolve_use_gpu(config, cluster)
    if plan.stream is not None and trial is None:
        check_stream_cpus(config, cluster)
    data = plan.data
    print(f"[hybridtrain] run {config.name!r} ({plan.run_id}) -> {run_dir}  ({data['source']}: {data['train']}/{data['val']}/{data['test']} samples, "
          f"{data['classes']} classes)" + (f"; resuming from {plan.resume_from.name}" if plan.resume_from else ""), flush=True)
    for note in plan.stream.notes if plan.stream is not None else ():
        print(f"[hybridtrain] warning: {note}", flush=True)
    stops = read_jsonl(run_dir / STOPS) if plan.resume else []
    if stops:
        print(f"[hybridtrain] its last driver was stopped by {stops[-1]['signal']} during {stops[-1]['phase']} ({stops[-1]['time']})", flush=True)

    coordinator = trial.coordinator if trial is not None else None
    deploys = coordinator is None and advisor_factory is None and config.advisor.is_served
    started, logs_since = time.perf_counter(), since_now()
    advisor_start: AdvisorStart | None = None
    # Whatever happens, the full Ray and worker logs end up in the run directory (they are off the terminal). Fault
    # injection: the driver's own writes run out of disk where faults.disk_full says so (off otherwise).
    stopped: DriverStopped | None = None
    try:
        with driver_disk_full(config.faults, run_dir):
            if deploys:  # the model loads while the coordinator and the worker group start
                advisor_start = AdvisorStart(plan.advisor)
            set_phase("start-up (the advisor and the coordinator)")
            handle, advice = start_advice(plan, advisor_factory, coordinator=coordinator)
            trainer = build_trainer(plan, advice=advice, use_gpu=use_gpu, trial=trial, components=components)
            # Rank 0's progress lines reach the terminal through the run directory, unless the workers' own
            # output does (--verbose); a sweep trial's progress stays in its run directory.
            summary = _fit_and_summarize(plan, trainer, handle, shared=coordinator is not None, tail_progress=not config.cluster.verbose and trial is None,
                                         started=started, use_gpu=use_gpu, cluster=cluster, advisor_start=advisor_start)
    except DriverStopped as stop:
        stopped = stop
        raise
    finally:
        if advisor_start is not None:
            advisor_start.stop()
        if deploys and delete_served_advisor(plan.advisor) and stopped is not None:
            stopped.done.append(f"the advisor's Serve application {plan.advisor.app_name!r} deleted")
        collect_ray_logs(run_dir / RAY_LOGS, since=logs_since)
    print(f"[hybridtrain] done: test_accuracy {summary['test_accuracy']:.4f}, macro F1 {summary['test_macro_f1']:.4f}, "
          f"{summary['epochs']} epochs in {summary['wall_s']:.1f}s -> {run_dir}", flush=True)
    return summary


def _fit_and_summarize(plan: RunPlan, trainer: Any, handle: Any, *, shared: bool, tail_progress: bool, started: float, use_gpu: bool,
                       cluster: ClusterInfo, advisor_start: AdvisorStart | None) -> dict[str, Any]:
    """Fit, close the run's advice (its ledger) and write `summary.json` whole; a failure says how to resume."""
    run_dir = plan.run_dir
    tail = ProgressTail(run_dir / PROGRESS) if tail_progress else contextlib.nullcontext()
    set_phase("training")
    try:
        # A SIGTERM aborts Ray Train at once (`cluster.stopping`), so no worker writes to the run directory after this driver.
        with tail, stopping_training(functools.partial(stop_training, trainer)):
            result = trainer.fit()
    except Exception as error:  # Ray wraps worker errors; keep the cause and point at the resumable state
        _close_after_failure(handle, plan, shared=shared)
        stop = stop_requested()
        if stop is not None:  # fit ended because the stop aborted it: keep the ledger so far, say where it stopped
            raise stop from None
        raise RunError(f"training failed: {_disk_full_line(error)}{error}\nThe last checkpoint is kept; continue with: hybridtrain run --resume {run_dir}"
                       f"\nWorker and Ray logs: {run_dir / RAY_LOGS}") from error
    final_file = run_dir / FINAL_METRICS
    if result.error is not None or not final_file.is_file():
        _close_after_failure(handle, plan, shared=shared)
        check_stop()
        raise RunError(f"training ended without its final evaluation ({result.error or 'no ' + FINAL_METRICS}); resume with: hybridtrain run --resume {run_dir}")
    metrics = json.loads(final_file.read_text())
    set_phase("the final report (the ledger and the summary)")
    try:
        advice_counts = close_advice(handle, plan, incidents=metrics.get("advice_incidents", []), shared=shared)
        started_advisor = advisor_start.record() if advisor_start is not None else {}
        summary = summarize(plan, metrics, advice_counts | started_advisor, driver_wall_s=time.perf_counter() - started, use_gpu=use_gpu, cluster=cluster)
        check_stop()  # a stop during the ledger's write comes out here: the run is not finished, its resume writes both again
        atomic_write_text(run_dir / "summary.json", json.dumps(summary, indent=2))  # its presence means finished: never half of it
    except OSError as error:  # a full disk at the very end: the checkpoints hold everything, nothing half-written was left
        raise RunError(f"training finished, but its outputs could not be written: {_disk_full_line(error)}{error}\nNothing was lost: every "
                       f"file is whole (or not there) and the last checkpoint holds the ledger. Free space, then finish with: "
                       f"hybridtrain run --resume {run_dir} (it evaluates that checkpoint again and writes the ledger and summary)") from error
    return summary


def _close_after_failure(handle: Any, plan: RunPlan, *, shared: bool) -> None:
    """Close the advice of a run that failed, writing the ledger so far; a write that fails too (a full disk)
    costs a warning, not the error that says why the run failed: the checkpoints hold the ledger for the resume."""
    try:
        close_advice(handle, plan, incidents=[], shared=shared)
    except OSError as error:
        print(f"[hybridtrain] warning: could not write {LEDGER} after the failure ({error}); the last checkpoint holds it", flush=True)


def _disk_full_line(error: BaseException) -> str:
    """A first line naming a full disk when `error` (or what it wraps, even as text through Ray) is ENOSPC; else ''."""
    cause: BaseException | None = error
    while cause is not None:
        if isinstance(cause, OSError) and cause.errno == errno.ENOSPC:
            return "the disk is full (ENOSPC). "
        cause = cause.__cause__ or cause.__context__
    return "the disk is full (ENOSPC). " if "No space left on device" in str(error) or "[Errno 28]" in str(error) else ""


def stop_training(trainer: Any, *, timeout_s: float = 60.0) -> str:
    """Abort Ray Train's run the way Train does on Ctrl-C (its controller stops the worker group, then itself), so no
    worker writes to the run directory after its driver is gone. Returns what happened, for the driver's last line."""
    import ray

    deadline = time.monotonic() + timeout_s
    while (controller := getattr(trainer, "controller", None)) is None:  # a stop in fit's first moments: its controller comes soon
        if not training_runs() or time.monotonic() > deadline:
            return "Ray Train had not started"
        time.sleep(0.1)
    try:
        ray.get(controller.abort.remote(), timeout=timeout_s)
    except ray.exceptions.RayActorError:
        pass  # abort ends the controller's process: its reply is the actor's death
    except ray.exceptions.GetTimeoutError:
        return f"Ray Train did not stop within {timeout_s:g} s (its workers end with this driver's Ray job)"
    return "Ray Train stopped"


@functools.cache
def _stoppable_trainer_class() -> type:
    """`TorchTrainer` that keeps the handle of the controller it starts (Train hands it to its Ctrl-C handler,
    in the main thread only), so that `stop_training` can abort it on SIGTERM."""
    from ray.train.torch import TorchTrainer

    class StoppableTorchTrainer(TorchTrainer):
        controller = None  # set as fit starts it

        def _register_sigint_handler(self, controller):
            self.controller = controller
            super()._register_sigint_handler(controller)

    return StoppableTorchTrainer


def resolve_use_gpu(config: ExperimentConfig, cluster: ClusterInfo) -> bool:
    use_gpu = cluster.use_gpu if config.train.use_gpu is None else config.train.use_gpu
    if use_gpu and not cluster.use_gpu:
        raise ConfigError("train.use_gpu is true but the cluster has no GPUs")
    return use_gpu


def worker_plan(plan: RunPlan, *, advice: AdviceSettings | None, trial: TrialContext | None = None,
                components: tuple[Any, ...] = ()) -> WorkerPlan:
    """What every worker of `plan` receives: its config sections, where it writes, and how it starts."""
    config = plan.config
    return WorkerPlan(data=config.data, model=config.model, train=config.train, modes=config.modes, run_dir=plan.run_dir, stream=plan.stream.without_codes() if plan.stream is not None else None,
                      split=plan.split,
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
    from ray.train.torch import TorchConfig

    from workers.train_loop import train_loop_per_worker

    train = plan.config.train
    resources = {"CPU": train.cpus_per_worker} | ({"GPU": 1} if use_gpu else {})
    keep_all = trial is not None and trial.keep_all_checkpoints
    streamed = {} if plan.stream is None else {"datasets": stream_datasets(plan.stream, seed=plan.config.data.seed), "dataset_config": data_config()}
    return _stoppable_trainer_class()(
        train_loop_per_worker,
        **streamed,
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
    """Open this run in a coordinator actor (a served advisor is deployed by the caller: `AdvisorStart`).

    By default the run gets its own actor; a sweep trial passes the sweep's `coordinator` (name,
    namespace), shared by the population (the sweep deployed the advisor). A resumed run starts with a fresh coordinator state: the
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
        name, namespace = plan.coordinator_name, ray.get_runtime_context().namespace
        handle = get_or_create_coordinator(name, namespace, config=config.coordinator,
                                           advisor_factory=advisor_factory or functools.partial(make_client, plan.advisor))
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


class AdvisorStart:
    """A run's served advisor, deployed without waiting for its replicas to load the model (that took a quarter
    of a default run's driver time, spent before the worker group even began to start).

    `deploy_advisor(wait=False)` returns once Serve has the application; a thread then waits for it to run and
    prints when it did, or why it did not. Questions asked meanwhile wait in the coordinator's advisor client
    (`serve_llm.client.AdvisorClient`), never in the training loop. A deployment that fails is not a failed run:
    the run trains on, each question is recorded as an `error`, and `summary.json` holds `advisor_deploy_error`.
    """

    def __init__(self, advisor: AdvisorConfig) -> None:
        from serve_llm.deployment import deploy_advisor

        self.advisor = advisor
        self.ready_s: float | None = None
        self.error: str | None = None
        self._stopping = threading.Event()
        self._started = time.perf_counter()
        print(f"[hybridtrain] starting the advisor ({advisor.backend}) on Ray Serve while the workers start ...", flush=True)
        deploy_advisor(advisor, http=False, wait=False)  # the trainers use its handle: no HTTP proxy, no port
        self._thread = threading.Thread(target=self._watch, name="hybridtrain-advisor-start", daemon=True)
        self._thread.start()

    def _watch(self) -> None:
        from serve_llm.deployment import AdvisorDeployError, wait_for_advisor

        try:
            wait_for_advisor(self.advisor, timeout_s=self.advisor.deploy_timeout_s, poll_s=0.5)
        except (AdvisorDeployError, TimeoutError) as error:
            if not self._stopping.is_set():  # not the run's own clean-up deleting it
                self.error = str(error)
                print(f"[hybridtrain] warning: {error}. Training goes on without advice; each question is recorded as an error", flush=True)
            return
        except Exception as error:  # noqa: BLE001 - Serve or Ray went away (the run is ending); the run's outcome says more
            if not self._stopping.is_set():
                self.error = f"could not watch the advisor's deployment ({type(error).__name__}: {error})"
            return
        self.ready_s = time.perf_counter() - self._started
        print(f"[hybridtrain] advisor ({self.advisor.backend}) ready after {self.ready_s:.1f}s", flush=True)

    def record(self) -> dict[str, Any]:
        """For `summary.json`: seconds until the advisor ran (None: not yet when training ended), or why it never did."""
        return {"advisor_ready_s": self.ready_s} | ({"advisor_deploy_error": self.error} if self.error else {})

    def stop(self) -> None:
        self._stopping.set()


def named_advisor(advisor: AdvisorConfig, owner: str) -> AdvisorConfig:
    """`advisor` with its Serve application named `<advisor.app_name>-<owner>`: one application per run (owner:
    its id and directory's digest) or per sweep population (its name and directory's digest). Clients must be
    built from the same config, so they ask the application the run or sweep deployed."""
    return dataclasses.replace(advisor, app_name=f"{advisor.app_name}-{owner}")


def delete_served_advisor(advisor: AdvisorConfig) -> bool:
    """Delete the advisor's Serve application (its replicas give back their CPUs and GPUs); returns whether it did.
    Never raises: a run's own outputs matter more than its clean-up, so a failure is a warning naming the application."""
    from ray import serve

    try:
        # Not waited for (3-4 s): the replicas stop on their own; a run on an embedded Ray shuts it all down next.
        serve.delete(advisor.app_name, _blocking=False)
    except Exception as error:  # noqa: BLE001 - Serve may be gone with the cluster; the run's result stands
        print(f"[hybridtrain] warning: could not delete the advisor's Serve application {advisor.app_name!r} "
              f"({type(error).__name__}: {error}); its replicas hold their CPUs/GPUs until serve.delete({advisor.app_name!r}) or `serve shutdown`", flush=True)
        return False
    logger.debug("deleted the advisor's Serve application %r", advisor.app_name)
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
    atomic_write_text(plan.run_dir / LEDGER, ledger.to_dataframe().to_csv(index=False))  # whole or not at all (a kill, a full disk)
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
        "optimizer": config.train.optimizer,
        # train.lr: find: the range test's choice and how it got there (RUN_DIR/lr_find.csv holds the curve); else None
        "lr_find": metrics.get("lr_find"),
        "worker_memory": metrics.get("worker_memory", []),  # each rank's RSS and USS at the start and at their peaks (MB)
        "stops": read_jsonl(plan.run_dir / STOPS),  # each time a driver of this run was stopped by a signal (`cluster.stopping`)
        "use_gpu": use_gpu,
        "data": plan.data,
        "cluster": {"address": cluster.address, "dashboard_url": cluster.dashboard_url},
    }
