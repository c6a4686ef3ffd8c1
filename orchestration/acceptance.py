"""Did a proposal help? A reward from probation metrics, and the verdict it implies. Pure.

The trainer measures two sets of metrics after `probation_steps`:
the *candidate* (weights/hyperparameters with the proposal applied) and a *reference* —
in reward mode "counterfactual" an untouched branch trained for the same steps, in mode
"baseline" the metrics just before the proposal was applied. The reward compares them.
"""

from __future__ import annotations

import math

from orchestration.config import CoordinatorConfig
from orchestration.protocol import ProbationMetrics, Verdict

_LOSS_FLOOR = 1e-8  # keeps the relative loss change finite when the reference loss is ~0


def compute_reward(candidate: ProbationMetrics, reference: ProbationMetrics, config: CoordinatorConfig) -> float:
    """Reward of the candidate over the reference; higher is better, 0 = no difference.

    With `s = max(|L_ref|, 1e-8)` (L = validation loss, T = train loss, A = validation accuracy):

        reward = w_loss * (L_ref - L_cand) / s
               + w_acc  * (A_cand - A_ref)
               - w_gap  * max(0, (L_cand - T_cand) - (L_ref - T_ref)) / s

    The accuracy term is 0 when either accuracy is missing, the gap term when either train loss
    is missing. A non-finite candidate loss gives `-inf`; a non-finite reference loss with a finite
    candidate gives `+inf` (the proposal rescued a diverged run).
    """
    if not math.isfinite(candidate.val_loss):
        return -math.inf
    if not math.isfinite(reference.val_loss):
        return math.inf
    scale = max(abs(reference.val_loss), _LOSS_FLOOR)
    loss_gain = (reference.val_loss - candidate.val_loss) / scale
    accuracy_gain = 0.0
    if candidate.val_accuracy is not None and reference.val_accuracy is not None:
        accuracy_gain = candidate.val_accuracy - reference.val_accuracy
    gap_growth = 0.0
    if candidate.train_loss is not None and reference.train_loss is not None:
        if math.isfinite(candidate.train_loss) and math.isfinite(reference.train_loss):
            candidate_gap = candidate.val_loss - candidate.train_loss
            reference_gap = reference.val_loss - reference.train_loss
            gap_growth = max(0.0, candidate_gap - reference_gap) / scale
    return (
        config.reward_loss_weight * loss_gain
        + config.reward_accuracy_weight * accuracy_gain
        - config.reward_gap_weight * gap_growth
    )


def judge(candidate: ProbationMetrics, reference: ProbationMetrics, config: CoordinatorConfig) -> Verdict:
    """Accept iff `compute_reward(candidate, reference, config) > config.accept_threshold`."""
    reward = compute_reward(candidate, reference, config)
    accepted = reward > config.accept_threshold
    comparison = ">" if accepted else "<="
    reason = (
        f"reward {reward:.4g} {comparison} threshold {config.accept_threshold:g} "
        f"({config.reward_mode}: val_loss {candidate.val_loss:.4g} vs {reference.val_loss:.4g})"
    )
    return Verdict(accepted=accepted, reward=reward, reason=reason)
