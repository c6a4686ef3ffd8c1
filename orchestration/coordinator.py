"""The coordinator: decides when to ask the advisor, what to apply, and whether it helped.

`Coordinator` is plain Python, unit-testable without Ray. The trainer (rank 0) talks to it at
every epoch boundary:

1. `on_epoch_end(snapshot, weight_drift)` returns a `Decision`: `Continue(reason)` or
   `Apply(query_id, proposal, alphas, ...)`. Queries are asynchronous: the advisor's answer is
   picked up at a later epoch boundary while training goes on; at most one query is in flight.
2. After an `Apply`, the trainer blends the proposal in (`workers.blending`), trains
   `probation_steps`, and calls `report_probation(query_id, candidate, reference)`, which returns
   the `Verdict`; on rejection the trainer rolls back. If the proposal cannot be applied at all it
   calls `report_apply_failed(query_id, problem)`. No new query starts until one of them is called.

`orchestration.actor.CoordinatorActor` is the Ray actor around it, and only forwards calls. The
messages (`TrainingSnapshot`, `Decision`, `ProbationMetrics`, `Verdict`) live in
`orchestration.protocol`; the advisor is anything with `submit(snapshot) -> Future`, handed in by
whoever builds the coordinator, so this module imports neither Ray nor the advisor's package.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import logging
import math
import zlib
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol

from orchestration.acceptance import judge
from orchestration.alphas import AlphaController
from orchestration.cache import ResponseCache
from orchestration.config import CoordinatorConfig
from orchestration.diagnostics import DiagnosticThresholds, diagnose
from orchestration.ledger import InterventionRecord, Ledger, RecordKind, to_json
from orchestration.menu import action_of, build_menu, finding_present, neuron_group_keys
from orchestration.policy import QueryPolicy
from orchestration.protocol import (
    AdvisorResponse,
    Apply,
    Continue,
    Decision,
    Diagnosis,
    ProbationMetrics,
    Proposal,
    ProposalOutcome,
    TrainingSnapshot,
    Verdict,
)
from orchestration.triage import triage

logger = logging.getLogger(__name__)

_PROMPT_REWARD_LIMIT = 10.0  # rewards shown to the advisor are clipped to +-this (keeps JSON finite)
_TRACK_RECORD_LENGTH = 64  # outcomes kept for the per-action track record (the prompt shows the last few)


class AdvisorPort(Protocol):
    """Anything that answers snapshots asynchronously (`serve_llm.client` clients, test fakes).

    `submit` never raises; timeouts and failures come back as `AdvisorResponse`s with that status.
    """

    def submit(self, snapshot: TrainingSnapshot) -> Future[AdvisorResponse]: ...


@dataclass(slots=True)
class _PendingQuery:
    query_id: str
    epoch: int
    snapshot: TrainingSnapshot  # as sent to the advisor
    future: Future[AdvisorResponse]


@dataclass(slots=True)
class _OnProbation:
    query_id: str
    epoch: int
    snapshot: TrainingSnapshot  # the snapshot the proposal answers (cache key if accepted)
    proposal: Proposal
    groups: list[str] = field(default_factory=list)
    source: Literal["advisor", "cache"] = "advisor"


@dataclass(frozen=True, slots=True)
class Source:
    """Where the answer to a query comes from (`choose_source`): `keep` (nothing on the menu answers a finding,
    so the menu's "keep" is the answer and no one is asked), `cache` (a similar snapshot's accepted answer) or
    `ask` (the advisor). `proposal` is the keep option or the cached answer; `reason` says why, for the ledger."""

    kind: Literal["keep", "cache", "ask"]
    reason: str
    proposal: Proposal | None = None


def choose_source(prompt: TrainingSnapshot, *, config: CoordinatorConfig, cache: ResponseCache, asker: str) -> Source:
    """Keep, use the cache, or ask the advisor, for the query `prompt` (its menu built) of run `asker`.

    Keeping comes first: asking a model for "keep" would cost seconds of the cores training uses
    (`ask_when_healthy` asks anyway). Then the cache, whose lookup counts a hit or a miss; nothing else changes.
    """
    if config.advice_mode == "choose" and not config.ask_when_healthy and not any(option.remedy for option in prompt.menu):
        logger.debug("epoch %d: no finding on the menu; kept without asking", prompt.epoch)
        return Source("keep", "no finding to answer, kept without asking the advisor (coordinator.ask_when_healthy)",
                      Proposal.from_dict(prompt.menu[0].proposal))
    if not config.cache_enabled:
        return Source("ask", "cache off")
    entry, distance = cache.lookup_entry(prompt, asker=asker)
    if entry is None:
        return Source("ask", f"no similar answer cached (nearest at distance {distance:.3g})")
    learned = f"answer learned by run {entry.origin}; " if entry.origin and entry.origin != asker else ""
    return Source("cache", f"{learned}cache distance {distance:.3g}", entry.proposal)


def cap_lr_scale(proposal: Proposal, *, lr_factor: float, max_lr_factor: float) -> tuple[Proposal, str]:
    """`proposal` with its lr raise cut so the schedule's peak stays within `max_lr_factor` times the configured lr,
    and what was done ("" when the cap does not bind): `(capped, note)`.

    The peak after the change is `lr_factor * lr_scale` (of train.lr); a raise past the cap becomes
    `lr_scale = max(1, max_lr_factor / lr_factor)`, so it reaches the cap and never turns into a cut, and a scale of 1
    leaves lr alone (`None`). Cuts are never touched; `max_lr_factor` 0 (or a non-finite `lr_factor`) changes nothing.
    """
    scale = proposal.hyperparameters.lr_scale
    if max_lr_factor <= 0 or scale is None or scale <= 1 or not math.isfinite(lr_factor) or lr_factor <= 0:
        return proposal, ""
    if lr_factor * scale <= max_lr_factor * (1 + 1e-9):
        return proposal, ""
    allowed = max(1.0, max_lr_factor / lr_factor)
    capped = dataclasses.replace(proposal, hyperparameters=dataclasses.replace(proposal.hyperparameters,
                                                                                lr_scale=None if allowed == 1.0 else allowed))
    note = (f"lr_scale {scale:g} capped to {allowed:g}: lr would reach {lr_factor * scale:g}x train.lr, "
            f"coordinator.max_lr_factor is {max_lr_factor:g} (now at {lr_factor:g}x)")
    return capped, note


def probation_steps(proposal: Proposal, at: TrainingSnapshot, config: CoordinatorConfig) -> int:
    """Optimizer steps to try `proposal` for: `probation_steps`, or for a restart at least `rescue_probation_epochs` epochs
    of the run's steps (`at.step / at.epoch` a epoch), long enough for a restarted net to show that it learns again."""
    if not proposal.restart or at.epoch <= 0 or at.step <= 0:
        return config.probation_steps
    return max(config.probation_steps, math.ceil(config.rescue_probation_epochs * at.step / at.epoch))


def _still_found(asked: TrainingSnapshot, now: Diagnosis) -> bool:
    """Whether a finding the query `asked` about is present in the diagnosis `now` (any finding, without a menu)."""
    remedies = {option.remedy for option in asked.menu if option.remedy}
    return any(finding_present(now, remedy) for remedy in remedies) if remedies else now.has_findings()


class Coordinator:
    """Decides when to ask, what to apply and whether it helped; records every decision."""

    def __init__(self, config: CoordinatorConfig, advisor: AdvisorPort | None, run_id: str = "run", *,
                 cache: ResponseCache | None = None) -> None:
        """`cache`: a response cache shared with other runs (a population's); by default the run has its own."""
        self.config = config
        self.advisor = advisor
        self.run_id = run_id
        self.policy = QueryPolicy(config)
        self.shares_cache = cache is not None
        self.cache = cache if cache is not None else ResponseCache.from_config(config)
        self.alphas = AlphaController.from_config(config)
        self.thresholds = DiagnosticThresholds.from_config(config)
        self.ledger = Ledger()
        self.outcomes: list[ProposalOutcome] = []
        self.last_query_epoch: int | None = None
        self.query_count = 0
        self._pending: _PendingQuery | None = None
        self._on_probation: _OnProbation | None = None

    @property
    def in_flight(self) -> bool:
        """True while a query awaits its answer or a proposal awaits its verdict."""
        return self._pending is not None or self._on_probation is not None

    # --- the epoch-boundary protocol ------------------------------------------------------

    def on_epoch_end(self, snapshot: TrainingSnapshot, weight_drift: float = 0.0) -> Decision:
        """What the trainer should do at this epoch boundary.

        `weight_drift` is `||W - W_q|| / ||W_q||` over all parameters, where `W_q` are the weights at
        the epoch the coordinator last asked (a decision with `asked_now` tells the workers to take
        a new `W_q`; before the first query, the weights of the first advised epoch).
        Picks up a finished answer first (dropping stale, invalid, timed-out or failed ones, each
        recorded); otherwise asks the query policy and, on a query, tries the cache before the advisor.
        """
        if self.advisor is None:
            logger.debug("epoch %d: advisor disabled", snapshot.epoch)
            return Continue("advisor disabled")
        probation = self._on_probation
        if probation is not None:
            # A probation the trainer replays its epoch over (it restarted from an earlier
            # checkpoint) or leaves unreported too long was lost with a worker: close it, or no
            # query would ever start again.
            replayed = snapshot.epoch <= probation.epoch
            if replayed or snapshot.epoch - probation.epoch > self.config.max_answer_age_epochs:
                self._on_probation = None
                why = "the trainer restarted before reporting it" if replayed else f"unreported after {snapshot.epoch - probation.epoch} epochs"
                self._record("error", epoch=snapshot.epoch, step=snapshot.step, query_id=probation.query_id, proposal=probation.proposal,
                             reason=f"probation abandoned: {why}")
        diagnosis = diagnose(snapshot, self.thresholds)  # read once: a late pick is checked against it, the policy decides by it
        if self._pending is not None:
            decision = self._collect_answer(snapshot, diagnosis)
            if decision is not None:
                return decision
        query = self.policy.decide(
            snapshot, last_query_epoch=self.last_query_epoch, weight_drift=weight_drift, in_flight=self.in_flight, diagnosis=diagnosis
        )
        if query is None:
            return Continue("waiting" if self.in_flight else "no query trigger")
        return self._ask(dataclasses.replace(snapshot, diagnosis=diagnosis), query.reason)

    def report_probation(
        self,
        query_id: str,
        candidate: ProbationMetrics,
        reference: ProbationMetrics,
        *,
        epoch: int | None = None,
        step: int = 0,
    ) -> Verdict:
        """Judge the proposal on probation, record the verdict (and the rollback if rejected),
        adapt the alphas of the groups it touched, and update the cache and the track record."""
        probation = self._take_probation(query_id)
        verdict = judge(candidate, reference, self.config)
        verdict_name = "accepted" if verdict.accepted else "rejected"
        new_alphas = self.alphas.update(probation.groups, verdict.accepted)
        record_epoch = probation.epoch if epoch is None else epoch
        self._record(
            "verdict",
            epoch=record_epoch,
            step=step,
            reason=verdict.reason,
            query_id=query_id,
            proposal=probation.proposal,
            alphas=new_alphas,
            reward=verdict.reward,
            verdict=verdict_name,
        )
        if verdict.accepted:
            if self.config.cache_enabled and probation.source == "advisor":
                self.cache.store(probation.snapshot, probation.proposal, origin=self.run_id)
        else:
            self._record(
                "rollback",
                epoch=record_epoch,
                step=step,
                reason="restore the pre-apply weights, optimizer state and hyperparameters",
                query_id=query_id,
                proposal=probation.proposal,
            )
            self.cache.evict_proposal(probation.proposal)
        summary = probation.proposal.summary()
        self._remember_outcome(
            probation.epoch,
            f"(cached) {summary}" if probation.source == "cache" else summary,
            verdict_name,
            verdict.reward,
            action=action_of(probation.proposal),
        )
        logger.info("proposal %s %s: %s", query_id, verdict_name, verdict.reason)
        return verdict

    def report_apply_failed(self, query_id: str, problem: str, *, epoch: int | None = None, step: int = 0) -> None:
        """Record that the trainer could not apply the proposal at all; nothing to judge or roll back."""
        probation = self._take_probation(query_id)
        self._record(
            "error",
            epoch=probation.epoch if epoch is None else epoch,
            step=step,
            reason=f"could not apply: {problem}",
            query_id=query_id,
            proposal=probation.proposal,
        )

    def report_incident(self, problem: str, *, epoch: int, step: int = 0, query_id: str = "") -> None:
        """Record a problem the workers met on the advice path (a change they could not make, an
        error that stopped advice); it lands in the ledger and the summary's `errors` count."""
        self._record("error", epoch=epoch, step=step, reason=problem, query_id=query_id)

    # --- reporting and state ----------------------------------------------------------------

    def summary_counts(self) -> dict[str, int]:
        """Totals for metrics (queries, cache hits, accepted/rejected/invalid proposals, ...)."""
        return self.ledger.counts()

    def telemetry(self) -> dict[str, Any]:
        """What the live metrics show of the advisor: the ledger's totals, the latest answer's latency, and the
        alpha of every group a verdict has moved so far."""
        latencies = [record.latency_s for record in self.ledger.records if record.latency_s is not None]
        return {"counts": self.ledger.counts(), "latency_s": latencies[-1] if latencies else None, "alphas": dict(self.alphas.alphas)}

    def ledger_records(self) -> list[dict[str, Any]]:
        """The ledger as JSON-able rows."""
        return self.ledger.to_state()

    def write_ledger(self, path: str | Path) -> str:
        """Write the ledger as CSV; returns the path written."""
        return str(self.ledger.write_csv(path))

    def to_state(self) -> dict[str, Any]:
        """JSON-able state carried by a restart or a PBT exploit.

        An unanswered query or a proposal still on probation is not carried: it belongs to the
        weights it was made for. Their ids are, so that `load_state` can record that they were dropped.
        """
        return {
            "in_flight": [item.query_id for item in (self._pending, self._on_probation) if item is not None],
            "run_id": self.run_id,
            "query_count": self.query_count,
            "last_query_epoch": self.last_query_epoch,
            "outcomes": [dataclasses.asdict(outcome) for outcome in self.outcomes],
            "alphas": self.alphas.to_state(),
            "cache": self.cache.to_state(),
            "ledger": self.ledger.to_state(),
        }

    def load_state(self, state: dict[str, Any]) -> None:
        """Take over `to_state` output. The current config's settings win; learned values carry."""
        self.query_count = int(state["query_count"])
        self.last_query_epoch = state["last_query_epoch"]
        self.outcomes = [ProposalOutcome(**outcome) for outcome in state["outcomes"]]
        self.alphas.alphas = {
            group: min(max(float(alpha), self.alphas.alpha_min), self.alphas.alpha_max) if alpha else 0.0
            for group, alpha in state["alphas"]["alphas"].items()
        }
        cache = ResponseCache.from_state(state["cache"])
        if cache.quantum != self.cache.quantum:
            logger.warning("dropping %d cache entries built with another quantum (%g)", len(cache), cache.quantum)
        elif self.shares_cache:
            # The population's cache holds what every run learned: add this run's, keep the others'.
            self.cache.merge(cache.entries)
        else:
            self.cache.replace(cache.entries)
            self.cache.hits, self.cache.misses, self.cache.shared_hits = cache.hits, cache.misses, cache.shared_hits
        self.ledger = Ledger.from_state(state["ledger"])
        self._pending = None
        self._on_probation = None
        for query_id in state.get("in_flight", []):
            self._record("stale", epoch=self.last_query_epoch or 0, query_id=query_id, step=0,
                         reason="abandoned: the run continued from a checkpoint taken while this was in flight")

    @classmethod
    def from_state(
        cls, state: dict[str, Any], *, config: CoordinatorConfig, advisor: AdvisorPort | None, run_id: str | None = None
    ) -> Coordinator:
        """A coordinator built from `config` that carries `state` (see `load_state`)."""
        coordinator = cls(config, advisor, run_id if run_id is not None else state["run_id"])
        coordinator.load_state(state)
        return coordinator

    # --- internals ----------------------------------------------------------------------------

    def _ask(self, snapshot: TrainingSnapshot, reason: str) -> Decision:
        """Keep, answer from the cache or submit to the advisor, as `choose_source` decides; each leaves a ledger row."""
        assert self.advisor is not None and not self.in_flight
        self.query_count += 1
        query_id = f"{self.run_id}:q{self.query_count}"
        self.last_query_epoch = snapshot.epoch
        prompt = self._prompt_snapshot(snapshot)
        if self.config.advice_mode == "choose":
            prompt.menu = build_menu(prompt, snapshot.diagnosis or diagnose(snapshot, self.thresholds),
                                     self.outcomes if self.config.track_record else ())
        source = choose_source(prompt, config=self.config, cache=self.cache, asker=self.run_id)
        if source.kind == "keep":  # recorded like an answer, so the ledger shows the look
            self._record("kept", epoch=snapshot.epoch, step=snapshot.step, query_id=query_id, proposal=source.proposal,
                         reason=f"{reason}; {source.reason}")
            return Continue(f"kept without asking ({query_id}): no finding", asked_now=True)
        if source.kind == "cache":
            assert source.proposal is not None
            self._record("cache_hit", epoch=snapshot.epoch, step=snapshot.step, reason=f"{reason}; {source.reason}", query_id=query_id,
                         proposal=source.proposal)
            return self._start_probation(query_id, source.proposal, prompt, source="cache", at=snapshot)
        self._record("query", epoch=snapshot.epoch, step=snapshot.step, reason=reason, query_id=query_id)
        try:
            future = self.advisor.submit(prompt)
        except Exception as error:  # noqa: BLE001 - a broken client must not stop training
            logger.exception("advisor submit failed for %s", query_id)
            self._record(
                "error", epoch=snapshot.epoch, step=snapshot.step, reason=f"submit failed: {error!r}", query_id=query_id
            )
            return Continue(f"advisor submit failed: {error!r}")
        self._pending = _PendingQuery(query_id=query_id, epoch=snapshot.epoch, snapshot=prompt, future=future)
        return Continue(f"asked advisor ({query_id}): {reason}", asked_now=True)

    def _collect_answer(self, snapshot: TrainingSnapshot, diagnosis: Diagnosis) -> Decision | None:
        """An `Apply` for a usable answer, `Continue` while waiting, None once an answer is dropped."""
        pending = self._pending
        assert pending is not None
        age = snapshot.epoch - pending.epoch
        wait_s = self.config.wait_for_answer_s
        if pending.snapshot.diagnosis is not None and pending.snapshot.diagnosis.has_findings() and _still_found(pending.snapshot, diagnosis):
            # Only while a finding the query was about is still there: otherwise the answer would come to be dropped.
            wait_s = max(wait_s, self.config.wait_on_findings_s)
        if not pending.future.done() and wait_s > 0:
            # Hold this epoch boundary until the answer comes (or the wait ends): always for wait_for_answer_s,
            # for wait_on_findings_s only while the query's finding is still there.
            concurrent.futures.wait([pending.future], timeout=wait_s)
        if not pending.future.done():
            if age <= self.config.max_answer_age_epochs:
                logger.debug("epoch %d: still waiting for %s (%d epochs)", snapshot.epoch, pending.query_id, age)
                return Continue(f"waiting for advisor answer {pending.query_id}")
            pending.future.cancel()
            self._pending = None
            self._drop("stale", snapshot, pending, f"no answer after {age} epochs; abandoned", None)
            return None
        self._pending = None
        try:
            answer = pending.future.result()
        except Exception as error:  # noqa: BLE001 - clients should not raise, but a fake or a bug may
            self._drop("error", snapshot, pending, f"advisor future raised {error!r}", None)
            return None
        outcome = triage(answer, age_epochs=age, config=self.config)
        chosen = next((option for option in pending.snapshot.menu if option.key == answer.choice), None)
        if outcome.kind == "usable" and chosen is not None and chosen.remedy:
            # A pick answers a finding: taken late, it must still answer one now.
            if not finding_present(diagnosis, chosen.remedy):
                self._drop("stale", snapshot, pending, f"the finding it answered ({chosen.remedy}) is gone after {age} epochs", answer)
                return None
        if outcome.kind == "noop":
            self._record("proposal", epoch=snapshot.epoch, step=snapshot.step, reason=outcome.reason, query_id=pending.query_id,
                         proposal=outcome.proposal, answer=answer)
            return None
        if outcome.kind != "usable":
            self._drop(outcome.kind, snapshot, pending, outcome.reason, answer)
            return None
        return self._start_probation(pending.query_id, outcome.proposal, pending.snapshot, source="advisor", at=snapshot, answer=answer)

    def _start_probation(
        self,
        query_id: str,
        proposal: Proposal,
        answered_snapshot: TrainingSnapshot,
        *,
        source: Literal["advisor", "cache"],
        at: TrainingSnapshot,
        answer: AdvisorResponse | None = None,
    ) -> Decision:
        """Put `proposal` on probation (an `Apply`), its lr raise capped first (`cap_lr_scale`); a proposal the cap
        leaves nothing of is recorded and training continues."""
        proposal, capped = cap_lr_scale(proposal, lr_factor=at.lr_factor, max_lr_factor=self.config.max_lr_factor)
        if capped and proposal.is_noop():
            self._record("proposal", epoch=at.epoch, step=at.step, reason=f"{capped}; nothing else to apply", query_id=query_id,
                         proposal=proposal, answer=answer)
            return Continue(f"{query_id}: {capped}", asked_now=source == "cache")  # a cache hit answers a query made now
        neuron_groups = at.modes_view().neuron_groups if self.config.neuron_groups else {}
        alphas = self.alphas.for_proposal(proposal, expand=lambda group: neuron_group_keys(group, neuron_groups))
        groups = list(alphas)
        self._record(
            "proposal",
            epoch=at.epoch,
            step=at.step,
            reason=f"{proposal.reason}; {capped}" if capped else proposal.reason,
            query_id=query_id,
            proposal=proposal,
            alphas=alphas,
            answer=answer,
        )
        self._on_probation = _OnProbation(
            query_id=query_id,
            epoch=at.epoch,
            snapshot=answered_snapshot,
            proposal=proposal,
            groups=groups,
            source=source,
        )
        return Apply(
            query_id=query_id,
            proposal=proposal,
            alphas=alphas,
            source=source,
            epoch_asked=answered_snapshot.epoch,
            probation_steps=probation_steps(proposal, at, self.config),
            reward_mode=self.config.reward_mode,
            reset_optimizer_moments=self.config.reset_optimizer_moments,
            seed=zlib.crc32(query_id.encode()),
        )

    def _take_probation(self, query_id: str) -> _OnProbation:
        probation = self._on_probation
        if probation is None or probation.query_id != query_id:
            current = None if probation is None else probation.query_id
            raise ValueError(f"no proposal {query_id!r} is on probation (on probation: {current!r})")
        self._on_probation = None
        return probation

    def _prompt_snapshot(self, snapshot: TrainingSnapshot) -> TrainingSnapshot:
        """A copy trimmed to `history_window` epochs, carrying the coordinator's own track record."""
        window = self.config.history_window
        prompt = TrainingSnapshot.from_dict(snapshot.to_dict())
        prompt.train_loss = prompt.train_loss[-window:]
        prompt.val_loss = prompt.val_loss[-window:]
        prompt.train_accuracy = prompt.train_accuracy[-window:]
        prompt.val_accuracy = prompt.val_accuracy[-window:]
        recent = self.config.max_recent_proposals
        prompt.recent_proposals = [dataclasses.replace(o) for o in self.outcomes[-recent:]] if recent else []
        return prompt

    def _drop(
        self, kind: RecordKind, snapshot: TrainingSnapshot, pending: _PendingQuery, reason: str, answer: AdvisorResponse | None
    ) -> None:
        """Record an answer that will not be applied (`None`: none came); the advisor's own failures join its track record."""
        proposal = answer.proposal if answer is not None else None
        self._record(
            kind,
            epoch=snapshot.epoch,
            step=snapshot.step,
            reason=reason,
            query_id=pending.query_id,
            proposal=proposal,
            answer=answer,
        )
        if kind in ("invalid", "stale", "timeout"):
            problems = answer.problems if answer is not None else []
            summary = proposal.summary() if proposal is not None else "; ".join(problems[:2]) or reason
            self._remember_outcome(pending.epoch, summary, kind, None, action=action_of(proposal) if proposal is not None else "")
        logger.info("dropped advisor answer %s (%s): %s", pending.query_id, kind, reason)

    def _remember_outcome(self, epoch: int, summary: str, verdict: str, reward: float | None, *, action: str = "") -> None:
        if reward is not None:
            reward = max(-_PROMPT_REWARD_LIMIT, min(_PROMPT_REWARD_LIMIT, reward))
        self.outcomes.append(ProposalOutcome(epoch=epoch, summary=summary, verdict=verdict, reward=reward, action=action))
        self.outcomes = self.outcomes[-max(self.config.max_recent_proposals, _TRACK_RECORD_LENGTH):]

    def _record(
        self,
        kind: RecordKind,
        *,
        epoch: int,
        step: int,
        reason: str,
        query_id: str,
        proposal: Proposal | None = None,
        alphas: dict[str, float] | None = None,
        reward: float | None = None,
        verdict: str = "",
        answer: AdvisorResponse | None = None,
    ) -> InterventionRecord:
        latency = answer.latency_s if answer is not None else None
        return self.ledger.append(
            InterventionRecord(
                kind=kind,
                epoch=epoch,
                step=step,
                reason=reason,
                query_id=query_id,
                proposal_summary=proposal.summary() if proposal is not None else "",
                proposal_json=to_json(proposal.to_dict()) if proposal is not None else "",
                alphas_json=to_json(alphas) if alphas is not None else "",
                reward=reward,
                verdict=verdict,
                latency_s=float(latency) if latency is not None and math.isfinite(latency) else None,
                status=answer.status if answer is not None else "",
                problems="; ".join(answer.problems) if answer is not None else "",
            )
        )
