"""When to ask the advisor: a pure decision over a training snapshot.

`QueryPolicy.decide` returns `Query(reason=...)` or `None`; it never acts. Gates are early
returns, each logged at debug level with the reason, in order of precedence:

1. a query (or a proposal on probation) is in flight -> no;
2. burn-in (`snapshot.epoch < burn_in_epochs`) -> no;
   already asked at this epoch (or a later one) -> no;
3. divergence (non-finite loss, val loss > divergence_factor * best val loss so far, or train loss
   > divergence_factor * previous train loss) -> ask at once;
4. plateau (relative val-loss improvement over `plateau_window` epochs below `plateau_threshold`),
   at most once per `plateau_window` epochs -> ask;
5. weight drift since the last query above `drift_threshold` -> ask;
6. `query_interval` epochs since the last query (or since epoch 0) -> ask.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass

from orchestration.coordinator_config import CoordinatorConfig
from serve_llm.schema import TrainingSnapshot

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Query:
    """The decision to ask the advisor now, and why (goes to the ledger)."""

    reason: str


def is_diverging(train_loss: Sequence[float], val_loss: Sequence[float], divergence_factor: float) -> str | None:
    """Why the run looks divergent, or None.

    Diverging iff the latest loss is not finite, or
    `val_loss[-1] > divergence_factor * min(val_loss[:-1])`, or
    `train_loss[-1] > divergence_factor * train_loss[-2]`.
    """
    for name, history in (("val_loss", val_loss), ("train_loss", train_loss)):
        if history and not math.isfinite(history[-1]):
            return f"{name} is {history[-1]}"
    finite_previous_val = [value for value in val_loss[:-1] if math.isfinite(value)]
    if val_loss and finite_previous_val:
        best = min(finite_previous_val)
        if best > 0 and val_loss[-1] > divergence_factor * best:
            return f"val_loss {val_loss[-1]:.4g} > {divergence_factor:g} x best {best:.4g}"
    if len(train_loss) >= 2 and math.isfinite(train_loss[-2]) and train_loss[-2] > 0:
        if train_loss[-1] > divergence_factor * train_loss[-2]:
            return f"train_loss {train_loss[-1]:.4g} > {divergence_factor:g} x previous {train_loss[-2]:.4g}"
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


class QueryPolicy:
    """Decides at each epoch end whether the coordinator should ask the advisor."""

    def __init__(self, config: CoordinatorConfig) -> None:
        self.config = config

    def decide(
        self,
        snapshot: TrainingSnapshot,
        *,
        last_query_epoch: int | None,
        weight_drift: float,
        in_flight: bool,
    ) -> Query | None:
        """`Query(reason)` if the advisor should be asked about `snapshot` now, else None."""
        config = self.config
        epoch = snapshot.epoch
        if in_flight:
            logger.debug("epoch %d: no query, one is already in flight", epoch)
            return None
        if epoch < config.burn_in_epochs:
            logger.debug("epoch %d: no query, burn-in lasts %d epochs", epoch, config.burn_in_epochs)
            return None
        if last_query_epoch is not None and epoch <= last_query_epoch:
            logger.debug("epoch %d: no query, already asked at epoch %d", epoch, last_query_epoch)
            return None

        divergence = is_diverging(snapshot.train_loss, snapshot.val_loss, config.divergence_factor)
        if divergence is not None:
            return Query(reason=f"divergence: {divergence}")

        epochs_since_query = epoch - (last_query_epoch if last_query_epoch is not None else 0)
        improvement = relative_improvement(snapshot.val_loss, config.plateau_window)
        if improvement is not None and improvement < config.plateau_threshold:
            if last_query_epoch is None or epochs_since_query >= config.plateau_window:
                return Query(
                    reason=f"plateau: val_loss improved {improvement:.2%} over {config.plateau_window} epochs"
                )
            logger.debug("epoch %d: plateau, but asked %d epochs ago", epoch, epochs_since_query)

        if math.isfinite(weight_drift) and weight_drift > config.drift_threshold:
            return Query(reason=f"weight drift {weight_drift:.3g} > {config.drift_threshold:g}")

        if config.query_interval > 0 and epochs_since_query >= config.query_interval:
            return Query(reason=f"interval: {epochs_since_query} epochs since last query")

        logger.debug("epoch %d: no query, no trigger (%d epochs since last query)", epoch, epochs_since_query)
        return None
