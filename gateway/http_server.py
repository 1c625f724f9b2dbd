"""uvicorn's httptools protocol with the wire limits it does not have.

uvicorn bounds neither header bytes nor header count, and a client that sends its head
(or its body) a byte at a time holds the connection for ever: slowloris, the class of
vLLM CVE-2025-48956. :func:`limited_protocol` returns a subclass of uvicorn's own
protocol (httptools keeps parsing; nothing else changes on the hot path) that refuses:

* a head over ``max_header_bytes`` (the request line and every header, raw) → 431;
* more than ``max_headers`` header lines → 431;
* a request target over ``max_request_line`` bytes → 414;
* a head not complete within ``header_timeout`` of the connection or of its first byte,
  or a body that stops arriving for ``body_timeout`` → 408, and the connection closes;
* a connection past ``max_connections`` open ones → 503 at once, closed;
* what the parser cannot read → 400 (uvicorn's is plain text);

each with a JSON error body in the door's shape. Timers are armed only while a head or a
body is incomplete after a read, so a request that arrives whole costs none.

    uvicorn.run(app, http=limited_protocol(settings.server), ...)
"""

from __future__ import annotations

import asyncio
from typing import Any

import orjson
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from gateway.settings import ServerSettings

_REASONS = {
    400: b"Bad Request",
    408: b"Request Timeout",
    414: b"URI Too Long",
    431: b"Request Header Fields Too Large",
    503: b"Service Unavailable",
}
_END_OF_HEAD = b"\r\n\r\n"


def error_body(status: int, message: str, *, ollama: bool) -> bytes:
    """The error in the door's shape; before a path is known, OpenAI's."""
    if ollama:
        return orjson.dumps({"error": message})
    code = {408: "timeout", 431: "headers_too_large", 414: "uri_too_long", 503: "overloaded"}
    kind = "server_error" if status >= 500 else "invalid_request_error"
    error = {"message": message, "type": kind, "param": None, "code": code.get(status)}
    return orjson.dumps({"error": error})


class _LimitedProtocol(HttpToolsProtocol):
    limits: ServerSettings = ServerSettings()

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._in_head = True  # reading a request's head (not yet its body)
        self._head_bytes = 0
        self._tail = b""  # the last bytes read, to find a head's end split across reads
        self._timer: asyncio.TimerHandle | None = None
        self._refused = False

    # -- connection --------------------------------------------------------------

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        if len(self.connections) > self.limits.max_connections:
            self._refuse(503, "Too many open connections; retry shortly.")
            return
        self._arm(self.limits.header_timeout, 408, "The request head took too long to arrive.")

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._refused:
            return
        if self._in_head:
            # Raw head bytes, counted as they come: a header line that never ends is
            # refused as soon as it passes the limit, however slowly it is sent.
            if self._tail:
                seen = self._tail + data
                end = seen.find(_END_OF_HEAD)
                counted = len(data) if end < 0 else max(0, end + 4 - len(self._tail))
            else:
                end = data.find(_END_OF_HEAD)
                counted = len(data) if end < 0 else end + 4
            self._head_bytes += counted
            if end < 0:
                self._tail = data[-3:]
            if self._head_bytes > self.limits.max_header_bytes:
                self._refuse(431, f"The request head is over {self.limits.max_header_bytes} bytes.")
                return
        super().data_received(data)
        if self._refused or self.parser is None:
            return
        # Still waiting for the rest of a head or a body: a timer bounds the wait.
        if self._in_head:
            if self._head_bytes and self._timer is None:
                self._arm(self.limits.header_timeout, 408, "The request head took too long.")
        elif self.cycle is not None and self.cycle.more_body:
            self._arm(self.limits.body_timeout, 408, "The request body stopped arriving.")

    # -- parser callbacks (the fewest overridden: each costs a call per request) --------

    def on_headers_complete(self) -> None:
        self._in_head = False
        self._disarm()
        # Both bounded already by the head's bytes; checked once the head is whole.
        if len(self.url) > self.limits.max_request_line:
            self._refuse(414, f"The request target is over {self.limits.max_request_line} bytes.")
        elif len(self.headers) > self.limits.max_headers:
            self._refuse(431, f"More than {self.limits.max_headers} header fields.")
        else:
            super().on_headers_complete()

    def on_body(self, body: bytes) -> None:
        if not self._refused:
            super().on_body(body)

    def on_message_complete(self) -> None:
        if self._refused:
            return
        self._disarm()
        self._in_head = True  # the next request on this connection
        self._head_bytes = 0
        self._tail = b""
        super().on_message_complete()

    def send_400_response(self, msg: str) -> None:
        self._refuse(400, "The request is not valid HTTP/1.1.")

    # -- refusing ----------------------------------------------------------------

    def _arm(self, seconds: float, status: int, message: str) -> None:
        self._disarm()
        self._timer = self.loop.call_later(seconds, self._expired, status, message)

    def _disarm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _expired(self, status: int, message: str) -> None:
        self._timer = None
        cycle = self.cycle
        if cycle is not None and not self._in_head:  # the app waits for a body: it is gone
            cycle.disconnected = True
            cycle.message_event.set()
            if cycle.response_started:
                self.transport.close()
                return
        self._refuse(status, message)

    def _refuse(self, status: int, message: str) -> None:
        """Answer ``status`` with a JSON error and close, once; the parser stops here."""
        if self._refused:
            return
        self._refused = True
        self._disarm()
        target = getattr(self, "url", b"")  # none before the first request's line
        body = error_body(status, message, ollama=target.startswith(b"/api/"))
        head = b"HTTP/1.1 %d %s\r\n" % (status, _REASONS[status])
        head += b"content-type: application/json\r\ncontent-length: %d\r\n" % len(body)
        head += b"connection: close\r\n\r\n"
        if not self.transport.is_closing():
            self.transport.write(head + body)
            self.transport.close()


def limited_protocol(limits: ServerSettings) -> type[HttpToolsProtocol]:
    """uvicorn's httptools protocol class, bound to the server settings' limits."""
    return type("LimitedHttpToolsProtocol", (_LimitedProtocol,), {"limits": limits})
