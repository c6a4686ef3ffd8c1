"""LLM-guided explore for PBT: the advisor proposes the configuration an exploited trial continues with.

Ray calls `custom_explore_fn(config)` synchronously inside the Tune loop, with a copy of the top
trial's config already perturbed by PBT and no metrics. A CPU LLM answers in 10-20 s, so the
explorer *asks ahead*: after every trial result it keeps the population table up to date and, when
no question is in flight, sends the advisor a snapshot of the current top trial with the table
(each trial's config, score and trend, and past explores with their outcome). At explore time it
uses the newest answer that is ready (waiting at most `tune.explore_timeout_s`, half a second by
default, for one in flight: Tune processes no result meanwhile) and in the search space's bounds;
otherwise PBT's own perturbation stands (`decide_explore`, a pure decision). Every decision is recorded: the source (`llm` or `fallback`), PBT's config,
the proposal, the config used, and why a proposal was not used.
"""

from __future__ import annotations

import concurrent.futures
import json
import logging
import math
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

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
        """The config the exploited trial continues with: the advisor's (if ready and in bounds) or PBT's.

        Tune calls this inside its event loop, where no trial's result is processed until it returns: it
        waits at most `tune.explore_timeout_s` (0.5 s by default) for an answer still in flight, never
        longer, and an answer not ready by then is a recorded fallback to PBT's perturbation.
        """
        with self._lock:
            started = time.monotonic()
            pending = self._pending
            if pending is not None and self.config.explore_timeout_s > 0:
                concurrent.futures.wait([pending[2]], timeout=self.config.explore_timeout_s)
            self._collect()
            ready, self._ready = self._ready, None
            top = self.trials.get(ready[1]) if ready is not None else None
            decision = decide_explore(None if ready is None else ready[2], top.config if top is not None else None, pbt_config, self.config,
                                      clipped=self.clip(pbt_config), in_flight_s=None if self._pending is None else started - self._pending[0])
            self._record(decision, pbt_config, waited_s=time.monotonic() - started)
            return dict(decision.config)

    def _record(self, decision: ExploreDecision, pbt_config: dict[str, Any], *, waited_s: float) -> None:
        keys = [key for key in self.config.space if key in pbt_config]
        chosen = decision.config
        row = {"time": time.time(), "source": decision.source, "problem": decision.problem, "proposal": decision.proposal,
               "waited_s": round(waited_s, 4), "pbt_config": {key: pbt_config[key] for key in keys}, "config": {key: chosen[key] for key in keys},
               "summary": ", ".join(f"{key}={chosen[key]:.3g}" if isinstance(chosen[key], float) else f"{key}={chosen[key]}" for key in keys)}
        self.explores.append(row)
        with open(self.log_path, "a") as log:
            log.write(json.dumps(row, default=str) + "\n")
        if decision.source == "fallback":
            logger.info("explore fell back to PBT's perturbation: %s", decision.problem)


@dataclass(frozen=True, kw_only=True, slots=True)
class ExploreDecision:
    """What one PBT explore used: `source` "llm" (the advisor's proposal) or "fallback" (PBT's own, clipped), and why."""

    source: Literal["llm", "fallback"]
    config: dict[str, Any]
    problem: str = ""  # why the advisor's proposal was not used; empty for "llm"
    proposal: str | None = None  # the advisor's proposal, summarised, when there was one


def decide_explore(answer: Any, top_config: dict[str, Any] | None, pbt_config: dict[str, Any], config: TuneConfig, *,
                   clipped: dict[str, Any], in_flight_s: float | None) -> ExploreDecision:
    """The explore decision from what is at hand now: a ready `answer` (asked about the trial whose config is
    `top_config`), or none, with a question `in_flight_s` seconds old or none at all. Pure: it waits for nothing.

    The advisor's proposal is used when it is usable and lands inside the search space; otherwise PBT's
    perturbation (`clipped` into the space) stands, with the reason.
    """
    if answer is None or top_config is None:
        problem = ("advisor answer not ready (asked {:.1f} s ago)".format(in_flight_s) if in_flight_s is not None
                   else "no advisor answer in flight (none asked yet, or the last question failed: see the log)")
        return ExploreDecision(source="fallback", config=clipped, problem=problem)
    proposal = getattr(answer, "proposal", None)
    status = getattr(answer, "status", "?")
    if status not in ("valid", "clamped") or proposal is None:
        return ExploreDecision(source="fallback", config=clipped, problem=f"advisor answer unusable (status {status})")
    explored, problem = proposal_config(proposal, top_config, pbt_config, config)
    if explored is None:
        return ExploreDecision(source="fallback", config=clipped, problem=problem, proposal=proposal.summary())
    return ExploreDecision(source="llm", config=explored, proposal=proposal.summary())
