"""The menu the advisor chooses from: a few well-formed actions built from the diagnosis. Pure.

A small language model writes poor proposals from scratch (it cut the learning rate 10x in a run
that was underfitting, whatever the state), but it can read a finding and pick the remedy that
names it. So by default (`coordinator.advice_mode: choose`) the coordinator turns its diagnosis
into a short menu: always "keep", the textbook remedy for each finding, and, when there are few
findings, the two learning-rate moves so that there is a real choice. Each option carries its
action family's track record in this run (tried, kept), which the advisor reads in the prompt
and a scoring backend multiplies into its own probabilities (`action_prior`).

`action_of` names the family of any proposal (menu-made, free-form or cached), so the track record
covers every mode.

When the run enables research modes (`TrainingSnapshot.modes_view()`), their actions join the menu: switch
the activation after a layer with dead units to PReLU, unfreeze the next frozen block, widen the curriculum
faster, switch batch selection on or off. What the modes let a proposal's `TrainingChange` do is
`orchestration.fitting.fit`'s to say. Options name the finding they answer as a `Finding`, and
`finding_present` matches on it.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from orchestration.protocol import (
    CURRICULUM_PACE_BOUNDS,
    HYPERPARAMETER_BOUNDS,
    MAX_ABS_EXPLICIT_VALUE,
    NEURON_GROUP_MARK,
    Diagnosis,
    Finding,
    MenuOption,
    NeuronGroup,
    Proposal,
    ProposalOutcome,
    TrainingSnapshot,
    split_neuron_group,
)

ACTIONS = ("keep", "lr_down", "lr_up", "regularise", "reinit_dead", "rescue", "restart", "activation", "unfreeze", "curriculum", "selection", "free_values")
MENU_KEYS = "ABCDEF"
RESTART_LR_SCALE = 0.1  # a collapsed run restarts at a tenth of its rate (the most one answer may cut: HYPERPARAMETER_BOUNDS)
MAX_RESCUE_GROUPS = 4
_INDEXED_MODULE = re.compile(r"^(.*)\.(\d+)$")  # "features.0" -> ("features", 0)


# --- what the run's research modes offer (read through `TrainingSnapshot.modes_view`) ---------------


def free_value_candidates(current: Sequence[float], history: Sequence[tuple[float, Sequence[float]]]) -> list[tuple[str, list[float]]]:
    """Explicit values to offer for a gradient-free group, from its (val loss, values) history, best first:
    the best epoch's values (when they are not the current ones), and a step past the best, away from the
    mean of the others (the direction the history says is downhill). Each clamped to +-MAX_ABS_EXPLICIT_VALUE."""
    if not history:
        return []
    clamp = lambda values: [round(min(max(value, -MAX_ABS_EXPLICIT_VALUE), MAX_ABS_EXPLICIT_VALUE), 5) for value in values]  # noqa: E731
    best_loss, best = history[0]
    candidates = []
    if max(abs(a - b) for a, b in zip(best, current)) > 1e-6:
        candidates.append((f"the values of its best epoch (val loss {best_loss:.4g})", clamp(best)))
    others = [values for _, values in history[1:]]
    if others:
        mean = [sum(column) / len(others) for column in zip(*others)]
        candidates.append(("a step past its best values, away from its worse ones", clamp([b + 0.5 * (b - m) for b, m in zip(best, mean)])))
    return candidates


def neuron_group_keys(group: str, neuron_groups: Mapping[str, Sequence[Any]]) -> list[str]:
    """The alpha keys a weight op's group stands for: "features.0.weight" -> its neuron groups ("features.0.weight#0",
    ...) when the layer is grouped; a neuron group or an ungrouped layer's group stands for itself."""
    name, index = split_neuron_group(group)
    described = neuron_groups.get(name.rpartition(".")[0])
    if index is not None or not described:
        return [group]
    return [f"{name}{NEURON_GROUP_MARK}{position}" for position in range(len(described))]


def activation_after(group: str, activations: Mapping[str, str], parameter_order: Sequence[str] = ()) -> str | None:
    """The adaptive activation that takes the output of parameter group `group` ("features.0.weight"), or None.

    In a `Sequential` the activation after the layer at index i sits at i + 1 ("features.1"); past a batch
    norm, at the next larger index of the same parent ("stem.0" -> "stem.2"). A layer whose name ends in no
    index (a residual block's "blocks.0.conv2") takes the first activation of the same parent module whose
    parameters come after its own in `parameter_order` (the snapshot's groups, in registration order:
    "blocks.0.act2.prelu.weight" after "blocks.0.conv2.weight"). Nothing outside the layer's parent qualifies."""
    module = group.rpartition(".")[0]
    match = _INDEXED_MODULE.match(module)
    if match is not None:
        parent, index = match.group(1), int(match.group(2))
        following = []
        for name in activations:
            candidate = _INDEXED_MODULE.match(name)
            if candidate is not None and candidate.group(1) == parent and int(candidate.group(2)) > index:
                following.append((int(candidate.group(2)), name))
        return min(following)[1] if following else None
    parent = module.rpartition(".")[0]
    siblings = [name for name in activations if name.rpartition(".")[0] == parent]
    order = list(parameter_order)
    if not siblings or group not in order:
        return None
    for later in order[order.index(group) + 1:]:
        owner = next((name for name in siblings if later.startswith(name + ".")), None)
        if owner is not None:
            return owner
    return None


@dataclass(frozen=True, slots=True)
class TrackRecord:
    """How often proposals of one action family were tried and kept in this run."""

    tried: int = 0
    kept: int = 0

    @property
    def prior(self) -> float:
        """Posterior mean of the keep rate under a uniform Beta(1, 1) prior: (kept + 1) / (tried + 2)."""
        return (self.kept + 1) / (self.tried + 2)


def action_of(proposal: Proposal) -> str:
    """The action family of a proposal: what it mainly does (see `ACTIONS`; "other" otherwise). A change to how
    training runs outweighs any hyperparameter or weight change that comes with it."""
    if proposal.is_noop():
        return "keep"
    if proposal.restart:
        return "restart"
    training = proposal.training
    if proposal.weights and {op.op for op in proposal.weights} == {"values"} and proposal.hyperparameters.is_empty() and training.is_empty():
        return "free_values"
    if training.unfreeze is not None:
        return "unfreeze"
    if training.activation_layer is not None:
        return "activation"
    if training.curriculum_pace is not None:
        return "curriculum"
    if training.batch_selection is not None:
        return "selection"
    change = proposal.hyperparameters
    ops = {op.op for op in proposal.weights}
    if change.lr_scale is not None and change.lr_scale < 1 and "toward_best" in ops:
        return "rescue"
    if "reinit_dead" in ops and change.is_empty():
        return "reinit_dead"
    if change.weight_decay is not None or change.dropout is not None:
        return "regularise"
    if change.lr_scale is not None and change.lr_scale < 1:
        return "lr_down"
    if change.lr_scale is not None and change.lr_scale > 1:
        return "lr_up"
    return "other"


def track_records(outcomes: Sequence[ProposalOutcome]) -> dict[str, TrackRecord]:
    """Tried/kept counts per action family over judged outcomes (accepted or rejected)."""
    counts: dict[str, list[int]] = {}
    for outcome in outcomes:
        if outcome.action and outcome.verdict in ("accepted", "rejected"):
            tried_kept = counts.setdefault(outcome.action, [0, 0])
            tried_kept[0] += 1
            tried_kept[1] += outcome.verdict == "accepted"
    return {action: TrackRecord(tried=tried, kept=kept) for action, (tried, kept) in counts.items()}


UNCALLED_WEIGHT = 0.4  # prior weight of an option no finding calls for (and of "keep" when something is found)


def action_prior(option: MenuOption, records: dict[str, TrackRecord], *, findings: bool) -> float:
    """The coordinator's prior for choosing `option`, which a scoring advisor multiplies by its own
    probabilities: 1 for the remedy of a finding (and for "keep" when nothing is found),
    `UNCALLED_WEIGHT` otherwise; times the family's keep rate in this run relative to an untried
    family's (1 untried, 2/3 after one rejection, 1/2 after two). A small model whose scores are
    nearly flat then follows the diagnosis; a strong model's confident scores override it."""
    if option.action == "keep":
        return UNCALLED_WEIGHT if findings else 1.0
    weight = 1.0 if option.remedy else UNCALLED_WEIGHT
    return weight * records.get(option.action, TrackRecord()).prior / 0.5


def _proposal(reason: str, *, alpha: float | None = None, weights: list[dict] | None = None, training: dict | None = None,
              restart: str = "", **hyperparameters: float) -> dict:
    proposal = {"hyperparameters": hyperparameters, "weights": weights or [], "alpha": alpha, "reason": reason}
    if training:
        proposal["training"] = training
    if restart:
        proposal["restart"] = restart
    return proposal


# (action, what it does, the finding it answers or "", proposal)
_Candidate = tuple[str, str, Finding | str, dict]
AFTER_LR, FILLER = "after lr", "filler"  # where a mode's option goes when it answers no finding's cause directly


def _mode_options(snapshot: TrainingSnapshot, diagnosis: Diagnosis) -> dict[Finding | str, list[_Candidate]]:
    """The research modes' options for this state, by where they go on the menu: under a `Finding` (overfitting,
    dead units, learning slowly, plateau) before the textbook remedy of that finding (each answers the finding's
    cause in this run more directly), `AFTER_LR` after every learning-rate remedy, `FILLER` where lr moves would go."""
    modes = snapshot.modes_view()
    options: dict[Finding | str, list[_Candidate]] = {}
    # Stuck (learning slowly, or not at all) with a sane learning rate: a rate too high or diverging comes first.
    stuck = (None if diagnosis.diverging or diagnosis.too_fast else Finding.LEARNING_SLOWLY if diagnosis.underfitting
             else Finding.PLATEAU if diagnosis.plateau else None)
    if diagnosis.overfitting and modes.batch_selection == "on":
        options.setdefault(Finding.OVERFITTING, []).append(
            ("selection", "switch batch selection off (a focus on hard samples overfits)", Finding.OVERFITTING,
             _proposal("overfitting: batch selection off", training={"batch_selection": False})))
    activations = modes.activations
    if diagnosis.dead_groups and activations:
        order = [layer.name for layer in snapshot.layers]
        layers = [activation_after(group, activations, order) for group in diagnosis.dead_groups]
        layer = next((layer for layer in layers if layer is not None and activations[layer] != "prelu"), None)
        if layer is not None:
            # A PReLU passes gradient for negative inputs: it revives dead units without re-drawing any weight.
            options.setdefault(Finding.DEAD_UNITS, []).append(
                ("activation", f"switch {layer} to prelu (passes gradient to dead units)", Finding.DEAD_UNITS,
                 _proposal(f"dead units: {layer} to prelu", training={"activation_layer": layer, "activation": "prelu"})))
    frozen = modes.frozen_blocks
    if stuck and frozen:
        # A frozen backbone keeps most update ratios at 0 (read as learning slowly) and caps what the net can fit.
        options.setdefault(stuck, []).append(
            ("unfreeze", f"unfreeze the next block ({frozen[-1]})", stuck, _proposal(f"{stuck}: unfreeze {frozen[-1]}", training={"unfreeze": 1})))
    pool, pace = modes.curriculum_pool, modes.curriculum_pace
    if stuck and pool is not None and pool < 1 and pace is not None:
        faster = min(CURRICULUM_PACE_BOUNDS[1], max(CURRICULUM_PACE_BOUNDS[0], 2 * pace))
        if faster != pace:
            # Stuck on the easy part of the data: a plateau while the pool is partial is the curriculum's to lift.
            options.setdefault(Finding.PLATEAU if stuck == Finding.PLATEAU else AFTER_LR, []).append(
                ("curriculum", f"widen the curriculum faster (pace x2, to {faster:.2g}; {pool:.0%} of the data in use)", stuck,
                 _proposal(f"{stuck}: curriculum pace x2", training={"curriculum_pace": faster})))
    if stuck and modes.batch_selection == "off":
        options.setdefault(AFTER_LR, []).append(
            ("selection", "switch batch selection on (train on the samples the model gets wrong)", stuck,
             _proposal(f"{stuck}: batch selection on", training={"batch_selection": True})))
    free = modes.free_values
    if free is not None and not (diagnosis.diverging or diagnosis.too_fast):
        # Gradient-free: explicit values for a small group, from its (values, val loss) history; the probation
        # compares them with the gradient step they compete with. A remedy when stuck, otherwise a filler.
        for does, values in free_value_candidates(free.current, free.history):
            options.setdefault(stuck or FILLER, []).append(
                ("free_values", f"set {free.group} to {does}", stuck or "",
                 _proposal(f"{stuck or 'gradient-free'}: {free.group} to {does}", alpha=1.0,
                           weights=[{"op": "values", "group": free.group, "amount": 0.0, "values": values}])))
    if diagnosis.plateau and activations:
        layer = next((name for name, kind in activations.items() if kind != "rational"), None)
        if layer is not None:
            options.setdefault(FILLER, []).append(
                ("activation", f"switch {layer} to rational (a learnable activation)", "",
                 _proposal(f"{layer} to rational", training={"activation_layer": layer, "activation": "rational"})))
    return options


def _restart(snapshot: TrainingSnapshot) -> _Candidate:
    """A collapsed net (at chance, not learning) is past what a cut or a pull toward its best can fix: start again from
    weights that were fine (the best ones if it ever learned, else the initial ones), moments restarted, at a 10x lower rate."""
    point = "best" if learned_once(snapshot) else "initial"
    return ("restart", f"restart from the {point} weights, optimizer moments reset, learning rate cut {1 / RESTART_LR_SCALE:g}x",
            Finding.COLLAPSED, _proposal(f"collapsed: restart from the {point} weights at lr / {1 / RESTART_LR_SCALE:g}",
                                         lr_scale=RESTART_LR_SCALE, restart=point))


def learned_once(snapshot: TrainingSnapshot) -> bool:
    """Whether the run's best validation accuracy (in the snapshot's window) got at least halfway from chance to perfect:
    then its best weights are a sound restart point. Weights from the first epochs of a run with a learning rate far too
    high are already damaged (dead units) though above chance (0.23 on digits at lr 0.3); those restart from the initial weights."""
    if snapshot.num_classes < 2 or not snapshot.val_accuracy:
        return False
    chance = 1.0 / snapshot.num_classes
    return max(snapshot.val_accuracy) >= chance + 0.5 * (1 - chance)


def build_menu(snapshot: TrainingSnapshot, diagnosis: Diagnosis, outcomes: Sequence[ProposalOutcome] = ()) -> list[MenuOption]:
    """The options for this state, "keep" first, at most `len(MENU_KEYS)`; each names the finding it answers.

    Remedies come in the order of the cause they address, the deepest first: divergence, a learning rate
    too high, overfitting, dead units, slow learning, plateau (a net with dead units also plateaus and learns
    slowly, and curing the plateau would not revive them; units a learning rate too high killed die again).
    The research modes' options (`_mode_options`) go before the textbook remedy of the finding they answer;
    when there are more options than keys, the textbook remedies stay and the modes' options go first, then
    fillers (`_fit_to_keys`)."""
    decay = float(snapshot.hyperparameters.get("weight_decay", 0.0) or 0.0)
    dropout = float(snapshot.hyperparameters.get("dropout", 0.0) or 0.0)
    mode_options = _mode_options(snapshot, diagnosis)
    candidates: list[_Candidate] = [("keep", "keep everything as it is", "", _proposal("keep: nothing needs fixing"))]
    textbook: list[_Candidate] = []  # the remedies a run without modes gets: never crowded out by a mode's option

    def add_remedy(candidate: _Candidate) -> None:
        textbook.append(candidate)
        candidates.append(candidate)

    if diagnosis.collapsed:
        add_remedy(_restart(snapshot))
    if diagnosis.diverging:
        by_update = sorted(snapshot.layers, key=lambda layer: layer.update_ratio, reverse=True)[:MAX_RESCUE_GROUPS]
        add_remedy(("rescue", "cut the learning rate 3x and pull weights back toward the best checkpoint", Finding.DIVERGING,
                    _proposal("diverging: cut lr 3x, weights toward best", alpha=1.0, lr_scale=0.3,
                              weights=[{"op": "toward_best", "group": layer.name, "amount": 0.5} for layer in by_update])))
    if diagnosis.too_fast and not diagnosis.diverging:
        add_remedy(("lr_down", "cut the learning rate 3x", Finding.TOO_FAST, _proposal("learning rate too high: cut lr 3x", lr_scale=0.3)))
    candidates += mode_options.get(Finding.OVERFITTING, [])
    if diagnosis.overfitting:
        new_decay = min(HYPERPARAMETER_BOUNDS["weight_decay"][1], max(3 * decay, 5e-4))
        new_dropout = min(HYPERPARAMETER_BOUNDS["dropout"][1], dropout + 0.1)
        add_remedy(("regularise", f"raise weight decay to {new_decay:.2g} and dropout to {new_dropout:.2g}", Finding.OVERFITTING,
                    _proposal("overfitting: more weight decay and dropout", weight_decay=new_decay, dropout=new_dropout)))
    candidates += mode_options.get(Finding.DEAD_UNITS, [])
    if diagnosis.dead_groups:
        groups = diagnosis.dead_groups[:MAX_RESCUE_GROUPS]
        # A unit is its weight row and its bias: a dead unit re-drawn with its old, very negative bias stays dead.
        known = {layer.name for layer in snapshot.layers}
        targets = list(dict.fromkeys(name for group in groups for name in (group, group.removesuffix(".weight") + ".bias") if name in known))
        targets = _dead_neuron_groups(targets, snapshot.modes_view().neuron_groups)
        add_remedy(("reinit_dead", f"re-draw half the dead units of {', '.join(groups)}", Finding.DEAD_UNITS,
                    _proposal("dead units: re-draw half", alpha=1.0,
                              weights=[{"op": "reinit_dead", "group": name, "amount": 0.5} for name in targets[:8]])))
    candidates += mode_options.get(Finding.LEARNING_SLOWLY, [])
    if diagnosis.underfitting:
        raise_by = diagnosis.lr_raise or 3.0
        add_remedy(("lr_up", f"raise the learning rate {raise_by:g}x", Finding.LEARNING_SLOWLY,
                    _proposal(f"learning slowly: raise lr {raise_by:g}x", lr_scale=raise_by)))
    candidates += mode_options.get(Finding.PLATEAU, [])
    if (diagnosis.diverging or diagnosis.plateau) and not diagnosis.too_fast:
        why = Finding.DIVERGING if diagnosis.diverging else Finding.PLATEAU
        add_remedy(("lr_down", "halve the learning rate", why, _proposal(f"{why}: halve lr", lr_scale=0.5)))
    candidates += mode_options.get(AFTER_LR, [])
    candidates += mode_options.get(FILLER, [])
    # Few findings: offer both learning-rate moves anyway, so that choosing is a real decision.
    offered = {candidate[0] for candidate in candidates}
    if len(candidates) < 3:
        if "lr_down" not in offered:
            candidates.append(("lr_down", "halve the learning rate", "", _proposal("halve lr", lr_scale=0.5)))
        if "lr_up" not in offered:
            candidates.append(("lr_up", "double the learning rate", "", _proposal("double lr", lr_scale=2.0)))
    candidates = _fit_to_keys(candidates, textbook)
    records = track_records(outcomes)
    findings = any(remedy for _, _, remedy, _ in candidates)
    menu = []
    for key, (action, does, remedy_of, proposal) in zip(MENU_KEYS, candidates):
        if action == "keep":
            label = f"{does}; right when there is no problem"
        else:
            label = f"{does}; for: {remedy_of}" if remedy_of else f"{does}; no finding calls for it"
        record = records.get(action)
        if record is not None and action != "keep":
            label += f" (tried {record.tried}x in this run, kept {record.kept}x)"
        option = MenuOption(key=key, action=action, label=label, proposal=proposal, remedy=remedy_of)
        option.prior = action_prior(option, records, findings=findings)
        menu.append(option)
    return menu


DEAD_GROUP_ACTIVITY = 0.05  # a neuron group whose units are positive this rarely on average is a dead cluster


def _dead_neuron_groups(targets: list[str], neuron_groups: Mapping[str, Sequence[NeuronGroup]]) -> list[str]:
    """Neuron-group coupling: each grouped layer among `targets` narrowed to its dead clusters (groups active at most
    `DEAD_GROUP_ACTIVITY`), so re-drawing them, and the verdict's change of alpha, touch those groups only."""
    narrowed = []
    for target in targets:
        described = neuron_groups.get(target.rpartition(".")[0], ())
        dead = [index for index, group in enumerate(described) if group.active <= DEAD_GROUP_ACTIVITY]
        narrowed += [f"{target}{NEURON_GROUP_MARK}{index}" for index in dead] or [target]
    return narrowed


def _fit_to_keys(candidates: list[_Candidate], textbook: list[_Candidate]) -> list[_Candidate]:
    """At most `len(MENU_KEYS)` candidates in their menu order. Which stay: "keep", the textbook remedies, the
    other remedies (the modes'), then fillers, each in menu order."""
    if len(candidates) <= len(MENU_KEYS):
        return candidates

    textbook_ids = {id(candidate) for candidate in textbook}

    def rank(position: int) -> tuple[int, int]:
        action, _, remedy, _ = candidate = candidates[position]
        tier = 0 if action == "keep" else 1 if id(candidate) in textbook_ids else 2 if remedy else 3
        return tier, position

    kept = sorted(sorted(range(len(candidates)), key=rank)[: len(MENU_KEYS)])
    return [candidates[position] for position in kept]


def finding_present(diagnosis: Diagnosis, remedy: Finding | str) -> bool:
    """Whether the finding an option answered (`MenuOption.remedy`) is still in `diagnosis`; True for an option
    that answers none."""
    try:
        finding = Finding(remedy)  # a remedy read back from JSON is the finding's plain words
    except ValueError:
        return True
    return finding in diagnosis.findings()


def remedies(snapshot: TrainingSnapshot, diagnosis: Diagnosis) -> list[MenuOption]:
    """The menu's options that answer a finding, deepest cause first; empty when nothing calls for one.
    What the heuristic advisor proposes and what the prompt hints at, in invent mode as in choose mode."""
    return [option for option in build_menu(snapshot, diagnosis) if option.remedy]
