"""Advisor faults on real Ray Serve, survived: the replica killed mid-request, and an advisor that answers
too slowly or with garbage inside a real training run. The advisor is the scripted backend deployed behind
Serve (`advisor.serve=true`), so its answers, and therefore what must be recorded, are known without a model.

- A killed replica: the request in flight comes back as a recorded failure (never an exception), Serve
  starts a new replica, and the same client's next request is answered again.
- An advisor that answers garbage (text the validator rejects) and too slowly (past `advisor.request_timeout_s`)
  in one real run: every epoch trains, the ledger holds `invalid` / `timeout` rows that say why, the summary
  counts them, and nothing is lost (`assert_nothing_lost`, shared with the other fault tests). The scripted
  backend's per-answer `delay_s` list makes one answer of the script slow and the others fast.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator

import pytest

from cluster.experiment import build_config
from cluster.launch import run_experiment
from serve_llm.client import AdvisorClient
from serve_llm.config import AdvisorConfig
from serve_llm.examples import example_snapshots
from tests.test_faults_e2e import ASK_EVERY_EPOCH, SHRINK, assert_nothing_lost

pytestmark = pytest.mark.e2e

# Answers a broken model could write: prose, and JSON cut off mid-way. Both fail the validator as a whole.
GARBAGE = ["Sure! I would lower the learning rate a bit and maybe add some dropout.",
           '{"hyperparameters": {"lr_scale": 0.5}, "weights": [']
REPLICA_BACK_S = 60.0


def _replica_names(app_name: str) -> list[str]:
    """Names of the live Serve replica actors of `app_name` (namespace "serve", `SERVE_REPLICA::app#deployment#id`)."""
    import ray

    return sorted(actor["name"] for actor in ray.util.list_named_actors(all_namespaces=True)
                  if actor["namespace"] == "serve" and actor["name"].startswith(f"SERVE_REPLICA::{app_name}#"))


def serve_apps_left(prefix: str, *, within_s: float = 30.0) -> list[str]:
    """Serve applications named `prefix...` still there after `within_s` (a run deletes its own without waiting)."""
    from ray import serve

    deadline = time.monotonic() + within_s
    while (left := [name for name in serve.status().applications if name.startswith(prefix)]) and time.monotonic() < deadline:
        time.sleep(0.5)
    return left


@pytest.fixture
def slow_scripted_advisor(ray_local, tmp_path) -> Iterator[AdvisorConfig]:
    """One replica of the scripted advisor, 4 s per answer (well inside its 30 s deadline)."""
    from ray import serve

    from serve_llm.deployment import deploy_advisor

    script = tmp_path / "slow.json"
    script.write_text(json.dumps({"proposals": [{"hyperparameters": {"lr_scale": 0.5}, "reason": "halve lr"}], "delay_s": 4.0}))
    config = AdvisorConfig(backend="scripted", serve=True, script=str(script), app_name="advisor-faults-killed",
                           request_timeout_s=30.0, num_cpus_per_replica=0.5, nice=0)
    deploy_advisor(config, http=False)
    try:
        yield config
    finally:
        serve.delete(config.app_name)


def test_a_replica_killed_mid_request_is_a_recorded_error_and_serve_brings_it_back(slow_scripted_advisor) -> None:
    import ray
    from ray import serve

    from serve_llm.deployment import is_deployed

    config = slow_scripted_advisor
    snapshot = example_snapshots(1)[0]
    client = AdvisorClient(config)  # the coordinator's client: looks the app up by name, reused after the fault
    assert client.ask(snapshot).status == "valid"  # the handle is resolved and the replica answers before the fault

    [victim] = _replica_names(config.app_name)
    started = time.monotonic()
    future = client.submit(snapshot)
    time.sleep(1.5)  # the request is inside the replica's 4 s backend call
    assert not future.done()
    ray.kill(ray.get_actor(victim, namespace="serve"), no_restart=False)
    response = future.result(timeout=60)  # the future resolves to a response: it never raises
    waited = time.monotonic() - started

    # An error naming the dead actor, not a timeout: the client did not hang until its deadline.
    assert response.status == "error", (response.status, response.problems)
    assert response.proposal is None and response.problems[0].startswith("advisor call failed")
    assert "ActorDiedError" in response.problems[0] or "RayActorError" in response.problems[0], response.problems
    assert response.backend == "scripted"
    assert waited < config.request_timeout_s, waited  # failed when the replica died, not at the deadline

    # Serve replaces the dead replica; the same client is answered again once it is up.
    deadline = time.monotonic() + REPLICA_BACK_S
    answers = []
    while time.monotonic() < deadline:
        answer = client.ask(snapshot, timeout_s=max(1.0, min(20.0, deadline - time.monotonic())))
        answers.append((answer.status, answer.problems[:1]))
        if answer.status == "valid":
            break
        time.sleep(1.0)
    back_s = time.monotonic() - started
    assert answers[-1][0] == "valid", answers
    assert answer.proposal is not None and answer.proposal.hyperparameters.lr_scale == 0.5
    replicas = _replica_names(config.app_name)
    assert len(replicas) == 1 and replicas != [victim], (victim, replicas)
    while not is_deployed(config) and time.monotonic() < deadline:  # Serve's own view: the app is RUNNING again
        time.sleep(0.5)
    assert is_deployed(config), serve.status().applications[config.app_name]
    print(f"\nkilled {victim}: in-flight request -> {response.status} ({response.problems[0][:120]}); "
          f"new replica {replicas[0]} answered {back_s:.1f}s after the fault, tries: {answers}")


def test_slow_and_garbage_answers_are_recorded_and_training_goes_on(ray_local, tmp_path) -> None:
    """A smoke run (2 workers, 5 epochs, asking every epoch) with the scripted advisor deployed on Serve,
    answering garbage, then too late (5 s against a 2 s deadline), then garbage again."""
    from ray import serve

    script = tmp_path / "faulty.json"
    script.write_text(json.dumps({"proposals": [GARBAGE[0], SHRINK, GARBAGE[1]], "delay_s": [0.0, 5.0, 0.0]}))
    app_name = "advisor-faults-run"
    # wait_for_answer_s: each epoch boundary holds until the in-flight answer (garbage, or the 2 s timeout)
    # is in, so which answer is recorded at which epoch does not depend on how fast the epochs run.
    overrides = [*ASK_EVERY_EPOCH, "train.epochs=5", "advisor.serve=true", f"advisor.script={script}", f"advisor.app_name={app_name}",
                 "advisor.request_timeout_s=2.0", "advisor.num_cpus_per_replica=0.5", "advisor.nice=0", "coordinator.wait_for_answer_s=30"]
    config = build_config(recipe="smoke", overrides=overrides)
    assert config.advisor.is_served  # answered through the Serve deployment, not in the coordinator
    run_dir = tmp_path / "run"
    try:
        summary = run_experiment(config, run_dir)
        # the run deployed its own app (named for the run) and deleted it when it ended
        assert not serve_apps_left(app_name), serve.status().applications
    finally:
        for name in [name for name in serve.status().applications if name.startswith(app_name)]:
            serve.delete(name)

    assert summary["epochs"] == 5  # every epoch trained, whatever the advisor did
    ledger = assert_nothing_lost(run_dir, summary, epochs=5)
    shown = ledger[["kind", "epoch", "reason", "query_id", "status", "problems"]].to_string()
    # Asked at each epoch end 1..5; each answer is collected at the next one. In order: q1 garbage;
    # q2 past its deadline; q3 queued behind q2's 5 s backend call (a timeout too) or, on slow epochs,
    # answered (garbage); q4 answered once the backend is free again (garbage, whichever came before).
    dropped = ledger[ledger.kind.isin(["invalid", "timeout", "error", "stale"])].set_index("epoch")
    assert list(dropped.index) == [2, 3, 4, 5], shown
    assert dropped.loc[2, "kind"] == "invalid" and dropped.loc[3, "kind"] == "timeout", shown
    assert dropped.loc[4, "kind"] in ("timeout", "invalid") and dropped.loc[5, "kind"] == "invalid", shown

    invalid, timeouts = ledger[ledger.kind == "invalid"], ledger[ledger.kind == "timeout"]
    assert summary["proposals_invalid"] == len(invalid) >= 2 and summary["answers_timeout"] == len(timeouts) >= 1, shown
    assert (invalid.reason == "advisor answer unusable (status rejected)").all() and (invalid.status == "rejected").all()
    assert invalid.problems.iloc[0].startswith("malformed JSON"), shown  # the validator's own words, per answer
    assert (timeouts.reason == "advisor timed out").all() and (timeouts.status == "timeout").all()
    assert timeouts.problems.str.contains("no answer within request_timeout_s=2.0s", regex=False).all(), shown
    assert set(dropped.query_id) <= set(ledger[ledger.kind == "query"].query_id)
    # Nothing was applied, and the faults were recorded as what they were: no errors, nothing stale.
    assert summary["proposals_accepted"] == summary["proposals_rejected"] == 0
    assert summary["errors"] == summary["answers_stale"] == 0 and summary["advice_incidents"] == []


def test_an_advisor_that_cannot_deploy_is_recorded_and_training_goes_on(ray_local, tmp_path) -> None:
    """The run deploys its advisor without waiting for it (the model loads while the workers start). One whose
    replicas cannot start (a script with no proposals: its constructor raises, Serve gives up after 3 tries) does
    not fail the run: every epoch trains, each question is an `error` row carrying Serve's reason, and the
    summary names the failed deployment."""
    from ray import serve

    script = tmp_path / "empty.json"
    script.write_text(json.dumps({"proposals": []}))
    app_name = "advisor-faults-undeployable"
    overrides = [*ASK_EVERY_EPOCH, "train.epochs=3", "advisor.serve=true", f"advisor.script={script}", f"advisor.app_name={app_name}",
                 "advisor.num_cpus_per_replica=0.5", "advisor.nice=0", "coordinator.wait_for_answer_s=120"]
    run_dir = tmp_path / "run"
    try:
        summary = run_experiment(build_config(recipe="smoke", overrides=overrides), run_dir)
        assert not serve_apps_left(app_name), serve.status().applications
    finally:
        for name in [name for name in serve.status().applications if name.startswith(app_name)]:
            serve.delete(name)
    ledger = assert_nothing_lost(run_dir, summary, epochs=3)
    shown = ledger[["kind", "epoch", "reason", "status", "problems"]].to_string()
    assert "DEPLOY_FAILED" in summary["advisor_deploy_error"] and summary["advisor_ready_s"] is None, summary
    errors = ledger[ledger.kind == "error"]
    assert len(errors) >= 1 and summary["errors"] == len(errors), shown
    assert errors.problems.str.contains("DEPLOY_FAILED").all() and errors.problems.str.contains("at least one scripted proposal").any(), shown
    assert summary["proposals_accepted"] == summary["proposals_rejected"] == 0
