"""The OpenAI routes as plain ASGI middleware, in front of FastAPI.

FastAPI's per-request machinery (route matching over every route, dependency
solving, its exception middleware and endpoint wrapper) cost 40-45 µs of CPU per
request on this machine, a tenth of all the gateway spent on a non-streamed
chat (loadtests/bench_overhead.py). The hot routes are served here instead:
matched by exact method and path (or one path prefix with a parameter), each
with a guard that cannot be left out, and errors rendered through
:func:`gateway.errors.describe` like everywhere else. Every other request
(admin, health, metrics, unknown paths) passes on to FastAPI.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response
from starlette.types import ASGIApp, Receive, Scope, Send

from gateway.api.disconnect import ClientDisconnected
from gateway.errors import MethodNotAllowed, describe
from gateway.service import CLIENT_CLOSED
from gateway.tenancy.records import Principal

Guard = Callable[[Request], Awaitable[Principal]]
# What a handler returns is itself ASGI: a Response, or an event stream.
Handler = Callable[[Request, Principal], Awaitable[ASGIApp]]


@dataclass(frozen=True, slots=True)
class Route:
    """``path`` is exact, unless ``param`` is set: then ``path`` is a prefix and the
    non-empty rest of the request's path is ``request.path_params[param]``."""

    method: str
    path: str
    handler: Handler
    guard: Guard  # required: a route without one cannot be declared
    param: str | None = None


def error_response(exc: BaseException) -> Response:
    """The client's view of ``exc``: OpenAI's error shape, its status and headers."""
    if isinstance(exc, ClientDisconnected | ClientDisconnect):
        return Response(status_code=CLIENT_CLOSED)  # nobody is left to read it
    info = describe(exc)
    return Response(
        info.body(), status_code=info.status, headers=info.headers, media_type="application/json"
    )


class Routes:
    """Serves ``routes``; passes any other request (and lifespan) on to ``app``."""

    def __init__(self, app: ASGIApp, *, routes: Sequence[Route]) -> None:
        self.app = app
        self.routes = tuple(routes)
        self._exact: dict[str, dict[str, Route]] = {}
        self._prefixed: dict[str, dict[str, Route]] = {}
        for r in self.routes:
            table = self._prefixed if r.param else self._exact
            table.setdefault(r.path, {})[r.method] = r

    def _match(self, path: str) -> tuple[dict[str, Route], str] | None:
        methods = self._exact.get(path)
        if methods is not None:
            return methods, ""
        for prefix, methods in self._prefixed.items():
            if path.startswith(prefix) and len(path) > len(prefix):
                return methods, path[len(prefix) :]
        return None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        found = self._match(scope["path"]) if scope["type"] == "http" else None
        if found is None:
            await self.app(scope, receive, send)
            return
        methods, rest = found
        route = methods.get(scope["method"])
        if route is not None and route.param is not None:
            scope["path_params"] = {route.param: rest}
        request = Request(scope, receive)
        response: ASGIApp
        try:
            if route is None:
                raise MethodNotAllowed(
                    f"Method {scope['method']} is not allowed on {scope['path']}"
                )
            response = await route.handler(request, await route.guard(request))
        except Exception as exc:
            response = error_response(exc)
        await response(scope, receive, send)
