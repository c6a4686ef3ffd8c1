"""When to ask the advisor: a pure decision over a training snapshot.

`QueryPolicy.decide` returns `Query(reason=...)` or `None`; it never acts. Gates are early
returns, each logged at debug level with the reason, in order of precedence:

1. a query (or a proposal on probation) is in flight -> no;
2. burn-in (`snapshot.epoch < burn_in_epochs`) -> no;
   the run's last epoch (`snapshot.total_epochs`, when known) -> no: no epoch end is left to try an answer at;
   already asked at this epoch (or a later one) -> no;
3. a collapse (chance-level accuracy, not learning: `orchestration.diagnostics.collapse`) -> ask at once;
   divergence, as `orchestration.diagnostics.diagnose` reads it (non-finite loss, val loss >
   divergence_factor * best val loss so far, or train loss > divergence_factor * previous) -> ask at once;
4. plateau, as `diagnose` reads it (relative val-loss improvement over `plateau_window` epochs
   below `plateau_threshold`), at most once per `plateau_window` epochs -> ask;
   slow learning (tiny updates at low accuracy), with the same cooldown -> ask;
5. weight drift since the last query above `drift_threshold` -> ask;
6. `query_interval` epochs since the last query (or since epoch 0) -> ask.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

from orchestration.config import CoordinatorConfig
from orchestration.diagnostics import DiagnosticThresholds, diagnose, is_diverging, relative_improvement
from orchestration.protocol import Diagnosis, Finding, TrainingSnapshot

__all__ = ["Query", "QueryPolicy", "is_diverging", "relative_improvement"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Query:
    """The decision to ask the advisor now, and why (goes to the ledger)."""

    reason: str


class QueryPolicy:
    """Decides at each epoch end whether the coordinator should ask the advisor."""

    def __init__(self, config: CoordinatorConfig) -> None:
        self.config = config
        self.thresholds = DiagnosticThresholds.from_config(config)

    def decide(
        self,
        snapshot: TrainingSnapshot,
        *,
        last_query_epoch: int | None,
        weight_drift: float,
        in_flight: bool,
        diagnosis: Diagnosis | None = None,
    ) -> Query | None:
        """`Query(reason)` if the advisor should be asked about `snapshot` now, else None.

        `diagnosis` is `diagnose(snapshot, thresholds from this config)`, computed here if not given.
        """
        config = self.config
        epoch = snapshot.epoch
        if in_flight:
            logger.debug("epoch %d: no query, one is already in flight", epoch)
            return None
        if epoch < config.burn_in_epochs:
            logger.debug("epoch %d: no query, burn-in lasts %d epochs", epoch, config.burn_in_epochs)
            return None
        if 0 < snapshot.total_epochs <= epoch:
            logger.debug("epoch %d: no query, the run's last epoch: no epoch end is left to try an answer at", epoch)
            return None
        if last_query_epoch is not None and epoch <= last_query_epoch:
            logger.debug("epoch %d: no query, already asked at epoch %d", epoch, last_query_epoch)
            return None

        diagnosis = diagnosis or diagnose(snapshot, self.thresholds)
        if diagnosis.collapsed:  # at chance and not learning: every epoch more is lost, as with divergence
            return Query(reason=_finding(diagnosis, Finding.COLLAPSED))
        if diagnosis.diverging:
            return Query(reason=_finding(diagnosis, Finding.DIVERGING).replace("diverging:", "divergence:", 1))

        epochs_since_query = epoch - (last_query_epoch if last_query_epoch is not None else 0)
        if diagnosis.plateau:
            if last_query_epoch is None or epochs_since_query >= config.plateau_window:
                return Query(reason=_finding(diagnosis, Finding.PLATEAU))
            logger.debug("epoch %d: plateau, but asked %d epochs ago", epoch, epochs_since_query)

        for flagged, finding in ((diagnosis.too_fast, Finding.TOO_FAST), (diagnosis.underfitting, Finding.LEARNING_SLOWLY),
                                (diagnosis.overfitting, Finding.OVERFITTING)):
            if not flagged:
                continue
            if last_query_epoch is None or epochs_since_query >= config.plateau_window:
                return Query(reason=_finding(diagnosis, finding))
            logger.debug("epoch %d: %s, but asked %d epochs ago", epoch, finding, epochs_since_query)

        if math.isfinite(weight_drift) and weight_drift > config.drift_threshold:
            return Query(reason=f"weight drift {weight_drift:.3g} > {config.drift_threshold:g}")

        if config.query_interval > 0 and epochs_since_query >= config.query_interval:
            return Query(reason=f"interval: {epochs_since_query} epochs since last query")

        logger.debug("epoch %d: no query, no trigger (%d epochs since last query)", epoch, epochs_since_query)
        return None


def _finding(diagnosis: Diagnosis, finding: Finding) -> str:
    """The note `diagnose` wrote for `finding` (it starts with the finding's words), or those words alone."""
    return next((note for note in diagnosis.notes if note.startswith(finding)), str(finding))
