"""End to end through real Ray Serve: the SmolLM2 advisor answers varied snapshots with
schema-valid proposals (100% parse rate), batching works, and a slow backend's request comes
back as a recorded timeout instead of hanging. One deployment per backend, shared by the module.
"""

from __future__ import annotations

import json
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from serve_llm.client import AdvisorClient
from serve_llm.config import AdvisorConfig
from serve_llm.examples import example_snapshot, example_snapshots
from serve_llm.validate import AdvisorResponse, proposal_violations

pytestmark = pytest.mark.e2e

NUM_SNAPSHOTS = 10


@pytest.fixture(scope="module", autouse=True)
def fresh_serve(ray_local) -> None:
    """Serve with an HTTP proxy: a run earlier in the session may have started it without one (handle only)."""
    from ray import serve

    serve.shutdown()


@pytest.fixture(scope="module")
def smollm2_advisor(ray_local) -> Iterator[tuple[AdvisorConfig, object]]:
    from ray import serve

    from serve_llm.deployment import deploy_advisor

    # 2 logical CPUs per replica: Ray sets the replica's torch threads from it.
    config = AdvisorConfig(app_name="advisor-e2e-smollm2", route_prefix="/advisor-e2e", max_batch_size=NUM_SNAPSHOTS,
                           batch_wait_timeout_s=1.0, num_cpus_per_replica=2.0, request_timeout_s=600.0)
    handle = deploy_advisor(config)
    yield config, handle
    serve.delete(config.app_name)


@pytest.fixture(scope="module")
def slow_advisor(ray_local, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[AdvisorConfig, object]]:
    from ray import serve

    from serve_llm.deployment import deploy_advisor

    script: Path = tmp_path_factory.mktemp("advisor") / "slow.json"
    script.write_text(json.dumps({"proposals": [{"hyperparameters": {"lr_scale": 0.5}}], "delay_s": 3.0}))
    config = AdvisorConfig(backend="scripted", script=str(script), app_name="advisor-e2e-slow",
                           route_prefix="/advisor-slow", request_timeout_s=1.0, num_cpus_per_replica=0.5)
    handle = deploy_advisor(config)
    yield config, handle
    serve.delete(config.app_name)


def test_smollm2_gives_schema_valid_proposals_for_varied_snapshots(smollm2_advisor) -> None:
    config, handle = smollm2_advisor
    snapshots = example_snapshots(NUM_SNAPSHOTS)
    client = AdvisorClient(config)  # looks its handle up by app name, as a coordinator actor would
    started = time.perf_counter()
    # Nine through the raw handle, one through the client's future: all land in one batch.
    pending = [handle.propose.remote(snapshot.to_dict()) for snapshot in snapshots[:-1]]
    future = client.submit(snapshots[-1])
    responses = [AdvisorResponse.from_dict(item.result(timeout_s=900)) for item in pending]
    responses.append(future.result(timeout=900))
    elapsed = time.perf_counter() - started
    statuses = [response.status for response in responses]
    assert statuses.count("valid") + statuses.count("clamped") == NUM_SNAPSHOTS, [
        (r.status, r.problems, r.raw_text) for r in responses
    ]
    for response, snapshot in zip(responses, snapshots):
        assert response.backend == "smollm2" and response.raw_text.startswith('{"reason": ')
        json.loads(response.raw_text)
        assert proposal_violations(response.proposal, snapshot) == []
    # Batched: ten answers cost far less than ten sequential generations would.
    assert max(r.latency_s for r in responses) < elapsed + 1
    print(f"\n{NUM_SNAPSHOTS} SmolLM2 proposals in {elapsed:.1f}s; e.g. {responses[2].raw_text}")


def test_http_route_and_health(smollm2_advisor, slow_advisor) -> None:
    config, _ = slow_advisor
    url = f"http://{config.http_host}:{config.http_port}{config.route_prefix}"
    with urllib.request.urlopen(url, timeout=30) as reply:
        health = json.loads(reply.read())
    assert health["status"] == "ok" and health["backend"] == "scripted"
    smollm2_config, _ = smollm2_advisor
    smollm2_url = f"http://{smollm2_config.http_host}:{smollm2_config.http_port}{smollm2_config.route_prefix}"
    asked = urllib.request.Request(smollm2_url, data=json.dumps(example_snapshot("plateau").to_dict()).encode(), method="POST")
    with urllib.request.urlopen(asked, timeout=120) as reply:
        assert json.loads(reply.read())["status"] == "valid"
    with urllib.request.urlopen(smollm2_url, timeout=30) as reply:
        smollm2_health = json.loads(reply.read())
    assert smollm2_health["model"] == "SmolLM2-135M-Instruct.Q4_1.gguf"
    # A CPU replica computes under SCHED_IDLE (Linux), so its answers take only the CPU training leaves idle.
    assert smollm2_health["cpu_priority"] == "idle (SCHED_IDLE)"
    request = urllib.request.Request(url, data=b"{not json", method="POST")
    with pytest.raises(urllib.error.HTTPError) as caught:
        urllib.request.urlopen(request, timeout=30)
    assert caught.value.code == 400


def test_request_past_its_deadline_is_a_recorded_timeout(slow_advisor) -> None:
    config, handle = slow_advisor
    started = time.perf_counter()
    response = AdvisorResponse.from_dict(handle.propose.remote({"run_id": "slow"}).result(timeout_s=30))
    assert response.status == "timeout" and response.proposal is None
    assert "request_timeout_s=1.0" in response.problems[0]
    assert time.perf_counter() - started < 2.9  # answered at the deadline, not after the 3 s backend
    body = json.dumps({"run_id": "slow-http"}).encode()
    request = urllib.request.Request(f"http://127.0.0.1:{config.http_port}{config.route_prefix}", data=body,
                                     method="POST", headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as reply:
        assert json.loads(reply.read())["status"] == "timeout"


def test_client_side_timeout_and_missing_app_are_responses(slow_advisor) -> None:
    config, _ = slow_advisor
    client = AdvisorClient(config)
    assert client.ask({"run_id": "x"}, timeout_s=0.2).status == "timeout"
    missing = AdvisorClient(AdvisorConfig(backend="smollm2", app_name="no-such-advisor"))
    response = missing.submit({"run_id": "x"}).result(timeout=60)
    assert response.status == "error" and "no-such-advisor" in response.problems[0]


def test_deploy_refuses_backend_none(ray_local) -> None:
    from serve_llm.deployment import deploy_advisor

    with pytest.raises(ValueError, match="no advisor"):
        deploy_advisor(AdvisorConfig(backend="none"))


def test_llm_guided_explore_with_the_real_advisor_stays_in_bounds(smollm2_advisor, tmp_path) -> None:
    """The PBT explorer asks SmolLM2 (through Serve) about a population; whatever it answers, the explored
    config lies inside the search space, and the decision (llm or fallback, and why) is recorded."""
    from tune_search.config import TuneConfig
    from tune_search.explore import LLMExplorer, in_bounds

    config, _ = smollm2_advisor
    tune_config = TuneConfig(llm_explore=True, explore_timeout_s=300.0,
                             space={"train.lr": {"loguniform": [1e-4, 1e-2]}, "model.dropout": {"uniform": [0.0, 0.3]}})
    explorer = LLMExplorer(tune_config, lambda: AdvisorClient(config), tmp_path / "decisions.jsonl")
    population = {"t0": (3e-3, 0.1, [0.80, 0.91, 0.95]), "t1": (1e-4, 0.25, [0.40, 0.55, 0.61]), "t2": (8e-3, 0.0, [0.70, 0.72, 0.71])}
    for epoch in range(3):
        for trial, (lr, dropout, scores) in population.items():
            explorer.observe(trial, {"train.lr": lr, "model.dropout": dropout}, {"val_accuracy": scores[epoch], "val_loss": 1 - scores[epoch],
                                                                                 "epoch": epoch + 1})
    chosen = explorer({"train.lr": 3.6e-3, "model.dropout": 0.08})  # PBT's perturbation of the top trial
    assert all(in_bounds(key, chosen[key], tune_config.space[key]) for key in tune_config.space), chosen
    decision = json.loads((tmp_path / "decisions.jsonl").read_text())
    assert decision["source"] in ("llm", "fallback") and decision["config"] == chosen
    assert decision["source"] == "llm" or decision["problem"]  # a fallback always says why
