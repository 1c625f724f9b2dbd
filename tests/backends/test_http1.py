"""backends/http1.py against scripted raw-socket servers on loopback.

The remote backends' behaviour through this client (errors, timeouts, streams)
is covered in test_remote.py and, against real engines, in the integration
tests; these pin down the connection handling: reuse, retries, body framings,
flow control.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest

from backends import http1
from backends.http1 import _HIGH_WATER, ConnectionPool, ProtocolError

Serve = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


@contextlib.asynccontextmanager
async def server(serve: Serve) -> AsyncIterator[tuple[str, list[int]]]:
    """A TCP server running ``serve`` per connection; yields its URL and a connection count."""
    connections: list[int] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        connections.append(1)
        try:
            await serve(reader, writer)
        finally:
            writer.close()

    srv = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = srv.sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}", connections
    finally:
        srv.close()


async def read_request(reader: asyncio.StreamReader) -> tuple[bytes, bytes]:
    head = await reader.readuntil(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            length = int(line.split(b":")[1])
    return head, await reader.readexactly(length)


def reply(body: bytes, extra: bytes = b"") -> bytes:
    return b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n%s\r\n%s" % (len(body), extra, body)


def once(raw: bytes) -> Serve:
    """A connection that answers one request with ``raw`` bytes, whatever they are."""

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(raw)
        await writer.drain()

    return serve


def keep_alive(answer: Callable[[int], bytes]) -> Serve:
    """A connection that answers request n (from 1) with ``answer(n)`` until the client leaves."""
    count = 0

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal count
        while True:
            try:
                await read_request(reader)
            except asyncio.IncompleteReadError:
                return
            count += 1
            writer.write(answer(count))

    return serve


async def test_sequential_requests_share_one_keep_alive_connection() -> None:
    seen: list[bytes] = []

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            try:
                head, body = await read_request(reader)
            except asyncio.IncompleteReadError:
                return
            seen.append(head + body)
            writer.write(reply(b'{"ok": true}', b"Retry-After: 3\r\n"))

    async with server(serve) as (url, connections):
        pool = ConnectionPool(url + "/base/", connect_timeout=1, headers={"Authorization": "k"})
        for _ in range(3):
            response = await pool.send("POST", "/v1/x", b"{}", {"Content-Type": "a/b"})
            assert (response.status, await response.read()) == (200, b'{"ok": true}')
            assert response.headers["retry-after"] == "3"
            response.release()
        await pool.close()
    assert len(connections) == 1
    head = seen[0].decode()
    assert head.startswith("POST /base/v1/x HTTP/1.1\r\n")
    for line in ("Host: 127.0.0.1:", "Authorization: k", "Content-Type: a/b", "Content-Length: 2"):
        assert line in head


async def test_a_connection_the_upstream_closed_while_idle_is_replaced() -> None:
    """Its keep-alive timeout passed: the request goes once more, on a new connection."""

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(reply(b"x"))
        await writer.drain()  # then close, although keep-alive was not refused

    async with server(serve) as (url, connections):
        pool = ConnectionPool(url, connect_timeout=1)
        for _ in range(3):
            response = await pool.send("GET", "/")
            assert await response.read() == b"x"
            response.release()
            await asyncio.sleep(0.05)  # the close arrives while the connection is idle
        await pool.close()
    assert len(connections) == 3


async def test_a_stale_connection_not_yet_seen_closed_is_retried_once() -> None:
    """The close is only noticed when the request is written: sent again, not failed."""
    served = 0

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal served
        await read_request(reader)
        served += 1
        writer.write(reply(b"x"))
        await writer.drain()
        await reader.read(1)  # the next request: drop it unanswered

    async with server(serve) as (url, connections):
        pool = ConnectionPool(url, connect_timeout=1)
        for _ in range(2):
            response = await pool.send("GET", "/")
            assert await response.read() == b"x"
            response.release()
        await pool.close()
    assert (served, len(connections)) == (2, 2)


async def test_chunked_and_until_close_bodies() -> None:
    bodies = [
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\nuntil the end",
    ]

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(bodies.pop(0))
        await writer.drain()

    async with server(serve) as (url, _):
        pool = ConnectionPool(url, connect_timeout=1)
        for expected in (b"abcde", b"until the end"):
            response = await pool.send("GET", "/")
            assert await response.read() == expected
            response.release()
        await pool.close()


async def test_an_answer_cut_short_is_a_protocol_error() -> None:
    async with server(once(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc")) as (url, _):
        pool = ConnectionPool(url, connect_timeout=1)
        response = await pool.send("GET", "/")
        with pytest.raises(ProtocolError):
            await response.read()
        response.release()
        await pool.close()


async def test_garbage_is_a_protocol_error() -> None:
    async with server(once(b"SSH-2.0-OpenSSH\r\n\r\n")) as (url, _):
        pool = ConnectionPool(url, connect_timeout=1)
        with pytest.raises(ProtocolError):
            await pool.send("GET", "/")
        await pool.close()


async def test_leaving_a_stream_early_closes_its_connection() -> None:
    """How an upstream learns that nobody wants the rest of a generation."""
    closed = asyncio.Event()

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nfirst\r\n")
        await writer.drain()
        await reader.read()  # returns once the client has closed
        closed.set()

    async with server(serve) as (url, connections):
        pool = ConnectionPool(url, connect_timeout=1)
        response = await pool.send("POST", "/", b"{}")
        assert await response.readany() == b"first"
        response.release()
        await asyncio.wait_for(closed.wait(), 2)
        await pool.close()
    assert len(connections) == 1


async def test_a_large_body_pauses_reading_and_arrives_whole() -> None:
    body = bytes(range(256)) * 4096  # 1 MiB, past the high-water mark many times

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(reply(body))
        await writer.drain()

    async with server(serve) as (url, _):
        pool = ConnectionPool(url, connect_timeout=1)
        response = await pool.send("GET", "/")
        await asyncio.sleep(0.1)  # let it all arrive unread: reading must pause, not buffer
        assert response._connection._buffered < len(body) // 2  # type: ignore[union-attr]
        assert await response.read() == body
        response.release()
        await pool.close()


async def test_connection_refused_is_an_os_error() -> None:
    async with server(read_request) as (url, _):
        pass  # closed: nothing listens there any more
    pool = ConnectionPool(url, connect_timeout=1)
    with pytest.raises(ConnectionRefusedError):
        await pool.send("GET", "/")


def test_only_http_urls() -> None:
    with pytest.raises(ValueError, match="not an http"):
        ConnectionPool("ftp://example.com", connect_timeout=1)


async def test_an_upstream_that_took_the_request_and_died_is_not_sent_it_again() -> None:
    """Only a connection that ends at once after the write was closed while idle."""
    taken = 0

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal taken
        await read_request(reader)
        writer.write(reply(b"x"))
        await writer.drain()
        await read_request(reader)  # the second request: taken, worked on, then a crash
        taken += 1
        await asyncio.sleep(0.2)

    async with server(serve) as (url, connections):
        pool = ConnectionPool(url, connect_timeout=1)
        response = await pool.send("POST", "/", b"{}")
        assert await response.read() == b"x"
        response.release()
        with pytest.raises(ProtocolError):
            await pool.send("POST", "/", b"{}")
        await pool.close()
    assert (taken, len(connections)) == (1, 1)


async def test_an_unread_answer_that_paused_reading_leaves_a_usable_connection() -> None:
    big = b"y" * (_HIGH_WATER + 4096)

    async with server(keep_alive(lambda _: reply(big))) as (url, connections):
        pool = ConnectionPool(url, connect_timeout=1)
        response = await pool.send("GET", "/")
        await asyncio.sleep(0.1)  # all of it arrives; reading pauses; nobody reads it
        response.release()
        response = await asyncio.wait_for(pool.send("GET", "/"), 2)
        assert await asyncio.wait_for(response.read(), 2) == big
        response.release()
        await pool.close()
    assert len(connections) == 1


async def test_informational_answers_are_skipped() -> None:
    """A 103 Early Hints before the answer must not be taken for it (and shift answers)."""
    hints = b"HTTP/1.1 103 Early Hints\r\nLink: </x>\r\n\r\n"

    async with server(keep_alive(lambda n: hints + reply(b"answer-%d" % n))) as (url, _):
        pool = ConnectionPool(url, connect_timeout=1)
        for n in (1, 2):
            response = await pool.send("GET", "/")
            assert (response.status, await response.read()) == (200, b"answer-%d" % n)
            assert "link" not in response.headers
            response.release()
        await pool.close()


async def test_idle_connections_are_not_kept_past_the_idle_limit(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(http1, "_IDLE_SECONDS", 0.05)

    async with server(keep_alive(lambda _: reply(b"x"))) as (url, connections):
        pool = ConnectionPool(url, connect_timeout=1)
        for pause in (0, 0.1):
            await asyncio.sleep(pause)
            response = await pool.send("GET", "/")
            assert await response.read() == b"x"
            response.release()
        await pool.close()
    assert len(connections) == 2
