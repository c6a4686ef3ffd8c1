"""A response cache: reuse an accepted proposal when the run looks like it did when it was made.

Snapshots become fixed-length, quantised feature vectors (`snapshot_features`); a lookup is a
nearest-neighbour search by Euclidean distance among entries of the same model signature
(model kind and parameter-group names, so a cached proposal never names groups a model lacks)
whose training change still fits the run's research modes (`orchestration.fitting.fit`: no
unfreeze once nothing is frozen, no switch to the activation a layer already has). A snapshot with a
non-finite feature (a NaN or infinite loss, gradient norm, ...) is a diverged state: it never hits and
is never stored, so it cannot be answered with what helped a healthy run.

One cache can serve a whole population (a sweep's trials, through `orchestration.population`):
every entry remembers the run that stored it, so a hit answered for another run is counted
(`shared_hits`). Its methods take a lock, so the coordinators of several runs may use it from
the threads of one actor.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from orchestration.config import CoordinatorConfig
from orchestration.fitting import fit
from orchestration.protocol import Proposal, TrainingSnapshot

logger = logging.getLogger(__name__)

FEATURE_NAMES = (
    "log_loss",
    "loss_trend",
    "generalisation_gap",
    "accuracy",
    "log10_lr",
    "log10_weight_decay",
    "dropout",
    "mean_log10_grad_norm",
    "max_log10_grad_norm",
    "mean_log10_update_ratio",
    "mean_dead_fraction",
    "max_dead_fraction",
)
_LOG_FLOOR = 1e-12  # keeps log() finite for zero losses, norms and ratios
_WEIGHT_DECAY_FLOOR = 1e-6  # weight decay 0 and 1e-6 are treated alike
_TREND_EPOCHS = 3  # loss trend is measured over this many most recent epochs


def snapshot_features(snapshot: TrainingSnapshot, quantum: float) -> np.ndarray:
    """The snapshot as a quantised feature vector of fixed length `len(FEATURE_NAMES)`.

    Features (in `FEATURE_NAMES` order), each in units where ~1 is a large difference:
    `ln L` (latest val loss, train loss if no val), the relative loss change over the last
    `_TREND_EPOCHS` epochs `(L[-1] - L[-k]) / |L[-k]|`, `ln L_val - ln L_train`, the latest val
    accuracy, `log10 lr`, `log10(weight_decay + 1e-6)`, dropout, and per-layer statistics
    aggregated over layers (mean and max of `log10 grad_norm`, mean of `log10 update_ratio`,
    mean and max of `dead_fraction`) so the length does not depend on the number of layers.
    Missing values become 0; non-finite ones stay non-finite (NaN, +-inf), so that `ResponseCache`
    can tell a diverged state from a healthy one (`is_comparable`). Each feature is rounded to a
    multiple of `quantum`: `q(x) = quantum * round(x / quantum)`.
    """
    assert quantum > 0, quantum  # CoordinatorConfig.cache_quantum is checked > 0
    loss_history = snapshot.val_loss or snapshot.train_loss
    loss = _last(loss_history)
    train_loss = _last(snapshot.train_loss)
    val_loss = _last(snapshot.val_loss)
    trend = 0.0
    if len(loss_history) >= 2:
        start = loss_history[-min(_TREND_EPOCHS, len(loss_history))]
        if start is not None and start != 0:
            trend = (loss_history[-1] - start) / abs(start)  # NaN or inf when either end is
    gap = 0.0
    if train_loss is not None and val_loss is not None:
        gap = _safe_log(val_loss) - _safe_log(train_loss)

    hyperparameters = snapshot.hyperparameters
    layers = snapshot.layers
    log_grad_norms = [math.log10(max(layer.grad_norm, _LOG_FLOOR)) for layer in layers]
    log_update_ratios = [math.log10(max(layer.update_ratio, _LOG_FLOOR)) for layer in layers]
    dead_fractions = [layer.dead_fraction for layer in layers]
    raw = [
        _safe_log(loss) if loss is not None else 0.0,
        trend,
        gap,
        _last(snapshot.val_accuracy) or 0.0,
        math.log10(max(hyperparameters.get("lr", 0.0), _LOG_FLOOR)) if "lr" in hyperparameters else 0.0,
        math.log10(max(hyperparameters.get("weight_decay", 0.0), 0.0) + _WEIGHT_DECAY_FLOOR),
        hyperparameters.get("dropout", 0.0),
        _mean(log_grad_norms),
        max(log_grad_norms, default=0.0),
        _mean(log_update_ratios),
        _mean(dead_fractions),
        max(dead_fractions, default=0.0),
    ]
    with np.errstate(invalid="ignore"):
        return np.round(np.asarray(raw, dtype=np.float64) / quantum) * quantum


def is_comparable(features: np.ndarray) -> bool:
    """Whether a feature vector may be matched at all: every feature finite. NaN and inf used to become 0,
    which put a diverged run (NaN loss) at distance 0 from one whose loss is 1."""
    return bool(np.all(np.isfinite(features)))


def model_signature(snapshot: TrainingSnapshot) -> str:
    """The model kind and its parameter-group names; a cached proposal only fits the same signature."""
    return snapshot.model_kind + ":" + ",".join(layer.name for layer in snapshot.layers)


@dataclass(slots=True)
class CacheEntry:
    """One accepted proposal and the features of the snapshot it answered."""

    signature: str
    features: np.ndarray
    proposal: Proposal
    epoch: int
    origin: str = ""  # the run that stored it


class ResponseCache:
    """Nearest-neighbour cache of accepted proposals, keyed by snapshot features.

    A hit is the nearest entry with the same model signature, whose training change fits the asking
    snapshot's modes as it is, at distance `<= similarity`.
    Entries whose proposal is later rejected are evicted; beyond `max_entries` the oldest go.
    """

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state.pop("_lock", None)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._lock = threading.RLock()

    def __init__(self, *, similarity: float, quantum: float, max_entries: int = 256) -> None:
        """Values as `CoordinatorConfig` checked them (build with `from_config`)."""
        self.similarity = similarity
        self.quantum = quantum
        self.max_entries = max_entries
        self.entries: list[CacheEntry] = []
        self.hits = 0
        self.misses = 0
        self.shared_hits = 0  # hits on an entry another run stored
        self._lock = threading.RLock()

    @classmethod
    def from_config(cls, config: CoordinatorConfig) -> ResponseCache:
        return cls(similarity=config.cache_similarity, quantum=config.cache_quantum, max_entries=config.max_cache_entries)

    def __len__(self) -> int:
        return len(self.entries)

    def lookup(self, snapshot: TrainingSnapshot, *, asker: str = "") -> tuple[Proposal | None, float]:
        """The cached proposal for the nearest similar snapshot (or None) and its distance (inf if none)."""
        entry, distance = self.lookup_entry(snapshot, asker=asker)
        return (Proposal.from_dict(entry.proposal.to_dict()) if entry is not None else None), distance

    def lookup_entry(self, snapshot: TrainingSnapshot, *, asker: str = "") -> tuple[CacheEntry | None, float]:
        """The nearest similar entry (or None) and its distance; `asker` is the run asking, so a hit on
        another run's entry counts in `shared_hits`."""
        signature = model_signature(snapshot)
        features = snapshot_features(snapshot, self.quantum)
        if not is_comparable(features):
            with self._lock:
                self.misses += 1
            logger.debug("cache miss at epoch %d: non-finite features %s", snapshot.epoch,
                         [name for name, value in zip(FEATURE_NAMES, features) if not math.isfinite(value)])
            return None, math.inf
        with self._lock:
            best: CacheEntry | None = None
            best_distance = math.inf
            for entry in self.entries:
                if entry.signature != signature or not _fits_modes(entry.proposal, snapshot):
                    continue
                distance = float(np.linalg.norm(entry.features - features))
                if distance < best_distance:
                    best, best_distance = entry, distance
            if best is None or best_distance > self.similarity:
                self.misses += 1
                logger.debug("cache miss at epoch %d, nearest distance %.3g", snapshot.epoch, best_distance)
                return None, best_distance
            self.hits += 1
            if asker and best.origin and best.origin != asker:
                self.shared_hits += 1
        logger.debug("cache hit at epoch %d, distance %.3g: %s", snapshot.epoch, best_distance, best.proposal.summary())
        return dataclasses.replace(best, proposal=Proposal.from_dict(best.proposal.to_dict())), best_distance

    def store(self, snapshot: TrainingSnapshot, proposal: Proposal, *, origin: str = "") -> None:
        """Remember `proposal` as a good answer to `snapshot` (from run `origin`), evicting the oldest entry when full.
        A snapshot with non-finite features is not stored (it could never be matched)."""
        features = snapshot_features(snapshot, self.quantum)
        if not is_comparable(features):
            logger.debug("not caching the answer at epoch %d: non-finite features", snapshot.epoch)
            return
        entry = CacheEntry(
            signature=model_signature(snapshot),
            features=features,
            proposal=Proposal.from_dict(proposal.to_dict()),
            epoch=snapshot.epoch,
            origin=origin,
        )
        with self._lock:
            self.entries.append(entry)
            self.entries = self.entries[-self.max_entries :]

    def merge(self, entries: list[CacheEntry]) -> int:
        """Add the entries not already held (same signature, features and proposal); returns how many came in.
        A run of a population that restarts from its checkpoint brings back what it learned without
        dropping what the other runs stored since."""
        with self._lock:
            held = {_entry_key(entry) for entry in self.entries}
            new = [entry for entry in entries if _entry_key(entry) not in held]
            self.entries = (self.entries + new)[-self.max_entries :]
        return len(new)

    def replace(self, entries: list[CacheEntry]) -> None:
        """Hold exactly `entries` (the newest `max_entries`): a single run rewound to its checkpoint."""
        with self._lock:
            self.entries = list(entries)[-self.max_entries :]

    def evict_proposal(self, proposal: Proposal) -> int:
        """Drop every entry holding `proposal` (e.g. after it was rejected); returns how many went."""
        rejected = proposal.to_dict()
        with self._lock:
            kept = [entry for entry in self.entries if entry.proposal.to_dict() != rejected]
            evicted = len(self.entries) - len(kept)
            self.entries = kept
        if evicted:
            logger.info("evicted %d cache entries holding rejected proposal %s", evicted, proposal.summary())
        return evicted

    def to_state(self) -> dict[str, Any]:
        """JSON-able state: settings, counters and entries."""
        with self._lock:
            entries = list(self.entries)
        return {
            "similarity": self.similarity,
            "quantum": self.quantum,
            "max_entries": self.max_entries,
            "hits": self.hits,
            "misses": self.misses,
            "shared_hits": self.shared_hits,
            "entries": [
                {
                    "signature": entry.signature,
                    "features": entry.features.tolist(),
                    "proposal": entry.proposal.to_dict(),
                    "epoch": entry.epoch,
                    "origin": entry.origin,
                }
                for entry in entries
            ],
        }

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> ResponseCache:
        """Rebuild from `to_state` output."""
        cache = cls(similarity=state["similarity"], quantum=state["quantum"], max_entries=state["max_entries"])
        cache.hits = state["hits"]
        cache.misses = state["misses"]
        cache.shared_hits = state.get("shared_hits", 0)
        cache.entries = [
            CacheEntry(
                signature=entry["signature"],
                features=np.asarray(entry["features"], dtype=np.float64),
                proposal=Proposal.from_dict(entry["proposal"]),
                epoch=entry["epoch"],
                origin=entry.get("origin", ""),
            )
            for entry in state["entries"]
        ]
        return cache


def _entry_key(entry: CacheEntry) -> tuple[str, tuple[float, ...], str]:
    return entry.signature, tuple(entry.features.tolist()), json.dumps(entry.proposal.to_dict(), sort_keys=True)


def _fits_modes(proposal: Proposal, snapshot: TrainingSnapshot) -> bool:
    """Whether the proposal's training change applies unchanged in this snapshot's modes: the modes move on
    (blocks thaw, an activation was switched, the curriculum is off in another run of the population)."""
    if proposal.training.is_empty():
        return True
    _, done = fit(proposal.training, snapshot.modes_view())
    return not done


def _last(history: Sequence[float]) -> float | None:
    return history[-1] if history else None


def _safe_log(value: float) -> float:
    """`ln value`, floored at `_LOG_FLOOR`; NaN and +inf stay what they are."""
    return math.log(max(value, _LOG_FLOOR)) if math.isfinite(value) else value


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values) if values else 0.0
