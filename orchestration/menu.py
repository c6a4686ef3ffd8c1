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
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from orchestration.protocol import (
    HYPERPARAMETER_BOUNDS,
    Diagnosis,
    MenuOption,
    Proposal,
    ProposalOutcome,
    TrainingSnapshot,
)

ACTIONS = ("keep", "lr_down", "lr_up", "regularise", "reinit_dead", "rescue")
MENU_KEYS = "ABCDEF"
MAX_RESCUE_GROUPS = 4


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
    """The action family of a proposal: what it mainly does (see `ACTIONS`; "other" otherwise)."""
    if proposal.is_noop():
        return "keep"
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


def _proposal(reason: str, *, alpha: float | None = None, weights: list[dict] | None = None, **hyperparameters: float) -> dict:
    return {"hyperparameters": hyperparameters, "weights": weights or [], "alpha": alpha, "reason": reason}


def build_menu(snapshot: TrainingSnapshot, diagnosis: Diagnosis, outcomes: Sequence[ProposalOutcome] = ()) -> list[MenuOption]:
    """The options for this state, "keep" first, at most `len(MENU_KEYS)`; each names the finding it answers.

    Remedies come in the order of the cause they address, the deepest first: divergence, a learning rate
    too high, overfitting, dead units, slow learning, plateau (a net with dead units also plateaus and learns
    slowly, and curing the plateau would not revive them; units a learning rate too high killed die again)."""
    decay = float(snapshot.hyperparameters.get("weight_decay", 0.0) or 0.0)
    dropout = float(snapshot.hyperparameters.get("dropout", 0.0) or 0.0)
    # (action, what it does, the finding it answers or "", proposal)
    candidates: list[tuple[str, str, str, dict]] = [("keep", "keep everything as it is", "", _proposal("keep: nothing needs fixing"))]
    if diagnosis.diverging:
        by_update = sorted(snapshot.layers, key=lambda layer: layer.update_ratio, reverse=True)[:MAX_RESCUE_GROUPS]
        candidates.append(("rescue", "cut the learning rate 3x and pull weights back toward the best checkpoint", "diverging",
                           _proposal("diverging: cut lr 3x, weights toward best", alpha=1.0, lr_scale=0.3,
                                     weights=[{"op": "toward_best", "group": layer.name, "amount": 0.5} for layer in by_update])))
    if diagnosis.too_fast and not diagnosis.diverging:
        candidates.append(("lr_down", "cut the learning rate 3x", "learning rate too high", _proposal("learning rate too high: cut lr 3x", lr_scale=0.3)))
    if diagnosis.overfitting:
        new_decay = min(HYPERPARAMETER_BOUNDS["weight_decay"][1], max(3 * decay, 5e-4))
        new_dropout = min(HYPERPARAMETER_BOUNDS["dropout"][1], dropout + 0.1)
        candidates.append(("regularise", f"raise weight decay to {new_decay:.2g} and dropout to {new_dropout:.2g}", "overfitting",
                           _proposal("overfitting: more weight decay and dropout", weight_decay=new_decay, dropout=new_dropout)))
    if diagnosis.dead_groups:
        groups = diagnosis.dead_groups[:MAX_RESCUE_GROUPS]
        # A unit is its weight row and its bias: a dead unit re-drawn with its old, very negative bias stays dead.
        known = {layer.name for layer in snapshot.layers}
        targets = list(dict.fromkeys(name for group in groups for name in (group, group.removesuffix(".weight") + ".bias") if name in known))
        candidates.append(("reinit_dead", f"re-draw half the dead units of {', '.join(groups)}", "dead units",
                           _proposal("dead units: re-draw half", alpha=1.0,
                                     weights=[{"op": "reinit_dead", "group": name, "amount": 0.5} for name in targets[:8]])))
    if diagnosis.underfitting:
        candidates.append(("lr_up", "raise the learning rate 3x", "learning slowly", _proposal("learning slowly: raise lr 3x", lr_scale=3.0)))
    if (diagnosis.diverging or diagnosis.plateau) and not diagnosis.too_fast:
        why = "diverging" if diagnosis.diverging else "plateau"
        candidates.append(("lr_down", "halve the learning rate", why, _proposal(f"{why}: halve lr", lr_scale=0.5)))
    # Few findings: offer both learning-rate moves anyway, so that choosing is a real decision.
    offered = {candidate[0] for candidate in candidates}
    if len(candidates) < 3:
        if "lr_down" not in offered:
            candidates.append(("lr_down", "halve the learning rate", "", _proposal("halve lr", lr_scale=0.5)))
        if "lr_up" not in offered:
            candidates.append(("lr_up", "double the learning rate", "", _proposal("double lr", lr_scale=2.0)))
    records = track_records(outcomes)
    findings = any(remedy for _, _, remedy, _ in candidates)
    menu = []
    for key, (action, does, remedy, proposal) in zip(MENU_KEYS, candidates):
        if action == "keep":
            label = f"{does}; right when there is no problem"
        else:
            label = f"{does}; for: {remedy}" if remedy else f"{does}; no finding calls for it"
        record = records.get(action)
        if record is not None and action != "keep":
            label += f" (tried {record.tried}x in this run, kept {record.kept}x)"
        option = MenuOption(key=key, action=action, label=label, proposal=proposal, remedy=remedy)
        option.prior = action_prior(option, records, findings=findings)
        menu.append(option)
    return menu


def finding_present(diagnosis: Diagnosis, remedy: str) -> bool:
    """Whether the finding an option answered (`MenuOption.remedy`) is still in `diagnosis`."""
    present = {"diverging": diagnosis.diverging, "plateau": diagnosis.plateau, "learning slowly": diagnosis.underfitting,
               "learning rate too high": diagnosis.too_fast,
               "overfitting": diagnosis.overfitting, "dead units": bool(diagnosis.dead_groups)}
    return present.get(remedy, True)


def remedies(snapshot: TrainingSnapshot, diagnosis: Diagnosis) -> list[MenuOption]:
    """The menu's options that answer a finding, deepest cause first; empty when nothing calls for one.
    What the heuristic advisor proposes and what the prompt hints at, in invent mode as in choose mode."""
    return [option for option in build_menu(snapshot, diagnosis) if option.remedy]
