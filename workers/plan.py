"""`WorkerPlan`: the frozen, typed plan every Ray Train worker receives (`train_loop_config={"plan": ...}`).

The driver (`cluster.launch`) decides everything about a run before the worker group starts; the
workers read it from here and from nowhere else. It is pickled once per worker group, so it holds
only plain dataclasses and paths: no handles, no callables.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from workers.config import DataConfig, ModelConfig, ModesConfig, TrainConfig
from workers.faults import FaultConfig

if TYPE_CHECKING:
    from workers.advice import AdviceSettings
    from workers.data import Split
    from workers.streaming import StreamSource

PLAN_KEY = "plan"  # the one key of Ray Train's `train_loop_config`


@dataclass(frozen=True, kw_only=True, slots=True)
class WorkerPlan:
    data: DataConfig
    model: ModelConfig
    train: TrainConfig
    modes: ModesConfig = field(default_factory=ModesConfig)  # the research modes (`workers.modes`); all off by default
    run_dir: Path
    checkpoint_root: Path  # Ray Train's run folder: where the newest intact checkpoint is looked for on a restart
    advice: AdviceSettings | None = None  # None: the run trains without an advisor
    faults: FaultConfig = FaultConfig()  # testing aid: off unless a test or the soak bench sets it
    initial_checkpoint: Path | None = None  # a sweep trial's handed-over checkpoint (its own after a pause, or a PBT clone)
    digest_checkpoints: bool = False  # each checkpoint records the SHA-256 of its weights (a sweep proves a PBT clone with it)
    extra_components: tuple[Callable[..., Any], ...] = ()  # the user's own loop components, fired after the built-in ones (`workers.events`)
    stream: StreamSource | None = None  # streamed data (`workers.streaming`): what the driver's scan found; None: in memory
    split: Split | None = None  # data in memory: the driver's split of it (`cluster.launch.check_data`); None: computed here

    def as_loop_config(self) -> dict[str, WorkerPlan]:
        """What `TorchTrainer(train_loop_config=...)` takes (Ray Train wants a dict)."""
        return {PLAN_KEY: self}

    @staticmethod
    def from_loop_config(loop_config: dict[str, object]) -> WorkerPlan:
        plan = loop_config.get(PLAN_KEY)
        if not isinstance(plan, WorkerPlan):
            raise TypeError(f"train_loop_config must be WorkerPlan.as_loop_config(), got keys {sorted(loop_config)}")
        return plan
