"""The DeepSpeed side in one process (world size 1, gloo): full-parameter access and statistics
are right under every ZeRO stage."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from workers.advice import WorkerAdvice
from workers.config import ModelConfig, TrainConfig
from workers.engine import build_engine, full_fp32_params, write_full_fp32_params
from workers.models import build_model

pytestmark = pytest.mark.e2e
STAGES = [0, 1, 2, 3]


@pytest.fixture(scope="module")
def single_process_group(monkeypatch_module):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    for key, value in {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0"}.items():
        monkeypatch_module.setenv(key, value)
    dist.init_process_group("gloo", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as patch:
        yield patch


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
    advice = WorkerAdvice(engine=engine, rank=0, world_size=1, run_id="t", model_kind="cnn2d", total_epochs=1, batch_size=32, rollback_dir=Path("unused"))
    loss = F.cross_entropy(engine(x), y)
    with advice.watch_grad_norms():
        engine.backward(loss)
    engine.step()
    assert set(advice.grad_norms) == set(expected)
    for name, norm in expected.items():
        assert advice.grad_norms[name] == pytest.approx(norm, rel=1e-4)
