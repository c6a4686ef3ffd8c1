"""The advisor's contract: what it reads (`TrainingSnapshot`) and what it may answer (`Proposal`).

Both sides are plain dataclasses that round-trip through JSON. The bounds below are the
single source of truth for what a proposal may ask for; the validator, the constrained
decoder and the coordinator all read them from here.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal

SCHEMA_VERSION = 1

# Bounds on hyperparameter changes: (low, high), inclusive.
HYPERPARAMETER_BOUNDS: dict[str, tuple[float, float]] = {
    "lr_scale": (0.1, 10.0),  # multiplies the current learning rate
    "weight_decay": (0.0, 0.1),  # absolute value
    "dropout": (0.0, 0.8),  # absolute probability
    "momentum": (0.0, 0.999),  # SGD momentum / Adam beta1
}

WEIGHT_OPS = ("shrink", "noise", "toward_best", "toward_ema", "reinit_dead", "values")
WeightOpName = Literal["shrink", "noise", "toward_best", "toward_ema", "reinit_dead", "values"]

# Bounds on each weight operation's `amount`, (low, high), inclusive:
#   shrink: W * (1 - amount);  noise: W + amount * std(W) * N(0, 1);
#   toward_best / toward_ema: W + amount * (W_ref - W);  reinit_dead: fraction of dead units re-drawn;
#   values: amount unused (0), explicit numbers in `values`.
WEIGHT_OP_AMOUNT_BOUNDS: dict[str, tuple[float, float]] = {
    "shrink": (0.0, 0.5),
    "noise": (0.0, 0.5),
    "toward_best": (0.0, 1.0),
    "toward_ema": (0.0, 1.0),
    "reinit_dead": (0.0, 1.0),
    "values": (0.0, 0.0),
}
MAX_EXPLICIT_VALUES = 64  # a `values` op may only target a group of at most this many numbers
MAX_ABS_EXPLICIT_VALUE = 10.0
MAX_WEIGHT_OPS = 8
ALPHA_BOUNDS = (0.0, 1.0)
MAX_REASON_CHARS = 280
VERDICTS = ("accepted", "rejected", "invalid", "stale", "timeout", "cached")


@dataclass(kw_only=True, slots=True)
class LayerStats:
    """Statistics of one parameter group (a layer's weight or bias tensor) at an epoch end."""

    name: str
    num_params: int = 0
    weight_norm: float = 0.0
    grad_norm: float = 0.0
    update_ratio: float = 0.0  # ||W_now - W_last_epoch|| / ||W_last_epoch||
    dead_fraction: float = 0.0  # fraction of output units never active on a probe batch


@dataclass(kw_only=True, slots=True)
class ProposalOutcome:
    """A past proposal and what became of it, fed back so the advisor sees its track record."""

    epoch: int
    summary: str
    verdict: str
    reward: float | None = None


@dataclass(kw_only=True, slots=True)
class TrainingSnapshot:
    """A compact, JSON-able summary of a run's state at an epoch boundary.

    Histories are oldest first and hold the most recent epochs only (the coordinator trims them).
    """

    run_id: str = "run"
    epoch: int = 0
    step: int = 0
    total_epochs: int = 0
    model_kind: str = "cnn2d"
    train_loss: list[float] = field(default_factory=list)
    val_loss: list[float] = field(default_factory=list)
    train_accuracy: list[float] = field(default_factory=list)
    val_accuracy: list[float] = field(default_factory=list)
    hyperparameters: dict[str, float] = field(default_factory=dict)  # lr, weight_decay, dropout, momentum, batch_size
    layers: list[LayerStats] = field(default_factory=list)
    recent_proposals: list[ProposalOutcome] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainingSnapshot:
        """Build from a possibly partial dict: missing fields take defaults, unknown ones raise."""
        if not isinstance(data, dict):
            raise TypeError(f"snapshot must be a JSON object, got {type(data).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"snapshot has unknown fields {unknown}; known fields are {sorted(known)}")
        values = dict(data)
        values["layers"] = [LayerStats(**layer) for layer in values.get("layers", [])]
        values["recent_proposals"] = [ProposalOutcome(**p) for p in values.get("recent_proposals", [])]
        return cls(**values)


@dataclass(kw_only=True, slots=True)
class HyperparameterChange:
    """Requested hyperparameter changes; `None` means leave it as it is."""

    lr_scale: float | None = None
    weight_decay: float | None = None
    dropout: float | None = None
    momentum: float | None = None

    def is_empty(self) -> bool:
        return all(getattr(self, name) is None for name in HYPERPARAMETER_BOUNDS)


@dataclass(kw_only=True, slots=True)
class WeightOp:
    """One bounded operation on a named parameter group (see `WEIGHT_OP_AMOUNT_BOUNDS`)."""

    op: WeightOpName
    group: str
    amount: float = 0.0
    values: list[float] | None = None


@dataclass(kw_only=True, slots=True)
class Proposal:
    """A validated advisor answer. Build one through the validator, not by hand, outside tests."""

    hyperparameters: HyperparameterChange = field(default_factory=HyperparameterChange)
    weights: list[WeightOp] = field(default_factory=list)
    alpha: float | None = None
    reason: str = ""

    def is_noop(self) -> bool:
        return self.hyperparameters.is_empty() and not self.weights

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Proposal:
        """Rebuild from `to_dict` output (trusted input, e.g. the coordinator's cache or ledger)."""
        return cls(
            hyperparameters=HyperparameterChange(**data.get("hyperparameters", {})),
            weights=[WeightOp(**op) for op in data.get("weights", [])],
            alpha=data.get("alpha"),
            reason=data.get("reason", ""),
        )

    def summary(self) -> str:
        """One line for prompts and ledgers, e.g. `lr_scale=0.5; shrink(fc1,0.1)`."""
        parts = [
            f"{name}={getattr(self.hyperparameters, name):g}"
            for name in HYPERPARAMETER_BOUNDS
            if getattr(self.hyperparameters, name) is not None
        ]
        parts += [f"{op.op}({op.group},{op.amount:g})" for op in self.weights]
        if self.alpha is not None:
            parts.append(f"alpha={self.alpha:g}")
        return "; ".join(parts) or "no-op"
