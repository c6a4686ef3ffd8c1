"""The DeepSpeed side in one process (world size 1, gloo): full-parameter access and statistics
are right under every ZeRO stage."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from workers.config import ModelConfig, TrainConfig
from workers.engine import build_engine, full_fp32_params, write_full_fp32_params
from workers.models import build_model
from workers.observer import AdviceObserver

pytestmark = pytest.mark.e2e
STAGES = [0, 1, 2, 3]


def _engine(stage: int):
    torch.manual_seed(0)
    model = build_model(ModelConfig(dropout=0.0), (1, 8, 8), 10)
    engine, _ = build_engine(model, TrainConfig(zero_stage=stage, num_workers=1), world_size=1, micro_steps_per_epoch=4, device=torch.device("cpu"))
    return engine


def _batch():
    generator = torch.Generator().manual_seed(1)
    return torch.randn(32, 1, 8, 8, generator=generator), torch.randint(0, 10, (32,), generator=generator)


@pytest.mark.parametrize("stage", STAGES)
def test_written_weights_reach_the_optimizer_master_copy(single_process_group, stage) -> None:
    engine = _engine(stage)
    x, y = _batch()
    engine.backward(F.cross_entropy(engine(x), y))
    engine.step()
    target = {name: torch.full_like(value, 0.01) for name, value in full_fp32_params(engine).items()}
    write_full_fp32_params(engine, target)
    assert all(torch.equal(full_fp32_params(engine)[name], target[name]) for name in target)
    # One more step starts from the written weights: under ZeRO a write to `param.data` alone would be
    # overwritten here by the stale master copy, and the step would move far from 0.01.
    engine.backward(F.cross_entropy(engine(x), y))
    engine.step()
    moved = max(float((full_fp32_params(engine)[name] - 0.01).abs().max()) for name in target)
    assert moved < 0.05


@pytest.mark.parametrize("stage", [0, 2, 3])
def test_hooked_gradient_norms_match_autograd(single_process_group, stage) -> None:
    torch.manual_seed(0)
    reference = build_model(ModelConfig(dropout=0.0), (1, 8, 8), 10)
    x, y = _batch()
    F.cross_entropy(reference(x), y).backward()
    expected = {name: float(param.grad.norm()) for name, param in reference.named_parameters()}
    engine = _engine(stage)
    advice = AdviceObserver(engine=engine, world_size=1)
    loss = F.cross_entropy(engine(x), y)
    with advice.watch_grad_norms():
        engine.backward(loss)
    engine.step()
    assert set(advice.grad_norms) == set(expected)
    for name, norm in expected.items():
        assert advice.grad_norms[name] == pytest.approx(norm, rel=1e-4)


def test_a_zero_learning_rate_refuses_an_lr_scale_instead_of_ignoring_it(single_process_group, tmp_path) -> None:
    from orchestration.protocol import Apply, HyperparameterChange, Proposal
    from workers.engine import read_hyperparameters, write_hyperparameters
    from workers.probation import ProbationRunner, WeightReferences

    engine = _engine(2)
    for group in engine.lr_scheduler.optimizer.param_groups:
        group["lr"] = 0.0  # e.g. the end of a cosine schedule with min_lr_ratio 0
    engine.lr_scheduler.base_lrs = [0.0 for _ in engine.lr_scheduler.base_lrs]
    current = read_hyperparameters(engine, batch_size=32)
    with pytest.raises(ValueError, match="learning rate is 0"):
        write_hyperparameters(engine, {**current, "lr": 1e-3}, batch_size=32)
    write_hyperparameters(engine, {**current, "dropout": 0.2}, batch_size=32)  # lr unchanged at 0: allowed

    runner = ProbationRunner(engine=engine, rank=0, batch_size=32, rollback_dir=tmp_path / "rollback")
    decision = Apply(query_id="q1", proposal=Proposal(hyperparameters=HyperparameterChange(lr_scale=0.5)), alphas={}, source="advisor",
                     epoch_asked=1, probation_steps=1, reward_mode="baseline", reset_optimizer_moments=False, seed=0)
    problem = runner.apply(decision, WeightReferences(params=full_fp32_params(engine)))
    assert problem is not None and "learning rate that is 0" in problem  # reported to the coordinator, which records it


class ScriptedLink:
    """Stands in for rank 0's `CoordinatorLink`: answers `on_epoch_end` from a list, records what it was sent."""

    def __init__(self, decisions) -> None:
        self.decisions = list(decisions)
        self.drifts: list[float] = []
        self.snapshots: list = []
        self.disabled_reason = ""
        self.incidents: list = []
        self.reachable = True

    def on_epoch_end(self, snapshot, weight_drift, *, epoch):
        self.drifts.append(weight_drift)
        self.snapshots.append(snapshot)
        return True, self.decisions.pop(0)


def test_weight_drift_is_measured_from_the_last_query(single_process_group, tmp_path) -> None:
    """The coordinator documents drift as `||W - W_q|| / ||W_q||` with `W_q` the weights when it last
    asked; the worker must measure exactly that (it used to measure from the last applied proposal)."""
    from orchestration.protocol import Continue, ProbationMetrics
    from workers.advice import AdviceSettings, WorkerAdvice

    engine = _engine(0)
    settings = AdviceSettings(coordinator="unused", namespace="unused", run_id="t", run_key="t", history_window=8)
    link = ScriptedLink([Continue("no query trigger"), Continue("asked advisor (t:q1)", asked_now=True), Continue("waiting"), Continue("waiting")])
    advice = WorkerAdvice(settings=settings, engine=engine, rank=0, model_kind="cnn2d", total_epochs=4, batch_size=32,
                          observer=AdviceObserver(engine=engine, world_size=1), link=link,
                          probation=__import__("workers.probation", fromlist=["ProbationRunner"]).ProbationRunner(
                              engine=engine, rank=0, batch_size=32, rollback_dir=tmp_path / "rb"))
    history: list[dict[str, float]] = []
    weights = []

    def epoch_end(epoch: int, scale: float) -> None:
        write_full_fp32_params(engine, {name: value * scale for name, value in full_fp32_params(engine).items()})
        weights.append(full_fp32_params(engine))
        history.append({"train_loss": 1.0, "val_loss": 1.0, "val_accuracy": 0.5})
        advice.on_epoch_end(epoch=epoch, step=epoch, history=history, best_params=None, run_probation=None,
                            epoch_metrics=ProbationMetrics(val_loss=1.0))

    def drift(now, reference) -> float:
        delta = sum(float((now[n] - reference[n]).norm() ** 2) for n in now)
        return (delta / sum(float(reference[n].norm() ** 2) for n in now)) ** 0.5

    for epoch, scale in enumerate((1.0, 1.1, 1.2, 1.3), start=1):
        epoch_end(epoch, scale)
    assert link.drifts[0] == 0.0  # the first advised epoch is the reference before any query
    assert link.drifts[1] == pytest.approx(drift(weights[1], weights[0]), rel=1e-5)
    # Asked at epoch 2: from then on drift is measured from epoch 2's weights, not from the last epoch's.
    assert link.drifts[2] == pytest.approx(drift(weights[2], weights[1]), rel=1e-5)
    assert link.drifts[3] == pytest.approx(drift(weights[3], weights[1]), rel=1e-5)


def test_the_snapshot_carries_the_lr_factor_the_accepted_changes_multiplied_up_to(single_process_group, tmp_path) -> None:
    """`coordinator.max_lr_factor` caps lr raises by it: the schedule's peak over the configured lr, whatever
    the warm-up or decay does to the lr of the moment."""
    from workers.advice import AdviceSettings, WorkerAdvice
    from workers.engine import read_hyperparameters, write_hyperparameters
    from workers.probation import ProbationRunner

    engine = _engine(0)
    settings = AdviceSettings(coordinator="unused", namespace="unused", run_id="t", run_key="t", history_window=8)
    from orchestration.protocol import Continue

    link = ScriptedLink([Continue("no query trigger")])
    advice = WorkerAdvice(settings=settings, engine=engine, rank=0, model_kind="cnn2d", total_epochs=4, batch_size=32,
                          observer=AdviceObserver(engine=engine, world_size=1), link=link,
                          probation=ProbationRunner(engine=engine, rank=0, batch_size=32, rollback_dir=tmp_path / "rb"))
    assert advice.configured_lr == TrainConfig().lr and advice.lr_factor() == 1.0
    current = read_hyperparameters(engine, batch_size=32)
    write_hyperparameters(engine, {**current, "lr": current["lr"] * 4}, batch_size=32)  # an accepted 4x raise
    engine.lr_scheduler.step()  # the schedule moves on: the factor does not
    assert advice.lr_factor() == pytest.approx(4.0)
    advice._ask(epoch=1, step=4, history=[{"train_loss": 1.0, "val_loss": 1.0, "train_accuracy": 0.5, "val_accuracy": 0.5}],
                params=full_fp32_params(engine))
    assert link.snapshots[0].lr_factor == pytest.approx(4.0)


def test_the_gpu_checks_blend_and_rollback_check_passes_on_the_cpu(single_process_group, tmp_path, monkeypatch) -> None:
    """`benchmarks/gpu_check.py` runs only where a GPU is lent: its ZeRO-3 rollback check must not first fail there on its own bugs."""
    from benchmarks import gpu_check
    from workers.engine import full_fp32_params

    monkeypatch.setattr(gpu_check, "DEVICE", torch.device("cpu"))
    x, y = gpu_check.task(400)
    result = gpu_check.check_rollback(x, y, tmp_path)
    assert result["ok"], result
    assert result["rollback_exact"] and result["accepted"] and result["blend_max_abs_error"] < 1e-6
    engine, spec = gpu_check.engine_for(0, steps_per_epoch=2)
    before = full_fp32_params(engine)
    assert gpu_check.step(engine, spec, *gpu_check.batch(x, y, 7)) > 0 and not torch.equal(full_fp32_params(engine)["head.3.weight"], before["head.3.weight"])
