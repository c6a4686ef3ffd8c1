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


def reward_noise(candidate: ProbationMetrics, reference: ProbationMetrics, config: CoordinatorConfig) -> float | None:
    """Standard error of the reward's loss and accuracy terms, from paired per-sample differences.

    Both branches are scored on the same validation samples, so per sample
    `r_i = w_loss * (l_ref_i - l_cand_i) / s + w_acc * (c_cand_i - c_ref_i)` (l: loss, c: 1 if correct),
    whose mean is the reward's first two terms; the noise is `std(r) / sqrt(n)`. None when either
    branch has no per-sample values or they do not pair up (then no margin is applied).
    """
    n = len(candidate.sample_losses)
    if n < 2 or len(reference.sample_losses) != n:
        return None
    scale = max(abs(reference.val_loss), _LOSS_FLOOR) if math.isfinite(reference.val_loss) else 1.0
    paired_correct = len(candidate.sample_correct) == n and len(reference.sample_correct) == n
    values = []
    for i in range(n):
        value = config.reward_loss_weight * (reference.sample_losses[i] - candidate.sample_losses[i]) / scale
        if paired_correct:
            value += config.reward_accuracy_weight * (candidate.sample_correct[i] - reference.sample_correct[i])
        values.append(value)
    if not all(math.isfinite(value) for value in values):
        return None
    mean = sum(values) / n
    variance = sum((value - mean) ** 2 for value in values) / (n - 1)
    return math.sqrt(variance / n)


def judge(candidate: ProbationMetrics, reference: ProbationMetrics, config: CoordinatorConfig) -> Verdict:
    """Accept iff the reward clears the threshold by `accept_significance` standard errors.

    `reward > accept_threshold + z * noise`, with `noise = reward_noise(...)` (0 when not measurable)
    and `z = accept_significance`: a gain within the probation's own noise (probation validation
    loss 1.996 against 1.999, say) is not a gain. Non-finite rewards skip the margin.
    """
    reward = compute_reward(candidate, reference, config)
    noise = reward_noise(candidate, reference, config) if config.accept_significance > 0 else None
    margin = config.accept_significance * noise if noise is not None and math.isfinite(reward) else 0.0
    bar = config.accept_threshold + margin
    accepted = reward > bar
    comparison = ">" if accepted else "<="
    against = f"threshold {config.accept_threshold:g}"
    if noise is not None:
        against += f" + {config.accept_significance:g} x noise {noise:.3g}"
    reason = (
        f"reward {reward:.4g} {comparison} {against} "
        f"({config.reward_mode}: val_loss {candidate.val_loss:.4g} vs {reference.val_loss:.4g})"
    )
    return Verdict(accepted=accepted, reward=reward, reason=reason)
