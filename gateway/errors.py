"""The gateway's errors and their one mapping to HTTP and to SSE.

Every failure a client can see passes through :func:`describe`, which turns
it into OpenAI's error shape ``{"error": {"message", "type", "param",
"code"}}`` plus a status and headers. Routes raise; they never build error
bodies themselves. Exceptions nobody anticipated become a 500 whose message
says nothing about the internals (the traceback goes to the log only).

    GatewayError
    ├── InvalidRequest        400 invalid_request_error
    ├── ModelNotFound         404 model_not_found
    ├── NotFound              404 (unknown route)
    └── RequestTooLarge       413 request_too_large

Backend errors (``backends.base``) are mapped in the same table:
``ContextLengthExceeded`` → 400 ``context_length_exceeded``,
``InvalidRequestError`` → 400, ``BackendOverloaded`` → 503 with
``Retry-After``, ``BackendUnavailable`` → 503, ``BackendTimeout`` → 504.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field

import orjson

from backends.base import (
    BackendError,
    BackendOverloaded,
    BackendTimeout,
    BackendUnavailable,
    ContextLengthExceeded,
    InvalidRequestError,
)

log = logging.getLogger(__name__)


class GatewayError(Exception):
    def __init__(self, message: str, *, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param


class InvalidRequest(GatewayError):
    """The request body or parameters are wrong."""


class ModelNotFound(GatewayError):
    def __init__(self, model: str) -> None:
        super().__init__(
            f"The model '{model}' does not exist or you do not have access to it.",
            param="model",
        )


class NotFound(GatewayError):
    """No route matches the path."""


class RequestTooLarge(GatewayError):
    """The request body exceeds ``server.max_body_bytes``."""


@dataclass(frozen=True, slots=True)
class ErrorInfo:
    status: int
    type: str
    code: str | None
    message: str
    param: str | None = None
    headers: dict[str, str] = field(default_factory=dict)

    def body(self) -> bytes:
        return orjson.dumps(
            {
                "error": {
                    "message": self.message,
                    "type": self.type,
                    "param": self.param,
                    "code": self.code,
                }
            }
        )

    def sse_event(self) -> bytes:
        """The event sent when a stream fails after its headers went out."""
        return b"data: " + self.body() + b"\n\n"


# Most specific first: the first matching row wins.
_TABLE: tuple[tuple[type[Exception], int, str, str | None], ...] = (
    (ContextLengthExceeded, 400, "invalid_request_error", "context_length_exceeded"),
    (InvalidRequestError, 400, "invalid_request_error", None),
    (InvalidRequest, 400, "invalid_request_error", None),
    (ModelNotFound, 404, "invalid_request_error", "model_not_found"),
    (NotFound, 404, "invalid_request_error", "not_found"),
    (RequestTooLarge, 413, "invalid_request_error", "request_too_large"),
    (BackendOverloaded, 503, "server_error", "overloaded"),
    (BackendUnavailable, 503, "server_error", "service_unavailable"),
    (BackendTimeout, 504, "server_error", "timeout"),
)


def status_of(exc: BaseException) -> int:
    """The HTTP status ``exc`` maps to, without logging anything."""
    return next((status for kind, status, _, _ in _TABLE if isinstance(exc, kind)), 500)


def describe(exc: BaseException) -> ErrorInfo:
    """The client-facing description of ``exc``; logs it only if it was unexpected."""
    for kind, status, type_, code in _TABLE:
        if isinstance(exc, kind):
            assert isinstance(exc, GatewayError | BackendError)
            headers = {}
            if isinstance(exc, BackendOverloaded):
                headers["Retry-After"] = str(max(1, math.ceil(exc.retry_after)))
            if isinstance(exc, BackendError) and exc.code is not None:
                code = exc.code
            return ErrorInfo(status, type_, code, exc.message, exc.param, headers)
    log.error("unhandled error", exc_info=exc)
    return ErrorInfo(500, "server_error", "internal_error", "The server had an internal error.")
