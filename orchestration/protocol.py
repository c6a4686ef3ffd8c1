"""The advice protocol: every message the workers, the coordinator and the advisor exchange.

One epoch boundary, in the order the messages flow:

1. rank 0 sends a `TrainingSnapshot` (curves, hyperparameters, per-layer `LayerStats`) to the
   coordinator, which may forward a trimmed copy, with its `Diagnosis` and track record
   (`ProposalOutcome`s), to the advisor;
2. the advisor answers an `AdvisorResponse`: a `Proposal` (a `HyperparameterChange` plus bounded
   `WeightOp`s) as its validator passed it, or why there is none;
3. the coordinator answers the workers with a `Decision`: `Continue(reason)` or `Apply(...)`;
4. after an `Apply`, the workers measure `ProbationMetrics` for the candidate and a reference
   branch, and the coordinator answers a `Verdict` (keep or roll back).

Everything here is a plain dataclass that round-trips through JSON or pickle, with no Ray,
torch or transformers import, so every package can read it. The bounds below are the single
source of truth for what a proposal may ask for; the validator, the constrained decoder, the
coordinator and the workers' blending all read them from here.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
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
RESTART_POINTS = ("best", "initial")  # what a restart restores: the best-validation weights or the run's initial ones
VERDICTS = ("accepted", "rejected", "invalid", "stale", "timeout", "cached")

# Research modes (`workers.modes`): what a proposal may change in how training runs, when the run enables it.
ACTIVATIONS = ("relu", "prelu", "rational")  # what an adaptive activation may be switched to
CURRICULUM_PACE_BOUNDS = (0.02, 1.0)  # fraction of the training set added to the curriculum's pool per epoch
MAX_UNFREEZE_BLOCKS = 4  # blocks one proposal may unfreeze (transfer learning)
NEURON_GROUP_MARK = "#"  # "features.0.weight#2": the rows of neuron group 2 of that layer (neuron-group coupling)
MAX_MODE_NAME_CHARS = 80  # a layer or block name longer than this, or not printable, is neither offered nor accepted


def split_neuron_group(name: str) -> tuple[str, int | None]:
    """("features.0.weight", 2) for "features.0.weight#2"; (name, None) for a whole parameter group."""
    base, mark, index = name.rpartition(NEURON_GROUP_MARK)
    return (base, int(index)) if mark and index.isdigit() else (name, None)


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
    action: str = ""  # the proposal's action family (`orchestration.menu.action_of`), for the track record


class Finding(StrEnum):
    """What `orchestration.diagnostics.diagnose` can find, deepest cause first (the order of the menu's remedies).

    The values are the words prompts, notes, ledgers and reports have always carried; a `StrEnum` formats and
    serialises as its value, so a finding written to JSON, CSV or a prompt reads as before."""

    COLLAPSED = "collapsed"  # at chance and not learning: only a restart helps (`orchestration.diagnostics.collapse`)
    DIVERGING = "diverging"
    TOO_FAST = "learning rate too high"
    OVERFITTING = "overfitting"
    DEAD_UNITS = "dead units"
    LEARNING_SLOWLY = "learning slowly"
    PLATEAU = "plateau"


@dataclass(kw_only=True, slots=True)
class Diagnosis:
    """What the numbers say (see `orchestration.diagnostics.diagnose`), as flags plus one line per finding.

    The coordinator computes it with the run's own thresholds and ships it inside the snapshot,
    so the prompt states exactly what made the coordinator ask.
    """

    plateau: bool = False
    collapsed: bool = False  # validation accuracy at chance and training not learning (what a learning rate far too high leaves)
    diverging: bool = False
    overfitting: bool = False
    underfitting: bool = False  # learning, but slowly: tiny updates and low accuracy (a learning rate far too low)
    too_fast: bool = False  # weights lurch: large updates with a stalled or worsening validation loss (a learning rate too high)
    lr_raise: float = 0.0  # when learning slowly: the lr factor that would bring the median step to the healthy band's middle
    dead_groups: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def findings(self) -> list[Finding]:
        """The findings present, deepest cause first."""
        present = {Finding.COLLAPSED: self.collapsed, Finding.DIVERGING: self.diverging, Finding.TOO_FAST: self.too_fast, Finding.OVERFITTING: self.overfitting,
                   Finding.DEAD_UNITS: bool(self.dead_groups), Finding.LEARNING_SLOWLY: self.underfitting, Finding.PLATEAU: self.plateau}
        return [finding for finding, flagged in present.items() if flagged]

    def has_findings(self) -> bool:
        """Whether anything calls for a remedy."""
        return bool(self.findings())


@dataclass(kw_only=True, slots=True)
class MenuOption:
    """One well-formed action the coordinator offers the advisor to choose (`orchestration.menu`)."""

    key: str  # what the advisor answers to choose it: "A", "B", ...
    action: str  # the action family: keep, lr_down, lr_up, regularise, reinit_dead, rescue
    label: str  # one line for the prompt: what it does, what it is for, its track record
    proposal: dict[str, Any] = field(default_factory=dict)  # `Proposal.to_dict()`; validated again when chosen
    remedy: Finding | Literal[""] = ""  # the finding it answers; empty for "keep" and for options no finding calls for
    prior: float = 1.0  # the coordinator's prior for choosing it: finding and track record (`orchestration.menu.action_prior`)

    def __post_init__(self) -> None:
        if isinstance(self.remedy, str) and self.remedy in Finding._value2member_map_:  # read back from JSON: a plain string
            self.remedy = Finding(self.remedy)


# --- the research modes, as a snapshot tells them ---------------------------------------------------


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _is_numbers(values: Any) -> bool:
    return isinstance(values, (list, tuple)) and all(_is_number(value) for value in values)


def usable_name(name: Any) -> bool:
    """Whether a layer or block name from a snapshot may be offered and accepted: a short printable string."""
    return isinstance(name, str) and 0 < len(name) <= MAX_MODE_NAME_CHARS and name.isprintable()


@dataclass(frozen=True, kw_only=True, slots=True)
class NeuronGroup:
    """One neuron group of a layer (neuron-group coupling, `workers.coupling.describe_groups`)."""

    size: int  # units in the group
    active: float  # mean fraction of the units' activations that are positive
    mean: float  # mean pre-activation

    @classmethod
    def from_dict(cls, data: Any) -> NeuronGroup | None:
        """The group, or None when the entry is malformed (a size that is no whole number >= 0, an activity that is no number)."""
        if not isinstance(data, Mapping):
            return None
        size, active, mean = data.get("size"), data.get("active"), data.get("mean", 0.0)
        if not (isinstance(size, int) and not isinstance(size, bool) and size >= 0 and _is_number(active) and _is_number(mean)):
            return None
        return cls(size=size, active=active, mean=mean)


@dataclass(frozen=True, kw_only=True, slots=True)
class FreeValues:
    """Gradient-free proposals: the parameter group the advisor may set to explicit values, and its history."""

    group: str
    current: tuple[float, ...] = ()
    history: tuple[tuple[float, tuple[float, ...]], ...] = ()  # (val loss, values) of the best epochs, best first

    def to_dict(self) -> dict[str, Any]:
        return {"group": self.group, "current": list(self.current), "history": [[loss, list(values)] for loss, values in self.history]}

    @classmethod
    def from_dict(cls, data: Any) -> FreeValues | None:
        """The entry, or None when the run offers nothing to set yet or the entry is malformed (a group name that is not
        usable, values that are not finite numbers, more of them than a proposal may set); history entries whose values
        are of another length are left out."""
        if not isinstance(data, Mapping) or not usable_name(data.get("group")):
            return None
        current = data.get("current")
        if not _is_numbers(current) or not 0 < len(current) <= MAX_EXPLICIT_VALUES:
            return None
        history = [(entry[0], tuple(entry[1])) for entry in data.get("history") or ()
                   if isinstance(entry, (list, tuple)) and len(entry) == 2 and _is_number(entry[0]) and _is_numbers(entry[1])
                   and len(entry[1]) == len(current)]
        return cls(group=data["group"], current=tuple(current), history=tuple(sorted(history, key=lambda entry: entry[0])))


@dataclass(frozen=True, kw_only=True, slots=True)
class ModesView:
    """The research modes a run enables and where they stand: the one reading of `TrainingSnapshot.modes`.

    The snapshot carries them as the plain dict `to_dict` writes (so its JSON, which prompts, caches, ledgers
    and the Serve endpoint see, is what it always was); every reader goes through `from_dict`, which leaves out
    what is malformed (names that are not short printable strings, numbers that are not finite), so untrusted
    snapshots are read in one place. A field at None (or empty) is a mode the run does not enable."""

    curriculum_pace: float | None = None  # curriculum learning: fraction of the training set added to the pool per epoch
    curriculum_pool: float | None = None  # ... and the fraction in this epoch's pool
    batch_selection: Literal["on", "off"] | None = None  # set only when the advisor may switch batch selection
    activations: dict[str, str] = field(default_factory=dict)  # adaptive activations {layer module: kind}, forward order
    frozen_blocks: tuple[str, ...] | None = None  # transfer learning: frozen blocks, forward order (an unfreeze thaws the last)
    trainable_blocks: tuple[str, ...] | None = None
    free_values: FreeValues | None = None  # gradient-free proposals
    neuron_groups: dict[str, tuple[NeuronGroup, ...]] = field(default_factory=dict)  # neuron-group coupling {layer module: groups}

    def to_dict(self) -> dict[str, Any]:
        """The wire form, `TrainingSnapshot.modes`: only the modes the run enables appear."""
        described: dict[str, Any] = {}
        if self.curriculum_pace is not None:
            described["curriculum_pace"] = self.curriculum_pace
            if self.curriculum_pool is not None:
                described["curriculum_pool"] = self.curriculum_pool
        if self.batch_selection is not None:
            described["batch_selection"] = self.batch_selection
        if self.activations:
            described["activations"] = dict(self.activations)
        if self.frozen_blocks is not None:
            described["frozen_blocks"] = list(self.frozen_blocks)
        if self.trainable_blocks is not None:
            described["trainable_blocks"] = list(self.trainable_blocks)
        if self.free_values is not None:
            described["free_values"] = self.free_values.to_dict()
        if self.neuron_groups:
            described["neuron_groups"] = {layer: [dataclasses.asdict(group) for group in groups] for layer, groups in self.neuron_groups.items()}
        return described

    @classmethod
    def from_dict(cls, data: Any) -> ModesView:
        """Read a snapshot's `modes`, leaving out what is malformed; anything but a mapping reads as no modes."""
        if not isinstance(data, Mapping):
            return cls()
        pace, pool, selection = data.get("curriculum_pace"), data.get("curriculum_pool"), data.get("batch_selection")
        activations = data.get("activations")

        def blocks(value: Any) -> tuple[str, ...] | None:
            return tuple(block for block in value if usable_name(block)) if isinstance(value, (list, tuple)) else None

        return cls(
            curriculum_pace=pace if _is_number(pace) else None,
            curriculum_pool=pool if _is_number(pool) else None,
            batch_selection=selection if selection in ("on", "off") else None,
            activations={name: kind for name, kind in activations.items() if usable_name(name) and isinstance(kind, str)}
            if isinstance(activations, Mapping) else {},
            frozen_blocks=blocks(data.get("frozen_blocks")),
            trainable_blocks=blocks(data.get("trainable_blocks")),
            free_values=FreeValues.from_dict(data.get("free_values")),
            neuron_groups=_neuron_groups(data.get("neuron_groups")),
        )


def _neuron_groups(data: Any) -> dict[str, tuple[NeuronGroup, ...]]:
    """{layer: groups} for each layer whose name is usable and whose groups are all well-formed (at least one)."""
    if not isinstance(data, Mapping):
        return {}
    layers = {}
    for layer, described in data.items():
        groups = tuple(NeuronGroup.from_dict(group) for group in described) if isinstance(described, (list, tuple)) else ()
        if usable_name(layer) and groups and None not in groups:
            layers[layer] = groups
    return layers


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
    num_classes: int = 0  # 0 = not known (then no collapse to chance can be read)
    train_loss: list[float] = field(default_factory=list)
    val_loss: list[float] = field(default_factory=list)
    train_accuracy: list[float] = field(default_factory=list)
    val_accuracy: list[float] = field(default_factory=list)
    hyperparameters: dict[str, float] = field(default_factory=dict)  # lr, weight_decay, dropout, momentum, batch_size
    # The learning-rate schedule's peak over the configured one (train.lr): what the accepted lr changes multiplied up
    # to (1 = as configured; the schedule's warm-up and decay do not count). `coordinator.max_lr_factor` caps it.
    lr_factor: float = 1.0
    layers: list[LayerStats] = field(default_factory=list)
    recent_proposals: list[ProposalOutcome] = field(default_factory=list)
    diagnosis: Diagnosis | None = None  # set by the coordinator on the copy it sends to the advisor
    menu: list[MenuOption] = field(default_factory=list)  # set by the coordinator: the advisor picks one (empty: it writes a proposal)
    # The research modes this run enables and where they stand, as `ModesView.to_dict` writes them (built by
    # `workers.modes.TrainingModes.view`); only enabled ones appear. Read them through `modes_view()`.
    modes: dict[str, Any] = field(default_factory=dict)

    def modes_view(self) -> ModesView:
        """The typed reading of `modes` (malformed entries left out): what every reader of the modes goes through."""
        return ModesView.from_dict(self.modes)

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
        if values.get("diagnosis") is not None:
            values["diagnosis"] = Diagnosis(**values["diagnosis"])
        values["menu"] = [MenuOption(**option) for option in values.get("menu", [])]
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
class TrainingChange:
    """Requested changes to how training runs (the research modes, `workers.modes`); `None` = leave it.

    Each is only valid when the run enables the mode, which the snapshot's `modes` says:
    `curriculum_pace` (curriculum learning), `batch_selection` (loss-prioritised batches, on or off),
    `activation_layer` + `activation` (switch one adaptive activation, one of `ACTIVATIONS`),
    `unfreeze` (transfer learning: unfreeze this many more frozen blocks, from the head down)."""

    curriculum_pace: float | None = None
    batch_selection: bool | None = None
    activation_layer: str | None = None
    activation: str | None = None
    unfreeze: int | None = None

    def is_empty(self) -> bool:
        return all(getattr(self, f.name) is None for f in dataclasses.fields(self))

    def summary_parts(self) -> list[str]:
        parts = [f"curriculum_pace={self.curriculum_pace:g}"] if self.curriculum_pace is not None else []
        if self.batch_selection is not None:
            parts.append(f"batch_selection={'on' if self.batch_selection else 'off'}")
        if self.activation_layer is not None:
            parts.append(f"activation({self.activation_layer},{self.activation})")
        if self.unfreeze is not None:
            parts.append(f"unfreeze={self.unfreeze}")
        return parts


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
    training: TrainingChange = field(default_factory=TrainingChange)
    # Restart the whole network from a known point (one of `RESTART_POINTS`; "" = no restart): its weights written back and
    # the optimizer's moments restarted, before any hyperparameter change and weight op. The collapsed run's remedy.
    restart: str = ""

    def is_noop(self) -> bool:
        return self.hyperparameters.is_empty() and not self.weights and self.training.is_empty() and not self.restart

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
            training=TrainingChange(**(data.get("training") or {})),
            restart=data.get("restart", ""),
        )

    def summary(self) -> str:
        """One line for prompts and ledgers, e.g. `lr_scale=0.5; shrink(fc1,0.1)`."""
        parts = [f"restart({self.restart})"] if self.restart else []
        parts += [
            f"{name}={getattr(self.hyperparameters, name):g}"
            for name in HYPERPARAMETER_BOUNDS
            if getattr(self.hyperparameters, name) is not None
        ]
        parts += [f"{op.op}({op.group},{op.amount:g})" for op in self.weights]
        parts += self.training.summary_parts()
        if self.alpha is not None:
            parts.append(f"alpha={self.alpha:g}")
        return "; ".join(parts) or "no-op"


# --- advisor -> coordinator (issue 22: moved here from serve_llm.validate, which builds them) ---

ResponseStatus = Literal["valid", "clamped", "rejected", "timeout", "error"]
RESPONSE_STATUSES = ("valid", "clamped", "rejected", "timeout", "error")
USABLE_STATUSES = ("valid", "clamped")  # the statuses whose proposal may be applied


@dataclass(kw_only=True, slots=True)
class AdvisorResponse:
    """One advisor answer as the coordinator sees it: the checked proposal (if any), what the
    validator did to get it, and the raw text it came from."""

    proposal: Proposal | None = None
    status: ResponseStatus = "rejected"
    problems: list[str] = field(default_factory=list)
    raw_text: str = ""
    latency_s: float = 0.0
    backend: str = ""
    model: str = ""
    choice: str = ""  # the menu option's key, when the advisor chose from a menu
    scores: dict[str, float] = field(default_factory=dict)  # menu key -> the chooser's probability, when it scores options

    @property
    def usable(self) -> bool:
        """True when `proposal` may be applied (after the coordinator's own gates)."""
        return self.status in USABLE_STATUSES and self.proposal is not None

    def to_dict(self) -> dict[str, Any]:
        return {
            "proposal": None if self.proposal is None else self.proposal.to_dict(),
            "status": self.status,
            "problems": list(self.problems),
            "raw_text": self.raw_text,
            "latency_s": self.latency_s,
            "backend": self.backend,
            "model": self.model,
            "choice": self.choice,
            "scores": dict(self.scores),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> AdvisorResponse:
        """Rebuild from `to_dict` output (trusted: `to_dict` produced it)."""
        proposal = data.get("proposal")
        status = data.get("status", "error")
        if status not in RESPONSE_STATUSES:
            raise ValueError(f"AdvisorResponse.status must be one of {RESPONSE_STATUSES}, got {status!r}")
        return cls(
            proposal=None if proposal is None else Proposal.from_dict(proposal),
            status=status,
            problems=list(data.get("problems", [])),
            raw_text=data.get("raw_text", ""),
            latency_s=float(data.get("latency_s", 0.0)),
            backend=data.get("backend", ""),
            model=data.get("model", ""),
            choice=data.get("choice", ""),
            scores={str(key): float(value) for key, value in data.get("scores", {}).items()},
        )

    @classmethod
    def failure(
        cls,
        status: Literal["rejected", "timeout", "error"],
        problem: str,
        *,
        raw_text: str = "",
        latency_s: float = 0.0,
        backend: str = "",
        model: str = "",
    ) -> AdvisorResponse:
        """A response carrying no proposal, with the one reason why."""
        return cls(
            proposal=None,
            status=status,
            problems=[problem],
            raw_text=raw_text,
            latency_s=latency_s,
            backend=backend,
            model=model,
        )


# --- coordinator -> workers -------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Continue:
    """Train on unchanged. `asked_now`: the coordinator asked the advisor at this epoch, so the
    workers take today's weights as the reference that weight drift is measured from."""

    reason: str = ""
    asked_now: bool = False


@dataclass(frozen=True, slots=True)
class Apply:
    """Blend `proposal` in now, with `alphas` per weight group, then report its probation."""

    query_id: str
    proposal: Proposal
    alphas: dict[str, float]  # parameter-group name -> blend factor, for each group a weight op names
    source: Literal["advisor", "cache"]
    epoch_asked: int  # epoch of the snapshot the proposal answers
    probation_steps: int  # optimizer steps to train before report_probation
    reward_mode: str  # "counterfactual": reference = untouched branch; "baseline": pre-apply metrics
    reset_optimizer_moments: bool  # zero optimizer moments of changed groups after applying
    seed: int  # seed for the random weight ops (`apply_weight_ops(..., seed=seed)`)

    @property
    def asked_now(self) -> bool:
        """A cache hit answers a query made at this very epoch."""
        return self.source == "cache"


Decision = Continue | Apply


# --- workers -> coordinator -------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ProbationMetrics:
    """Metrics measured at the end of a probation (or on the reference branch)."""

    val_loss: float
    val_accuracy: float | None = None  # in [0, 1]; None for tasks without accuracy
    train_loss: float | None = None
    # Per validation sample, in one fixed order (both branches alike): the noise of the comparison is
    # measured from their paired differences (`orchestration.acceptance`). Empty when not measured.
    sample_losses: tuple[float, ...] = ()
    sample_correct: tuple[int, ...] = ()


@dataclass(frozen=True, slots=True)
class Verdict:
    """Whether a proposal is kept, the reward that decided it, and why."""

    accepted: bool
    reward: float
    reason: str
