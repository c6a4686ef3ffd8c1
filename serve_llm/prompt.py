"""Render a `TrainingSnapshot` into a short chat prompt from a versioned template file.

Templates live in `serve_llm/prompts/<name>.txt` (package data), with a `### system` and a
`### user` section and `$name` placeholders (`string.Template`, so JSON braces need no escaping).
The prompt is kept to a few hundred tokens: the default model has 135M parameters and prefill
on 2 CPU cores costs about as much as generation.
"""

from __future__ import annotations

import functools
import math
import string
from dataclasses import dataclass
from importlib import resources

from orchestration.diagnostics import diagnose
from orchestration.menu import remedies
from orchestration.protocol import (
    ACTIVATIONS,
    ALPHA_BOUNDS,
    CURRICULUM_PACE_BOUNDS,
    HYPERPARAMETER_BOUNDS,
    MAX_UNFREEZE_BLOCKS,
    WEIGHT_OP_AMOUNT_BOUNDS,
    ModesView,
    NeuronGroup,
    Proposal,
    TrainingSnapshot,
)
from serve_llm.decoding import GENERATION_MAX_OPS, generation_groups

MAX_LAYERS_SHOWN = 12  # groups beyond this are summarised by count
MAX_ACTIVATIONS_SHOWN = 6  # adaptive activations beyond this are summarised by count
MAX_FREE_VALUES_SHOWN = 16  # numbers of a gradient-free group shown per entry
_HISTORY_NAMES = (
    ("train_loss", "train loss"),
    ("val_loss", "val loss"),
    ("val_accuracy", "val acc"),
)


@dataclass(kw_only=True, slots=True)
class Prompt:
    """A rendered prompt: the chat messages and the template version that produced them."""

    system: str
    user: str
    template: str

    def messages(self) -> list[dict[str, str]]:
        return [{"role": "system", "content": self.system}, {"role": "user", "content": self.user}]


@functools.cache
def load_template(name: str) -> tuple[string.Template, string.Template]:
    """Read `prompts/<name>.txt` and split it into (system, user) templates."""
    path = resources.files("serve_llm") / "prompts" / f"{name}.txt"
    if not path.is_file():
        raise ValueError(f"prompt template {name!r} not found in serve_llm/prompts")
    text = path.read_text(encoding="utf-8")
    head, separator, user = text.partition("### user\n")
    if not separator or not head.startswith("### system\n"):
        raise ValueError(f"prompt template {name!r} must hold a '### system' then a '### user' section")
    return string.Template(head.removeprefix("### system\n").strip()), string.Template(user.strip())


def _number(value: float) -> str:
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return "?"
    if not math.isfinite(value):
        return str(value)
    return f"{value:.3g}"


def _short(value: float) -> str:
    """Two significant digits: per-layer stats only need an order of magnitude."""
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
        return "?"
    return f"{value:.2g}"


def _bounds(bounds: tuple[float, float]) -> str:
    return f"{bounds[0]:g}-{bounds[1]:g}"


def _one_line(text: str, limit: int) -> str:
    """Untrusted text (run ids, group names, past reasons) on one line, cut to `limit`."""
    return " ".join("".join(ch if ch.isprintable() else " " for ch in str(text)).split())[:limit]


def _histories(snapshot: TrainingSnapshot) -> str:
    lines = []
    for attribute, label in _HISTORY_NAMES:
        values = getattr(snapshot, attribute)  # the coordinator trimmed them to coordinator.history_window
        if values:
            lines.append(f"{label}: {' '.join(_number(value) for value in values)}")
    return "\n".join(lines) or "no history yet"


def _hyperparameters(snapshot: TrainingSnapshot) -> str:
    items = [f"{_one_line(name, 24)}={_number(value)}" for name, value in snapshot.hyperparameters.items()]
    return " ".join(items) or "unknown"


def _mode_settings(modes: ModesView) -> str:
    """Where the run's research modes stand, on one line: "" when it enables none."""
    parts = []
    if modes.curriculum_pace is not None:
        in_use = f", {modes.curriculum_pool:.0%} of the data in use" if modes.curriculum_pool is not None else ""
        parts.append(f"curriculum pace {_number(modes.curriculum_pace)} per epoch{in_use}")
    if modes.batch_selection is not None:
        parts.append(f"batch selection {modes.batch_selection}")
    activations = modes.activations
    if activations:
        shown = [f"{_one_line(name, 60)}={_one_line(kind, 12)}" for name, kind in list(activations.items())[:MAX_ACTIVATIONS_SHOWN]]
        if len(activations) > len(shown):
            shown.append(f"+{len(activations) - len(shown)} more")
        parts.append(f"activations {' '.join(shown)}")
    if modes.frozen_blocks is not None:
        frozen, trainable = modes.frozen_blocks, modes.trainable_blocks
        blocks = f"{len(frozen)} blocks frozen" + (f" (next to unfreeze: {_one_line(frozen[-1], 60)})" if frozen else "")
        parts.append(blocks + (f", {len(trainable)} trainable" if trainable is not None else ""))
    if modes.neuron_groups:
        shown = [f"{_one_line(layer, 40)} [{' '.join(_neuron_group(group) for group in groups[:8])}]" for layer, groups in list(modes.neuron_groups.items())[:4]]
        parts.append(f"neuron groups (units/fraction active; name one as LAYER.weight#N) {'; '.join(shown)}")
    free = modes.free_values
    if free is not None:
        shown = "; ".join(f"{_number(loss)}: [{' '.join(_number(value) for value in values[:MAX_FREE_VALUES_SHOWN])}]" for loss, values in free.history[:3])
        parts.append(f"gradient-free {_one_line(free.group, 60)} now [{' '.join(_number(value) for value in free.current[:MAX_FREE_VALUES_SHOWN])}]"
                     + (f", best epochs (val loss: values) {shown}" if shown else ""))
    return "\nModes: " + "; ".join(parts) if parts else ""


def _neuron_group(group: NeuronGroup) -> str:
    return f"{_number(group.size)}/{_number(group.active)}"


def _training_options(modes: ModesView) -> str:
    """The "training" object's fields the run enables, for the answer format: "" when it enables none."""
    fields = []
    if modes.curriculum_pace is not None:
        fields.append(f"curriculum_pace {_bounds(CURRICULUM_PACE_BOUNDS)} (data added per epoch)")
    if modes.batch_selection is not None:
        fields.append("batch_selection true or false")
    if modes.activations:
        fields.append(f"activation_layer (a layer under Modes) with activation {' or '.join(ACTIVATIONS)}")
    if modes.frozen_blocks:
        fields.append(f"unfreeze 1-{min(MAX_UNFREEZE_BLOCKS, len(modes.frozen_blocks))} (blocks, from the head down)")
    return f" Optional \"training\": {{{', '.join(fields)}}}, null keeps it." if fields else ""


def _layers(snapshot: TrainingSnapshot) -> str:
    shown = snapshot.layers[:MAX_LAYERS_SHOWN]
    items = [
        f"{_one_line(layer.name, 60)} {_short(layer.grad_norm)} {_short(layer.dead_fraction)}" for layer in shown
    ]
    if len(snapshot.layers) > len(shown):
        items.append(f"+{len(snapshot.layers) - len(shown)} more")
    return "; ".join(items) or "none reported"


def _recent(snapshot: TrainingSnapshot) -> str:
    items = []
    for outcome in snapshot.recent_proposals:  # at most coordinator.max_recent_proposals
        reward = "" if outcome.reward is None else f", reward {outcome.reward:+.3g}"
        items.append(f"epoch {_one_line(outcome.epoch, 12)}: {_one_line(outcome.summary, 80)} -> {_one_line(outcome.verdict, 12)}{reward}")
    return "; ".join(items) or "none"


def _ranked(snapshot: TrainingSnapshot) -> str:
    """Past judged proposals sorted by reward, best first (as optimisation by prompting does)."""
    judged = [outcome for outcome in snapshot.recent_proposals if outcome.reward is not None]
    judged.sort(key=lambda outcome: outcome.reward, reverse=True)
    items = [f"{_one_line(outcome.summary, 60)} -> {_one_line(outcome.verdict, 12)}, reward {outcome.reward:+.3g}" for outcome in judged]
    return "; ".join(items) or "none yet"


def _menu(snapshot: TrainingSnapshot) -> str:
    return "\n".join(f"{_one_line(option.key, 1)}. {_one_line(option.label, 160)}" for option in snapshot.menu)


def _hints(snapshot: TrainingSnapshot, diagnosis) -> str:
    """The menu's remedy for each finding, in the schema's words (`lr_scale=0.3; toward_best(fc1,0.5)`)."""
    first = {option.remedy: option for option in reversed(remedies(snapshot, diagnosis))}  # the deepest remedy of each finding
    hints = [f"for {remedy}: {Proposal.from_dict(option.proposal).summary()}" for remedy, option in reversed(first.items())]
    return "; ".join(_one_line(hint, 160) for hint in hints) or "keep everything: null values and no weight ops"


def render_prompt(snapshot: TrainingSnapshot, template: str = "advisor_v1") -> Prompt:
    """The chat prompt for one snapshot, from template file `template`."""
    system, user = load_template(template)
    signals = snapshot.diagnosis or diagnose(snapshot)  # the coordinator's own reading when it sent one
    groups = generation_groups([layer.name for layer in snapshot.layers])
    modes = snapshot.modes_view()
    values = {
        "model_kind": _one_line(snapshot.model_kind, 24),
        "epoch": _one_line(snapshot.epoch, 12),
        "total_epochs": _one_line(snapshot.total_epochs or "?", 12),
        "histories": _histories(snapshot),
        "hyperparameters": _hyperparameters(snapshot),
        "modes": _mode_settings(modes),  # empty, and the line absent, when the run enables no research mode
        "training_options": _training_options(modes),
        "layers": _layers(snapshot),
        # Findings and hints quote group names (a dead or runaway layer): untrusted text like any other.
        "findings": "; ".join(_one_line(note, 200) for note in signals.notes),
        "hints": _hints(snapshot, signals),
        "recent": _recent(snapshot),
        "ranked": _ranked(snapshot),
        "menu": _menu(snapshot) or "none",
        "max_ops": GENERATION_MAX_OPS,
        "small_amount_bounds": _bounds(WEIGHT_OP_AMOUNT_BOUNDS["shrink"]),
        "unit_amount_bounds": _bounds(WEIGHT_OP_AMOUNT_BOUNDS["toward_best"]),
        "alpha_bounds": _bounds(ALPHA_BOUNDS),
        "groups": ", ".join(groups) or "none (no weight ops possible)",
    }
    values.update({f"{name}_bounds": _bounds(bounds) for name, bounds in HYPERPARAMETER_BOUNDS.items()})
    return Prompt(system=system.substitute(values), user=user.substitute(values), template=template)
