"""Security hardening without Ray: the OpenAI-compatible backend against hostile local servers (a redirect that would
carry the API key elsewhere, a reply dripped a byte at a time, a huge reply), the advisor route's limits, and
`cluster down` against a head record that no longer names the head."""

from __future__ import annotations

import json
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
