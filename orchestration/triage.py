"""What to do with an advisor answer once it has arrived. Pure: a decision returned as a value.

`triage` sorts an answer into exactly one of:

- `stale`: it arrived more than `max_answer_age_epochs` after its query (the weights moved on);
- `timeout` / `error`: the advisor timed out or failed (the answer says so);
- `invalid`: the validator rejected it, or it carries no proposal;
- `noop`: valid, but nothing is left to apply once `apply_weights` / `apply_hyperparameters` are honoured;
- `usable`: put the (restricted) proposal on probation.

The coordinator records every kind but `usable` in the ledger and drops the answer.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Literal

from orchestration.config import CoordinatorConfig
from orchestration.protocol import USABLE_STATUSES, AdvisorResponse, HyperparameterChange, Proposal, TrainingChange

TriageKind = Literal["usable", "noop", "stale", "timeout", "error", "invalid"]


@dataclass(frozen=True, slots=True)
class Triage:
    kind: TriageKind
    reason: str
    proposal: Proposal | None = None  # what may be applied (usable) or what was answered (noop)


def restrict_to_allowed(proposal: Proposal, config: CoordinatorConfig) -> Proposal:
    """The part of `proposal` the config lets through (`apply_weights`, `apply_hyperparameters`; a training
    change, like a hyperparameter change, changes how training runs, not the weights)."""
    return Proposal(
        hyperparameters=dataclasses.replace(proposal.hyperparameters) if config.apply_hyperparameters else HyperparameterChange(),
        weights=list(proposal.weights) if config.apply_weights else [],
        alpha=proposal.alpha,
        reason=proposal.reason,
        training=dataclasses.replace(proposal.training) if config.apply_hyperparameters else TrainingChange(),
        restart=proposal.restart if config.apply_weights else "",  # a restart writes every weight
    )


def triage(answer: AdvisorResponse, *, age_epochs: int, config: CoordinatorConfig) -> Triage:
    """Sort an arrived `answer` asked `age_epochs` epochs ago."""
    status, proposal = answer.status, answer.proposal
    if age_epochs > config.max_answer_age_epochs:
        return Triage("stale", f"answer arrived {age_epochs} epochs after the query")
    if status == "timeout":
        return Triage("timeout", "advisor timed out")
    if status == "error":
        return Triage("error", "advisor failed")
    if status not in USABLE_STATUSES or proposal is None:
        return Triage("invalid", f"advisor answer unusable (status {status})")
    usable = restrict_to_allowed(proposal, config)
    if usable.is_noop():
        return Triage("noop", "no-op: nothing to apply" + ("" if proposal.is_noop() else " under apply_* settings"), proposal)
    return Triage("usable", "", usable)
