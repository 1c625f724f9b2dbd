"""Request-size guard, as plain ASGI middleware (no BaseHTTPMiddleware on the hot path).

A body larger than ``max_bytes`` is refused with status 413, in the error shape of the
door the path belongs to (``body``), before the application reads it: at once when
``Content-Length`` says so, otherwise as soon as the streamed body passes the limit.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from gateway.errors import ErrorInfo, RequestTooLarge, describe


class BodySizeLimit:
    def __init__(
        self,
        app: ASGIApp,
        *,
        max_bytes: int,
        body: Callable[[str, ErrorInfo], bytes],
        larger: Mapping[tuple[str, str], int] | None = None,
    ) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self._body = body  # (path, error) → the error body in that path's wire format
        self._larger = dict(larger or {})  # (method, path) → its own limit (uploads)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.max_bytes
        if self._larger:
            limit = self._larger.get((scope["method"], scope["path"]), limit)
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            await self._refuse(scope["path"], send, limit)
            return
        seen = 0

        async def limited() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    raise RequestTooLarge(self._message(limit))
            return message

        await self.app(scope, limited, send)

    def _message(self, limit: int) -> str:
        return f"The request body is larger than {limit} bytes."

    async def _refuse(self, path: str, send: Send, limit: int) -> None:
        info = describe(RequestTooLarge(self._message(limit)))
        await send(
            {
                "type": "http.response.start",
                "status": info.status,
                "headers": [(b"content-type", b"application/json")],
            }
        )
        await send({"type": "http.response.body", "body": self._body(path, info)})
