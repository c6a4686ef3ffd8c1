"""`Loop`: what the per-worker loop and its components share on one rank (composer's `State`), and
`prepare`, which builds it from the `WorkerPlan`: placement, data, model, research modes, engine.

Every rank loads and splits the data identically (seeded) and builds the same initial weights, so
shards line up without any exchange.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import socket
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from orchestration.errors import DataError
from workers.config import DEFAULT_LR, LR_FIND, ModelConfig, TrainConfig, small_data_batch
from workers.data import Dataset, Normalizer, Split, load_dataset, shard_batches, stratified_split
from workers.engine import EngineSpec, build_engine, gather_to_all, input_dtype
from workers.events import Components, Event
from workers.files import atomic_write_text
from workers.models import build_model, first_dropout, resolve_kind
from workers.modes import TrainingModes
from workers.optimizers import EvalWeights
from workers.plan import WorkerPlan

PLACEMENT_GROUP = "placement_group.txt"  # in the run directory: the id of the worker group's placement group
PLACEMENT = "placement.json"  # in the run directory: the node each rank of the (latest) worker group ran on
PROGRESS = "progress.log"  # in the run directory: rank 0's progress lines, which the driver prints live


@dataclass(kw_only=True)
class LoopState:
    """What the loop carries across epochs and restarts (saved in every checkpoint)."""

    epoch: int = 0  # last completed epoch
    best_val_loss: float = math.inf
    best_epoch: int = 0
    bad_epochs: int = 0  # epochs since the last val-loss improvement
    history: list[dict[str, float]] = field(default_factory=list)
    wall_s: float = 0.0  # training wall time over all attempts
    restarts: int = 0
    probation_s: float = 0.0  # of wall_s, time spent trying advisor proposals on probation
    checkpoint_s: float = 0.0  # of wall_s, time spent saving checkpoints and reporting them
    rollbacks_verified: int = 0  # rejected proposals whose rollback was checked bit for bit
    configured: dict[str, float] = field(default_factory=dict)  # lr, weight_decay, momentum, dropout as the config set them
    params_digest: str = ""  # SHA-256 of the checkpointed weights (sweep trials only: proves a PBT clone)
    nodes: list[str] = field(default_factory=list)  # the Ray node of each rank that wrote this state
    modes: dict[str, Any] = field(default_factory=dict)  # the research modes' state (`TrainingModes.state`)


@dataclass(kw_only=True)
class LoopData:
    """The rank's data. In memory: every sample (`features`, `labels`) and the split's indices into them.
    Streamed (`stream`): only the probe rows are here, as a train split of their own (probations and the LR
    range test draw from them); epochs, validation and the test stream through Ray Data."""

    dataset: Dataset
    split: Split
    normalizer: Normalizer
    features: torch.Tensor  # every sample (streamed: the probe rows), normalised
    labels: torch.Tensor
    stream: Any = None  # `workers.streaming.StreamShards` of a streamed run

    def count(self, which: str) -> int:
        """Samples in the train, val or test split (streamed: the whole split, not the probe rows)."""
        return self.stream.source.counts[which] if self.stream is not None else len(getattr(self.split, which))


@dataclass(frozen=True, kw_only=True, slots=True)
class BatchInfo:
    """Which micro-step is running (`loop.batch` during `batch` and `batch_end`)."""

    phase: str  # "epoch" (the epoch's training steps) or "probation" (a proposal's)
    epoch: int
    step: int
    steps: int  # micro-steps in this phase

    @property
    def last(self) -> bool:
        return self.step == self.steps - 1


@dataclass(kw_only=True)
class Loop:
    """One rank's view of the run. The loop owns the training fields; components read them, and only
    interventions write them (see `workers.events`)."""

    plan: WorkerPlan
    rank: int
    world_size: int
    device: torch.device
    train: TrainConfig  # the plan's, with the batch lowered on small data (`small_data_batch`)
    model_config: ModelConfig  # the plan's, with the kind resolved from the data
    data: LoopData
    engine: Any
    spec: EngineSpec
    modes: TrainingModes
    nodes: list[str]  # the Ray node of each rank
    configured: dict[str, float]  # lr, weight_decay, momentum, dropout as the config set them
    eval_weights: EvalWeights  # schedule-free AdamW's evaluation point (a no-op for the other optimizers)
    state: LoopState = field(default_factory=LoopState)
    best_params: dict[str, torch.Tensor] | None = None
    initial_params: dict[str, torch.Tensor] | None = None  # the weights before the first step (a collapsed run's restart point)
    lr_find: Any = None  # `workers.lr_find.LrFindResult` with train.lr: find
    memory: Any = None  # `workers.memory.MemoryWatch` of this worker
    components: Components = field(default_factory=lambda: Components([]))
    start: str = "fresh"  # how this attempt began: "fresh", "resumed" (a checkpoint of this run) or "handed over" (a sweep's)
    # what the current event is about
    epoch: int = 0
    batch: BatchInfo | None = None
    row: dict[str, float] = field(default_factory=dict)  # the epoch's metrics, from `epoch_end` on
    stop: bool = False  # this epoch ends the run early (early stopping)
    save: bool = False  # this epoch writes a checkpoint
    checkpoint_dir: Path | None = None  # during `checkpoint`
    epoch_result: Any = None  # the epoch's `workers.epoch.EpochResult`, from `epoch_end` on
    scores: np.ndarray | None = None  # each training sample's loss at this epoch's start (curriculum, batch selection)
    epoch_started: float = 0.0  # perf_counter at the epoch's start
    _clock: float = 0.0

    @property
    def run_dir(self) -> Path:
        return self.plan.run_dir

    @property
    def dtype(self) -> torch.dtype:
        return input_dtype(self.spec)

    def fire(self, event: Event) -> list[str]:
        return self.components.fire(event, self)

    def start_clock(self) -> None:
        self._clock = time.perf_counter()

    def account_time(self) -> float:
        """Add the time since the last mark to `state.wall_s` (training wall time), mark again; returns it."""
        now = time.perf_counter()
        elapsed, self._clock = now - self._clock, now
        self.state.wall_s += elapsed
        return elapsed

    def log(self, message: str) -> None:
        progress_log(self.rank, self.run_dir, message)


def prepare(plan: WorkerPlan) -> Loop:
    """Everything a rank needs before its first epoch; the same on every rank but for placement files."""
    import ray.train
    import ray.train.torch

    context = ray.train.get_context()
    rank, world_size = context.get_world_rank(), context.get_world_size()
    os.environ.setdefault("LOCAL_RANK", str(context.get_local_rank()))  # DeepSpeed reads it
    nodes = _record_placement(plan.run_dir, rank)
    data = load_data(plan, rank=rank, world_size=world_size)
    model_config = plan.model.for_kind(resolve_kind(plan.model.kind, data.dataset.sample_shape))
    train = small_data_batch(plan.train, data.count("train"), world_size)
    if train.lr == LR_FIND:  # built at the default, then the range test picks the rate (`train_loop.find_lr`)
        train = dataclasses.replace(train, lr=DEFAULT_LR)
    torch.manual_seed(train.seed)  # the same initial weights on every rank
    model = build_model(model_config, data.dataset.sample_shape, len(data.dataset.classes))
    modes = TrainingModes.create(plan.modes, train, model_config, model, log=lambda message: progress_log(rank, plan.run_dir, message))
    # Before DeepSpeed partitions them (ZeRO-3): the same on every rank and every attempt (seeded, or model.pretrained's).
    initial_params = {name: param.detach().float().cpu().clone() for name, param in model.named_parameters()}
    micro_steps = (data.stream.train_steps(train.batch_size, train.grad_accum_steps) if data.stream is not None else
                   len(shard_batches(len(data.split.train), rank=0, world_size=world_size, batch_size=train.batch_size, epoch=0,
                                     seed=train.seed, grad_accum_steps=train.grad_accum_steps)))
    device = ray.train.torch.get_device()
    engine, spec = build_engine(model, train, world_size=world_size, micro_steps_per_epoch=micro_steps, device=device,
                                param_groups=modes.optimizer_groups())
    modes.attach(engine)
    dropout = model_config.dropout if model_config.dropout is not None else first_dropout(model)  # a factory's model sets its own
    configured = {"lr": train.lr, "weight_decay": train.weight_decay, "momentum": train.momentum, "dropout": dropout}
    return Loop(plan=plan, rank=rank, world_size=world_size, device=device, train=train, model_config=model_config,
                data=data, engine=engine, spec=spec, modes=modes, eval_weights=EvalWeights(engine), initial_params=initial_params, nodes=nodes, configured=configured, state=LoopState(configured=configured))


def progress_log(rank: int, run_dir: Path, message: str) -> None:
    """Progress for people, from rank 0 only: appended to `RUN_DIR/progress.log`, which the driver prints
    as it grows, and written to the worker's real stdout (in Ray's logs; on the terminal with --verbose).
    Not `print`: Ray Train routes it through its logger, which would echo every line twice."""
    if rank != 0:
        return
    line = f"[hybridtrain] {message}\n"
    sys.__stdout__.write(line)
    sys.__stdout__.flush()
    try:
        with open(run_dir / PROGRESS, "a", encoding="utf-8") as progress:
            progress.write(line)
    except OSError:  # progress display is best effort; training goes on
        pass


def load_data(plan: WorkerPlan, *, rank: int = 0, world_size: int = 1) -> LoopData:
    if plan.stream is not None:
        return _streamed_data(plan, rank=rank, world_size=world_size)
    dataset = load_dataset(plan.data)
    if plan.split is not None:  # the driver's (`cluster.launch.check_data`), on the same data: the fingerprint guards a resume
        split = plan.split
        highest = int(max(split.train.max(), split.val.max(), split.test.max()))
        if split.size != len(dataset.y) or highest >= len(dataset.y):
            raise DataError(f"{dataset.source}: {len(dataset.y)} samples here, but the driver split {split.size} (highest index {highest}): "
                            "the data changed after the run checked it, or this node reads other data at the same path")
    else:
        split = stratified_split(dataset.y, val_fraction=plan.data.val_fraction, test_fraction=plan.data.test_fraction, seed=plan.data.seed)
    normalizer = Normalizer.fit(dataset.x[split.train])
    return LoopData(dataset=dataset, split=split, normalizer=normalizer, features=torch.from_numpy(normalizer(dataset.x)),
                    labels=torch.from_numpy(dataset.y))


def _streamed_data(plan: WorkerPlan, *, rank: int, world_size: int) -> LoopData:
    from workers.streaming import StreamShards

    source = plan.stream
    stream = StreamShards.open(source, rank=rank, world_size=world_size, shuffle_buffer=plan.data.shuffle_buffer,
                               val_in_memory_mb=plan.data.val_in_memory_mb)
    probe = stream.probe()
    if len(probe["y"]) != source.probe_rows:
        raise RuntimeError(f"the probe stream gave {len(probe['y'])} rows, the scan promised {source.probe_rows}")
    positions = np.arange(len(probe["y"]))
    return LoopData(dataset=Dataset(x=probe["x"], y=probe["y"], classes=list(source.classes), source=source.source),
                    split=Split(train=positions, val=positions[:0], test=positions[:0]), normalizer=Normalizer.from_dict(source.normalizer),
                    features=torch.from_numpy(probe["x"]), labels=torch.from_numpy(probe["y"]), stream=stream)


def _record_placement(run_dir: Path, rank: int) -> list[str]:
    """Where each rank runs (`placement.json`) and which placement group Train reserved (`placement_group.txt`):
    a sweep frees that group if the run is killed (a paused or stopped Tune trial) and Ray Train's own
    cleaner cannot (it needs the State API). Collective: returns every rank's node id."""
    import ray
    import ray.util

    if rank == 0:
        group = ray.util.get_current_placement_group()
        if group is not None:
            run_dir.mkdir(parents=True, exist_ok=True)
            atomic_write_text(run_dir / PLACEMENT_GROUP, group.id.hex())
    here = {"rank": rank, "node_id": ray.get_runtime_context().get_node_id(), "hostname": socket.gethostname(), "pid": os.getpid()}
    workers = gather_to_all(here)
    if rank == 0:
        atomic_write_text(run_dir / PLACEMENT, json.dumps({"workers": workers}, indent=1))
    return [worker["node_id"] for worker in workers]


def positions_by_rank(num_samples: int, world_size: int) -> np.ndarray:
    """Positions in the train split in the order `evaluate(..., per_sample=True)` returns them (rank shards in rank order)."""
    return np.concatenate([np.arange(num_samples)[rank::world_size] for rank in range(world_size)])
