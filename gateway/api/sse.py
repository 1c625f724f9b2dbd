"""A server-sent event stream as a plain ASGI response.

Starlette's ``StreamingResponse`` (on uvicorn's ASGI 2.3) runs each stream in an
anyio task group with a second task listening for the disconnect: a fifth of the
gateway's CPU for a short stream (loadtests/bench_overhead.py). This sends the
events from the request's own task, and one :func:`hangup_cancels` watcher stops
the body when the client leaves.

The body finishes its request (bills it, frees its slots) in its own ``finally``;
a body that never started never runs it, which happens when the client is gone
before the status line is sent, so ``abandon`` is always awaited at the end.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, Awaitable, Callable, Mapping

from starlette.requests import Request
from starlette.types import Receive, Scope, Send

from gateway.api.disconnect import ClientDisconnected, hangup_cancels

_SSE_HEADERS = [
    (b"content-type", b"text/event-stream; charset=utf-8"),
    (b"cache-control", b"no-cache"),
    (b"x-accel-buffering", b"no"),  # nginx in front: pass each event on at once
]


class EventStream:
    def __init__(
        self,
        body: AsyncGenerator[bytes, None],
        *,
        headers: Mapping[str, str],
        abandon: Callable[[], Awaitable[None]],
    ) -> None:
        self.body = body
        self.headers = [
            *_SSE_HEADERS,
            *((k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in headers.items()),
        ]
        self._abandon = abandon

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await send({"type": "http.response.start", "status": 200, "headers": self.headers})
            async with hangup_cancels(Request(scope, receive)):
                async for event in self.body:
                    await send({"type": "http.response.body", "body": event, "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        except ClientDisconnected:
            pass  # the body's own finally has billed what it produced
        finally:
            await self.body.aclose()  # a no-op once it has run to its end
            await self._abandon()
