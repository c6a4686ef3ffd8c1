"""LLM-guided explore for PBT: the advisor proposes the configuration an exploited trial continues with.

Ray calls `custom_explore_fn(config)` synchronously inside the Tune loop, with a copy of the top
trial's config already perturbed by PBT and no metrics. A CPU LLM answers in 10-20 s, so the
explorer *asks ahead*: after every trial result it keeps the population table up to date and, when
no question is in flight, sends the advisor a snapshot of the current top trial with the table
(each trial's config, score and trend, and past explores with their outcome). At explore time it
uses the newest answer that is ready and in the search space's bounds; otherwise PBT's own
perturbation stands. Every decision is recorded: the source (`llm` or `fallback`), PBT's config,
the proposal, the config used, and why a proposal was not used.
"""

from __future__ import annotations

import json
import logging
import math
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from orchestration.protocol import ProposalOutcome, TrainingSnapshot
from tune_search.config import TuneConfig, distribution
from tune_search.search import ClipToSpace, mutable_keys

logger = logging.getLogger(__name__)

# Search-space keys the advisor's hyperparameter change can address, and how.
_ADVISED = {"train.lr": "lr_scale", "train.weight_decay": "weight_decay", "model.dropout": "dropout", "train.momentum": "momentum"}


@dataclass(kw_only=True)
class TrialRecord:
    config: dict[str, Any]
    scores: list[float] = field(default_factory=list)
    val_loss: list[float] = field(default_factory=list)
    epoch: float = 0.0


def in_bounds(key: str, value: Any, spec: dict[str, Any]) -> bool:
    kind, argument = distribution(spec)
    if kind in ("loguniform", "uniform"):
        return isinstance(value, (int, float)) and math.isfinite(value) and argument[0] <= value <= argument[1]
    return value in argument


def proposal_config(proposal: Any, top_config: dict[str, Any], pbt_config: dict[str, Any], config: TuneConfig) -> tuple[dict[str, Any] | None, str]:
    """PBT's config with the advisor's change applied to the top trial's values, or `(None, why)` if the
    proposal addresses nothing in the space or leaves its bounds."""
    change = proposal.hyperparameters
    explored = dict(pbt_config)
    touched = []
    for key in mutable_keys(config):
        field_name = _ADVISED.get(key)
        value = getattr(change, field_name, None) if field_name else None
        if value is None:
            continue
        explored[key] = top_config[key] * value if field_name == "lr_scale" else value
        touched.append(key)
        if not in_bounds(key, explored[key], config.space[key]):
            return None, f"{key}={explored[key]!r} is outside the search space {config.space[key]}"
    if not touched:
        return None, "the proposal changes no key of the search space"
    return explored, ""


class LLMExplorer:
    """PBT's `custom_explore_fn` (`__call__`) plus the bookkeeping a Tune callback feeds it (`observe`)."""

    def __init__(self, config: TuneConfig, advisor_factory: Any, log_path: Path) -> None:
        self.config = config
        self.advisor_factory = advisor_factory  # () -> anything with submit(snapshot) -> Future (serve_llm clients)
        self.advisor: Any = None  # built on first use, in the Tune driver
        self.log_path = Path(log_path)
        self.trials: dict[str, TrialRecord] = {}
        self.explores: list[dict[str, Any]] = []
        self.clip = ClipToSpace(config)
        self._pending: tuple[float, str, Future] | None = None  # (asked at, top trial, answer)
        self._ready: tuple[float, str, Any] | None = None
        self._lock = threading.Lock()

    # --- fed by the Tune callback after every trial result --------------------------------------

    def observe(self, trial_id: str, config: dict[str, Any], result: dict[str, Any]) -> None:
        record = self.trials.setdefault(trial_id, TrialRecord(config=dict(config)))
        record.config = {key: value for key, value in config.items() if key in self.config.space}
        score = result.get(self.config.metric)
        if isinstance(score, (int, float)) and math.isfinite(score):
            record.scores.append(float(score))
        if isinstance(result.get("val_loss"), (int, float)):
            record.val_loss.append(float(result["val_loss"]))
        record.epoch = float(result.get("epoch", record.epoch))
        self._collect()
        if self._pending is None and len(self.trials) >= 2:
            self._ask()

    def _top(self) -> tuple[str, TrialRecord] | None:
        sign = 1.0 if self.config.mode == "max" else -1.0
        scored = [(trial_id, record) for trial_id, record in self.trials.items() if record.scores]
        return max(scored, key=lambda item: sign * item[1].scores[-1]) if scored else None

    def snapshot(self) -> TrainingSnapshot | None:
        """The top trial's state for the advisor, with the population table as its track record."""
        top = self._top()
        if top is None:
            return None
        trial_id, record = top
        table = []
        for other_id, other in sorted(self.trials.items()):
            if not other.scores:
                continue
            trend = other.scores[-1] - other.scores[-2] if len(other.scores) >= 2 else 0.0
            settings = ", ".join(f"{key}={value:.3g}" if isinstance(value, float) else f"{key}={value}" for key, value in other.config.items())
            table.append(ProposalOutcome(epoch=int(other.epoch), summary=f"trial {other_id[-5:]}: {settings}; trend {trend:+.3f}",
                                         verdict="top" if other_id == trial_id else "population", reward=other.scores[-1]))
        for explore in self.explores[-3:]:
            table.append(ProposalOutcome(epoch=int(explore.get("epoch", 0)), summary=f"explore {explore['summary']}", verdict=explore["source"],
                                         reward=None))
        hyperparameters = {"lr": float(record.config.get("train.lr", 0.0)), "weight_decay": float(record.config.get("train.weight_decay", 0.0)),
                           "dropout": float(record.config.get("model.dropout", 0.0)), "momentum": float(record.config.get("train.momentum", 0.0))}
        return TrainingSnapshot(run_id=f"population:{trial_id}", epoch=int(record.epoch), train_loss=[], val_loss=record.val_loss[-8:],
                                val_accuracy=record.scores[-8:] if self.config.metric == "val_accuracy" else [],
                                hyperparameters=hyperparameters, recent_proposals=table)

    def _ask(self) -> None:
        snapshot = self.snapshot()
        top = self._top()
        if snapshot is None or top is None:
            return
        try:
            self.advisor = self.advisor or self.advisor_factory()
            self._pending = (time.monotonic(), top[0], self.advisor.submit(snapshot))
        except Exception as error:  # noqa: BLE001 - a broken advisor must not stop the sweep
            logger.warning("explore query failed: %s", error)

    def _collect(self) -> None:
        if self._pending is not None and self._pending[2].done():
            asked_at, top_id, future = self._pending
            self._pending = None
            try:
                self._ready = (asked_at, top_id, future.result())
            except Exception as error:  # noqa: BLE001
                logger.warning("explore answer failed: %s", error)

    def __getstate__(self) -> dict[str, Any]:
        """Tune pickles its scheduler with the experiment (for resume): keep the record, not the live parts."""
        state = dict(self.__dict__)
        state.update(advisor=None, _pending=None, _ready=None, _lock=None)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()

    # --- PBT's custom_explore_fn -------------------------------------------------------------------

    def __call__(self, pbt_config: dict[str, Any]) -> dict[str, Any]:
        """The config the exploited trial continues with: the advisor's (if ready and in bounds) or PBT's."""
        with self._lock:
            if self._pending is not None and self.config.explore_timeout_s > 0:
                try:
                    self._pending[2].result(timeout=self.config.explore_timeout_s)
                except Exception:  # noqa: BLE001 - late or failed: the fallback below says so
                    pass
            self._collect()
            ready, self._ready = self._ready, None
            top = self.trials.get(ready[1]) if ready else None
            chosen, source, problem, proposed = self.clip(pbt_config), "fallback", "no advisor answer ready", None
            if ready is not None and top is not None:
                answer = ready[2]
                proposal = getattr(answer, "proposal", None)
                if getattr(answer, "status", "") not in ("valid", "clamped") or proposal is None:
                    problem = f"advisor answer unusable (status {getattr(answer, 'status', '?')})"
                else:
                    explored, problem = proposal_config(proposal, top.config, pbt_config, self.config)
                    proposed = proposal.summary()
                    if explored is not None:
                        chosen, source = explored, "llm"
            keys = [key for key in self.config.space if key in pbt_config]
            decision = {"time": time.time(), "source": source, "problem": problem, "proposal": proposed,
                        "pbt_config": {key: pbt_config[key] for key in keys}, "config": {key: chosen[key] for key in keys},
                        "summary": ", ".join(f"{key}={chosen[key]:.3g}" if isinstance(chosen[key], float) else f"{key}={chosen[key]}" for key in keys)}
            self.explores.append(decision)
            with open(self.log_path, "a") as log:
                log.write(json.dumps(decision, default=str) + "\n")
            if source == "fallback":
                logger.info("explore fell back to PBT's perturbation: %s", problem)
            return dict(chosen)
