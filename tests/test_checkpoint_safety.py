"""Loading a checkpoint never runs code it carries (issue 21): DeepSpeed's own loader unpickles with
`weights_only=False`, so a crafted model-state file ran its payload on `--resume`, a restart, a PBT
exploit or probation's rollback. DeepSpeed single-process (gloo), as in `test_worker_engine`."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from orchestration.errors import CheckpointError
from workers.config import ModelConfig, TrainConfig
from workers.engine import build_engine, full_fp32_params, load_engine_checkpoint, state_digest, write_full_fp32_params
from workers.models import build_model

pytestmark = pytest.mark.e2e
TAG = "state"


class Payload:
    """What an attacker pickles: unpickling calls `open(marker, "w")`, which creates the marker file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return open, (str(self.marker), "w")


def _trained_engine(stage: int):
    torch.manual_seed(0)
    model = build_model(ModelConfig(dropout=0.0), (1, 8, 8), 10)
    engine, _ = build_engine(model, TrainConfig(zero_stage=stage, num_workers=1), world_size=1, micro_steps_per_epoch=4, device=torch.device("cpu"))
    generator = torch.Generator().manual_seed(1)
    x, y = torch.randn(32, 1, 8, 8, generator=generator), torch.randint(0, 10, (32,), generator=generator)
    for _ in range(2):
        engine.backward(F.cross_entropy(engine(x), y))
        engine.step()
    return engine


def _hyperparameters(engine) -> dict[str, float]:
    return {"lr": float(engine.get_lr()[0])}


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_a_checkpoint_round_trips_weights_only(single_process_group, tmp_path, stage) -> None:
    engine = _trained_engine(stage)
    engine.save_checkpoint(str(tmp_path), tag=TAG, client_state={"loop_state": {"epoch": 3}})
    saved = state_digest(engine, _hyperparameters(engine))
    write_full_fp32_params(engine, {name: torch.zeros_like(value) for name, value in full_fp32_params(engine).items()})
    assert state_digest(engine, _hyperparameters(engine)) != saved
    load_engine_checkpoint(engine, str(tmp_path), TAG)
    assert state_digest(engine, _hyperparameters(engine)) == saved  # weights, every optimizer moment, the lr


@pytest.mark.parametrize(("stage", "victim"), [(0, "mp_rank_00_model_states.pt"), (3, "zero_pp_rank_0_mp_rank_00_model_states.pt"),
                                               (3, "zero_pp_rank_0_mp_rank_00_optim_states.pt")])
def test_a_pickle_payload_in_a_checkpoint_is_refused_and_never_runs(single_process_group, tmp_path, stage, victim) -> None:
    engine = _trained_engine(stage)
    engine.save_checkpoint(str(tmp_path / "ckpt"), tag=TAG)
    marker = tmp_path / "payload-ran"
    target = tmp_path / "ckpt" / TAG / victim
    assert target.is_file()
    torch.save({"module": Payload(marker), "optimizer_state_dict": Payload(marker)}, target)
    with pytest.raises(CheckpointError, match=f"{target}: refused to load: it holds more than weights") as refused:
        load_engine_checkpoint(engine, str(tmp_path / "ckpt"), TAG)
    assert "open" in str(refused.value)  # names what the file asked for
    assert not marker.exists()
