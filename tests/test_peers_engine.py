"""The peers inside a real DeepSpeed engine at ZeRO 0-3 (single process, gloo, as in `test_worker_engine`): their whole
state round-trips a checkpoint (Prodigy's d and schedule-free's sums too), schedule-free is evaluated at its average and
comes back bit for bit, and a restart leaves their reference points meaningful. The 2-worker runs are in `test_peers_e2e`."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from workers.config import ModelConfig, TrainConfig
from workers.engine import build_engine, full_fp32_params, full_optimizer_state, load_engine_checkpoint, read_hyperparameters, \
    reset_optimizer_moments, state_digest
from workers.models import build_model
from workers.optimizers import EvalWeights, group_scalars, schedule_free_average

pytestmark = pytest.mark.e2e
PEERS = [("prodigy", 1.0), ("schedulefree_adamw", 3e-3)]


def _engine(optimizer: str, lr: float, stage: int):
    torch.manual_seed(0)
    model = build_model(ModelConfig(dropout=0.0), (1, 8, 8), 10)
    train = TrainConfig(zero_stage=stage, num_workers=1, optimizer=optimizer, lr=lr, warmup_epochs=0.0)
    engine, _ = build_engine(model, train, world_size=1, micro_steps_per_epoch=20, device=torch.device("cpu"))
    return engine


def _steps(engine, count: int, seed: int = 1) -> None:
    generator = torch.Generator().manual_seed(seed)
    for _ in range(count):
        x, y = torch.randn(32, 1, 8, 8, generator=generator), torch.randint(0, 10, (32,), generator=generator)
        engine.backward(F.cross_entropy(engine(x), y))
        engine.step()


def _digest(engine) -> str:
    return state_digest(engine, read_hyperparameters(engine, batch_size=32))


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
@pytest.mark.parametrize(("optimizer", "lr"), PEERS)
def test_the_whole_state_round_trips_a_checkpoint(single_process_group, tmp_path, optimizer, lr, stage) -> None:
    engine = _engine(optimizer, lr, stage)
    _steps(engine, 3)
    engine.save_checkpoint(str(tmp_path), tag="s", save_latest=False)
    saved, scalars = _digest(engine), group_scalars(engine.lr_scheduler.optimizer)
    _steps(engine, 2, seed=2)
    assert group_scalars(engine.lr_scheduler.optimizer) != scalars  # d / weight_sum / k moved on
    assert _digest(engine) != saved
    load_engine_checkpoint(engine, str(tmp_path), "s")
    assert _digest(engine) == saved
    assert group_scalars(engine.lr_scheduler.optimizer) == scalars


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_schedule_free_is_evaluated_at_its_average_and_comes_back_exactly(single_process_group, stage) -> None:
    engine = _engine("schedulefree_adamw", 3e-3, stage)
    _steps(engine, 3)
    before, training = _digest(engine), full_fp32_params(engine)
    swap = EvalWeights(engine)
    swap.swap_in()
    evaluated = full_fp32_params(engine)
    beta1 = engine.lr_scheduler.optimizer.param_groups[0]["betas"][0]
    for name, param in engine.module.named_parameters():
        z = full_optimizer_state(engine, param, "z").detach().float().cpu().reshape(training[name].shape)
        assert torch.allclose(evaluated[name], schedule_free_average(training[name], z, beta1))
    assert any(not torch.equal(evaluated[name], training[name]) for name in training)  # x is not y
    swap.swap_out()
    assert _digest(engine) == before  # the training point back, bit for bit


@pytest.mark.parametrize("stage", [0, 2, 3])
@pytest.mark.parametrize(("optimizer", "lr"), PEERS)
def test_a_restart_zeroes_the_moments_and_keeps_the_points(single_process_group, optimizer, lr, stage) -> None:
    engine = _engine(optimizer, lr, stage)
    _steps(engine, 3)
    named = dict(engine.module.named_parameters())
    p0_before = {name: full_optimizer_state(engine, param, "p0") for name, param in named.items()} if optimizer == "prodigy" else {}
    p0_before = {name: value.clone() for name, value in p0_before.items() if value is not None}
    reset_optimizer_moments(engine, list(named))
    params = full_fp32_params(engine)
    for name, param in named.items():
        assert torch.count_nonzero(full_optimizer_state(engine, param, "exp_avg_sq")) == 0
        if optimizer == "schedulefree_adamw":
            z = full_optimizer_state(engine, param, "z").detach().float().cpu().reshape(params[name].shape)
            assert torch.equal(z, params[name])  # x = y = z: a fresh start from these weights
        elif name in p0_before:
            assert torch.equal(full_optimizer_state(engine, param, "p0"), p0_before[name])  # the start d is measured from
