"""The population coordinator (pure logic): per-run coordinators, one shared response cache."""

from __future__ import annotations

import threading

import pytest

from orchestration.config import CoordinatorConfig
from orchestration.coordinator import Coordinator
from orchestration.population import Population, RunNotOpen
from tests.test_coordinator_cache import PROPOSAL, run_snapshot


def test_runs_keep_their_own_state_and_share_one_cache() -> None:
    population = Population(CoordinatorConfig(), advisor=None)
    assert population.open("a", run_id="run-a") and population.open("b", config=CoordinatorConfig(query_interval=7), run_id="run-b")
    assert not population.open("a")
    a, b = population.runs["a"], population.runs["b"]
    assert a.cache is b.cache is population.cache and a.shares_cache
    assert b.config.query_interval == 7 and a.config.query_interval != 7
    population.report_incident("a", "a problem", epoch=1)
    assert [r["kind"] for r in population.ledger_records("a")] == ["error"] and population.ledger_records("b") == []
    assert not hasattr(population, "call")  # no call by name: a worker reaches only the typed run calls, never `_ask`
    with pytest.raises(KeyError, match="not open"):
        population.summary_counts("c")
    with pytest.raises(RunNotOpen, match="not open") as raised:
        population.to_state("c")
    assert (raised.value.run, raised.value.open_runs) == ("c", ["a", "b"])
    assert population.close("a")["ledger"][0]["reason"] == "a problem"
    assert population.stats()["runs_open"] == ["b"] and population.stats()["runs_opened"] == 2


def test_a_restored_run_adds_its_cache_entries_without_dropping_the_others() -> None:
    """A trial restarting from its checkpoint (or cloning another's) brings back what it learned; what the
    other runs stored since stays. A single run, by contrast, is rewound to exactly its checkpoint."""
    checkpointed = Coordinator(CoordinatorConfig(), None, "old")
    checkpointed.cache.store(run_snapshot(val_loss=0.5), PROPOSAL, origin="old")
    state = checkpointed.to_state()

    population = Population(CoordinatorConfig(), advisor=None)
    population.open("other", run_id="other")
    population.cache.store(run_snapshot(val_loss=2.0), PROPOSAL, origin="other")
    population.open("restarted", run_id="restarted")
    population.load_state("restarted", state)
    population.load_state("restarted", state)  # twice: no duplicates
    assert sorted(entry.origin for entry in population.cache.entries) == ["old", "other"]

    alone = Coordinator(CoordinatorConfig(), None, "alone")
    alone.cache.store(run_snapshot(val_loss=2.0), PROPOSAL, origin="alone")
    alone.load_state(state)
    assert [entry.origin for entry in alone.cache.entries] == ["old"]


def test_hits_on_another_runs_entry_are_counted_as_shared() -> None:
    population = Population(CoordinatorConfig(), advisor=None)
    population.cache.store(run_snapshot(), PROPOSAL, origin="a")
    entry, _ = population.cache.lookup_entry(run_snapshot(), asker="a")
    assert entry.origin == "a" and population.cache.shared_hits == 0
    population.cache.lookup_entry(run_snapshot(), asker="b")
    assert (population.cache.hits, population.cache.shared_hits) == (2, 1)


def test_concurrent_runs_do_not_corrupt_the_shared_cache() -> None:
    population = Population(CoordinatorConfig(max_cache_entries=50), advisor=None)

    def work(run: str) -> None:
        population.open(run, run_id=run)
        for step in range(200):
            population.cache.store(run_snapshot(val_loss=0.1 + step / 100), PROPOSAL, origin=run)
            population.cache.lookup(run_snapshot(val_loss=0.1 + step / 100), asker=run)
            population.to_state(run)

    threads = [threading.Thread(target=work, args=(f"run-{index}",)) for index in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(population.cache) == 50 and population.cache.hits == 6 * 200 and population.stats()["runs_opened"] == 6
