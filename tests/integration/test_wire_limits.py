"""The wire limits of a real ``lockgate serve``, driven over raw sockets.

Small limits (4 KiB of head, 0.5 s to send it, 8 connections) so that each refusal is quick
to provoke; the fake backend serves, no model is needed.
"""

from __future__ import annotations

import contextlib
import json
import socket
import time
from collections.abc import Iterator

import httpx
import pytest

from tests.integration.conftest import Server, lockgate, stop

pytestmark = pytest.mark.integration

CONFIG = """
server:
  host: 127.0.0.1
  port: {port}
  log_level: warning
  max_header_bytes: 4096
  max_headers: 32
  max_request_line: 1024
  header_timeout: 0.5
  body_timeout: 0.5
  keep_alive_timeout: 1
  max_connections: 8
models:
  - name: echo
    backend: fake
auth:
  database: DATABASE
"""


@pytest.fixture(scope="module")
def limited(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    root = tmp_path_factory.mktemp("wire")
    server = lockgate(CONFIG.replace("DATABASE", str(root / "wire.db")), root)
    yield server
    stop(server)


def connect(server: Server) -> socket.socket:
    host, port = server.base_url.removeprefix("http://").split(":")
    s = socket.create_connection((host, int(port)), timeout=5)
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return s


def answer(s: socket.socket) -> tuple[int, dict[str, object], float]:
    """(status, JSON body, seconds until the server closed) of a refused connection."""
    started, data = time.monotonic(), b""
    with contextlib.suppress(ConnectionResetError):
        while chunk := s.recv(65536):
            data += chunk
    closed = time.monotonic() - started
    head, _, body = data.partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    return status, json.loads(body), closed


def test_a_request_within_the_limits_is_served(limited: Server) -> None:
    body = {"model": "echo", "messages": [{"role": "user", "content": "a b"}]}
    r = httpx.post(f"{limited.base_url}/v1/chat/completions", json=body)
    assert r.json()["choices"][0]["message"]["content"] == "a b"


@pytest.mark.parametrize(
    ("request_bytes", "status"),
    [
        (b"GET /v1/models HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 8000 + b"\r\n\r\n", 431),
        (b"GET /v1/models HTTP/1.1\r\n" + b"X-N: 1\r\n" * 40 + b"\r\n", 431),
        (b"GET /v1/" + b"m" * 2000 + b" HTTP/1.1\r\nHost: x\r\n\r\n", 414),
        (b"GET /v1/models HTTP/1.1\r\nHo st: x\r\n\r\n", 400),
        (b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + b"\x00" * 40, 400),  # TLS to HTTP
    ],
    ids=["header-bytes", "header-count", "request-line", "malformed", "tls"],
)
def test_heads_past_the_limits_are_refused_in_openai_shape(
    limited: Server, request_bytes: bytes, status: int
) -> None:
    with connect(limited) as s:
        s.sendall(request_bytes)
        got, body, _ = answer(s)
    assert got == status
    assert set(body["error"]) == {"message", "type", "param", "code"}  # type: ignore[arg-type]


def test_an_ollama_path_is_refused_in_ollamas_shape(limited: Server) -> None:
    with connect(limited) as s:
        s.sendall(b"POST /api/chat HTTP/1.1\r\n" + b"X-N: 1\r\n" * 40 + b"\r\n")
        status, body, _ = answer(s)
    assert status == 431
    assert set(body) == {"error"}


def test_a_header_that_never_ends_is_cut_off_as_it_grows(limited: Server) -> None:
    with connect(limited) as s:
        s.sendall(b"GET /v1/models HTTP/1.1\r\nX-Endless: ")
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            for _ in range(10):  # 10 KiB, 1 KiB at a time, no end of line
                s.sendall(b"a" * 1024)
                time.sleep(0.01)
        status, _, _ = answer(s)
    assert status == 431


@pytest.mark.parametrize(
    "sent",
    [b"", b"GET /v1/models HTTP/1.1\r\nHost: x\r\n"],  # nothing, or a head never finished
    ids=["silent", "slowloris"],
)
def test_a_slow_head_is_a_408_within_the_header_timeout(limited: Server, sent: bytes) -> None:
    with connect(limited) as s:
        s.sendall(sent)
        status, body, closed = answer(s)
    assert status == 408
    assert body["error"]["code"] == "timeout"  # type: ignore[index]
    assert closed < 3


def test_a_body_that_stops_arriving_is_cut_off(limited: Server) -> None:
    with connect(limited) as s:
        s.sendall(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b'Content-Length: 1000\r\n\r\n{"model": "echo"'
        )
        started, data = time.monotonic(), b""
        with contextlib.suppress(ConnectionResetError):
            while chunk := s.recv(65536):
                data += chunk
    assert time.monotonic() - started < 3
    assert not data or data.startswith(b"HTTP/1.1 4")  # 408 (or closed unanswered)


def test_connections_past_the_cap_get_a_503_at_once(limited: Server) -> None:
    held = [connect(limited) for _ in range(8)]
    try:
        time.sleep(0.05)
        with connect(limited) as extra:
            status, body, closed = answer(extra)
        assert status == 503
        assert body["error"]["code"] == "overloaded"  # type: ignore[index]
        assert closed < 0.4  # at once, not after a timeout
    finally:
        for s in held:
            s.close()
    time.sleep(0.1)
    assert httpx.get(f"{limited.base_url}/health/live").status_code == 200
