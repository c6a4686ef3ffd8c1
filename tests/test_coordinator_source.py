"""Where a query's answer comes from, as a value (`choose_source`): keep, the cache, or the advisor."""

from __future__ import annotations

import dataclasses

from orchestration.cache import ResponseCache
from orchestration.config import CoordinatorConfig
from orchestration.coordinator import Source, choose_source
from orchestration.protocol import MenuOption, Proposal
from tests.test_coordinator_cache import PROPOSAL, run_snapshot

KEEP = Proposal(reason="keep: nothing needs fixing")
HEALTHY_MENU = [MenuOption(key="A", action="keep", label="keep everything as it is", proposal=KEEP.to_dict()),
                MenuOption(key="B", action="lr_down", label="lower the learning rate", proposal=PROPOSAL.to_dict())]
PLATEAU_MENU = [HEALTHY_MENU[0], dataclasses.replace(HEALTHY_MENU[1], remedy="plateau")]


def prompt(menu: list[MenuOption]):
    snapshot = run_snapshot()
    snapshot.menu = list(menu)
    return snapshot


def cache_holding(origin: str = "a") -> ResponseCache:
    cache = ResponseCache.from_config(CoordinatorConfig())
    cache.store(run_snapshot(), PROPOSAL, origin=origin)
    return cache


def test_a_healthy_run_is_kept_without_asking_or_looking_in_the_cache() -> None:
    cache = cache_holding()
    source = choose_source(prompt(HEALTHY_MENU), config=CoordinatorConfig(), cache=cache, asker="a")
    assert source.kind == "keep" and source.proposal == KEEP and "ask_when_healthy" in source.reason
    assert (cache.hits, cache.misses) == (0, 0)  # a kept look does not count as a cache lookup


def test_a_finding_on_the_menu_is_not_kept() -> None:
    source = choose_source(prompt(PLATEAU_MENU), config=CoordinatorConfig(), cache=ResponseCache.from_config(CoordinatorConfig()), asker="a")
    assert source == Source("ask", source.reason) and "no similar answer cached" in source.reason


def test_ask_when_healthy_asks_even_with_nothing_to_fix() -> None:
    config = CoordinatorConfig(ask_when_healthy=True)
    source = choose_source(prompt(HEALTHY_MENU), config=config, cache=ResponseCache.from_config(config), asker="a")
    assert source.kind == "ask" and source.proposal is None


def test_without_a_menu_nothing_is_kept() -> None:
    """Keeping reads the menu: a run that invents its proposals (`advice_mode=invent`) always asks."""
    config = CoordinatorConfig(advice_mode="invent")
    assert choose_source(prompt([]), config=config, cache=ResponseCache.from_config(config), asker="a").kind == "ask"


def test_a_similar_accepted_answer_comes_from_the_cache() -> None:
    cache = cache_holding(origin="a")
    source = choose_source(prompt(PLATEAU_MENU), config=CoordinatorConfig(), cache=cache, asker="a")
    assert source.kind == "cache" and source.proposal == PROPOSAL
    assert source.reason == "cache distance 0" and cache.hits == 1


def test_a_cache_hit_names_the_run_that_learned_it() -> None:
    source = choose_source(prompt(PLATEAU_MENU), config=CoordinatorConfig(), cache=cache_holding(origin="b"), asker="a")
    assert source.kind == "cache" and source.reason.startswith("answer learned by run b; cache distance")


def test_the_cache_is_not_read_when_it_is_off() -> None:
    cache = cache_holding()
    source = choose_source(prompt(PLATEAU_MENU), config=CoordinatorConfig(cache_enabled=False), cache=cache, asker="a")
    assert source == Source("ask", "cache off") and (cache.hits, cache.misses) == (0, 0)
