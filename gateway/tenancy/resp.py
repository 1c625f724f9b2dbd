"""A lean Redis client for the request path: one pipelined connection, hiredis parsing.

Measured here (one EVALSHA of the admission script, uvloop): redis-py's asyncio
client spends ~160 µs of CPU per call (pool checkout, retry and event hooks,
its own framing); this spends ~55 µs. Every admission and completion makes one
call, so that difference is most of what Redis-backed limits cost a request.

Replies come back in the order commands were sent, so each command's future
waits in a FIFO; commands issued in one event-loop iteration leave in one write.
Anything that leaves the stream in doubt (a timeout, a lost connection) closes
the connection and fails every waiting command; the next command reconnects.
Multi-command transactions stay on redis-py
(:class:`~gateway.tenancy.redis_store.RedisStore`): a shared pipelined
connection cannot hold a MULTI open.

    fast = FastRedis("redis://127.0.0.1:6379/0", timeout=0.25)
    reply = await fast.evalsha(script, keys=["k"], args=[1])
"""

from __future__ import annotations

import asyncio
import hashlib
import socket
import ssl
from collections import deque
from typing import Any, cast
from urllib.parse import unquote, urlparse

import hiredis


class RespError(Exception):
    """Redis answered with an error reply (a bug in a script, or NOSCRIPT)."""


class Script:
    def __init__(self, source: str) -> None:
        self.source = source
        self.sha = hashlib.sha1(source.encode(), usedforsecurity=False).hexdigest()


_SKIP_NEXT_REPLY = b"*3\r\n$6\r\nCLIENT\r\n$5\r\nREPLY\r\n$4\r\nSKIP\r\n"  # CLIENT REPLY SKIP


class _Connection(asyncio.Protocol):
    def __init__(self) -> None:
        self._reader = hiredis.Reader()
        self._waiting: deque[asyncio.Future[Any]] = deque()
        self._transport: asyncio.Transport | None = None
        self._out: list[bytes] = []
        self.closed = False
        self.can_skip_replies = False  # CLIENT REPLY may be renamed away or denied by ACLs

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def data_received(self, data: bytes) -> None:
        self._reader.feed(data)
        while (reply := self._reader.gets()) is not False:
            if not self._waiting:  # a reply nobody asked for: the stream is out of step
                self.abort()
                return
            future = self._waiting.popleft()
            if future.done():  # its caller gave up (timeout); the reply is dropped
                continue
            if isinstance(reply, hiredis.ReplyError):
                future.set_exception(RespError(str(reply)))
            else:
                future.set_result(reply)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        while self._waiting:
            future = self._waiting.popleft()
            if not future.done():
                future.set_exception(ConnectionError("redis connection lost"))

    def send(self, args: tuple[Any, ...]) -> asyncio.Future[Any]:
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        if self.closed or self._transport is None:
            future.set_exception(ConnectionError("redis connection closed"))
            return future
        self._waiting.append(future)
        if not self._out:  # the first command of this loop iteration: flush after the rest
            asyncio.get_running_loop().call_soon(self._flush)
        self._out.append(hiredis.pack_command(args))
        return future

    def send_noreply(self, args: tuple[Any, ...]) -> None:
        """Send a command whose reply Redis skips (``CLIENT REPLY SKIP``): nothing to read."""
        if self.closed or self._transport is None:
            return
        if not self.can_skip_replies:
            self.send(args).add_done_callback(_consume)
            return
        if not self._out:
            asyncio.get_running_loop().call_soon(self._flush)
        self._out.append(_SKIP_NEXT_REPLY + hiredis.pack_command(args))

    def _flush(self) -> None:
        # Every command sent during one event-loop iteration leaves in one write: with many
        # requests in flight, admissions and releases share system calls and packets.
        if self._transport is not None and not self.closed:
            self._transport.write(b"".join(self._out))
        self._out.clear()

    def abort(self) -> None:
        if self._transport is not None and not self.closed:
            self._transport.abort()


class FastRedis:
    """One connection to ``url`` (redis://, rediss:// or unix://), opened on first use."""

    def __init__(self, url: str, *, timeout: float) -> None:
        self._url = urlparse(url)
        self._timeout = timeout
        self._conn: _Connection | None = None
        self._connecting: asyncio.Lock | None = None
        self._preload: list[Script] = []

    def preload(self, script: Script) -> None:
        """Load ``script`` on every new connection, so replies-skipped calls can use its SHA."""
        self._preload.append(script)

    async def _connection(self) -> _Connection:
        if self._conn is not None and not self._conn.closed:
            return self._conn
        if self._connecting is None:
            self._connecting = asyncio.Lock()
        async with self._connecting:
            if self._conn is None or self._conn.closed:
                self._conn = await self._open()
        return self._conn

    async def _open(self) -> _Connection:
        loop = asyncio.get_running_loop()
        u = self._url
        if u.scheme == "unix":
            _, conn = await loop.create_unix_connection(_Connection, u.path)
        else:
            tls = ssl.create_default_context() if u.scheme == "rediss" else None
            _, conn = await loop.create_connection(
                _Connection, u.hostname or "127.0.0.1", u.port or 6379, ssl=tls
            )
        try:
            # Everything after the socket opened: on any failure (or a cancellation by the
            # caller's timeout while Redis is frozen) the socket must not be left open.
            if u.password:
                auth = (u.username, u.password) if u.username else (u.password,)
                await conn.send(("AUTH", *(unquote(a) for a in auth)))
            db = u.path.strip("/") if u.scheme != "unix" else ""
            if db and db != "0":
                await conn.send(("SELECT", db))
            for script in self._preload:
                await conn.send(("SCRIPT", "LOAD", script.source))
            try:
                conn.can_skip_replies = await conn.send(("CLIENT", "REPLY", "ON")) == b"OK"
            except RespError:
                conn.can_skip_replies = False
        except RespError as exc:
            conn.abort()
            # The reply names the problem (WRONGPASS, ...), never the password.
            raise ConnectionError(f"redis refused the connection: {exc}") from None
        except BaseException:
            conn.abort()
            raise
        return conn

    async def execute(self, *args: Any) -> Any:
        conn = await self._connection()
        return await conn.send(args)

    async def evalsha(self, script: Script, keys: list[str], args: list[Any]) -> Any:
        """Run a script by its SHA; load it on first use (or after Redis lost it)."""
        conn = self._conn
        if conn is None or conn.closed:
            conn = await self._connection()
        try:
            return await conn.send(("EVALSHA", script.sha, len(keys), *keys, *args))
        except RespError as exc:
            if not str(exc).startswith("NOSCRIPT"):
                raise
            return await self.execute("EVAL", script.source, len(keys), *keys, *args)

    def evalsha_nowait(self, script: Script, keys: list[str], args: list[Any]) -> None:
        """Run a preloaded script without a reply (a release); dropped if not connected.

        No reply means no wake-up to read one. If Redis lost the script (SCRIPT FLUSH),
        the call is lost too: releases are safe to lose (leases expire, rates refill).
        """
        conn = self._conn
        if conn is not None and not conn.closed:
            conn.send_noreply(("EVALSHA", script.sha, len(keys), *keys, *args))

    def reset(self) -> None:
        """Drop the connection (after a timeout its stream is in doubt)."""
        if self._conn is not None:
            self._conn.abort()
            self._conn = None

    async def close(self) -> None:
        self.reset()


def _consume(future: asyncio.Future[Any]) -> None:
    if not future.cancelled():
        future.exception()  # retrieved, so asyncio does not log it: a lost release is harmless
