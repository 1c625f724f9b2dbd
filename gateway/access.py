"""One access-log line and one ``lockgate_requests_total`` count for every HTTP request.

:class:`AccessLog` is the outermost middleware, so it sees every answer: bad JSON,
a 401, an unknown path, a 413 from the size guard, a stream cut by the client. Each
request carries an :class:`AccessRecord` in its scope that the layers below fill in
as they learn things (the guard: the tenant; the front door: its endpoint, the model
and the request id; a stream: its real outcome)::

    record = access_of(request.scope)
    record.tenant = principal.tenant.id

Requests the service ran are counted by the service (with their model and outcome);
this counts the rest, under ``model="-"``: a client-chosen name never becomes a label
value. The line never holds a key (one in a path or a model name is redacted) or a
body: method, path, status, outcome, duration,
tenant, model, request id, bytes sent. ``/health/*`` and ``/metrics`` are logged at
debug, so probes and scrapes do not fill an info log.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from typing import Literal

import orjson
from starlette.routing import BaseRoute, Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from gateway.metrics import Metrics
from gateway.redaction import REDACTED, SECRETS

AccessFormat = Literal["text", "json", "off"]

_KEY = "lockgate.access"
_QUIET = ("/health/", "/metrics")


class AccessRecord:
    """What is known about one request; filled in by the layers that learn it."""

    __slots__ = ("counted", "endpoint", "model", "outcome", "request_id", "tenant")

    def __init__(self) -> None:
        self.tenant = "-"
        self.endpoint: str | None = None  # the front door's operation: chat, ollama_chat...
        self.model = "-"  # as the client asked for it (for the log line only)
        self.request_id = "-"
        self.outcome: int | None = None  # when it differs from the status line: 499, 502...
        self.counted = False  # the service counted it in lockgate_requests_total


def access_of(scope: Scope) -> AccessRecord:
    """This request's record (a fresh one, not logged, outside :class:`AccessLog`)."""
    record = scope.get(_KEY)
    if record is None:
        record = scope[_KEY] = AccessRecord()
    return record


def _printable(text: str) -> str:
    """``text`` without secrets, or its quoted escape when it could forge or break a line."""
    text = SECRETS.sub(REDACTED, text)  # a key in a path or a model name is not written
    return text if text.isprintable() and " " not in text else repr(text)


def _endpoint_of(path: str) -> str:
    """The metric label of a path that is not a front door's: a fixed, small set."""
    for prefix, label in (("/admin/", "admin"), ("/health/", "health"), ("/metrics", "metrics")):
        if path.startswith(prefix):
            return label
    return "other"


def _door_names(routes: Sequence[BaseRoute]) -> dict[str, str]:
    """Each front door's fixed path → its endpoint label, for requests refused before
    the endpoint ran (a 413 from the size guard)."""
    names: dict[str, str] = {}
    for r in routes:
        if isinstance(r, Route) and isinstance(name := getattr(r.endpoint, "name", None), str):
            names[r.path] = name
    return names


class AccessLog:
    def __init__(
        self,
        app: ASGIApp,
        *,
        metrics: Metrics,
        routes: Sequence[BaseRoute] = (),
        format: AccessFormat = "text",
        logger: logging.Logger | None = None,
    ) -> None:
        self.app = app
        self.metrics = metrics
        self._routes = routes  # the router's own list: read at the first request
        self._doors: dict[str, str] | None = None
        self.format = format
        self.log = logger or logging.getLogger("lockgate.access")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        record = scope[_KEY] = AccessRecord()
        started = time.perf_counter()
        status = 500  # unless an answer starts: the app raised before it sent anything
        sent = 0

        async def counting(message: Message) -> None:
            nonlocal status, sent
            if message["type"] == "http.response.body":
                sent += len(message.get("body", b""))
            elif message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, counting)
        finally:
            self._finish(scope, record, status, sent, time.perf_counter() - started)

    def _finish(
        self, scope: Scope, record: AccessRecord, status: int, sent: int, seconds: float
    ) -> None:
        path: str = scope["path"]
        endpoint = record.endpoint
        if endpoint is None:
            if self._doors is None:
                self._doors = _door_names(self._routes)
            endpoint = self._doors.get(path) or _endpoint_of(path)
        if not record.counted:
            self.metrics.requests.labels("-", endpoint, str(status)).inc()
        if self.format == "off":
            return
        level = logging.DEBUG if path.startswith(_QUIET) else logging.INFO
        if not self.log.isEnabledFor(level):
            return
        outcome = record.outcome or status
        if self.format == "json":
            line = orjson.dumps(
                {
                    "method": scope["method"],
                    "path": SECRETS.sub(REDACTED, path),
                    "status": status,
                    "outcome": outcome,
                    "ms": round(seconds * 1000, 2),
                    "tenant": record.tenant,
                    "model": SECRETS.sub(REDACTED, record.model),
                    "endpoint": endpoint,
                    "request_id": SECRETS.sub(REDACTED, record.request_id),
                    "bytes": sent,
                }
            ).decode()
        else:
            # Client-chosen strings are quoted with their escapes: no forged log lines.
            line = (
                f"{scope['method']} {_printable(path)} {status} outcome={outcome} "
                f"{seconds * 1000:.1f}ms tenant={record.tenant} model={_printable(record.model)} "
                f"endpoint={endpoint} request_id={_printable(record.request_id)} bytes={sent}"
            )
        self.log.log(level, line)
