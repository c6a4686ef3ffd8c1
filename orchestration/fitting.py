"""What a proposal may do to a run's research modes, read once. Pure.

`fit` takes a proposal's `TrainingChange` and the run's modes (`ModesView`) and returns the change as the
run can take it, with one sentence for each thing it dropped or clamped (as Ray Tune's PBT explore returns
`new_config, operations`). `fit_weight_ops` does the same for weight ops on frozen blocks. Every gate calls
them: the validator's repair (`serve_llm.validate`), the response cache (`orchestration.cache`), the menu's
last check of a pick (`orchestration.menu`), and the workers before they change anything
(`workers.modes.TrainingModes.apply` / `check_weight_ops`, which refuse what these would drop).
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from typing import Any

from orchestration.protocol import (
    ACTIVATIONS,
    CURRICULUM_PACE_BOUNDS,
    MAX_UNFREEZE_BLOCKS,
    ModesView,
    TrainingChange,
    WeightOp,
    split_neuron_group,
)


def fit(change: TrainingChange, view: ModesView) -> tuple[TrainingChange, list[str]]:
    """The part of `change` the run's modes let through, and what was done to get it (empty: it fits as is).

    Dropped: a field whose mode the run does not enable; an activation switch naming a layer the run lacks,
    a kind outside `ACTIVATIONS`, half a switch (a layer without a kind or the reverse) or the kind the layer
    already has; a batch-selection switch to the state it is in. Clamped: `curriculum_pace` to
    `CURRICULUM_PACE_BOUNDS`, `unfreeze` to [1, min(MAX_UNFREEZE_BLOCKS, frozen blocks)]. Field types are the
    caller's to check (the validator rejects malformed ones before this)."""
    done: list[str] = []
    fitted: dict[str, Any] = {}
    if change.curriculum_pace is not None:
        if view.curriculum_pace is None:
            done.append("dropped training.curriculum_pace: the run has no curriculum")
        else:
            low, high = CURRICULUM_PACE_BOUNDS
            pace = min(max(change.curriculum_pace, low), high)
            if pace != change.curriculum_pace:
                done.append(f"clamped training.curriculum_pace from {change.curriculum_pace:g} to {pace:g} (bounds [{low:g}, {high:g}])")
            fitted["curriculum_pace"] = pace
    if change.batch_selection is not None:
        if view.batch_selection is None:
            done.append("dropped training.batch_selection: the run does not let the advisor switch batch selection (modes.batch_selection: advised)")
        elif (view.batch_selection == "on") == change.batch_selection:
            done.append(f"dropped training.batch_selection: batch selection is already {view.batch_selection}")
        else:
            fitted["batch_selection"] = change.batch_selection
    if change.activation_layer is not None or change.activation is not None:
        layer, kind = change.activation_layer, change.activation
        if not view.activations:
            done.append("dropped training.activation: the run has no adaptive activations")
        elif layer is None or kind is None:
            done.append("dropped training.activation: a switch needs both activation_layer and activation")
        elif layer not in view.activations:
            done.append(f"dropped training.activation: no adaptive activation {layer[:80]!r}")
        elif kind not in ACTIVATIONS:
            done.append(f"dropped training.activation: unknown activation {kind[:40]!r} (one of {', '.join(ACTIVATIONS)})")
        elif view.activations[layer] == kind:
            done.append(f"dropped training.activation: {layer} already is {kind}")
        else:
            fitted.update(activation_layer=layer, activation=kind)
    if change.unfreeze is not None:
        frozen = view.frozen_blocks or ()
        if not frozen:
            done.append("dropped training.unfreeze: the run has no frozen blocks")
        else:
            high = min(MAX_UNFREEZE_BLOCKS, len(frozen))
            count = min(max(change.unfreeze, 1), high)
            if count != change.unfreeze:
                done.append(f"clamped training.unfreeze from {change.unfreeze} to {count} (bounds [1, {high}], {len(frozen)} blocks frozen)")
            fitted["unfreeze"] = count
    return TrainingChange(**fitted), done


def fit_weight_ops(ops: Sequence[WeightOp], frozen_groups: Collection[str]) -> tuple[list[WeightOp], list[str]]:
    """The weight ops that leave frozen parameter groups alone, and one sentence naming those it dropped.

    A frozen block keeps its pretrained weights bit for bit (transfer learning), so no op may touch one of
    its `frozen_groups` (parameter names), whole or a neuron group of it ("features.0.weight#2")."""
    frozen = set(frozen_groups)
    touched = sorted({op.group for op in ops if split_neuron_group(op.group)[0] in frozen})
    if not touched:
        return list(ops), []
    return [op for op in ops if op.group not in touched], [f"dropped weight ops on frozen blocks ({', '.join(touched)}): unfreeze them first"]
