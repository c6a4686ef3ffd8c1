"""One reading of a training snapshot: plateau, divergence, slow learning, overfitting, dead units. Pure.

Each finding is a `Finding` (`orchestration.protocol`): a flag of the `Diagnosis` (`Diagnosis.findings()`, what
the menu and the coordinator match on) and a note that starts with the finding's words (what the prompt and
the query policy quote).

The query policy asks the advisor on what `diagnose` finds, and the prompt tells the advisor the
same findings (the coordinator ships its `Diagnosis` inside the snapshot), so the two can never
disagree. Thresholds come from the coordinator's config (`DiagnosticThresholds.from_config`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from orchestration.config import CoordinatorConfig
from orchestration.protocol import Diagnosis, Finding, TrainingSnapshot


@dataclass(frozen=True, kw_only=True, slots=True)
class DiagnosticThresholds:
    """What counts as a finding. The defaults are `CoordinatorConfig`'s defaults."""

    plateau_window: int = 3  # epochs over which a plateau (and a widening gap) is measured
    plateau_threshold: float = 0.01  # relative val-loss improvement over the window below which = plateau
    divergence_factor: float = 1.5  # loss above factor * (best val / previous train) = divergence
    overfit_gap_growth: float = 0.02  # val-train loss gap widening by this much over the window = overfitting
    dead_fraction: float = 0.8  # a layer with this fraction of its units never active is worth a re-draw
    underfit_update_ratio: float = 0.03  # median per-epoch ||dW|| / ||W|| below which the weights barely move
    underfit_accuracy: float = 0.9  # ... and validation accuracy below this = learning far too slowly
    fast_update_ratio: float = 0.12  # median update ratio above which a stalled or worsening val loss = lr too high
    runaway_update_ratio: float = 0.5  # any group's update ratio above this = lr too high
    overfit_loss_ratio: float = 2.0  # val loss above this multiple of train loss (and OVERFIT_MIN_GAP above it) = overfitting

    @classmethod
    def from_config(cls, config: CoordinatorConfig) -> DiagnosticThresholds:
        return cls(plateau_window=config.plateau_window, plateau_threshold=config.plateau_threshold,
                   divergence_factor=config.divergence_factor, overfit_gap_growth=config.overfit_gap_growth,
                   dead_fraction=config.dead_fraction, underfit_update_ratio=config.underfit_update_ratio,
                   fast_update_ratio=config.fast_update_ratio, runaway_update_ratio=config.runaway_update_ratio,
                   overfit_loss_ratio=config.overfit_loss_ratio)


OVERFIT_MIN_GAP = 0.1  # a val/train loss ratio counts as overfitting only with this much absolute gap
ACCURACY_DROP = 0.05  # a validation-loss rise counts as divergence only with this much validation accuracy lost


def is_diverging(train_loss: Sequence[float], val_loss: Sequence[float], divergence_factor: float,
                 val_accuracy: Sequence[float] = ()) -> str | None:
    """Why the run looks divergent, or None.

    Diverging iff the latest loss is not finite, or `train_loss[-1] > divergence_factor * train_loss[-2]`,
    or `val_loss[-1] > divergence_factor * min(val_loss[:-1])` while the model is getting worse, not
    just more confident: validation accuracy (when known) at least `ACCURACY_DROP` below its best, else
    training loss not at its best. (Validation loss rising while accuracy holds or training loss falls
    is overfitting, which has its own finding.)
    """
    for name, history in (("val_loss", val_loss), ("train_loss", train_loss)):
        if history and not math.isfinite(history[-1]):
            return f"{name} is {history[-1]}"
    if len(train_loss) >= 2 and math.isfinite(train_loss[-2]) and train_loss[-2] > 0:
        if train_loss[-1] > divergence_factor * train_loss[-2]:
            return f"train_loss {train_loss[-1]:.4g} > {divergence_factor:g} x previous {train_loss[-2]:.4g}"
    finite_previous_val = [value for value in val_loss[:-1] if math.isfinite(value)]
    if not val_loss or not finite_previous_val:
        return None
    best = min(finite_previous_val)
    if not (best > 0 and val_loss[-1] > divergence_factor * best):
        return None
    accuracies = [value for value in val_accuracy if math.isfinite(value)]
    if len(accuracies) >= 2:
        getting_worse = accuracies[-1] < max(accuracies[:-1]) - ACCURACY_DROP
    else:
        previous_train = [value for value in train_loss[:-1] if math.isfinite(value)]
        getting_worse = not (train_loss and previous_train and train_loss[-1] < min(previous_train))
    if getting_worse:
        return f"val_loss {val_loss[-1]:.4g} > {divergence_factor:g} x best {best:.4g}"
    return None


def relative_improvement(val_loss: Sequence[float], window: int) -> float | None:
    """Relative val-loss improvement over the last `window` epochs, or None if history is too short.

    `improvement = (L[-1 - window] - min(L[-window:])) / |L[-1 - window]|`; positive = getting better.
    """
    if len(val_loss) < window + 1:
        return None
    start = val_loss[-1 - window]
    if not math.isfinite(start) or start == 0:
        return None
    return (start - min(val_loss[-window:])) / abs(start)


def gap_growth(train_loss: Sequence[float], val_loss: Sequence[float], window: int) -> float | None:
    """How much the (val - train) loss gap widened over the last `window` epochs, or None if too short."""
    if len(train_loss) < window + 1 or len(val_loss) < window + 1:
        return None
    values = [train_loss[-1 - window], val_loss[-1 - window], train_loss[-1], val_loss[-1]]
    if not all(math.isfinite(value) for value in values):
        return None
    return (val_loss[-1] - train_loss[-1]) - (val_loss[-1 - window] - train_loss[-1 - window])


def _update_ratios(snapshot: TrainingSnapshot) -> list[float]:
    """The groups' per-epoch update ratios that are finite and non-zero, ascending."""
    return sorted(layer.update_ratio for layer in snapshot.layers if layer.update_ratio > 0 and math.isfinite(layer.update_ratio))


CHANCE_MARGIN = 0.05  # validation accuracy within this of chance (1 / classes) counts as chance
COLLAPSE_EPOCHS = 2  # epochs at chance (without divergence) before a run counts as collapsed
STUCK_IMPROVEMENT = 0.02  # training loss falling less than this (relative) over the last epoch = not learning


def chance_ceiling(num_classes: int) -> float:
    """The validation accuracy at or below which a classifier of `num_classes` classes is at chance."""
    return 1.0 / num_classes + CHANCE_MARGIN


def collapse(snapshot: TrainingSnapshot, *, diverging: bool) -> str | None:
    """Why the network looks collapsed, or None.

    Collapsed iff the number of classes C is known and either (a) the run is `diverging` and its latest validation
    accuracy is at chance (`<= 1/C + CHANCE_MARGIN`), or (b) the last `COLLAPSE_EPOCHS` validation accuracies are at
    chance and the latest training loss is at least `0.9 ln C` (no better than a guess) and not learning: it fell less
    than `STUCK_IMPROVEMENT` over the last epoch, or it fell from above `ln C` (back from a blow-up, not below a guess). That is what a learning rate far too high leaves (dead units, saturated
    logits): cutting the rate alone does not bring it back, and raising it (what "learning slowly" would call for
    at tiny update ratios) is the wrong way. A learning rate far too low also starts near chance, but its training
    loss falls: (b) leaves it to the slow-learning finding.
    """
    classes = snapshot.num_classes
    accuracy = [value for value in snapshot.val_accuracy if math.isfinite(value)]
    if classes < 2 or not accuracy:
        return None
    ceiling = chance_ceiling(classes)
    if diverging and accuracy[-1] <= ceiling:
        return f"diverging at chance: val accuracy {accuracy[-1]:.3f} (chance {1 / classes:.3f})"
    recent, train = accuracy[-COLLAPSE_EPOCHS:], snapshot.train_loss
    if len(recent) < COLLAPSE_EPOCHS or max(recent) > ceiling or len(train) < 2:
        return None
    guess = 0.9 * math.log(classes)
    latest, previous = train[-1], train[-2]
    # Falling counts as learning only below the guess's loss: a loss coming down from a blow-up to ln C is not learning.
    learning = math.isfinite(previous) and previous < math.log(classes) and latest < (1 - STUCK_IMPROVEMENT) * previous
    stuck = not math.isfinite(latest) or (latest >= guess and not learning)
    if stuck:
        return (f"val accuracy {recent[-1]:.3f} at chance ({1 / classes:.3f}) for {COLLAPSE_EPOCHS} epochs, "
                f"train loss {latest:.3g} no better than a guess (ln {classes} = {math.log(classes):.3g}) and not falling")
    return None


LR_RAISE_BOUNDS = (3.0, 10.0)  # the learning-rate raise a slow-learning finding calls for: at least 3x, at most 10x at once


def lr_raise(snapshot: TrainingSnapshot, thresholds: DiagnosticThresholds) -> float:
    """The factor that brings the median per-epoch update ratio to the geometric middle of the healthy band
    (`sqrt(underfit_update_ratio * fast_update_ratio)`, 0.06 by default), whole, within `LR_RAISE_BOUNDS`.

    Adam-type steps scale with the learning rate, so a run 30x too slow moving 0.01 per epoch gets 6x, not the
    3x that barely dents it; one moving 0.025 gets 3x."""
    ratios = _update_ratios(snapshot)
    if not ratios:
        return LR_RAISE_BOUNDS[0]
    target = math.sqrt(thresholds.underfit_update_ratio * thresholds.fast_update_ratio)
    return float(min(LR_RAISE_BOUNDS[1], max(LR_RAISE_BOUNDS[0], round(target / ratios[len(ratios) // 2]))))


def slow_learning(snapshot: TrainingSnapshot, thresholds: DiagnosticThresholds) -> str | None:
    """Why the run looks like it learns far too slowly (a learning rate too low), or None.

    Slow iff the median per-epoch update ratio of the parameter groups is below
    `underfit_update_ratio`, the latest validation accuracy is below `underfit_accuracy`, and the
    validation loss is not above the training loss by more than 10 % (no overfitting to blame).
    """
    ratios = _update_ratios(snapshot)
    if not ratios or not snapshot.val_accuracy or not snapshot.train_loss or not snapshot.val_loss:
        return None
    median = ratios[len(ratios) // 2]
    accuracy, train, val = snapshot.val_accuracy[-1], snapshot.train_loss[-1], snapshot.val_loss[-1]
    if not all(math.isfinite(value) for value in (accuracy, train, val)):
        return None
    if median < thresholds.underfit_update_ratio and accuracy < thresholds.underfit_accuracy and val <= 1.1 * train:
        return f"weights move {median:.2g} per epoch (median update ratio) at val accuracy {accuracy:.2f}"
    return None


def too_fast(snapshot: TrainingSnapshot, thresholds: DiagnosticThresholds, *, stalled: bool) -> str | None:
    """Why the learning rate looks too high, or None.

    Too fast iff some parameter group moved more than `runaway_update_ratio` of its norm in the last epoch
    (in a dead or exploding net the median can be tiny while one group lurches), or the median update ratio is
    above `fast_update_ratio` while the validation loss is `stalled` (a plateau) or 10 % above its best.
    Large steps with no progress are the textbook sign of a step size too large; healthy runs in the advice
    bench move at most 0.15 per epoch at their start and less as they converge.
    """
    ratios = _update_ratios(snapshot)
    if not ratios:
        return None
    if ratios[-1] > thresholds.runaway_update_ratio:
        group = next(layer for layer in snapshot.layers if layer.update_ratio == ratios[-1])
        return f"{group.name} moved {ratios[-1]:.2g} of its norm in one epoch"
    median = ratios[len(ratios) // 2]
    finite_val = [value for value in snapshot.val_loss if math.isfinite(value)]
    worse = len(finite_val) >= 2 and finite_val[-1] > 1.1 * min(finite_val[:-1])
    if median > thresholds.fast_update_ratio and (stalled or worse):
        return f"weights move {median:.2g} per epoch (median update ratio) while validation loss " + ("stalls" if stalled and not worse else "is above its best")
    return None


def overfit_level(snapshot: TrainingSnapshot, thresholds: DiagnosticThresholds) -> str | None:
    """Validation loss far above training loss, however it got there (a gap that is large but no longer growing)."""
    if not snapshot.train_loss or not snapshot.val_loss:
        return None
    train, val = snapshot.train_loss[-1], snapshot.val_loss[-1]
    if math.isfinite(train) and math.isfinite(val) and val > thresholds.overfit_loss_ratio * train and val - train > OVERFIT_MIN_GAP:
        return f"val loss {val:.3g} is {val / max(train, 1e-12):.3g}x train loss {train:.3g}"
    return None


def diagnose(snapshot: TrainingSnapshot, thresholds: DiagnosticThresholds | None = None) -> Diagnosis:
    """Read trends from the snapshot's loss curves and per-layer statistics."""
    thresholds = thresholds or DiagnosticThresholds()
    window = thresholds.plateau_window
    diagnosis = Diagnosis()
    divergence = is_diverging(snapshot.train_loss, snapshot.val_loss, thresholds.divergence_factor, snapshot.val_accuracy)
    if divergence is not None:
        diagnosis.diverging = True
        diagnosis.notes.append(f"{Finding.DIVERGING}: {divergence}")
    else:
        improvement = relative_improvement(snapshot.val_loss, window)
        if improvement is not None and improvement < thresholds.plateau_threshold:
            diagnosis.plateau = True
            diagnosis.notes.append(f"{Finding.PLATEAU}: validation loss improved {improvement:.2%} over {window} epochs")
    collapsed = collapse(snapshot, diverging=diagnosis.diverging)
    if collapsed is not None:
        diagnosis.collapsed = True
        diagnosis.notes.insert(0, f"{Finding.COLLAPSED}: {collapsed}")
    fast = None if diagnosis.diverging else too_fast(snapshot, thresholds, stalled=diagnosis.plateau)
    if fast is not None:
        diagnosis.too_fast = True
        diagnosis.notes.append(f"{Finding.TOO_FAST}: {fast}")
    # A collapsed net moves little and sits at chance, which reads as learning slowly; raising its rate is the wrong way.
    slow = None if diagnosis.diverging or diagnosis.collapsed or fast is not None else slow_learning(snapshot, thresholds)
    if slow is not None:
        diagnosis.underfitting = True
        diagnosis.lr_raise = lr_raise(snapshot, thresholds)
        diagnosis.notes.append(f"{Finding.LEARNING_SLOWLY}: {slow}")
    growth = gap_growth(snapshot.train_loss, snapshot.val_loss, window)
    finite_val = [value for value in snapshot.val_loss if math.isfinite(value)]
    if growth is not None and growth > thresholds.overfit_gap_growth and snapshot.val_loss[-1] > min(finite_val):
        diagnosis.overfitting = True
        diagnosis.notes.append(f"{Finding.OVERFITTING}: val-train loss gap grew by {growth:.3g} over {window} epochs")
    elif (level := overfit_level(snapshot, thresholds)) is not None:
        diagnosis.overfitting = True
        diagnosis.notes.append(f"{Finding.OVERFITTING}: {level}")
    # Dead units matter only in a net that is not learning well: a healthy ReLU net often has half
    # of a wide hidden layer silent on the validation set, and re-drawing those units only hurts it.
    accuracy = snapshot.val_accuracy[-1] if snapshot.val_accuracy and math.isfinite(snapshot.val_accuracy[-1]) else None
    # Units killed by a learning rate too high die again when re-drawn; and a net that overfits needs regularising.
    struggling = (diagnosis.plateau or diagnosis.underfitting or accuracy is None or accuracy < thresholds.underfit_accuracy) \
        and not (diagnosis.too_fast or diagnosis.overfitting or diagnosis.collapsed)
    diagnosis.dead_groups = [layer.name for layer in snapshot.layers if layer.dead_fraction >= thresholds.dead_fraction] if struggling else []
    if diagnosis.dead_groups:
        diagnosis.notes.append(f"many dead units in {', '.join(diagnosis.dead_groups[:3])}")
    if not diagnosis.notes:
        diagnosis.notes.append("no problem detected")
    return diagnosis
