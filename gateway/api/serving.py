"""How every front door answers a planned request: one body, or a stream of events.

    return await serve(request, principal, plan, body=chat_completion,
                       stream=ChatStream(choices=n, include_usage=False))

:func:`serve` starts the service's run while watching for the client to hang up,
then either collects it into one JSON body (``body``) or hands it to an
:class:`EventStream` that encodes each event with the door's :class:`StreamEncoder`
(OpenAI SSE, Ollama NDJSON, Responses events). Either way the run is closed when
the answer ends, which is what finishes the request in the service.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, Callable, Mapping
from typing import Any, Protocol

import orjson
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import ASGIApp, Receive, Scope, Send

from backends.base import GenerationChunk
from gateway.access import access_of
from gateway.api.disconnect import ClientDisconnected, hangup_cancels
from gateway.drain import Drain
from gateway.errors import CLIENT_CLOSED, ErrorInfo, InvalidRequest, ShuttingDown, describe
from gateway.events import (
    Delta,
    Embedded,
    EmbedPlan,
    Event,
    Failed,
    Finished,
    Plan,
    Result,
    Started,
    collect,
)
from gateway.service import InferenceService
from gateway.tenancy.records import Principal, Priority

# A client may lower its own priority (a batch job on an interactive key), never raise it.
PRIORITY_HEADER = "x-lockgate-priority"
# Requests carrying one id go to one instance (routing.affinity: session).
SESSION_HEADER = "x-session-id"


class StreamEncoder(Protocol):
    """One wire format's streamed answer; every method returns the bytes to send."""

    media_type: bytes

    def start(self, started: Started) -> bytes: ...
    def delta(self, index: int, chunk: GenerationChunk) -> bytes: ...
    def finish(self, finished: Finished) -> bytes: ...
    def fail(self, info: ErrorInfo) -> bytes: ...


async def read_body(request: Request, principal: Principal) -> bytes:
    return await request.body()  # kept by Starlette: the request log reads it again


def service_of(request: Request) -> InferenceService:
    service: InferenceService = request.app.state.service
    return service


def drain_of(request: Request) -> Drain:
    drain: Drain = request.app.state.drain
    return drain


def json_response(payload: object, headers: Mapping[str, str] | None = None) -> Response:
    return Response(orjson.dumps(payload), media_type="application/json", headers=headers)


def priority_of(request: Request, principal: Principal) -> Priority:
    asked = request.headers.get(PRIORITY_HEADER)
    if asked is None:
        return principal.tenant.priority
    asked = asked.strip().lower()
    if asked not in ("interactive", "batch"):
        raise InvalidRequest(
            f"The {PRIORITY_HEADER} header must be 'interactive' or 'batch'.",
            param=PRIORITY_HEADER,
        )
    return "batch" if "batch" in (asked, principal.tenant.priority) else "interactive"


async def serve(
    request: Request,
    principal: Principal,
    plan: Plan,
    *,
    body: Callable[[Result], Any],
    stream: StreamEncoder,
) -> ASGIApp:
    """Run ``plan``; answer with ``body(result)`` as JSON, or stream it with ``stream``."""
    priority = priority_of(request, principal)
    session = request.headers.get(SESSION_HEADER)
    if session:
        plan.session = session
    _handed_to_service(request, plan)
    service = service_of(request)
    raw = await _logged_body(request, principal, service)
    run = service.run(principal, plan, priority=priority, body=raw)
    handed_over = False
    try:
        async with hangup_cancels(request, drain_of(request)):
            started = await run.__anext__()
            assert type(started) is Started
            if plan.stream:
                response = EventStream(run, started, stream)
                handed_over = True  # the stream closes the run from here on
                return response
            result = await collect(run, started)
    finally:
        if not handed_over:
            await run.aclose()
    return json_response(body(result), started.headers)


async def embed(request: Request, principal: Principal, plan: EmbedPlan) -> Embedded:
    """Run an embedding ``plan`` while watching for the client to hang up."""
    _handed_to_service(request, plan)
    service = service_of(request)
    raw = await _logged_body(request, principal, service)
    async with hangup_cancels(request, drain_of(request)):
        return await service.embed(principal, plan, body=raw)


async def _logged_body(
    request: Request, principal: Principal, service: InferenceService
) -> bytes | None:
    """The body as sent, when the request log may write it (read once already: cached)."""
    log = service.request_log
    if log is None or not log.bodies or not principal.tenant.log_requests:
        return None
    return await request.body()


def _handed_to_service(request: Request, plan: Plan | EmbedPlan) -> None:
    """From here on the service counts the request (gateway/access.py counts the rest)."""
    record = access_of(request.scope)
    record.model, record.request_id, record.counted = plan.model, plan.request_id, True


class EventStream:
    """A run's events as a plain ASGI streamed response.

    Starlette's ``StreamingResponse`` (on uvicorn's ASGI 2.3) runs each stream in an
    anyio task group with a second task listening for the disconnect: a fifth of the
    gateway's CPU for a short stream (loadtests/bench_overhead.py). This sends the
    events from the request's own task, and one :func:`hangup_cancels` watcher stops
    the run when the client leaves. One write per produced chunk: what ``start``
    renders rides with the first.
    """

    def __init__(
        self, run: AsyncGenerator[Event, None], started: Started, encoder: StreamEncoder
    ) -> None:
        self.run = run
        self.started = started
        self.encoder = encoder
        self.headers = [
            (b"content-type", encoder.media_type),
            (b"cache-control", b"no-cache"),
            (b"x-accel-buffering", b"no"),  # nginx in front: pass each event on at once
            *(
                (k.lower().encode("latin-1"), v.encode("latin-1"))
                for k, v in started.headers.items()
            ),
        ]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        encoder = self.encoder
        record = access_of(scope)
        pending = b""
        try:
            pending = encoder.start(self.started)
            await send({"type": "http.response.start", "status": 200, "headers": self.headers})
            request = Request(scope, receive)
            async with hangup_cancels(request, drain_of(request)):
                async for event in self.run:
                    if type(event) is Delta:
                        data = encoder.delta(event.index, event.chunk)
                    elif isinstance(event, Finished):
                        data = encoder.finish(event)
                    elif isinstance(event, Failed):
                        info = describe(event.error)
                        record.outcome = info.status
                        data = encoder.fail(info)
                    else:  # pragma: no cover - Started comes once, before the stream
                        continue
                    if pending:
                        data, pending = pending + data, b""
                    if data:
                        await send({"type": "http.response.body", "body": data, "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        except ClientDisconnected:
            record.outcome = CLIENT_CLOSED  # the run's own finally billed what it produced
        except ShuttingDown as exc:  # the drain's deadline: an error event, never a silent cut
            info = describe(exc)
            record.outcome = info.status
            await self.run.aclose()  # billed and counted before the last bytes go
            data = pending + encoder.fail(info)
            await send({"type": "http.response.body", "body": data, "more_body": False})
        finally:
            await self.run.aclose()  # a no-op once it has run to its end
