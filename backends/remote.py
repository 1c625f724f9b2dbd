"""What every remote backend shares: the HTTP client, health probing, load, errors.

:class:`RemoteBackend` owns one pool of keep-alive connections per upstream
(:mod:`backends.http1`), probes the upstream every ``health_interval`` seconds
(subclasses decide how, and may read load signals on the way), and counts
requests in flight.

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

import orjson

from backends.base import (
    BackendError,
    BackendLoad,
    BackendOverloaded,
    BackendTimeout,
    BackendUnavailable,
    GenerationRequest,
    InvalidRequestError,
    ModelInfo,
    Unsupported,
)
from backends.http1 import ConnectionPool, ProtocolError, Response

log = logging.getLogger(__name__)

# Not httpx (10-23x aiohttp's client CPU per request under concurrency,
# loadtests/bench_http_clients.py), and no longer aiohttp: backends/http1.py spends a
# third of its CPU per call.

ERROR_BODY_LIMIT = 64 * 1024
MAX_LINE = 1 << 20  # one SSE or NDJSON line (long tool-call arguments must fit)
# After [DONE], how long to wait for the rest of the answer (its terminator) so that the
# connection is reused rather than closed.
_TAIL_SECONDS = 0.05
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
    request_timeout: float = 600.0  # a whole non-streamed answer
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
    if status == 501:  # llama-server without --embeddings, an engine without an endpoint
        log.info("upstream answered 501: %s", message)
        return Unsupported("the model does not support this operation")
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


def parse_event(payload: str | bytes) -> dict[str, Any]:
    """One JSON object from a stream line; malformed data is the upstream's fault."""
    try:
        event = orjson.loads(payload)
    except orjson.JSONDecodeError:
        raise BackendUnavailable("the upstream sent malformed data") from None
    if not isinstance(event, dict):
        raise BackendUnavailable("the upstream sent malformed data")
    return event


def transport_error(exc: BaseException, what: str, *, retry_after: float = 1.0) -> BackendError:
    """A transport failure in words a client can act on (never an exception's class name)."""
    if isinstance(exc, TimeoutError):
        return BackendTimeout(f"the upstream timed out ({what})")
    if what == STREAM:
        message = "the upstream closed the connection in the middle of its answer"
    elif isinstance(exc, ConnectionRefusedError):
        message = "the upstream refused the connection (it is not running, or not yet)"
    elif isinstance(exc, ProtocolError):
        message = "the upstream's answer was cut off or malformed"
    else:
        message = "the upstream cannot be reached"
    return BackendUnavailable(message, retry_after=retry_after)


STREAM = "reading the stream"


_TRANSPORT_ERRORS = (TimeoutError, OSError)  # OSError includes http1.ProtocolError


class RemoteBackend:
    """The shared half of every remote backend; subclasses add generate/embed.

    All HTTP goes through the helpers here (``get``, ``post_json``,
    ``streaming_response``, ``lines``), so the client appears in this module only.
    """

    def __init__(self, config: RemoteConfig) -> None:
        self.config = config
        self._pool: ConnectionPool | None = None
        self._healthy = False
        self._health_task: asyncio.Task[None] | None = None
        self.in_flight = 0

    # -- lifecycle ---------------------------------------------------------

    @property
    def ready(self) -> bool:
        return self._pool is not None and self._healthy

    async def start(self) -> None:
        cfg = self.config
        headers = {"Authorization": f"Bearer {cfg.api_key}"} if cfg.api_key else {}
        # No limit on connections: the gateway's scheduler admits only as many requests
        # as the backend has slots (``load().capacity``, which for llama-server is its
        # own slot count), so none should ever wait inside the client, unseen. Streams
        # are bounded by the first-token and chunk-gap timers in lines(), the short calls
        # by their own limits.
        self._pool = ConnectionPool(
            cfg.base_url, connect_timeout=cfg.connect_timeout, headers=headers
        )
        self._healthy = await self.probe()
        if not self._healthy:
            log.warning(
                "upstream %s is not reachable at start-up; its requests get 503 until a"
                " health probe (every %gs) passes",
                cfg.base_url,
                cfg.health_interval,
            )
        self._health_task = asyncio.create_task(self._watch())

    async def close(self) -> None:
        if self._health_task is not None:
            self._health_task.cancel()
            await asyncio.gather(self._health_task, return_exceptions=True)
        if self._pool is not None:
            await self._pool.close()
            self._pool = None

    async def probe(self) -> bool:
        """Refresh health (and, in subclasses, load signals); True if healthy.

        The generic probe is ``GET /v1/models``; engines with a real health
        endpoint override it.
        """
        return (await self.get("/v1/models"))[0] == 200

    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(self.config.health_interval)
            try:
                healthy = await self.probe()
            except Exception:  # a probe must never kill the watcher
                log.exception("probing %s failed", self.config.base_url)
                healthy = False
            if healthy and not self._healthy:
                log.info("upstream %s is reachable again", self.config.base_url)
            elif self._healthy and not healthy:
                log.warning("upstream %s stopped answering its health probe", self.config.base_url)
            self._healthy = healthy

    @property
    def pool(self) -> ConnectionPool:
        if self._pool is None:
            raise BackendUnavailable("the backend is not started")
        return self._pool

    # -- HTTP helpers ------------------------------------------------------

    async def get(self, path: str) -> tuple[int, bytes]:
        """(status, body) of a short GET; status 0 when the upstream is unreachable."""
        try:
            async with asyncio.timeout(self.config.connect_timeout):
                response = await self.pool.send("GET", path)
                try:
                    return response.status, await response.read()
                finally:
                    response.release()
        except _TRANSPORT_ERRORS:
            return 0, b""

    async def post_json(
        self, path: str, body: dict[str, Any], *, within: float | None = None
    ) -> dict[str, Any]:
        """POST ``body``; the decoded JSON object (default limit: the first-token
        timeout), or the translated error."""
        try:
            async with asyncio.timeout(within or self.config.first_token_timeout):
                response = await self.pool.send("POST", path, orjson.dumps(body), JSON_HEADERS)
                try:
                    raw = await response.read()
                finally:
                    response.release()
        except _TRANSPORT_ERRORS as exc:
            raise transport_error(exc, path, retry_after=self.config.health_interval) from None
        if response.status >= 400:
            raise upstream_error(response.status, raw[:ERROR_BODY_LIMIT], response.headers)
        return parse_event(raw)

    @contextlib.asynccontextmanager
    async def streaming_response(self, path: str, body: dict[str, Any]) -> AsyncIterator[Response]:
        """POST ``body`` and yield the streaming response, or raise the translated error.

        Leaving the block before the answer's end closes the connection, which is how
        the upstream learns to stop generating; a block that ran to its end (``[DONE]``)
        reads the answer's last bytes so that the connection is used again.
        """
        try:
            async with asyncio.timeout(self.config.first_token_timeout):
                response = await self.pool.send("POST", path, orjson.dumps(body), JSON_HEADERS)
        except _TRANSPORT_ERRORS as exc:
            raise transport_error(exc, "connect", retry_after=self.config.health_interval) from None
        try:
            if response.status >= 400:
                raise await self._error_of(response)
            yield response
            with contextlib.suppress(TimeoutError, OSError):
                async with asyncio.timeout(_TAIL_SECONDS):
                    await response.finish()
        except OSError as exc:
            raise transport_error(exc, STREAM) from None
        finally:
            response.release()  # back to the pool if read to its end, else closed

    async def _error_of(self, response: Response) -> BackendError:
        """The translated error of a failed answer, from at most ERROR_BODY_LIMIT bytes of
        its body read within the chunk-gap limit (an error body may stall too)."""
        raw = b""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(self.config.chunk_timeout):
                while len(raw) < ERROR_BODY_LIMIT and (chunk := await response.readany()):
                    raw += chunk
        return upstream_error(response.status, raw[:ERROR_BODY_LIMIT], response.headers)

    async def lines(self, response: Response) -> AsyncIterator[str]:
        """The response's lines; each read from the socket within the first-token or
        chunk-gap limit.

        Whatever has arrived is read at once and split here: one timer per read rather
        than per line (an SSE event is two lines) cut the gateway's CPU per stream.
        """
        limit = self.config.first_token_timeout
        pending: list[bytes] = []  # the start of a line not yet ended
        size = 0
        while True:
            try:
                async with asyncio.timeout(limit):
                    data = await response.readany()
            except TimeoutError:
                raise BackendTimeout("the upstream stalled") from None
            if not data:
                if pending:
                    yield b"".join(pending).decode("utf-8", errors="replace").rstrip("\r")
                return
            limit = self.config.chunk_timeout
            *complete, tail = data.split(b"\n")
            if complete:
                complete[0] = b"".join((*pending, complete[0]))
                pending, size = [], 0
            if tail:
                pending.append(tail)
                size += len(tail)
                if size > MAX_LINE:
                    raise BackendUnavailable(f"the upstream sent a line over {MAX_LINE} bytes")
            for line in complete:
                yield line.decode("utf-8", errors="replace").rstrip("\r")

    async def validate(self, request: GenerationRequest) -> None:
        """Nothing to check locally: without the upstream's tokenizer, it enforces context."""

    def load(self) -> BackendLoad:
        return BackendLoad(running=self.in_flight, capacity=self.config.concurrency)

    def describe(self) -> ModelInfo:
        return ModelInfo()  # the upstream's model; what it is, it does not say
