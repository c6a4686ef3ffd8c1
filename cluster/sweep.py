"""Run a Ray Tune sweep whose trials are full hybridtrain runs: `run_sweep` orchestrates it.

    run_sweep(config, sweep_dir)   # check, deploy the shared advisor and coordinator, tune, write results

The sweep is split by job:

- `cluster.trial`: the Train-to-Tune bridge. Each trial is a Tune *function* trainable (`trial_main`)
  that plans a run exactly as `hybridtrain run` does and executes it with a `TrialContext`.
- `cluster.sweep_callbacks`: the Tune callbacks (progress table, telemetry, the LLM explorer's feed).
- `cluster.placement`: frees the placement groups of Train runs whose trial Tune killed.
- `cluster.sweep_outputs`: `results.csv`, `explores.csv` and `summary.json`.

One advisor deployment and one coordinator actor serve the whole population: the sweep deploys the
advisor and creates the coordinator (`POPULATION_COORDINATOR`) before Tune starts; every trial run
opens its own coordinator state in it (alphas, track record, ledger, under its own, possibly tuned,
settings), and all of them share the advisor client and the response cache. The trial function
reserves no CPU to speak of (`TRIAL_CPU`): it is only the Train driver, and Train reserves the workers'
placement group from `ScalingConfig` itself. `max_concurrent_trials` is the whole population, and the
cluster must fit it at once (asynchronous PBT pauses trials while any is pending).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import time
from pathlib import Path
from typing import Any

from cluster.experiment import ExperimentConfig, write_config
from cluster.fingerprint import FINGERPRINT, fingerprint
from cluster.launch import TRIAL_CPU, check_unchanged, deploy_served_advisor, needed_cpus, resolve_output_dir
from cluster.placement import free_placement_groups
from cluster.rundir import atomic_write_text, claim_directory
from cluster.runtime import check_shared_storage, connect
from cluster.sweep_callbacks import explore_feed, progress_table, ray_output_to, sweep_series
from cluster.sweep_outputs import EXPLORE_DECISIONS, write_sweep_outputs
from cluster.trial import trial_config, trial_main
from orchestration.settings import ConfigError
from tune_search.config import TuneConfig, extreme_values
from tune_search.search import build_scheduler, param_space

TUNE_STORAGE = "ray"
TUNE_RUN_NAME = "tune"
POPULATION_COORDINATOR = "hybridtrain-population-{digest}"  # the sweep's shared coordinator actor, by sweep directory
WORKER_START_TIMEOUT_ENV = "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S"
TUNE_LOG = "logs/tune.log"  # in the sweep directory: Ray's and Tune's own output during the sweep


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


def trial_generator(tune_config: TuneConfig) -> Any:
    """Tune's variant generator, seeded (the same trials for the same seed) and limited to the sweep's concurrency."""
    from ray.tune.search import BasicVariantGenerator

    return BasicVariantGenerator(random_state=tune_config.seed, max_concurrent=tune_config.concurrency)


def run_sweep(config: ExperimentConfig | None, sweep_dir: str | Path, *, resume: bool = False, address: str | None = None,
              allow_changed: bool = False) -> dict[str, Any]:
    """Run `config.tune` into `sweep_dir` (or, with `resume`, continue the sweep there) and return its summary.

    The sweep directory is claimed first (`cluster.rundir.claim_directory`): a second driver on it is refused
    before Ray starts. A resume whose config (`tune.*` included) or data differ from what the sweep started
    with is refused, saying what changed, unless `allow_changed` (`cluster.fingerprint`). Ray's and Tune's own
    output goes to `SWEEP_DIR/logs/tune.log` (with `cluster.verbose`, to the terminal too, as Ray prints it);
    the terminal shows hybridtrain's table and lines.
    """
    with claim_directory(sweep_dir, "sweep"):
        config, sweep_dir = resolve_output_dir("sweep", config, sweep_dir, resume=resume, address=address)
        current = fingerprint(config, sweep=True)
        if resume:
            check_unchanged(sweep_dir, current, allow_changed=allow_changed, kind="sweep")
        check_space(config)
        # Starting a whole population at once on a small machine takes a while: give Train's worker groups
        # longer than its 60 s default to come up (read by Train controllers of an embedded Ray, which
        # inherit this process's environment; set it on the cluster's nodes otherwise).
        os.environ.setdefault(WORKER_START_TIMEOUT_ENV, "600")
        cluster = connect(config.cluster, min_cpus=needed_cpus(config, trials=config.tune.concurrency))
        check_shared_storage(sweep_dir, cluster)  # trials on any node write here and read each other's checkpoints
        if not resume:
            write_config(config, sweep_dir / "config.yaml")
        atomic_write_text(sweep_dir / FINGERPRINT, json.dumps(current, indent=1))  # what --resume compares with (now, after --allow-changed)
        deploy_served_advisor(config.advisor, shared=True)
        population = start_population(config, sweep_dir)
        print(f"[hybridtrain] sweep {config.name!r}: {config.tune.scheduler}, {config.tune.num_samples} trials of {config.train.epochs} epochs "
              f"-> {sweep_dir}" + ("" if config.cluster.verbose else f"; Ray's and Tune's own output: {sweep_dir / TUNE_LOG}"), flush=True)
        started = time.perf_counter()
        output = contextlib.nullcontext() if config.cluster.verbose else ray_output_to(sweep_dir / TUNE_LOG)
        try:
            with output:
                tuner = build_tuner(config, sweep_dir, resume=resume, coordinator=population[:2] if population else None)
                results = tuner.fit()
        finally:
            free_placement_groups(sweep_dir / "trials")  # of trials stopped early (ASHA) or killed last
            coordinator_stats = stop_population(population)
        summary = write_sweep_outputs(config, sweep_dir, results, wall_s=time.perf_counter() - started, coordinator=coordinator_stats)
        _print_outcome(summary, sweep_dir)
        return summary


def build_tuner(config: ExperimentConfig, sweep_dir: Path, *, resume: bool, coordinator: tuple[str, str] | None):
    """The sweep's `Tuner`: restored from `sweep_dir` on `resume` if Tune saved its state there (finished
    trials are not run again), else a new one whose trials open their runs in `coordinator`."""
    from ray import tune

    tune_config = config.tune
    callbacks, explorer = _tune_callbacks(config, sweep_dir)
    # A trial is only the Train driver: a token share of a CPU (Tune refuses an empty request); the workers'
    # resources are reserved once, by Train, from ScalingConfig.
    trainable = tune.with_resources(tune.with_parameters(trial_main, base=config.to_dict(), sweep_dir=str(sweep_dir), coordinator=coordinator),
                                    {"CPU": TRIAL_CPU})
    experiment = sweep_dir / TUNE_STORAGE / TUNE_RUN_NAME
    if resume and tune.Tuner.can_restore(str(experiment)):
        return tune.Tuner.restore(str(experiment), trainable=trainable, resume_errored=True)
    return tune.Tuner(
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


def _tune_callbacks(config: ExperimentConfig, sweep_dir: Path) -> tuple[list[Any], Any]:
    """The sweep's Tune callbacks, and the LLM explorer (None unless `tune.llm_explore`) that one of them feeds."""
    tune_config = config.tune
    callbacks = [progress_table(tune_config.metric), sweep_series(sweep_dir, config.name, tune_config.metric, tune_config.mode)]
    if not tune_config.llm_explore:
        return callbacks, None
    from serve_llm.client import make_client
    from tune_search.explore import LLMExplorer

    explorer = LLMExplorer(tune_config, functools.partial(make_client, config.advisor), sweep_dir / EXPLORE_DECISIONS)
    return callbacks + [explore_feed(explorer)], explorer


def _print_outcome(summary: dict[str, Any], sweep_dir: Path) -> None:
    for trial, error in summary["trials_failed"].items():
        print(f"[hybridtrain] warning: trial {trial} failed ({error}); the others went on. Its log: {sweep_dir / TUNE_STORAGE / TUNE_RUN_NAME / trial}",
              flush=True)
    best = summary["best_score"]
    print(f"[hybridtrain] sweep done: best {summary['metric']} {best if best is None else f'{best:.4f}'} "
          f"in {summary['best_run_dir']}; {summary['exploits']} exploits, {summary['trials']} trials -> {sweep_dir}", flush=True)


def start_population(config: ExperimentConfig, sweep_dir: Path) -> tuple[str, str, Any] | None:
    """The sweep's one coordinator actor (name, namespace, handle), or None when trials are not advised.

    It holds the population's advisor client and response cache; its settings for the cache are the
    sweep's base `coordinator` section (each trial brings its own for the rest). A resumed sweep gets
    a fresh one; the trials bring their coordinator state back from their checkpoints.
    """
    if config.advisor.backend == "none":
        return None
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
