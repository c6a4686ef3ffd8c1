"""Network guards: what counts as a loopback address, and one guarded HTTP POST (for the OpenAI-compatible backend:
no redirects, a size cap and a deadline for the whole reply).

Why not `urllib.request.urlopen`: it answers a 301/302/303 to a POST with a GET that keeps the `Authorization`
header, to any host and over plain HTTP, so one redirect hands the API key to whoever the endpoint names; and its
`timeout` bounds each socket operation, not the exchange, so a server that sends a byte every few seconds holds the
caller (and the advisor replica's lock, and every later batch) for as long as it likes.

Here a redirect is refused, never followed (an API endpoint has no reason to redirect a POST; the error says where it
pointed, so the user can configure that URL directly); the reply is read up to `max_bytes` and no further (a larger
announced length is refused before reading); and a watchdog shuts the socket at the deadline, whatever phase the
exchange is in (request, status line, headers, body). Proxies named in the environment are not used.
"""

from __future__ import annotations

import http.client
import ipaddress
import socket
import threading
import time
import urllib.parse

READ_CHUNK = 65536  # bytes asked of the socket at a time


def is_loopback(host: str) -> bool:
    """True for an address only this machine reaches: `localhost`, 127.0.0.0/8, ::1. A name or a wildcard (0.0.0.0, ::)
    is not: it may be, or stand for, an address other machines reach."""
    if host.strip().lower() == "localhost":
        return True
    try:
        address = ipaddress.ip_address(host.strip().strip("[]"))
    except ValueError:
        return False
    mapped = getattr(address, "ipv4_mapped", None)  # ::ffff:127.0.0.1, as a dual-stack socket shows an IPv4 bind
    return (mapped or address).is_loopback


def post_json(url: str, body: bytes, headers: dict[str, str], *, deadline_s: float, max_bytes: int) -> bytes:
    """POST `body` to `url`; the reply's body, read whole within `deadline_s` seconds and at most `max_bytes` long.

    Raises `TimeoutError` past the deadline; `OSError` for a redirect, a non-2xx status or a reply over the cap (the
    endpoint answered with something that is not read), and for a connection that fails; `http.client.HTTPException`
    for a reply that is not HTTP."""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"not an http(s) URL: {url!r}")
    started = time.monotonic()
    kind = http.client.HTTPSConnection if parts.scheme == "https" else http.client.HTTPConnection
    connection = kind(parts.hostname, parts.port, timeout=deadline_s)
    cut = threading.Event()
    try:
        connection.connect()  # bounded by the socket timeout; the watchdog covers everything after it
        watchdog = threading.Timer(max(0.0, deadline_s - (time.monotonic() - started)), _shut, (connection.sock, cut))
        watchdog.daemon = True
        watchdog.start()
        try:
            connection.request("POST", (parts.path or "/") + (f"?{parts.query}" if parts.query else ""), body=body, headers=headers)
            response = connection.getresponse()
            _refuse_unwanted_status(response, url)
            reply = _read_capped(response, max_bytes)
        finally:
            watchdog.cancel()
    except (OSError, http.client.HTTPException) as error:
        if cut.is_set():
            raise TimeoutError(f"no complete reply from {url} within {deadline_s:g}s") from error
        raise
    finally:
        connection.close()
    if cut.is_set():  # the watchdog's shutdown can read as a clean end of a reply without a length
        raise TimeoutError(f"no complete reply from {url} within {deadline_s:g}s")
    return reply


def _shut(sock: socket.socket | None, cut: threading.Event) -> None:
    """The deadline passed: shut the socket down under whatever read or write is blocked on it (it then returns at
    once). The plain socket's shutdown, also for TLS: the reader sees the end of the stream, not a TLS alert."""
    cut.set()
    if sock is not None:
        try:
            socket.socket.shutdown(sock, socket.SHUT_RDWR)
        except OSError:
            pass  # already closed: the exchange ended as the deadline came


def _refuse_unwanted_status(response: http.client.HTTPResponse, url: str) -> None:
    if 300 <= response.status < 400:
        target = (response.getheader("Location") or "no Location")[:200]
        raise OSError(f"{url} answered HTTP {response.status} redirecting to {target}: redirects are not followed (the API "
                           "key would go with them); set advisor.endpoint to the URL that answers")
    if not 200 <= response.status < 300:
        excerpt = response.read1(300).decode("utf-8", errors="replace")
        raise OSError(f"HTTP {response.status} {response.reason}: {excerpt}")


def _read_capped(response: http.client.HTTPResponse, max_bytes: int) -> bytes:
    """The body, refused as soon as it is known to pass `max_bytes` (by its announced length, else while reading)."""
    announced = response.getheader("Content-Length", "")
    if announced.strip().isdigit() and int(announced) > max_bytes:
        raise OSError(f"the reply announces {int(announced)} bytes, over advisor.max_reply_bytes={max_bytes}")
    chunks: list[bytes] = []
    size = 0
    while chunk := response.read1(READ_CHUNK):  # one socket read at a time: the cap is checked between them
        size += len(chunk)
        if size > max_bytes:
            raise OSError(f"the reply passed advisor.max_reply_bytes={max_bytes} bytes; the rest was not read")
        chunks.append(chunk)
    if response.length:  # a Content-Length reply cut short
        raise http.client.IncompleteRead(b"".join(chunks), response.length)
    return b"".join(chunks)
