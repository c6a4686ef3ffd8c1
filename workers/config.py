"""Configs owned by the worker side: data, model, training and the research modes."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from orchestration.protocol import CURRICULUM_PACE_BOUNDS
from orchestration.settings import require
from workers.optimizers import PRODIGY_LR_BOUNDS

MODEL_KINDS = ("auto", "cnn2d", "cnn1d", "mlp", "resnet", "custom")  # custom: built by model.factory
OPTIMIZERS = ("adamw", "adam", "sgd", "rmsprop", "prodigy", "schedulefree_adamw")  # the last two: `workers.optimizers`
DEFAULT_LR = 3e-3  # train.lr when unset (Prodigy: 1.0, a multiplier on its own step-size estimate)
LR_FIND = "find"  # train.lr: an LR range test before the run picks it (`workers.lr_find`)
INITS = ("default", "zero", "normal", "xavier", "kaiming")
PRECISIONS = ("auto", "fp32", "bf16")
ACTIVATION_CHOICES = ("relu", "prelu", "rational", "adaptive")  # adaptive: starts as ReLU, the advisor may switch each layer's
BATCH_SELECTION = ("off", "on", "advised")  # advised: starts off, the advisor may switch it on and off


@dataclass(kw_only=True, slots=True)
class DataConfig:
    """Where the data comes from and how it is split.

    `path` is None for scikit-learn's bundled digits; otherwise a `.npz` (arrays `x`, `y`), a `.csv`
    (with `label_column`), a `.parquet` file or a directory of them (`label_column` and an `image` column
    of encoded images or numeric features), or a folder with one sub-folder of images per class.
    """

    path: str | None = None
    # Anything else: "package.module:function" returning a ray.data.Dataset with a label column and an `image`
    # column (encoded PNG/JPEG bytes) or numeric feature columns, like a Parquet table. Not with `path`.
    loader: str | None = None
    label_column: str = "label"  # CSV and Parquet tables, and a loader's dataset
    image_size: int | None = None  # image folders only: resize to this square size (None -> first image's size)
    grayscale: bool = False  # image folders only
    val_fraction: float = 0.1
    test_fraction: float = 0.1
    seed: int = 0
    # Parquet through Ray Data, never whole in one process (`workers.streaming`): true, false, or auto (when
    # the Parquet files on disk take more than streaming_threshold_mb). Streamed data is split by a seeded hash
    # of each row's content, not stratified by counting.
    streaming: bool | str = "auto"
    streaming_threshold_mb: float = 256.0
    normalize_sample: int = 4096  # streamed: the normalisation statistics come from the first this-many training rows
    # streamed: the training rows held in memory for probations and the LR range test, and the rows each worker
    # shuffles in (Ray Data's local shuffle buffer); each at most 64 MiB of decoded samples (`workers.streaming.HELD_BYTES`)
    probe_rows: int = 2048
    shuffle_buffer: int = 2048
    val_in_memory_mb: float = 256.0  # streamed: a worker keeps its part of val after the first pass when it decodes to at most this
    # Image augmentation on the fly, training steps only: a random crop of the image padded by this many pixels
    # (0: off) and a random horizontal flip, drawn per sample from the epoch's seed.
    random_crop_padding: int = 0
    random_flip: bool = False

    def __post_init__(self) -> None:
        require(self.streaming in (True, False, "auto"), "data.streaming", self.streaming, "must be true, false or auto")
        require(self.streaming_threshold_mb >= 0, "data.streaming_threshold_mb", self.streaming_threshold_mb, "must be >= 0")
        require(self.val_in_memory_mb >= 0, "data.val_in_memory_mb", self.val_in_memory_mb, "must be >= 0")
        for name in ("normalize_sample", "probe_rows", "shuffle_buffer"):
            require(getattr(self, name) >= 1, f"data.{name}", getattr(self, name), "must be >= 1")
        require(0 <= self.random_crop_padding <= 64, "data.random_crop_padding", self.random_crop_padding, "must be in [0, 64]")
        require(0.0 < self.val_fraction < 0.5, "data.val_fraction", self.val_fraction, "must be in (0, 0.5)")
        require(0.0 < self.test_fraction < 0.5, "data.test_fraction", self.test_fraction, "must be in (0, 0.5)")
        require(self.image_size is None or self.image_size >= 4, "data.image_size", self.image_size, "must be >= 4")
        if self.loader is not None:
            from workers.references import check_reference

            check_reference(self.loader, "data.loader")
            require(self.path is None, "data.loader", self.loader, f"replaces data.path; give one of them (data.path is {self.path!r})")


# Defaults per network kind for the fields left unset (None). Tabular data is small and overfits a deep MLP:
# on the breast-cancer CSV (455 training rows) one hidden layer of 64 units with dropout 0.2 reached
# 0.979 test accuracy over 5 seeds (logistic regression: 1.0, 57 test samples), two layers of 32 0.947-0.961.
KIND_DEFAULTS = {
    "mlp": {"width": 64, "depth": 1, "dropout": 0.2},
    "cnn2d": {"width": 32, "depth": 2, "dropout": 0.1},
    "cnn1d": {"width": 32, "depth": 2, "dropout": 0.1},
    "resnet": {"width": 32, "depth": 2, "dropout": 0.1},
}


@dataclass(kw_only=True, slots=True)
class ModelConfig:
    """Which network. `auto` picks from the data's shape: images -> cnn2d, flat features -> mlp.
    `width`, `depth` and `dropout` left unset take the kind's default (`KIND_DEFAULTS`; `for_kind`)."""

    kind: str = "auto"
    width: int | None = None  # channels of the first conv layer / units of each hidden layer (mlp)
    hidden: int = 128  # units of the classifier's hidden layer (cnn)
    depth: int | None = None  # conv stages (cnn) or hidden layers (mlp) or residual blocks per stage (resnet)
    dropout: float | None = None
    init: str = "default"  # weight init: default (PyTorch's), zero, normal, xavier, kaiming
    activation: str = "relu"  # relu | prelu | rational (learnable) | adaptive (ReLU the advisor may switch per layer)
    pretrained: str | None = None  # transfer learning: a run directory (or its model.safetensors) whose matching layers start this model
    # Your own network: "package.module:function", called as function(sample_shape, num_classes, **options) and
    # returning an nn.Module of logits. width/depth/hidden/activation are the built-in kinds' and do not apply;
    # dropout, when set, is applied to the module's nn.Dropout layers; init applies as for the built-in kinds.
    factory: str | None = None
    options: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        from workers.references import check_reference

        require(self.kind in MODEL_KINDS, "model.kind", self.kind, f"must be one of {MODEL_KINDS}")
        if self.factory is not None:
            check_reference(self.factory, "model.factory")
            require(self.kind in ("auto", "custom"), "model.kind", self.kind, "must be auto (or unset) when model.factory is set")
        require(self.kind != "custom" or self.factory is not None, "model.kind", self.kind, "custom needs model.factory")
        require(isinstance(self.options, dict) and all(isinstance(key, str) for key in self.options), "model.options", self.options,
                "must be a mapping of keyword arguments for model.factory")
        require(not self.options or self.factory is not None, "model.options", self.options, "apply only with model.factory")
        require(self.activation in ACTIVATION_CHOICES, "model.activation", self.activation, f"must be one of {ACTIVATION_CHOICES}")
        require(self.init in INITS, "model.init", self.init, f"must be one of {INITS}")
        require(self.width is None or 1 <= self.width <= 4096, "model.width", self.width, "must be in [1, 4096]")
        require(1 <= self.hidden <= 65536, "model.hidden", self.hidden, "must be in [1, 65536]")
        require(self.depth is None or 1 <= self.depth <= 16, "model.depth", self.depth, "must be in [1, 16]")
        require(self.dropout is None or 0.0 <= self.dropout < 1.0, "model.dropout", self.dropout, "must be in [0, 1)")

    def for_kind(self, kind: str) -> ModelConfig:
        """This config with `kind` (resolved, not `auto`) and every unset field at that kind's default."""
        if self.factory is not None:
            return dataclasses.replace(self, kind="custom")
        defaults = KIND_DEFAULTS[kind]
        return dataclasses.replace(self, kind=kind, **{name: value for name, value in defaults.items() if getattr(self, name) is None})


@dataclass(kw_only=True, slots=True)
class TrainConfig:
    """How to train: workers, ZeRO, optimizer, schedule, stopping, fault tolerance (fault *injection* is `workers.faults.FaultConfig`)."""

    num_workers: int = 2
    cpus_per_worker: float = 1.0
    use_gpu: bool | None = None  # None -> use GPUs if the cluster has them
    zero_stage: int = 2
    precision: str = "auto"  # auto -> bf16 on GPUs that support it, fp32 otherwise (DeepSpeed's CPU path has no fp16)
    epochs: int = 30
    batch_size: int = 64  # per worker, per micro-step
    min_steps_per_epoch: int = 8  # on small data, batch_size is lowered (never raised) to give an epoch this many optimizer steps; 0 = off
    grad_accum_steps: int = 1
    grad_clip: float = 1.0  # max global grad norm; 0 disables
    optimizer: str = "adamw"  # adamw | adam | sgd | rmsprop | prodigy | schedulefree_adamw
    # Peak learning rate, reached after warm-up; unset: 3e-3 (prodigy: 1.0, its multiplier). "find": an LR range test
    # before the run picks it (`workers.lr_find`; not with prodigy, which finds its own).
    lr: float | str | None = None
    lr_find_steps: int = 100  # with lr: find, optimizer steps of the range test (1e-8 to 1, exponentially)
    weight_decay: float = 1e-4
    momentum: float = 0.9  # SGD momentum / RMSprop momentum / Adam beta1
    warmup_epochs: float = 1.0  # linear warm-up, then cosine decay to min_lr_ratio * lr
    min_lr_ratio: float = 0.05
    early_stopping_patience: int = 8  # epochs without val-loss improvement; 0 disables
    early_stopping_min_delta: float = 1e-4
    seed: int = 0
    max_failures: int = 2  # worker-group restarts from the last checkpoint before the run fails
    checkpoint_every: int = 5  # epochs between checkpoints (the last epoch and an early stop always save one); a restart redoes at most this many
    checkpoints_to_keep: int = 2
    tensorboard: bool = True  # rank 0 writes RUN_DIR/tensorboard (the series Ray's metrics export; orchestration/telemetry.py)

    def __post_init__(self) -> None:
        require(self.num_workers >= 1, "train.num_workers", self.num_workers, "must be >= 1")
        require(self.cpus_per_worker > 0, "train.cpus_per_worker", self.cpus_per_worker, "must be > 0")
        require(self.zero_stage in (0, 1, 2, 3), "train.zero_stage", self.zero_stage, "must be 0, 1, 2 or 3")
        require(self.precision in PRECISIONS, "train.precision", self.precision, f"must be one of {PRECISIONS}")
        require(self.epochs >= 1, "train.epochs", self.epochs, "must be >= 1")
        require(self.batch_size >= 1, "train.batch_size", self.batch_size, "must be >= 1")
        require(self.min_steps_per_epoch >= 0, "train.min_steps_per_epoch", self.min_steps_per_epoch, "must be >= 0")
        require(self.grad_accum_steps >= 1, "train.grad_accum_steps", self.grad_accum_steps, "must be >= 1")
        require(self.grad_clip >= 0, "train.grad_clip", self.grad_clip, "must be >= 0")
        require(self.optimizer in OPTIMIZERS, "train.optimizer", self.optimizer, f"must be one of {OPTIMIZERS}")
        if self.lr is None:
            self.lr = 1.0 if self.optimizer == "prodigy" else DEFAULT_LR
        if isinstance(self.lr, str):
            require(self.lr == LR_FIND, "train.lr", self.lr, f"must be a number or {LR_FIND!r}")
            require(self.optimizer != "prodigy", "train.lr", self.lr, "cannot be 'find' with train.optimizer prodigy (it sets its own step size)")
        else:
            require(isinstance(self.lr, (int, float)) and not isinstance(self.lr, bool), "train.lr", self.lr, f"must be a number or {LR_FIND!r}")
            self.lr = float(self.lr)
            require(0 < self.lr <= 10, "train.lr", self.lr, "must be in (0, 10]")
            low, high = PRODIGY_LR_BOUNDS
            require(self.optimizer != "prodigy" or low <= self.lr <= high, "train.lr", self.lr,
                    f"with prodigy is a multiplier on its own step-size estimate: must be in [{low:g}, {high:g}] (1.0 is the usual choice)")
        require(10 <= self.lr_find_steps <= 1000, "train.lr_find_steps", self.lr_find_steps, "must be in [10, 1000]")
        require(0 <= self.weight_decay <= 1, "train.weight_decay", self.weight_decay, "must be in [0, 1]")
        require(0 <= self.momentum < 1, "train.momentum", self.momentum, "must be in [0, 1)")
        require(self.warmup_epochs >= 0, "train.warmup_epochs", self.warmup_epochs, "must be >= 0")
        require(0 <= self.min_lr_ratio <= 1, "train.min_lr_ratio", self.min_lr_ratio, "must be in [0, 1]")
        require(self.early_stopping_patience >= 0, "train.early_stopping_patience", self.early_stopping_patience, "must be >= 0")
        require(self.max_failures >= -1, "train.max_failures", self.max_failures, "must be >= -1 (-1: retry forever)")
        require(self.checkpoint_every >= 1, "train.checkpoint_every", self.checkpoint_every, "must be >= 1")
        require(self.checkpoints_to_keep >= 1, "train.checkpoints_to_keep", self.checkpoints_to_keep, "must be >= 1")


@dataclass(kw_only=True, slots=True)
class ModesConfig:
    """The research modes (`workers.modes`), all off by default: curriculum learning, batch selection, transfer
    learning's schedule (with `model.pretrained`) and gradient-free proposals. Adaptive activations and the
    pretrained weights are `model.activation` and `model.pretrained`: they define the network.

    Rules that span sections (`l2sp` needs `model.pretrained` and `train.zero_stage` 0-2) are checked by
    `cluster.experiment.ExperimentConfig`."""

    curriculum: bool = False  # easiest samples first (loss under the current model), the pool widening each epoch
    curriculum_start: float = 0.3  # fraction of the training set in the first epoch's pool
    curriculum_pace: float = 0.15  # fraction added to the pool per epoch (the advisor may change it)
    batch_selection: str | bool = "off"  # off | on | advised: batches drawn by loss, importance-weighted so the gradient stays unbiased (YAML reads on/off as true/false: both work)
    selection_floor: float = 0.2  # share of uniform probability mixed in (bounds each importance weight by 1 / floor)
    freeze_pretrained: bool = True  # with model.pretrained: train the head only at first
    unfreeze_every: int = 0  # with frozen blocks: unfreeze the next one every this many epochs; 0 = only when the advisor asks
    layer_lr_decay: float = 0.3  # discriminative learning rates: a block k below the head trains at lr * layer_lr_decay**k
    l2sp: float = 0.0  # with model.pretrained: strength of the L2 pull toward the pretrained weights (L2-SP)
    gradient_free: bool = False  # the advisor may set the last layer's bias to explicit values, from a history of (values, val loss)

    def __post_init__(self) -> None:
        if isinstance(self.batch_selection, bool):
            self.batch_selection = "on" if self.batch_selection else "off"
        low, high = CURRICULUM_PACE_BOUNDS
        require(0 < self.curriculum_start <= 1, "modes.curriculum_start", self.curriculum_start, "must be in (0, 1]")
        require(low <= self.curriculum_pace <= high, "modes.curriculum_pace", self.curriculum_pace, f"must be in [{low:g}, {high:g}]")
        require(self.batch_selection in BATCH_SELECTION, "modes.batch_selection", self.batch_selection, f"must be one of {BATCH_SELECTION}")
        require(0 < self.selection_floor <= 1, "modes.selection_floor", self.selection_floor, "must be in (0, 1]")
        require(self.unfreeze_every >= 0, "modes.unfreeze_every", self.unfreeze_every, "must be >= 0")
        require(0 <= self.layer_lr_decay <= 1, "modes.layer_lr_decay", self.layer_lr_decay, "must be in [0, 1]")
        require(self.l2sp >= 0, "modes.l2sp", self.l2sp, "must be >= 0")


def small_data_batch(train: TrainConfig, train_size: int, world_size: int) -> TrainConfig:
    """`train` with `batch_size` lowered so one epoch of `train_size` samples on `world_size` workers has at
    least `min_steps_per_epoch` optimizer steps (never below 8 samples per worker, never raised).

    455 tabular rows on 2 workers at the default 64 make 4 steps an epoch, 120 in 30 epochs: too few for
    the MLP to fit (0.961 test accuracy over 5 seeds); at 28 per worker (8 steps) it reached 0.979."""
    if train.min_steps_per_epoch <= 0:
        return train
    fitting = train_size // (world_size * train.grad_accum_steps * train.min_steps_per_epoch)
    batch = min(train.batch_size, max(8, fitting))
    return train if batch == train.batch_size else dataclasses.replace(train, batch_size=batch)

