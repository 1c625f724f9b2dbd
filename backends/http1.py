"""A small HTTP/1.1 client for the request path: pooled keep-alive connections and
httptools parsing, nothing more.

A remote backend needs little of HTTP: one upstream, JSON bodies, answers read
whole or streamed (SSE, NDJSON), no redirects, cookies, compression or proxies.
aiohttp spent ~148 µs of CPU per call to the benchmark's mock upstream, whatever
its options; this spends ~44 µs, and that difference was a fifth of the gateway's
CPU per request (loadtests/bench_overhead.py).

    pool = ConnectionPool("http://127.0.0.1:8080", connect_timeout=5)
    response = await pool.send("POST", "/v1/chat/completions", body, headers)
    try:
        status, raw = response.status, await response.read()
    finally:
        response.release()  # back to the pool if the answer was read to its end, else closed

Timeouts other than connecting are the caller's (``asyncio.timeout`` around the
awaits). Anything that breaks a connection raises an ``OSError``: the
connection failures themselves, and :class:`ProtocolError` for an answer that is
not HTTP/1.1 or stops half-way. A request on a reused connection that the
upstream had already closed (its keep-alive timeout) is sent again once on a new
connection, if that connection ended at once and without a byte of an answer; an
upstream that takes a request and then dies is not sent it again.
"""

from __future__ import annotations

import asyncio
import ssl
from collections import deque
from collections.abc import Mapping
from urllib.parse import urlsplit

import httptools

_HIGH_WATER = 1 << 16  # buffered body bytes before the socket stops being read
# An idle connection is reused for this long, below the usual keep-alive timeouts
# (uvicorn's and llama-server's are 5 s), so that the upstream rarely closes one under us.
_IDLE_SECONDS = 4.0
# A reused connection that ends this soon after a request was written, with nothing of
# an answer, was closed while idle: the request is sent again, once. Later, the upstream
# may have run it.
_STALE_SECONDS = 0.05


class ProtocolError(ConnectionError):
    """The upstream's answer is not valid HTTP/1.1, or the connection ended inside it."""


class _Connection(asyncio.Protocol):
    """One keep-alive connection, carrying one exchange at a time."""

    def __init__(self) -> None:
        self._transport: asyncio.Transport | None = None
        self._parser = httptools.HttpResponseParser(self)
        self._waiter: asyncio.Future[None] | None = None
        self._paused = False
        self._reset()

    def _reset(self) -> None:
        if self._paused and self._transport is not None:
            self._transport.resume_reading()  # a previous answer left unread
        self.status = 0
        self.headers: dict[str, str] = {}
        self.headers_done = False
        self.complete = False
        self.received = False  # any byte of the current answer
        self.error: BaseException | None = None
        self.keep_alive = True
        self._delimited = False  # a Content-Length or chunked body, not "until close"
        self._body: deque[bytes] = deque()
        self._buffered = 0
        self._paused = False
        self.sent_at = self.lost_at = 0.0
        self.idle_since = 0.0
        self.unsent = False  # the request could not even be written

    # -- asyncio.Protocol ----------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]  # uvloop's is not a subclass

    def data_received(self, data: bytes) -> None:
        self.received = True
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self._fail(ProtocolError(f"malformed HTTP answer: {exc}"))
            self.close()

    def eof_received(self) -> None:
        return None  # let the transport close; connection_lost says what that means

    def connection_lost(self, exc: Exception | None) -> None:
        self._transport = None
        self.lost_at = asyncio.get_running_loop().time()
        if self.headers_done and not self.complete and not self._delimited and exc is None:
            self.complete = True  # a body that runs until the connection closes
            self.keep_alive = False
            self._wake()
        elif not self.complete:
            self._fail(ProtocolError("the upstream closed the connection mid-answer"))

    # -- httptools callbacks --------------------------------------------------

    def on_header(self, name: bytes, value: bytes) -> None:
        key = name.decode("latin-1").lower()
        self.headers[key] = value.decode("latin-1")
        if key == "content-length" or (key == "transfer-encoding" and b"chunked" in value.lower()):
            self._delimited = True

    def on_headers_complete(self) -> None:
        self.status = self._parser.get_status_code()
        if 100 <= self.status < 200:  # informational (103 Early Hints): the answer follows
            self.headers = {}
            return
        self.keep_alive = self._parser.should_keep_alive()
        self.headers_done = True
        self._wake()

    def on_body(self, body: bytes) -> None:
        self._body.append(body)
        self._buffered += len(body)
        if self._buffered > _HIGH_WATER and not self._paused and self._transport is not None:
            self._transport.pause_reading()
            self._paused = True
        self._wake()

    def on_message_complete(self) -> None:
        if self.headers_done:  # not the end of an informational answer
            self.complete = True
            self._wake()

    # -- used by ConnectionPool and Response ------------------------------------

    def closed_while_idle(self) -> bool:
        """Ended at once after the request went out, with nothing of an answer: the
        upstream had closed it while it sat in the pool."""
        if self.unsent:
            return True
        if self.received:
            return False
        return self._transport is None and self.lost_at - self.sent_at < _STALE_SECONDS

    @property
    def usable(self) -> bool:
        return self._transport is not None and not self._transport.is_closing()

    def send(self, data: bytes) -> None:
        if self._transport is None or self._transport.is_closing():
            self.unsent = True
            raise ProtocolError("the connection is closed")
        self._reset()
        self._transport.write(data)
        self.sent_at = asyncio.get_running_loop().time()

    async def wait(self) -> None:
        """Until the parser has news (headers, body, the end) or the connection fails."""
        if self.error is not None:
            raise self.error
        self._waiter = asyncio.get_running_loop().create_future()
        try:
            await self._waiter
        finally:
            self._waiter = None
        if self.error is not None:
            raise self.error

    def take(self) -> bytes:
        data = b"".join(self._body)
        self._body.clear()
        self._buffered = 0
        if self._paused and self._transport is not None:
            self._paused = False
            self._transport.resume_reading()
        return data

    def has_body(self) -> bool:
        return self._buffered > 0

    def close(self) -> None:
        if self._transport is not None:
            self._transport.close()

    def _fail(self, exc: BaseException) -> None:
        if self.error is None:
            self.error = exc
        self._wake()

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)


class Response:
    """One answer: its status and headers (names lower-case), then its body."""

    def __init__(self, pool: ConnectionPool, connection: _Connection) -> None:
        self._pool = pool
        self._connection: _Connection | None = connection
        self.status = connection.status
        self.headers: Mapping[str, str] = connection.headers

    async def read(self) -> bytes:
        """The rest of the body."""
        parts: list[bytes] = []
        while True:
            chunk = await self.readany()
            if not chunk:
                return b"".join(parts)
            parts.append(chunk)

    async def readany(self) -> bytes:
        """What has arrived (waiting for something if nothing has), or b"" at the end."""
        conn = self._connection
        if conn is None:
            return b""
        while not conn.has_body():
            if conn.complete:
                return b""
            await conn.wait()
        return conn.take()

    async def finish(self, limit: int = 1 << 16) -> None:
        """Read and drop what is left (an answer's terminator, say), up to ``limit``
        bytes, so that :meth:`release` can reuse the connection."""
        while limit > 0:
            chunk = await self.readany()
            if not chunk:
                return
            limit -= len(chunk)

    def release(self) -> None:
        """Give the connection back if the answer was read to its end, else close it
        (which is how an upstream learns that nobody wants the rest)."""
        conn, self._connection = self._connection, None
        if conn is not None:
            self._pool.give_back(conn)


class ConnectionPool:
    """Keep-alive connections to one upstream; no limit (the scheduler bounds the load)."""

    def __init__(
        self,
        base_url: str,
        *,
        connect_timeout: float,
        headers: Mapping[str, str] | None = None,
        max_idle: int = 1024,
    ) -> None:
        url = urlsplit(base_url)
        if url.scheme not in ("http", "https") or not url.hostname:
            raise ValueError(f"not an http(s) URL: {base_url!r}")
        self._host = url.hostname
        self._port = url.port or (443 if url.scheme == "https" else 80)
        self._ssl = ssl.create_default_context() if url.scheme == "https" else None
        self._prefix = url.path.rstrip("/")
        host = f"[{self._host}]" if ":" in self._host else self._host
        default_port = self._port == (443 if self._ssl else 80)
        fixed = {"Host": host if default_port else f"{host}:{self._port}", **(headers or {})}
        self._head = "".join(f"{k}: {v}\r\n" for k, v in fixed.items()).encode("latin-1")
        self._connect_timeout = connect_timeout
        self._idle: list[_Connection] = []
        self._max_idle = max_idle
        self._closed = False

    async def send(
        self,
        method: str,
        path: str,
        body: bytes = b"",
        headers: Mapping[str, str] | None = None,
    ) -> Response:
        """Send one request; return once the answer's status and headers are in."""
        head = f"{method} {self._prefix}{path} HTTP/1.1\r\n".encode("latin-1") + self._head
        if headers:
            head += "".join(f"{k}: {v}\r\n" for k, v in headers.items()).encode("latin-1")
        if body or method in ("POST", "PUT", "PATCH"):
            head += b"Content-Length: %d\r\n" % len(body)
        data = head + b"\r\n" + body
        retried = False
        while True:
            conn, reused = await self._checkout()
            try:
                conn.send(data)
                while not conn.headers_done:
                    await conn.wait()
            except ProtocolError:
                conn.close()
                if reused and not retried and conn.closed_while_idle():
                    retried = True
                    continue
                raise
            except BaseException:
                conn.close()
                raise
            return Response(self, conn)

    async def _checkout(self) -> tuple[_Connection, bool]:
        if self._closed:
            raise ProtocolError("the connection pool is closed")
        loop = asyncio.get_running_loop()
        while self._idle:
            conn = self._idle.pop()
            if conn.usable and loop.time() - conn.idle_since < _IDLE_SECONDS:
                return conn, True
            conn.close()
        async with asyncio.timeout(self._connect_timeout):
            _, conn = await loop.create_connection(
                _Connection, self._host, self._port, ssl=self._ssl
            )
        return conn, False

    def give_back(self, conn: _Connection) -> None:
        reusable = conn.complete and conn.keep_alive and conn.error is None and conn.usable
        if reusable and not self._closed and len(self._idle) < self._max_idle:
            conn.idle_since = asyncio.get_running_loop().time()
            self._idle.append(conn)
        else:
            conn.close()

    async def close(self) -> None:
        self._closed = True
        for conn in self._idle:
            conn.close()
        self._idle.clear()
        await asyncio.sleep(0)  # let the transports finish closing
