"""The gateway's errors and their one table: status, type, code, Retry-After, queue outcome.

Every failure a client can see passes through :func:`describe`, which turns it
into a wire-neutral :class:`ErrorInfo` (status, OpenAI's error type and code, a
message, headers); each wire format renders that once (``gateway.protocol``:
OpenAI's ``{"error": {...}}``, Ollama's ``{"error": "..."}``, a Responses
``response.failed`` event). Routes and the service raise; they never build error
bodies themselves. Exceptions nobody anticipated become a 500 whose message says
nothing about the internals (the traceback goes to the log only).

    GatewayError
    ├── InvalidRequest        400 invalid_request_error
    ├── Unauthorized          401 invalid_api_key
    ├── Forbidden             403 permission_denied (model not allowed, admin API off)
    ├── ModelNotFound         404 model_not_found
    ├── NotFound              404 (unknown route or admin resource)
    ├── MethodNotAllowed      405 (a known path, another method)
    ├── Conflict              409 conflict (admin: the id exists)
    ├── ConfigRefused         422 invalid_config (a reload's file is refused whole)
    ├── RequestTooLarge       413 request_too_large
    ├── RateLimited           429 rate_limit_exceeded, Retry-After and x-ratelimit-*
    ├── QuotaExceeded         429 insufficient_quota (a token budget is spent)
    ├── StateUnavailable      503 (Redis unreachable and no local answer)
    ├── ShuttingDown          503 shutting_down, Retry-After (draining: gateway/drain.py)
    └── SchedulerRefusal      not queued, or waited too long; Retry-After from the drain rate
        ├── TenantQueueFull   429 rate_limit_exceeded (this tenant has too many waiting)
        ├── QueueFull         503 queue_full (the model's queue is full)
        └── QueueTimeout      503 queue_timeout (no slot within the maximum wait)

``StoreUnavailable`` (the tenancy store, e.g. Redis, did not answer an admin call)
is a 503 too. Backend errors (``backends.base``) are mapped in the same table:
``ContextLengthExceeded`` → 400 ``context_length_exceeded``,
``InvalidRequestError`` (and ``Unsupported``) → 400, ``BackendOverloaded`` and
``BackendUnavailable`` → 503 with ``Retry-After``, ``BackendTimeout`` → 504.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field

from backends.base import (
    BackendError,
    BackendOverloaded,
    BackendTimeout,
    BackendUnavailable,
    ContextLengthExceeded,
    InvalidRequestError,
)
from gateway.tenancy.store import StoreUnavailable

log = logging.getLogger(__name__)

CLIENT_CLOSED = 499  # nginx's convention for "the client went away" (or the server shut down)


def retry_after_header(seconds: float) -> dict[str, str]:
    """The ``Retry-After`` header for a delay: whole seconds, at least 1."""
    return {"Retry-After": str(max(1, math.ceil(seconds)))}


class GatewayError(Exception):
    def __init__(
        self, message: str, *, param: str | None = None, headers: dict[str, str] | None = None
    ) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.headers = headers or {}


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


class MethodNotAllowed(GatewayError):
    """The path exists, but not with this method."""


class BeyondLimit(GatewayError):
    """The request alone is larger than a whole limit or budget: it can never be admitted."""


class RequestTooLarge(GatewayError):
    """The request body exceeds ``server.max_body_bytes``."""


class Unauthorized(GatewayError):
    """No key, or a key that is unknown, malformed, expired or revoked."""


class Forbidden(GatewayError):
    """The key is valid but may not do this."""


class Conflict(GatewayError):
    """An admin create whose id already exists."""


class ConfigRefused(GatewayError):
    """A reload's configuration does not validate, or cannot be applied: nothing changed."""


class RateLimited(GatewayError):
    """A rate or concurrency limit is reached; ``headers`` say when to retry.

    ``kind`` is OpenAI's error type for it: ``requests`` or ``tokens``.
    """

    def __init__(self, message: str, *, kind: str, headers: dict[str, str]) -> None:
        super().__init__(message, headers=headers)
        self.kind = kind


class QuotaExceeded(GatewayError):
    """A daily or monthly token budget is spent."""


class StateUnavailable(GatewayError):
    """Shared state (Redis) cannot be reached and the policy is to fail closed."""

    def __init__(self, message: str) -> None:
        super().__init__(message, headers=retry_after_header(1))


class ShuttingDown(GatewayError):
    """This server is draining: new requests are refused, what is open at the deadline cut."""

    def __init__(self, message: str) -> None:
        super().__init__(message, headers=retry_after_header(1))


class SchedulerRefusal(GatewayError):
    """The scheduler would not queue the request, or it waited too long."""

    def __init__(self, message: str, *, retry_after: float) -> None:
        super().__init__(message, headers=retry_after_header(retry_after))
        self.retry_after = retry_after


class TenantQueueFull(SchedulerRefusal):
    """This tenant already has ``max_queue_per_tenant`` requests waiting for the model."""


class QueueFull(SchedulerRefusal):
    """The model's queue holds ``max_queue`` requests already."""


class QueueTimeout(SchedulerRefusal):
    """No slot freed within ``max_wait``."""


@dataclass(frozen=True, slots=True)
class ErrorInfo:
    """What a client is told about a failure, in no wire format yet."""

    status: int
    type: str
    code: str | None
    message: str
    param: str | None = None
    headers: dict[str, str] = field(default_factory=dict)


# Most specific first: the first matching row wins. The last column is the
# lockgate_queue_requests_total outcome of a refusal by the scheduler.
_TABLE: tuple[tuple[type[Exception], int, str, str | None, str | None], ...] = (
    (ContextLengthExceeded, 400, "invalid_request_error", "context_length_exceeded", None),
    (InvalidRequestError, 400, "invalid_request_error", None, None),
    (InvalidRequest, 400, "invalid_request_error", None, None),
    (BeyondLimit, 400, "invalid_request_error", "exceeds_limit", None),
    (ModelNotFound, 404, "invalid_request_error", "model_not_found", None),
    (NotFound, 404, "invalid_request_error", "not_found", None),
    (MethodNotAllowed, 405, "invalid_request_error", None, None),
    (RequestTooLarge, 413, "invalid_request_error", "request_too_large", None),
    (Unauthorized, 401, "invalid_request_error", "invalid_api_key", None),
    (Forbidden, 403, "invalid_request_error", "permission_denied", None),
    (Conflict, 409, "invalid_request_error", "conflict", None),
    (ConfigRefused, 422, "invalid_request_error", "invalid_config", None),
    (RateLimited, 429, "requests", "rate_limit_exceeded", None),
    (QuotaExceeded, 429, "insufficient_quota", "insufficient_quota", None),
    (TenantQueueFull, 429, "requests", "rate_limit_exceeded", "rejected_tenant"),
    (QueueFull, 503, "server_error", "queue_full", "rejected_full"),
    (QueueTimeout, 503, "server_error", "queue_timeout", "expired"),
    (StateUnavailable, 503, "server_error", "service_unavailable", "unavailable"),
    (ShuttingDown, 503, "server_error", "shutting_down", None),
    (StoreUnavailable, 503, "server_error", "service_unavailable", None),
    (BackendOverloaded, 503, "server_error", "overloaded", None),
    (BackendUnavailable, 503, "server_error", "service_unavailable", None),
    (BackendTimeout, 504, "server_error", "timeout", None),
)


def status_of(exc: BaseException) -> int:
    """The HTTP status ``exc`` maps to, without logging anything."""
    return next((row[1] for row in _TABLE if isinstance(exc, row[0])), 500)


def queue_outcome(exc: BaseException) -> str | None:
    """The scheduler outcome label of a refusal, or ``None`` if ``exc`` is not one."""
    return next((row[4] for row in _TABLE if isinstance(exc, row[0])), None)


def describe(exc: BaseException) -> ErrorInfo:
    """The client-facing description of ``exc``; logs it only if it was unexpected."""
    for kind, status, type_, code, _ in _TABLE:
        if isinstance(exc, kind):
            if isinstance(exc, StoreUnavailable):
                message = "Tenant storage is temporarily unavailable; retry shortly."
                return ErrorInfo(status, type_, code, message, None, retry_after_header(1))
            assert isinstance(exc, GatewayError | BackendError)
            headers = dict(exc.headers) if isinstance(exc, GatewayError) else {}
            if isinstance(exc, BackendOverloaded | BackendUnavailable):
                headers.update(retry_after_header(exc.retry_after))
            if isinstance(exc, BackendError) and exc.code is not None:
                code = exc.code
            if isinstance(exc, RateLimited):
                type_ = exc.kind
            return ErrorInfo(status, type_, code, exc.message, exc.param, headers)
    log.error("unhandled error", exc_info=exc)
    return ErrorInfo(500, "server_error", "internal_error", "The server had an internal error.")
