"""Plain diagnostics of a training snapshot (plateau, divergence, overfitting, dead units).

Shared by the prompt, which states them so that a small model need not infer trends from raw
numbers, and by the heuristic backend, which acts on them by rule.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from serve_llm.schema import TrainingSnapshot

PLATEAU_WINDOW = 3  # epochs compared for a plateau
PLATEAU_REL_IMPROVEMENT = 0.01  # less than 1% better over the window counts as a plateau
DIVERGENCE_FACTOR = 1.5  # last loss 50% above the best so far counts as diverging
GAP_GROWTH = 0.02  # val-train loss gap widening by this much over the window counts as overfitting
DEAD_FRACTION = 0.3  # a layer with 30% of its units never active is worth a re-draw


@dataclass(kw_only=True, slots=True)
class Signals:
    """What the numbers say, as flags plus one short line per finding."""

    plateau: bool = False
    diverging: bool = False
    overfitting: bool = False
    dead_groups: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def remedies(self) -> list[str]:
        """The textbook response to each finding, as short hints for the prompt."""
        hints = []
        if self.diverging:
            hints.append("cut lr (lr_scale 0.3) and move weights toward_best")
        elif self.plateau:
            hints.append("lower lr (lr_scale 0.5)")
        if self.dead_groups:
            hints.append(f"reinit_dead on {self.dead_groups[0]}")
        if self.overfitting:
            hints.append("raise weight_decay or dropout")
        return hints or ["keep everything: null values and no weight ops"]


def _finite(values: list[float]) -> list[float]:
    return [value for value in values if isinstance(value, (int, float)) and math.isfinite(value)]


def diagnose(snapshot: TrainingSnapshot) -> Signals:
    """Read trends from the snapshot's histories and per-layer stats."""
    signals = Signals()
    train = snapshot.train_loss
    val = snapshot.val_loss
    losses = val if len(val) > PLATEAU_WINDOW else train

    if any(not math.isfinite(value) for value in train[-2:]):
        signals.diverging = True
        signals.notes.append("training loss is not finite")
    elif len(_finite(train)) >= 2:
        best, last = min(_finite(train)), train[-1]
        if last > DIVERGENCE_FACTOR * best and last - best > 1e-3:
            signals.diverging = True
            signals.notes.append(f"training loss {last:.3g} is {last / max(best, 1e-12):.1f}x its best {best:.3g}")

    if not signals.diverging and len(_finite(losses)) > PLATEAU_WINDOW:
        before, now = losses[-PLATEAU_WINDOW - 1], losses[-1]
        if before > 0 and (before - now) / before < PLATEAU_REL_IMPROVEMENT:
            signals.plateau = True
            which = "validation" if losses is val else "training"
            signals.notes.append(f"{which} loss flat over {PLATEAU_WINDOW} epochs ({before:.3g} -> {now:.3g})")

    if len(_finite(train)) > PLATEAU_WINDOW and len(_finite(val)) > PLATEAU_WINDOW:
        gap_then = val[-PLATEAU_WINDOW - 1] - train[-PLATEAU_WINDOW - 1]
        gap_now = val[-1] - train[-1]
        if gap_now - gap_then > GAP_GROWTH and val[-1] > min(_finite(val)):
            signals.overfitting = True
            signals.notes.append(f"val-train loss gap grew {gap_then:.3g} -> {gap_now:.3g}")

    for layer in snapshot.layers:
        if layer.dead_fraction >= DEAD_FRACTION:
            signals.dead_groups.append(layer.name)
    if signals.dead_groups:
        signals.notes.append(f"many dead units in {', '.join(signals.dead_groups[:3])}")
    if not signals.notes:
        signals.notes.append("no problem detected")
    return signals
