"""A front door's route as a plain ASGI endpoint on the FastAPI router.

FastAPI's per-request machinery for an ``APIRoute`` (dependency solving, its
endpoint wrapper) cost 40-45 µs of CPU per request on this machine, a tenth of all
the gateway spent on a non-streamed chat (loadtests/bench_overhead.py). The
generation routes are registered on the same router as every other route — so
path patterns, 404/405, middleware and the OpenAPI document work as usual — but
as an :class:`Endpoint`: a guard that cannot be left out, the handler, and errors
rendered in the door's own wire format.

    route("/v1/chat/completions", "POST", chat, name="chat", errors=OPENAI_ERRORS,
          body=ChatCompletionRequest)
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

from pydantic import BaseModel
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route
from starlette.types import ASGIApp, Receive, Scope, Send

from gateway.access import access_of
from gateway.api.disconnect import ClientDisconnected
from gateway.api.security import authenticated
from gateway.errors import CLIENT_CLOSED, ErrorInfo, describe
from gateway.tenancy.records import Principal

Guard = Callable[[Request], Awaitable[Principal]]
# What a handler returns is itself ASGI: a Response, or an event stream.
Handler = Callable[[Request, Principal], Awaitable[ASGIApp]]


@dataclass(frozen=True, slots=True)
class ErrorFormat:
    """How one wire format renders an error body."""

    name: str  # openai, ollama
    body: Callable[[ErrorInfo], bytes]
    media_type: str = "application/json"

    def response(self, exc: BaseException) -> Response:
        if isinstance(exc, ClientDisconnected | ClientDisconnect):
            return Response(status_code=CLIENT_CLOSED)  # nobody is left to read it
        info = describe(exc)
        return Response(
            self.body(info),
            status_code=info.status,
            headers=info.headers,
            media_type=self.media_type,
        )


class Endpoint:
    """Guard, then handler; any error is rendered by ``errors``.

    ``name`` is its ``endpoint`` label in metrics and the access log; ``body`` (the
    request model) and ``summary`` describe the route in the OpenAPI document
    (:mod:`gateway.api.openapi`).
    """

    def __init__(
        self,
        handler: Handler,
        *,
        name: str,
        guard: Guard,
        errors: ErrorFormat,
        body: type[BaseModel] | None = None,
        summary: str = "",
    ) -> None:
        self.handler = handler
        self.name = name
        self.guard = guard
        self.errors = errors
        self.body = body
        self.summary = summary or (handler.__doc__ or "").strip().split("\n")[0]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        request = Request(scope, receive)
        access_of(scope).endpoint = self.name
        response: ASGIApp
        try:
            response = await self.handler(request, await self.guard(request))
        except Exception as exc:
            response = self.errors.response(exc)
        await response(scope, receive, send)


def route(
    path: str,
    method: str,
    handler: Handler,
    *,
    name: str,
    errors: ErrorFormat,
    body: type[BaseModel] | None = None,
    guard: Guard | None = None,
) -> Route:
    """A Starlette route to an :class:`Endpoint`; the guard is the tenant key unless given."""
    endpoint = Endpoint(handler, name=name, guard=guard or authenticated, errors=errors, body=body)
    return Route(path, endpoint, methods=[method])


class FastDispatch:
    """Serves the front doors' fixed-path routes straight from their :class:`Endpoint`.

    The routes stay registered on the FastAPI router (its OpenAPI document, 404/405,
    ``url_path_for`` and any route added later all see them); this only skips the walk
    through FastAPI's exception and exit-stack middleware and the router's pattern
    matching for the hottest requests, which cost 25-35 µs of CPU per request
    (in-process, fake backend), 5-6% of a proxied chat. Paths with parameters, other
    methods and every other path go on to ``app`` as usual.
    """

    def __init__(self, app: ASGIApp, *, routes: Sequence[BaseRoute]) -> None:
        self.app = app
        self._routes = routes  # the router's own list: read once, at the first request
        self._table: dict[tuple[str, str], Endpoint] | None = None

    def _build(self) -> dict[tuple[str, str], Endpoint]:
        table: dict[tuple[str, str], Endpoint] = {}
        for r in self._routes:
            if isinstance(r, Route) and isinstance(r.endpoint, Endpoint) and not r.param_convertors:
                for method in r.methods or ():
                    table.setdefault((method, r.path), r.endpoint)  # the first route wins
        return table

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            table = self._table
            if table is None:
                table = self._table = self._build()
            endpoint = table.get((scope["method"], scope["path"]))
            if endpoint is not None:
                scope["path_params"] = {}
                await endpoint(scope, receive, send)
                return
        await self.app(scope, receive, send)
