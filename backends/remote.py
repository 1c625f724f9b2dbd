"""What every remote backend shares: the HTTP client, health probing, load, errors.

:class:`RemoteBackend` owns one pooled ``httpx.AsyncClient`` per upstream,
probes the upstream every ``health_interval`` seconds (subclasses decide how,
and may read load signals on the way), and counts requests in flight.

Upstream failures are translated here, once, into the backend error tree (see
:mod:`backends.base`): a 4xx caused by the request is the client's
``InvalidRequestError`` (never retried, never an outage); 401/403/404 mean
this gateway is misconfigured (``BackendUnavailable``, logged); 429 and 503 are
``BackendOverloaded``; other 5xx and connection failures are
``BackendUnavailable``; timeouts are ``BackendTimeout``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from typing import Any

import httpx
import orjson

from backends.base import (
    BackendError,
    BackendLoad,
    BackendOverloaded,
    BackendTimeout,
    BackendUnavailable,
    InvalidRequestError,
)

log = logging.getLogger(__name__)

ERROR_BODY_LIMIT = 64 * 1024
JSON_HEADERS = {"Content-Type": "application/json"}


@dataclass(frozen=True, slots=True)
class RemoteConfig:
    base_url: str  # the server root, e.g. http://127.0.0.1:8080 (``/v1`` is appended)
    upstream_model: str
    concurrency: int = 8
    api_key: str | None = None
    connect_timeout: float = 5.0
    first_token_timeout: float = 120.0
    chunk_timeout: float = 60.0
    context_length: int | None = None  # for clients' information; the upstream enforces it
    health_interval: float = 5.0


def upstream_error(status: int, body: bytes, headers: Mapping[str, str]) -> BackendError:
    """Translate one upstream HTTP error into the backend error tree."""
    message, code = error_message(body)
    if status == 429:
        return BackendOverloaded(
            f"upstream is rate limiting: {message}", retry_after=_retry_after(headers)
        )
    if status in (401, 403):
        log.warning("upstream refused the gateway's credentials (HTTP %d)", status)
        return BackendUnavailable("the upstream refused this gateway's credentials")
    if status == 404:
        log.warning("upstream answered 404: %s", message)
        return BackendUnavailable(f"the upstream does not serve this model: {message}")
    if status == 503:  # vLLM, llama-server and Ollama ("server busy") all mean "full"
        return BackendOverloaded(f"upstream is busy: {message}", retry_after=_retry_after(headers))
    if status == 408:
        return BackendTimeout("the upstream timed out")
    if 400 <= status < 500:
        return InvalidRequestError(message, code=code)
    return BackendUnavailable(f"upstream error {status}: {message}")


def error_message(body: bytes) -> tuple[str, str | None]:
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError:
        text = body.decode("utf-8", errors="replace").strip()
        return (text[:500] or "no details"), None
    error = data.get("error", data) if isinstance(data, dict) else data
    if isinstance(error, dict):  # OpenAI / vLLM / llama-server
        message = error.get("message") or error.get("detail") or "no details"
        code = error.get("code") or error.get("type")
        return str(message), str(code) if isinstance(code, str) else None
    return str(error), None  # Ollama: {"error": "text"}


def _retry_after(headers: Mapping[str, str]) -> float:
    try:
        return max(1.0, float(headers.get("retry-after", "1")))
    except ValueError:
        return 1.0


def transport_error(exc: httpx.HTTPError, what: str) -> BackendError:
    if isinstance(exc, httpx.TimeoutException):
        return BackendTimeout(f"the upstream timed out ({what})")
    return BackendUnavailable(f"the upstream is unreachable ({type(exc).__name__})")


class RemoteBackend:
    """The shared half of every remote backend; subclasses add generate/embed."""

    def __init__(
        self, config: RemoteConfig, *, transport: httpx.AsyncBaseTransport | None = None
    ) -> None:
        self.config = config
        self._transport = transport
        self._client: httpx.AsyncClient | None = None
        self._healthy = False
        self._health_task: asyncio.Task[None] | None = None
        self.in_flight = 0

    # -- lifecycle ---------------------------------------------------------

    @property
    def context_length(self) -> int:
        return self.config.context_length or 0

    @property
    def ready(self) -> bool:
        return self._client is not None and self._healthy

    async def start(self) -> None:
        cfg = self.config
        headers = {"Authorization": f"Bearer {cfg.api_key}"} if cfg.api_key else {}
        self._client = httpx.AsyncClient(
            base_url=cfg.base_url.rstrip("/"),
            headers=headers,
            transport=self._transport,
            # The pool matches the configured concurrency so requests never queue
            # inside httpx, where nobody could see or cancel them.
            limits=httpx.Limits(
                max_connections=cfg.concurrency + 2, max_keepalive_connections=cfg.concurrency
            ),
            # Streams are bounded by first-token and chunk-gap timers in _parse; the
            # read timeout here covers the short non-streaming calls.
            timeout=httpx.Timeout(cfg.first_token_timeout, connect=cfg.connect_timeout),
        )
        self._healthy = await self.probe()
        self._health_task = asyncio.create_task(self._watch())

    async def close(self) -> None:
        if self._health_task is not None:
            self._health_task.cancel()
            await asyncio.gather(self._health_task, return_exceptions=True)
        if self._client is not None:
            await self._client.aclose()
            self._client = None

    async def probe(self) -> bool:
        """Refresh health (and, in subclasses, load signals); True if healthy.

        The generic probe is ``GET /v1/models``; engines with a real health
        endpoint override it.
        """
        return await self._get_ok("/v1/models")

    async def _get_ok(self, path: str) -> bool:
        try:
            response = await self.client.get(path, timeout=self.config.connect_timeout)
        except httpx.HTTPError:
            return False
        return response.status_code == 200

    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(self.config.health_interval)
            try:
                healthy = await self.probe()
            except Exception:  # a probe must never kill the watcher
                log.exception("probing %s failed", self.config.base_url)
                healthy = False
            if healthy != self._healthy:
                state = "healthy" if healthy else "unhealthy"
                log.warning("upstream %s is now %s", self.config.base_url, state)
            self._healthy = healthy

    @property
    def client(self) -> httpx.AsyncClient:
        if self._client is None:
            raise BackendUnavailable("the backend is not started")
        return self._client

    @contextlib.asynccontextmanager
    async def streaming_response(
        self, path: str, body: dict[str, Any]
    ) -> AsyncIterator[httpx.Response]:
        """POST ``body`` and yield the streaming response, or raise the translated error.

        Leaving the block closes the response; an unfinished stream closes its
        connection, which tells the upstream to stop generating.
        """
        request = self.client.build_request(
            "POST", path, content=orjson.dumps(body), headers=JSON_HEADERS
        )
        try:
            async with asyncio.timeout(self.config.first_token_timeout):
                response = await self.client.send(request, stream=True)
        except TimeoutError:
            raise BackendTimeout("the upstream sent no response in time") from None
        except httpx.HTTPError as exc:
            raise transport_error(exc, "connect") from None
        try:
            if response.status_code >= 400:
                raw = await response.aread()
                raise upstream_error(response.status_code, raw[:ERROR_BODY_LIMIT], response.headers)
            yield response
        except httpx.HTTPError as exc:
            raise transport_error(exc, "reading the stream") from None
        finally:
            await response.aclose()

    async def lines(self, response: httpx.Response) -> AsyncIterator[str]:
        """The response's lines, each within the first-token or chunk-gap limit."""
        source = response.aiter_lines()
        limit = self.config.first_token_timeout
        while True:
            try:
                async with asyncio.timeout(limit):
                    line = await anext(source)
            except StopAsyncIteration:
                return
            except TimeoutError:
                raise BackendTimeout("the upstream stalled") from None
            limit = self.config.chunk_timeout
            yield line

    def load(self) -> BackendLoad:
        return BackendLoad(running=self.in_flight, waiting=0, capacity=self.config.concurrency)
