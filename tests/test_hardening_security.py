"""Security hardening without Ray: the OpenAI-compatible backend against hostile local servers (a redirect that would
carry the API key elsewhere, a reply dripped a byte at a time, a huge reply), the advisor route's limits, and
`cluster down` against a head record that no longer names the head."""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from serve_llm.backends import OpenAICompatibleBackend
from serve_llm.config import AdvisorConfig
from serve_llm.examples import example_snapshot

ANSWER = json.dumps({"choices": [{"message": {"content": json.dumps({"reason": "flat", "hyperparameters": {"lr_scale": 0.5}})}}]}).encode()


class _Hostile(BaseHTTPRequestHandler):
    """One handler for every hostile server; `server.behaviour` says how it answers and `server.seen` records the
    requests it got (method, path, Authorization header), `server.sent` the body bytes it managed to send."""

    protocol_version = "HTTP/1.0"  # a reply without Content-Length ends when the connection closes

    def do_POST(self) -> None:  # noqa: N802 - http.server API
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        self._answer()

    def do_GET(self) -> None:  # noqa: N802 - what urllib turns a redirected POST into
        self._answer()

    def _answer(self) -> None:
        server = self.server
        server.seen.append((self.command, self.path, self.headers.get("Authorization")))
        getattr(self, "_" + server.behaviour)()

    def _ok(self) -> None:
        self.send_response(200)
        self.send_header("Content-Length", str(len(ANSWER)))
        self.end_headers()
        self.wfile.write(ANSWER)

    def _redirect(self) -> None:
        self.send_response(302)
        self.send_header("Location", self.server.target + "/v1/chat/completions")
        self.send_header("Content-Length", "0")
        self.end_headers()

    def _drip_body(self) -> None:
        """A well-formed reply whose every byte comes 0.1 s after the last: 4 s in all, each read well within any timeout."""
        self.send_response(200)
        self.send_header("Content-Length", "40")
        self.end_headers()
        for byte in b" " * 40:
            self.wfile.write(bytes([byte]))
            self.wfile.flush()
            time.sleep(0.1)

    def _drip_headers(self) -> None:
        self.wfile.write(b"HTTP/1.0 200 OK\r\n")
        for _ in range(40):
            self.wfile.write(b"X: y\r\n")
            self.wfile.flush()
            time.sleep(0.1)
        self.wfile.write(b"\r\n")

    def _huge(self) -> None:
        """64 MiB with no length announced, sent until the client hangs up."""
        self.send_response(200)
        self.end_headers()
        chunk = b"x" * 65536
        try:
            for _ in range(1024):
                self.wfile.write(chunk)
                self.server.sent += len(chunk)
        except OSError:
            pass

    def _huge_announced(self) -> None:
        self.send_response(200)
        self.send_header("Content-Length", str(10 * 2**30))
        self.end_headers()
        self._huge()

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture()
def hostile() -> Iterator:
    """`hostile(behaviour)` -> a started local server's URL and the server (for what it saw); all stopped after the test."""
    servers: list[ThreadingHTTPServer] = []

    def start(behaviour: str, target: str = "") -> tuple[str, ThreadingHTTPServer]:
        server = ThreadingHTTPServer(("127.0.0.1", 0), _Hostile)
        server.daemon_threads = True
        server.behaviour, server.target, server.seen, server.sent = behaviour, target, [], 0
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return f"http://127.0.0.1:{server.server_address[1]}", server

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


def _ask(endpoint: str, **settings) -> tuple:
    backend = OpenAICompatibleBackend(AdvisorConfig(backend="openai", endpoint=endpoint, api_key_env="TEST_ADVISOR_KEY", **settings))
    started = time.monotonic()
    response = backend.propose_batch([example_snapshot("plateau")])[0]
    return response, time.monotonic() - started


def test_the_api_key_never_follows_a_redirect(hostile, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TEST_ADVISOR_KEY", "secret-key")
    elsewhere, other = hostile("ok")
    redirecting, first = hostile("redirect", target=elsewhere)
    response, _ = _ask(redirecting)
    assert first.seen == [("POST", "/v1/chat/completions", "Bearer secret-key")]  # the configured endpoint gets the key
    assert other.seen == []  # the host it redirects to gets nothing at all
    assert response.status == "error" and "redirect" in response.problems[0] and elsewhere in response.problems[0]
    assert "secret-key" not in json.dumps(response.to_dict())


@pytest.mark.parametrize("behaviour", ["drip_body", "drip_headers"])
def test_a_dripping_server_is_cut_at_the_deadline_for_the_whole_reply(hostile, behaviour: str) -> None:
    url, _ = hostile(behaviour)
    response, elapsed = _ask(url, request_timeout_s=30, reply_deadline_s=1.0)
    assert response.status == "timeout" and "within 1s" in response.problems[0], response.problems
    assert elapsed < 1.0 + 0.5  # the server would take 4 s; no single read ever waits long


@pytest.mark.parametrize("behaviour", ["huge", "huge_announced"])
def test_a_huge_reply_is_refused_at_the_cap_without_being_read(hostile, behaviour: str) -> None:
    url, server = hostile(behaviour)
    response, elapsed = _ask(url, max_reply_bytes=1_000_000)
    assert response.status == "error" and "advisor.max_reply_bytes=1000000" in response.problems[0], response.problems
    time.sleep(0.2)  # the server notices the hang-up
    assert server.sent < 32 * 2**20  # of 64 MiB: the cap, plus what the sockets' buffers held
    assert elapsed < 5


def test_reply_limits_are_validated_naming_the_field() -> None:
    from orchestration.errors import ConfigError

    for field, value in (("reply_deadline_s", 0), ("reply_deadline_s", float("nan")), ("max_reply_bytes", 0), ("max_reply_bytes", 1.5)):
        with pytest.raises(ConfigError, match=f"advisor.{field}"):
            AdvisorConfig(**{field: value})
    assert AdvisorConfig(request_timeout_s=7).reply_deadline == 7
    assert AdvisorConfig(request_timeout_s=7, reply_deadline_s=2).reply_deadline == 2


# ---- the advisor's HTTP route (`hybridtrain advisor serve`) ----------------------------------------------


def _route():
    """The real route handler of the Serve deployment around the heuristic backend, built as the plain class it wraps
    (no Serve needed: it takes a starlette Request)."""
    from serve_llm.deployment import AdvisorDeployment

    config = AdvisorConfig(backend="heuristic", nice=0, idle_cpu=False, max_request_bytes=4096, max_history=16)
    return AdvisorDeployment.func_or_class(config.to_dict())


def _post(route, body: bytes, *, announced: int | None = None, chunk: int = 1024) -> tuple[int, dict]:
    """POST `body` to the route in chunks, as Serve's proxy hands it over; `announced` is the Content-Length sent
    (None: the body's own length; -1: none, as for a chunked upload)."""
    import asyncio

    from starlette.requests import Request

    length = len(body) if announced is None else announced
    headers = [(b"content-type", b"application/json")] + ([(b"content-length", str(length).encode())] if length >= 0 else [])
    pieces = [body[start:start + chunk] for start in range(0, len(body), chunk)] or [b""]
    messages = [{"type": "http.request", "body": piece, "more_body": index < len(pieces) - 1} for index, piece in enumerate(pieces)]
    given = []

    async def receive() -> dict:
        given.append(len(given))
        return messages.pop(0) if messages else {"type": "http.disconnect"}

    scope = {"type": "http", "method": "POST", "path": "/advisor", "headers": headers, "query_string": b""}
    reply = asyncio.run(route(Request(scope, receive)))
    _post.chunks_read = len(given)
    return reply.status_code, json.loads(reply.body)


def test_the_route_hands_a_snapshot_within_its_limits_to_the_advisor() -> None:
    route = _route()
    asked = []

    async def propose(snapshot: dict) -> dict:  # the batched call needs a live replica; the e2e test covers it
        asked.append(snapshot)
        return {"status": "valid"}

    route.propose = propose
    snapshot = example_snapshot("plateau").to_dict()
    assert _post(route, json.dumps(snapshot).encode()) == (200, {"status": "valid"})
    assert asked == [snapshot]


def test_the_route_refuses_an_oversized_body_before_reading_it_whole() -> None:
    route = _route()
    huge = json.dumps({"run_id": "x" * 100_000}).encode()
    assert _post(route, huge) == (413, {"error": f"body of {len(huge)} bytes is over advisor.max_request_bytes=4096"})
    assert _post.chunks_read == 0  # refused on its announced length
    for announced in (-1, 10):  # no length, or a length that lies: refused while reading, past the cap
        status, answer = _post(route, huge, announced=announced)
        assert status == 413 and "advisor.max_request_bytes=4096" in answer["error"]
        assert _post.chunks_read <= 4096 // 1024 + 1


def test_the_route_refuses_long_histories_and_bodies_that_are_no_snapshot() -> None:
    route = _route()
    status, answer = _post(route, json.dumps({"val_loss": [1.0] * 17}).encode())
    assert status == 422 and answer["error"] == "snapshot val_loss has 17 entries, over advisor.max_history=16"
    free = {"modes": {"free_values": {"group": "g", "current": [1.0], "history": [[1.0, [1.0]]] * 17}}}
    assert _post(route, json.dumps(free).encode())[0] == 422
    assert _post(route, b"[" * 2000 + b"]" * 2000)[0] == 400  # nesting too deep to parse: not a crash
    assert _post(route, b"[1, 2]") == (400, {"error": "body must be a JSON object (a snapshot), got list"})
    assert _post(route, b"{not json")[0] == 400


def test_route_limits_are_validated_naming_the_field() -> None:
    from orchestration.errors import ConfigError

    for field in ("max_request_bytes", "max_history"):
        with pytest.raises(ConfigError, match=f"advisor.{field}"):
            AdvisorConfig(**{field: 0})


def test_a_route_open_to_the_network_is_asked_for_and_warned_about(caplog: pytest.LogCaptureFixture, monkeypatch) -> None:
    import argparse

    from cluster.advisor_cli import _config_from_args, register
    from serve_llm import deployment

    parser = argparse.ArgumentParser()
    register(parser.add_subparsers())
    assert _config_from_args(parser.parse_args(["advisor", "serve"])).http_host == "127.0.0.1"
    exposed = _config_from_args(parser.parse_args(["advisor", "serve", "--host", "0.0.0.0", "--set", "backend=heuristic"]))
    assert exposed.http_host == "0.0.0.0"
    started = []
    monkeypatch.setattr(deployment.serve, "start", lambda **options: started.append(options))
    monkeypatch.setattr(deployment, "_require_proxy", lambda: None)
    monkeypatch.setattr(deployment.serve, "run", lambda *args, **kwargs: "handle")
    with caplog.at_level("WARNING", logger="serve_llm.deployment"):
        deployment.deploy_advisor(AdvisorConfig(backend="heuristic"))
        assert caplog.records == []  # loopback: nothing to warn about
        deployment.deploy_advisor(exposed)
    assert started[-1]["http_options"]["host"] == "0.0.0.0"
    assert [record.levelname for record in caplog.records] == ["WARNING"] and "no authentication" in caplog.records[0].getMessage()


# ---- `hybridtrain cluster up` / `cluster down` -----------------------------------------------------------


def test_a_local_head_is_loopback_only_and_a_network_head_has_token_auth() -> None:
    from cluster.jobs import SINGLE_MACHINE, head_command

    local, local_env = head_command(host="127.0.0.1", port=6379, dashboard_port=8265, agent_port=0, num_cpus=2)
    assert "--node-ip-address=127.0.0.1" in local and "--dashboard-host=127.0.0.1" in local
    assert local_env == SINGLE_MACHINE  # else Ray swaps 127.0.0.1 for the machine's address and binds every interface
    assert head_command(host="localhost", port=1, dashboard_port=2, agent_port=0, num_cpus=None)[1] == SINGLE_MACHINE
    network, network_env = head_command(host="10.1.2.3", port=6379, dashboard_port=8265, agent_port=0, num_cpus=None)
    assert "--node-ip-address=10.1.2.3" in network and "--dashboard-host=127.0.0.1" in network
    assert network_env == {"RAY_AUTH_MODE": "token"}


def test_a_network_head_refuses_a_wildcard_and_disabled_auth(monkeypatch: pytest.MonkeyPatch) -> None:
    from cluster.jobs import _check_host
    from orchestration.errors import UsageError

    monkeypatch.delenv("RAY_AUTH_MODE", raising=False)
    assert _check_host("127.0.0.1") is False and _check_host("10.1.2.3") is True
    for wildcard in ("0.0.0.0", "::"):
        with pytest.raises(UsageError, match="not '"):
            _check_host(wildcard)
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    with pytest.raises(UsageError, match="needs token auth"):
        _check_host("10.1.2.3")
    assert _check_host("127.0.0.1") is False  # a loopback head may run without a token, as the user chose


def test_a_token_is_created_once_owner_only_and_never_shown(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    from cluster.jobs import _auth_line
    from cluster.runtime import ensure_token, read_token

    monkeypatch.setenv("HOME", str(tmp_path))
    for name in ("RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"):
        monkeypatch.delenv(name, raising=False)
    created = ensure_token()
    assert created == tmp_path / ".ray" / "auth_token" and created.stat().st_mode & 0o777 == 0o600
    token = read_token()
    assert token is not None and len(token) == 64 and int(token, 16) >= 0
    assert ensure_token() is None and read_token() == token  # an existing token is kept
    line = _auth_line(True, created)
    assert "token auth is on" in line and str(created) in line and token not in line


def _unrelated_process():
    """A live process that leads its own process group, as the pid in a stale head record may come to name."""
    import subprocess

    return subprocess.Popen(["sleep", "60"], start_new_session=True)


@pytest.mark.parametrize("record", ["stale start time", "legacy record"])
def test_cluster_down_never_signals_a_process_that_is_no_longer_the_head(tmp_path, monkeypatch, record: str) -> None:
    import psutil

    from cluster import jobs
    from orchestration.errors import JobError

    state_file = tmp_path / "head.json"
    monkeypatch.setattr(jobs, "HEAD_STATE", state_file)
    bystander = _unrelated_process()
    try:
        state = {"pgid": bystander.pid, "address": "127.0.0.1:6391", "dashboard": "http://127.0.0.1:8291"}
        if record == "stale start time":  # the head started an hour before the process that holds its pid now
            state.update(pid=bystander.pid, create_time=psutil.Process(bystander.pid).create_time() - 3600)
        state_file.write_text(json.dumps(state))
        assert jobs.head_status(state) == "replaced"
        with pytest.raises(JobError, match="no longer the head node"):
            jobs.cluster_down(timeout_s=1)
        time.sleep(0.2)
        assert bystander.poll() is None  # still running: not signalled
        assert not state_file.exists()  # the stale record is gone, so `cluster up` can start a head again
    finally:
        bystander.kill()
        bystander.wait()


def test_head_status_follows_the_recorded_process() -> None:
    import psutil

    from cluster.jobs import head_status

    process = _unrelated_process()
    state = {"pgid": process.pid, "pid": process.pid, "create_time": psutil.Process(process.pid).create_time()}
    assert head_status(state) == "running"
    process.kill()
    process.wait()
    assert head_status(state) == "gone"


def test_a_driver_joins_a_loopback_head_in_single_machine_mode(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    from cluster.runtime import SINGLE_MACHINE, prepare_to_join

    (name, value), = SINGLE_MACHINE.items()
    monkeypatch.delenv("RAY_AUTH_MODE", raising=False)  # prepare_to_join may set it (a token at hand): restored after
    monkeypatch.setenv("RAY_TMPDIR", str(tmp_path))
    (tmp_path / "ray").mkdir()
    (tmp_path / "ray" / "ray_current_cluster").write_text("127.0.0.1:6391")  # what `ray start` recorded: "auto" joins it
    for address, joins_loopback in (("127.0.0.1:6391", True), ("localhost:6379", True), ("auto", True), ("10.0.0.5:6379", False),
                                    ("http://127.0.0.1:8265", False), (None, False)):
        monkeypatch.delenv(name, raising=False)
        prepare_to_join(address)
        assert (os.environ.get(name) == value) is joins_loopback, address
