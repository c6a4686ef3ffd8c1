"""Settings of the coordinator: when to ask the advisor, how hard to trust it, how to judge it.

Units are in the comments; rules of thumb say where a value usually sits.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from orchestration.settings import require

REWARD_MODES = ("counterfactual", "baseline")
RewardMode = Literal["counterfactual", "baseline"]
ADVICE_MODES = ("choose", "invent")
AdviceMode = Literal["choose", "invent"]


@dataclass(kw_only=True, slots=True)
class CoordinatorConfig:
    """Everything the coordinator decides by. Validated on construction, before Ray starts."""

    # --- when to ask -------------------------------------------------------------------
    query_interval: int = 5  # epochs between routine queries; 0 = ask only on a trigger
    burn_in_epochs: int = 2  # epochs (0-based index < this) during which the advisor is never asked
    plateau_window: int = 3  # epochs over which a plateau is measured (and the cooldown after a query)
    plateau_threshold: float = 0.01  # relative val-loss improvement over the window below which = plateau
    divergence_factor: float = 1.5  # loss above factor * (best val / previous train) = divergence
    overfit_gap_growth: float = 0.02  # val-train loss gap widening by this much over plateau_window = overfitting
    dead_fraction: float = 0.8  # a layer with this fraction of units never active counts as having dead units (in the advice bench healthy nets have up to 61% silent on the validation set, broken ones 97-100%)
    underfit_update_ratio: float = 0.03  # median per-epoch ||dW||/||W|| below which (at val accuracy < 0.9) learning is "slow" (healthy nets in the advice bench move >= 0.036)
    fast_update_ratio: float = 0.12  # median ||dW||/||W|| per epoch above which a stalled or worsening val loss means "lr too high"
    runaway_update_ratio: float = 0.5  # any group moving this much of its norm in an epoch: "lr too high" on its own
    overfit_loss_ratio: float = 2.0  # val loss above this multiple of train loss (and 0.1 above it) = overfitting, grown or not
    drift_threshold: float = 0.5  # relative weight change since the last query: ||W - W_q|| / ||W_q||, W_q = weights when last asked
    max_answer_age_epochs: int = 2  # an answer (or an unreported probation) older than this is stale
    wait_for_answer_s: float = 0.0  # seconds an epoch boundary may wait for an in-flight answer; 0 = fully asynchronous
    wait_on_findings_s: float = 30.0  # the same wait, only for a query a finding triggered (on short epochs a late answer misses its moment)

    # --- what the advisor answers ----------------------------------------------------------
    advice_mode: AdviceMode = "choose"  # choose: pick from a menu built from the diagnosis | invent: write a whole proposal
    track_record: bool = True  # the menu shows, and its prior weighs, how each action fared earlier in the run
    # choose mode: ask the advisor even when no menu option answers a finding. Off: the coordinator keeps on its own
    # (recorded), since a model call costs seconds of the cores training uses to confirm "keep".
    ask_when_healthy: bool = False

    # --- response cache ------------------------------------------------------------------
    cache_enabled: bool = True
    cache_similarity: float = 0.2  # max Euclidean distance between quantised snapshot features for a hit
    cache_quantum: float = 0.1  # feature quantisation step; ~0.1 = a 10 % loss change is "different"
    max_cache_entries: int = 256  # oldest entries are evicted first

    # --- blending strength ---------------------------------------------------------------
    stability_alpha: float = 0.1  # starting blend factor per parameter group; 0 = proposals never move weights
    alpha_min: float = 0.01  # floor after repeated rejections
    alpha_max: float = 0.5  # ceiling after repeated acceptances
    alpha_up: float = 1.5  # alpha *= alpha_up after an accepted proposal (>= 1)
    alpha_down: float = 0.5  # alpha *= alpha_down after a rejected one (in (0, 1])

    # --- probation and acceptance --------------------------------------------------------
    probation_steps: int = 10  # optimizer steps each probation branch trains before the candidate is judged
    # A restart (the collapsed run's remedy) trains this many epochs of steps on probation, at least probation_steps:
    # restarted at a tenth of the rate it has to climb from the initial weights' loss, which ten steps rarely show
    # (the collapsed reference sits at chance and does not move); one epoch is what the run's own first epoch had.
    rescue_probation_epochs: float = 1.0
    reward_mode: RewardMode = "counterfactual"  # reference = untouched branch | pre-apply metrics
    accept_threshold: float = 0.0  # accept iff reward > this + accept_significance * (the reward's standard error)
    accept_significance: float = 2.0  # z: how many standard errors of the paired per-sample reward a gain must clear; 0 = off
    reward_loss_weight: float = 1.0  # weight of the relative val-loss decrease
    reward_accuracy_weight: float = 1.0  # weight of the val-accuracy gain (accuracy in [0, 1])
    reward_gap_weight: float = 0.5  # weight of the penalty on a growing (val - train) loss gap

    # --- what a proposal may touch -------------------------------------------------------
    reset_optimizer_moments: bool = False  # zero Adam moments of changed groups after applying
    verify_rollback: bool = False  # hash full weights + optimizer moments before/after each rollback (costly on big models)
    apply_hyperparameters: bool = True
    # Cap on the learning-rate schedule's peak, as a multiple of the configured train.lr, over all accepted changes
    # together (each answer may scale lr by 0.1-10x; four accepted 10x raises took 1e-4 to 1.0). A raise past it is cut
    # to reach it, and the ledger says so. 0 = no cap.
    max_lr_factor: float = 10.0
    apply_weights: bool = True
    neuron_groups: bool = False  # one alpha per group of a layer's neurons (k-means on activation statistics, log2(width) groups), not per layer
    regroup_every: int = 5  # epochs between re-clusterings of the neuron groups

    # --- what the advisor is shown -------------------------------------------------------
    history_window: int = 8  # epochs of loss/accuracy history kept in a snapshot sent to the advisor
    max_recent_proposals: int = 5  # past proposals (with verdicts and rewards) shown to the advisor

    def __post_init__(self) -> None:
        for name in ("query_interval", "burn_in_epochs"):
            require(getattr(self, name) >= 0, f"coordinator.{name}", getattr(self, name), "must be >= 0")
        for name in ("plateau_window", "probation_steps", "history_window", "max_cache_entries", "regroup_every"):
            require(getattr(self, name) >= 1, f"coordinator.{name}", getattr(self, name), "must be >= 1")
        require(0 <= self.rescue_probation_epochs <= 10, "coordinator.rescue_probation_epochs", self.rescue_probation_epochs, "must be in [0, 10]")
        require(self.max_answer_age_epochs >= 0, "coordinator.max_answer_age_epochs", self.max_answer_age_epochs, "must be >= 0")
        require(0 <= self.wait_for_answer_s <= 3600, "coordinator.wait_for_answer_s", self.wait_for_answer_s, "must be in [0, 3600]")
        require(0 <= self.wait_on_findings_s <= 3600, "coordinator.wait_on_findings_s", self.wait_on_findings_s, "must be in [0, 3600]")
        require(self.max_recent_proposals >= 0, "coordinator.max_recent_proposals", self.max_recent_proposals, "must be >= 0")
        require(self.plateau_threshold >= 0, "coordinator.plateau_threshold", self.plateau_threshold, "must be >= 0")
        require(self.divergence_factor > 1, "coordinator.divergence_factor", self.divergence_factor, "must be > 1")
        require(self.overfit_gap_growth > 0, "coordinator.overfit_gap_growth", self.overfit_gap_growth, "must be > 0")
        require(self.underfit_update_ratio >= 0, "coordinator.underfit_update_ratio", self.underfit_update_ratio, "must be >= 0")
        require(self.fast_update_ratio > self.underfit_update_ratio, "coordinator.fast_update_ratio", self.fast_update_ratio,
                f"must be > coordinator.underfit_update_ratio ({self.underfit_update_ratio})")
        require(self.runaway_update_ratio >= self.fast_update_ratio, "coordinator.runaway_update_ratio", self.runaway_update_ratio,
                f"must be >= coordinator.fast_update_ratio ({self.fast_update_ratio})")
        require(self.overfit_loss_ratio > 1, "coordinator.overfit_loss_ratio", self.overfit_loss_ratio, "must be > 1")
        require(0 < self.dead_fraction <= 1, "coordinator.dead_fraction", self.dead_fraction, "must be in (0, 1]")
        require(self.drift_threshold > 0, "coordinator.drift_threshold", self.drift_threshold, "must be > 0")
        require(self.cache_similarity >= 0, "coordinator.cache_similarity", self.cache_similarity, "must be >= 0")
        require(self.cache_quantum > 0, "coordinator.cache_quantum", self.cache_quantum, "must be > 0")
        for name in ("stability_alpha", "alpha_min", "alpha_max"):
            value = getattr(self, name)
            require(0.0 <= value <= 1.0, f"coordinator.{name}", value, "must be in [0, 1]")
        require(self.alpha_min <= self.alpha_max, "coordinator.alpha_max", self.alpha_max, f"must be >= alpha_min ({self.alpha_min!r})")
        require(self.stability_alpha == 0.0 or self.alpha_min <= self.stability_alpha <= self.alpha_max, "coordinator.stability_alpha",
                self.stability_alpha, f"must be 0 or in [alpha_min, alpha_max] = [{self.alpha_min!r}, {self.alpha_max!r}]")
        require(self.max_lr_factor == 0 or self.max_lr_factor >= 1, "coordinator.max_lr_factor", self.max_lr_factor, "must be 0 (no cap) or >= 1")
        require(self.alpha_up >= 1.0, "coordinator.alpha_up", self.alpha_up, "must be >= 1")
        require(0.0 < self.alpha_down <= 1.0, "coordinator.alpha_down", self.alpha_down, "must be in (0, 1]")
        require(self.advice_mode in ADVICE_MODES, "coordinator.advice_mode", self.advice_mode, f"must be one of {ADVICE_MODES}")
        require(0 <= self.accept_significance <= 10, "coordinator.accept_significance", self.accept_significance, "must be in [0, 10]")
        require(self.reward_mode in REWARD_MODES, "coordinator.reward_mode", self.reward_mode, f"must be one of {REWARD_MODES}")
        for name in ("reward_loss_weight", "reward_accuracy_weight", "reward_gap_weight"):
            require(getattr(self, name) >= 0, f"coordinator.{name}", getattr(self, name), "must be >= 0")
