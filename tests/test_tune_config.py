"""Sweep config and search spaces: bad spaces fail before Ray starts, naming the key; schedulers are built right."""

from __future__ import annotations

import pytest

from cluster.experiment import build_config
from cluster.launch import needed_cpus
from cluster.sweep import check_space, trial_generator
from cluster.trial import trial_config
from orchestration.settings import ConfigError
from tune_search.config import TuneConfig
from tune_search.search import build_scheduler, mutable_keys, param_space


def sweep(**tune) -> list[str]:
    return [f"tune.{key}={value}" for key, value in tune.items()]


@pytest.mark.parametrize(
    ("space", "named"),
    [
        ({"train.lr": {"loguniform": [1e-2, 1e-4]}}, "tune.space.train.lr"),  # inverted
        ({"train.lr": {"loguniform": [0.0, 1e-2]}}, "tune.space.train.lr"),  # log of 0
        ({"train.lr": {"uniform": [0.1]}}, "tune.space.train.lr"),  # not [low, high]
        ({"train.optimizer": {"choice": []}}, "tune.space.train.optimizer"),  # empty
        ({"train.num_workers": {"choice": [1, 2]}}, "tune.space.train.num_workers"),  # never tunable: ZeRO shards
        ({"train.lr": {"normal": [0, 1]}}, "tune.space.train.lr"),  # unknown distribution
        ({"train.colour": {"choice": ["red"]}}, "tune.space.train.colour"),
    ],
)
def test_bad_spaces_name_the_key(space, named) -> None:
    with pytest.raises(ConfigError, match=named.replace(".", r"\.")):
        TuneConfig(space=space)


def test_values_the_run_config_would_reject_fail_before_ray_starts() -> None:
    config = build_config(recipe="smoke", sweep=True, overrides=["tune.space={train.lr: {loguniform: [1.0e-3, 20.0]}}"])
    with pytest.raises(ConfigError, match=r"tune\.space\.train\.lr: value 20\.0 .*train\.lr must be in \(0, 10\]"):
        check_space(config)
    config = build_config(recipe="smoke", sweep=True, overrides=["tune.space={train.optimizer: {choice: [adamw, lion]}}"])
    with pytest.raises(ConfigError, match=r"tune\.space\.train\.optimizer: value 'lion'"):
        check_space(config)


def test_pbt_needs_a_mutable_key_and_pb2_a_continuous_one() -> None:
    with pytest.raises(ConfigError, match="can mutate"):
        TuneConfig(scheduler="pbt", space={"train.zero_stage": {"choice": [1, 2]}})
    with pytest.raises(ConfigError, match="pb2"):
        TuneConfig(scheduler="pb2", space={"train.weight_decay": {"choice": [0.0, 0.01]}})
    with pytest.raises(ConfigError, match="tune.llm_explore"):
        TuneConfig(scheduler="asha", llm_explore=True)


def test_pbt_never_mutates_keys_that_change_what_a_checkpoint_holds() -> None:
    config = TuneConfig(space={"train.lr": {"loguniform": [1e-4, 1e-2]}, "model.width": {"choice": [16, 32]},
                               "train.zero_stage": {"grid": [1, 2]}, "model.dropout": {"uniform": [0.0, 0.3]}})
    assert mutable_keys(config) == ["train.lr", "model.dropout"]
    scheduler = build_scheduler(config, max_epochs=6)
    assert set(scheduler._hyperparam_mutations) == {"train.lr", "model.dropout"}
    assert set(param_space(config)) == {"train.lr", "model.width", "train.zero_stage", "model.dropout"}


def test_each_scheduler_is_built() -> None:
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler, PopulationBasedTraining
    from ray.tune.schedulers.pb2 import PB2

    space = {"train.lr": {"loguniform": [1e-4, 1e-2]}}
    assert isinstance(build_scheduler(TuneConfig(scheduler="pbt", space=space), max_epochs=6), PopulationBasedTraining)
    pb2 = build_scheduler(TuneConfig(scheduler="pb2", space=space), max_epochs=6)
    assert isinstance(pb2, PB2) and pb2._hyperparam_bounds == {"train.lr": [1e-4, 1e-2]}
    assert isinstance(build_scheduler(TuneConfig(scheduler="asha", space=space, grace_period=2), max_epochs=6), ASHAScheduler)
    assert isinstance(build_scheduler(TuneConfig(scheduler="random", space=space), max_epochs=6), FIFOScheduler)


def test_a_trial_config_is_the_base_with_the_sampled_values() -> None:
    base = build_config(recipe="smoke", sweep=True)
    config = trial_config(base.to_dict(), {"train.lr": 0.004, "model.dropout": 0.2})
    assert (config.train.lr, config.model.dropout, config.train.epochs) == (0.004, 0.2, base.train.epochs)


def test_the_population_is_sized_to_run_at_once() -> None:
    config = build_config(recipe="smoke", sweep=True)
    assert config.tune.concurrency == config.tune.num_samples == 4
    assert needed_cpus(config, trials=config.tune.concurrency) == 5  # 4 trials x 2 workers x 0.5 CPU, plus the trials' token shares



def test_the_concurrency_limit_reaches_tune() -> None:
    # Tune drops `TuneConfig.max_concurrent_trials` once a search algorithm is given: the generator carries the limit.
    generator = trial_generator(TuneConfig(num_samples=3, max_concurrent_trials=1))
    assert generator.max_concurrent == 1
    assert trial_generator(TuneConfig(num_samples=3)).max_concurrent == 3


def test_pbt_perturbations_stay_inside_the_space() -> None:
    from tune_search.search import ClipToSpace

    config = TuneConfig(space={"train.lr": {"loguniform": [1e-4, 1e-2]}, "model.dropout": {"uniform": [0.0, 0.3]},
                               "train.optimizer": {"choice": ["adamw", "sgd"]}})
    clip = build_scheduler(config, max_epochs=6)._custom_explore_fn
    assert isinstance(clip, ClipToSpace)
    assert clip({"train.lr": 1.2e-2, "model.dropout": 0.36, "train.optimizer": "sgd"}) == {"train.lr": 1e-2, "model.dropout": 0.3, "train.optimizer": "sgd"}


def test_sweep_outputs_name_a_failed_trial_and_pick_the_best_finished_one(tmp_path) -> None:
    """Written from Tune's results: a trial that crashed is a row with its error and a summary entry; the best
    trial is chosen among the finished ones."""
    import json
    from dataclasses import dataclass, field

    import pandas as pd

    from cluster.sweep_outputs import write_sweep_outputs

    @dataclass
    class Result:  # what write_sweep_outputs reads of a ray.tune.Result
        path: str
        metrics: dict
        config: dict
        error: BaseException | None = None
        metrics_dataframe: pd.DataFrame = field(default_factory=pd.DataFrame)

    good_run = tmp_path / "trials" / "t0" / "run-0"
    good_run.mkdir(parents=True)
    (good_run / "summary.json").write_text(json.dumps({"test_accuracy": 0.97}))
    results = [
        Result(str(tmp_path / "ray/tune/t0_lr=0.001"), {"val_accuracy": 0.96, "epoch": 6, "run_dir": str(good_run)}, {"train.lr": 1e-3},
               metrics_dataframe=pd.DataFrame({"val_accuracy": [0.9, 0.96]})),
        Result(str(tmp_path / "ray/tune/t1_lr=0.01"), {"val_accuracy": 0.5, "epoch": 2, "run_dir": str(tmp_path / "trials/t1/run-0")},
               {"train.lr": 1e-2}, error=RuntimeError("worker died\ntraceback ..."), metrics_dataframe=pd.DataFrame({"val_accuracy": [0.5]})),
    ]
    summary = write_sweep_outputs(build_config(recipe="smoke", sweep=True), tmp_path, results, wall_s=1.0)
    assert summary["trials"] == 2 and summary["trials_finished"] == 1
    assert summary["trials_failed"] == {"t1_lr=0.01": "RuntimeError: worker died"}
    assert summary["best_score"] == 0.96 and summary["best_test_accuracy"] == 0.97 and summary["best_run_dir"] == str(good_run)
    rows = pd.read_csv(tmp_path / "results.csv")
    assert list(rows.status) == ["finished", "error"] and rows.error[1] == "RuntimeError: worker died"
