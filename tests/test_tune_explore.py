"""LLM-guided explore, as a state machine without a cluster: asks ahead, uses a ready in-bounds answer,
falls back to PBT's own perturbation (and records why) when the answer is late, unusable or out of bounds."""

from __future__ import annotations

import json
import pickle
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass

from orchestration.protocol import HyperparameterChange, Proposal
from tune_search.config import TuneConfig
from tune_search.explore import ExploreDecision, LLMExplorer, decide_explore, proposal_config

CONFIG = TuneConfig(llm_explore=True, space={"train.lr": {"loguniform": [1e-4, 1e-2]}, "model.dropout": {"uniform": [0.0, 0.3]}})


@dataclass
class Answer:
    proposal: Proposal | None
    status: str = "valid"


class Advisor:
    """Answers at once (`instant`) or never (the CPU LLM still thinking)."""

    def __init__(self, proposal: Proposal | None, *, instant: bool = True) -> None:
        self.proposal, self.instant, self.snapshots = proposal, instant, []

    def submit(self, snapshot):
        self.snapshots.append(snapshot)
        future: Future = Future()
        if self.instant:
            future.set_result(Answer(self.proposal))
        return future


class SlowAdvisor(Advisor):
    """Answers `delay_s` after it is asked, from a thread (as the Serve client's pool does)."""

    def __init__(self, proposal: Proposal | None, *, delay_s: float) -> None:
        super().__init__(proposal)
        self.delay_s = delay_s

    def submit(self, snapshot):
        self.snapshots.append(snapshot)
        future: Future = Future()
        threading.Timer(self.delay_s, future.set_result, args=(Answer(self.proposal),)).start()
        return future


def explorer(tmp_path, advisor: Advisor) -> LLMExplorer:
    explorer = LLMExplorer(CONFIG, lambda: advisor, tmp_path / "decisions.jsonl")
    explorer.observe("t0", {"train.lr": 1e-3, "model.dropout": 0.1}, {"val_accuracy": 0.90, "val_loss": 0.4, "epoch": 2})
    explorer.observe("t1", {"train.lr": 1e-4, "model.dropout": 0.2}, {"val_accuracy": 0.60, "val_loss": 1.1, "epoch": 2})
    return explorer


def test_a_ready_in_bounds_answer_sets_the_explored_config(tmp_path) -> None:
    advisor = Advisor(Proposal(hyperparameters=HyperparameterChange(lr_scale=2.0, dropout=0.05)))
    explore = explorer(tmp_path, advisor)
    snapshot = advisor.snapshots[0]
    assert snapshot.hyperparameters["lr"] == 1e-3  # the top trial, asked ahead of any explore
    assert [outcome.verdict for outcome in snapshot.recent_proposals] == ["top", "population"]  # the population table
    chosen = explore({"train.lr": 1.2e-3, "model.dropout": 0.12})
    assert chosen == {"train.lr": 2e-3, "model.dropout": 0.05}
    decision = json.loads((tmp_path / "decisions.jsonl").read_text())
    assert decision["source"] == "llm" and decision["pbt_config"] == {"train.lr": 1.2e-3, "model.dropout": 0.12}


def test_a_slow_advisor_falls_back_to_pbt_without_stalling(tmp_path) -> None:
    explore = explorer(tmp_path, Advisor(None, instant=False))
    pbt = {"train.lr": 1.2e-3, "model.dropout": 0.12}
    started = time.monotonic()
    assert explore(pbt) == pbt
    assert time.monotonic() - started < CONFIG.explore_timeout_s + 0.25  # Tune's loop waited half a second, not the LLM's 10-20 s
    decision = json.loads((tmp_path / "decisions.jsonl").read_text())
    assert decision["source"] == "fallback" and decision["problem"].startswith("advisor answer not ready")
    assert decision["waited_s"] <= CONFIG.explore_timeout_s + 0.25


def test_an_answer_that_comes_after_the_explore_serves_the_next_one(tmp_path) -> None:
    """A slow advisor (answers 1.5 s after it is asked): the first explore falls back within its half-second
    budget; the answer, once there, is used by the next explore without waiting."""
    advisor = SlowAdvisor(Proposal(hyperparameters=HyperparameterChange(lr_scale=2.0)), delay_s=1.5)
    explore = explorer(tmp_path, advisor)
    pbt = {"train.lr": 1.2e-3, "model.dropout": 0.12}
    started = time.monotonic()
    assert explore(pbt) == pbt
    assert time.monotonic() - started < 1.0
    time.sleep(1.5)  # the answer arrives while the trials train on
    started = time.monotonic()
    assert explore(pbt) == {"train.lr": 2e-3, "model.dropout": 0.12}
    assert time.monotonic() - started < 0.1  # ready: taken at once
    sources = [json.loads(line)["source"] for line in (tmp_path / "decisions.jsonl").read_text().splitlines()]
    assert sources == ["fallback", "llm"]


def test_the_explore_decision_is_pure() -> None:
    pbt = {"train.lr": 1.2e-3, "model.dropout": 0.12}
    clipped = dict(pbt)
    usable = Answer(Proposal(hyperparameters=HyperparameterChange(dropout=0.2)))
    top = {"train.lr": 1e-3, "model.dropout": 0.1}
    assert decide_explore(usable, top, pbt, CONFIG, clipped=clipped, in_flight_s=None) == ExploreDecision(
        source="llm", config={"train.lr": 1.2e-3, "model.dropout": 0.2}, proposal=usable.proposal.summary())
    late = decide_explore(None, None, pbt, CONFIG, clipped=clipped, in_flight_s=3.0)
    assert late.source == "fallback" and late.config == clipped and late.problem == "advisor answer not ready (asked 3.0 s ago)"
    assert decide_explore(None, None, pbt, CONFIG, clipped=clipped, in_flight_s=None).problem.startswith("no advisor answer in flight")
    failed = decide_explore(Answer(None, status="timeout"), top, pbt, CONFIG, clipped=clipped, in_flight_s=None)
    assert failed.source == "fallback" and failed.problem == "advisor answer unusable (status timeout)"


def test_an_out_of_bounds_or_unusable_answer_falls_back_and_says_why(tmp_path) -> None:
    explore = explorer(tmp_path, Advisor(Proposal(hyperparameters=HyperparameterChange(lr_scale=10.0))))  # 1e-2 * ... > bound
    pbt = {"train.lr": 1.2e-3, "model.dropout": 0.12}
    explore.observe("t0", {"train.lr": 5e-3, "model.dropout": 0.1}, {"val_accuracy": 0.95, "epoch": 3})
    assert explore(pbt) == pbt
    decisions = [json.loads(line) for line in (tmp_path / "decisions.jsonl").read_text().splitlines()]
    assert decisions[-1]["source"] == "fallback" and "outside the search space" in decisions[-1]["problem"]
    nothing = proposal_config(Proposal(hyperparameters=HyperparameterChange(momentum=0.5)), {"train.lr": 1e-3}, pbt, CONFIG)
    assert nothing == (None, "the proposal changes no key of the search space")


def test_the_explorer_survives_tunes_pickling(tmp_path) -> None:
    import functools

    explore = explorer(tmp_path, Advisor(None, instant=False))
    explore.advisor_factory = functools.partial(Advisor, None, instant=False)  # picklable, as make_client's partial is
    restored = pickle.loads(pickle.dumps(explore))
    assert restored.advisor is None and set(restored.trials) == {"t0", "t1"}
    assert restored({"train.lr": 1e-3, "model.dropout": 0.1})["train.lr"] == 1e-3
