"""Run one experiment: validate, connect, train on Ray Train, and write the run directory.

A run directory holds `config.yaml` (the resolved config), `metrics.csv` (one row per epoch),
`summary.json`, the final `model.safetensors` with `model.json`, and `ray/` (Ray Train's storage:
checkpoints that `--resume` and worker restarts continue from).
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable

from cluster.runtime import ClusterInfo, connect
from orchestration.config import ConfigError, ExperimentConfig, read_config, write_config
from workers.data import load_dataset, stratified_split
from workers.train_loop import FINAL_METRICS

logger = logging.getLogger(__name__)

RAY_STORAGE = "ray"
LEDGER = "interventions.csv"
COORDINATOR_STATE = "coordinator_state.json"
RAY_RUN_NAME = "train"


class RunError(RuntimeError):
    """Training did not finish; the message says why and where its state is."""


def prepare_run_dir(run_dir: Path, *, resume: bool) -> None:
    if resume:
        if not (run_dir / "config.yaml").is_file():
            raise ConfigError(f"--resume {str(run_dir)!r}: not a run directory (no config.yaml)")
        if (run_dir / "summary.json").is_file():
            raise ConfigError(f"--resume {str(run_dir)!r}: the run already finished (summary.json is there)")
        return
    if (run_dir / "config.yaml").exists():
        raise ConfigError(f"run directory {str(run_dir)!r} already holds a run; use --resume to continue it or choose another --output")
    run_dir.mkdir(parents=True, exist_ok=True)


def check_data(config: ExperimentConfig) -> dict[str, Any]:
    """Load and split the data once on the driver, so bad data fails before Ray starts."""
    dataset = load_dataset(config.data)
    split = stratified_split(dataset.y, val_fraction=config.data.val_fraction, test_fraction=config.data.test_fraction, seed=config.data.seed)
    return {"source": dataset.source, "sample_shape": list(dataset.sample_shape), "classes": len(dataset.classes),
            "train": len(split.train), "val": len(split.val), "test": len(split.test)}


def run_experiment(config: ExperimentConfig | None, run_dir: str | Path, *, resume: bool = False, cluster: ClusterInfo | None = None,
                   advisor_factory: Callable[[], Any] | None = None) -> dict[str, Any]:
    """Train `config` into `run_dir` and return the summary (also written to `summary.json`).

    `advisor_factory` replaces the configured advisor with a custom client (anything with
    `submit(snapshot) -> Future`), built inside the coordinator actor.
    """
    from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from workers.train_loop import train_loop_per_worker

    run_dir = Path(run_dir).resolve()
    prepare_run_dir(run_dir, resume=resume)
    if resume:
        config = read_config(run_dir / "config.yaml")
        if os.environ.get("RAY_ADDRESS"):
            config.cluster.address = None  # resolve_address falls back to RAY_ADDRESS
    if config is None:
        raise ValueError("run_experiment needs a config unless it resumes a run directory")
    data_info = check_data(config)
    write_config(config, run_dir / "config.yaml")
    train = config.train
    advisor_cpus = config.advisor.num_cpus_per_replica * (config.advisor.num_replicas if isinstance(config.advisor.num_replicas, int) else 1)
    needed_cpus = train.num_workers * train.cpus_per_worker + (advisor_cpus if config.advisor.is_served else 0)
    cluster = cluster or connect(config.cluster, min_cpus=math.ceil(needed_cpus))
    use_gpu = cluster.use_gpu if train.use_gpu is None else train.use_gpu
    if use_gpu and not cluster.use_gpu:
        raise ConfigError("train.use_gpu is true but the cluster has no GPUs")
    resources = {"CPU": train.cpus_per_worker} | ({"GPU": 1} if use_gpu else {})
    print(f"[hybridtrain] run {config.name!r} -> {run_dir}  ({data_info['source']}: {data_info['train']}/{data_info['val']}/{data_info['test']} samples, "
          f"{data_info['classes']} classes)", flush=True)

    coordinator, advice = _start_advice(config, run_dir, advisor_factory)
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"data": asdict(config.data), "model": asdict(config.model), "train": asdict(config.train), "run_dir": str(run_dir),
                           "advice": advice},
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        scaling_config=ScalingConfig(num_workers=train.num_workers, use_gpu=use_gpu, resources_per_worker=resources),
        run_config=RunConfig(
            # Same name and storage on --resume: Ray Train then hands the latest checkpoint to the workers.
            name=RAY_RUN_NAME,
            storage_path=str(run_dir / RAY_STORAGE),
            failure_config=FailureConfig(max_failures=train.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=train.checkpoints_to_keep),
            logging_config=LoggingConfig(log_level="WARNING"),  # our own progress lines say what matters
        ),
    )
    started = time.perf_counter()
    try:
        result = trainer.fit()
    except Exception as error:  # Ray wraps worker errors; keep the cause and point at the resumable state
        raise RunError(f"training failed: {error}\nThe last checkpoint is kept; continue with: hybridtrain run --resume {run_dir}") from error
    finally:
        advice_counts = _close_advice(coordinator, run_dir)
    final_file = run_dir / FINAL_METRICS
    if result.error is not None or not final_file.is_file():
        raise RunError(f"training ended without its final evaluation ({result.error or 'no ' + FINAL_METRICS}); resume with: hybridtrain run --resume {run_dir}")
    metrics = json.loads(final_file.read_text())
    summary = {
        "name": config.name,
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
        "driver_wall_s": time.perf_counter() - started,
        "zero_stage": metrics["zero_stage"],
        "precision": metrics["precision"],
        "num_workers": train.num_workers,
        "restarts": metrics["restarts"],
        "advisor": config.advisor.backend,
        **advice_counts,
        "probation_s": metrics["probation_s"],
        "rollbacks_verified": metrics["rollbacks_verified"],
        "use_gpu": use_gpu,
        "data": data_info,
        "cluster": {"address": cluster.address, "dashboard_url": cluster.dashboard_url},
    }
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    print(f"[hybridtrain] done: test_accuracy {summary['test_accuracy']:.4f}, macro F1 {summary['test_macro_f1']:.4f}, "
          f"{summary['epochs']} epochs in {summary['wall_s']:.1f}s -> {run_dir}", flush=True)
    return summary


def _start_advice(config: ExperimentConfig, run_dir: Path, advisor_factory: Callable[[], Any] | None) -> tuple[Any, dict[str, Any] | None]:
    """Deploy the advisor (if it is a served LLM) and create this run's coordinator actor."""
    if config.advisor.backend == "none" and advisor_factory is None:
        return None, None
    import ray

    from orchestration.coordinator import get_or_create_coordinator

    if config.advisor.is_served and advisor_factory is None:
        from serve_llm.deployment import deploy_advisor

        print(f"[hybridtrain] starting the advisor ({config.advisor.backend}) on Ray Serve ...", flush=True)
        deploy_advisor(config.advisor)
    run_id = f"{config.name}-{abs(hash(str(run_dir))) % 10**8:08d}"
    name = f"hybridtrain-coordinator-{run_id}"
    namespace = ray.get_runtime_context().namespace
    state_file = run_dir / COORDINATOR_STATE
    state = json.loads(state_file.read_text()) if state_file.is_file() else None  # --resume keeps the track record
    coordinator = get_or_create_coordinator(name, namespace, config=config.coordinator, run_id=run_id,
                                            advisor_factory=advisor_factory, advisor_config=None if advisor_factory else config.advisor, state=state)
    ray.get(coordinator.summary_counts.remote())  # fail here, not in a worker, if the actor cannot start
    return coordinator, {"coordinator": name, "namespace": namespace, "run_id": run_id, "verify_rollback": config.coordinator.verify_rollback,
                         "call_timeout_s": config.coordinator.wait_for_answer_s + 120.0}


def _close_advice(coordinator: Any, run_dir: Path) -> dict[str, Any]:
    """Write the ledger and the coordinator's state; return the counts for summary.json."""
    if coordinator is None:
        return {}
    import ray

    try:
        coordinator_state = ray.get(coordinator.to_state.remote())
        (run_dir / COORDINATOR_STATE).write_text(json.dumps(coordinator_state))
        ray.get(coordinator.write_ledger.remote(str(run_dir / LEDGER)))
        counts = ray.get(coordinator.summary_counts.remote())
    except Exception as error:  # the run's own outputs matter more than the ledger; say what was lost
        logger.warning("could not collect the advisor ledger: %s", error)
        print(f"[hybridtrain] warning: advisor ledger lost: {error}", flush=True)
        return {"advisor_ledger_error": str(error)}
    finally:
        ray.kill(coordinator)
    return counts
