"""A batch's input lines: checked as a whole, then each run as the HTTP request it names.

    {"custom_id": "q1", "method": "POST", "url": "/v1/chat/completions", "body": {...}}

:func:`check` reads the file once before the batch starts and refuses it, with the
line numbers, when lines name another endpoint than the batch's, a model the tenant
may not use, or a ``custom_id`` used twice. A line that is not such an object at all
is not the batch's failure: it goes to the error file when its turn comes. A batch has one
model, as OpenAI's do. Embedding lines do not queue in the scheduler (embeddings never
do): only the batch's own slot limit spaces them.
:func:`run_line` plans a line with the OpenAI door's own functions and runs it
through :meth:`~gateway.service.InferenceService.run` at ``batch`` priority, so it
meets the same admission, limits, routing and scheduler as an HTTP request.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from functools import partial
from typing import Any

import orjson

from backends.base import BackendOverloaded, BackendUnavailable
from gateway.api.openai import (
    chat_plan,
    completion_plan,
    embedding_body,
    embedding_plan,
)
from gateway.batch.records import BatchError
from gateway.errors import (
    GatewayError,
    InvalidRequest,
    RateLimited,
    SchedulerRefusal,
    StateUnavailable,
    describe,
)
from gateway.events import Result, Started, collect
from gateway.protocol.openai import (
    ChatCompletionRequest,
    CompletionRequest,
    EmbeddingRequest,
    chat_completion,
    error_body,
    text_completion,
)
from gateway.protocol.wire import new_id, parse_object
from gateway.service import InferenceService
from gateway.tenancy.records import Principal

MAX_ERRORS = 100  # validation errors listed on a refused batch
RETRY_FLOOR, RETRY_CAP = 0.5, 30.0  # seconds between tries of a line refused for now


@dataclass(frozen=True, slots=True)
class Checked:
    lines: int
    model: str | None
    errors: list[BatchError]


@dataclass(frozen=True, slots=True)
class LineOutcome:
    status: int
    body: dict[str, Any]
    request_id: str
    input_tokens: int = 0
    output_tokens: int = 0
    cached_tokens: int = 0

    @property
    def ok(self) -> bool:
        return self.status == 200


def decode(raw: bytes) -> dict[str, Any] | None:
    try:
        line = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return None
    return line if isinstance(line, dict) else None


async def check(
    lines: AsyncIterator[tuple[int, bytes]],
    *,
    endpoint: str,
    allowed: Callable[[str], bool],
) -> Checked:
    """One pass over the file: the lines, the model the first names, and what is wrong."""
    errors: list[BatchError] = []
    seen: set[str] = set()
    count, model = 0, None

    def error(code: str, message: str, index: int, param: str | None = None) -> None:
        if len(errors) < MAX_ERRORS:
            errors.append(BatchError(code=code, message=message, line=index + 1, param=param))

    async for index, raw in lines:
        count += 1
        line = decode(raw)
        if line is None:
            continue  # an error line when it runs; not the batch's failure
        custom_id = line.get("custom_id")
        if isinstance(custom_id, str):
            if custom_id in seen:
                error(
                    "duplicate_custom_id",
                    f"The custom_id '{custom_id}' is used twice.",
                    index,
                    "custom_id",
                )
            seen.add(custom_id)
        url = line.get("url")
        if isinstance(url, str) and url != endpoint:
            message = f"The line's url '{url}' is not the batch's endpoint '{endpoint}'."
            error("mismatched_endpoint", message, index, "url")
        body = line.get("body")
        name = body.get("model") if isinstance(body, dict) else None
        if isinstance(name, str):
            model = model or name
            if name != model:
                message = f"Every line must name one model ('{model}'); this one names '{name}'."
                error("mismatched_model", message, index, "body.model")
            elif not allowed(name):
                error(
                    "model_not_found",
                    f"The model '{name}' does not exist or you do not have access to it.",
                    index,
                    "body.model",
                )
    if count == 0:
        errors.append(BatchError(code="empty_file", message="The input file has no lines."))
    return Checked(count, model, errors)


def output_line(
    batch_id: str,
    index: int,
    custom_id: object,
    outcome: LineOutcome | None,
    error: BatchError | None,
) -> bytes:
    """One line of the output or error file, OpenAI's shape."""
    response = None
    if outcome is not None:
        response = {
            "status_code": outcome.status,
            "request_id": outcome.request_id,
            "body": outcome.body,
        }
    return orjson.dumps(
        {
            "id": output_id(batch_id, index),
            "custom_id": custom_id if isinstance(custom_id, str) else None,
            "response": response,
            "error": None if error is None else {"code": error.code, "message": error.message},
        }
    )


def output_id(batch_id: str, index: int) -> str:
    """The same for a line however often it runs (files.merge keeps one per id)."""
    return f"batch_req_{batch_id.removeprefix('batch_')}_{index}"


async def run_line(
    service: InferenceService,
    principal: Principal,
    endpoint: str,
    line: dict[str, Any],
    *,
    deadline: float,
) -> LineOutcome:
    """Run one line; a refusal that says "later" (rate limits, a full queue) is tried
    again until ``deadline`` (a monotonic time), any other failure is its outcome."""
    delay = RETRY_FLOOR
    while True:
        try:
            return await _run_once(service, principal, endpoint, line)
        except (
            RateLimited,
            SchedulerRefusal,
            StateUnavailable,
            BackendOverloaded,
            BackendUnavailable,
        ) as exc:
            wait = max(delay, _retry_after(exc))
            if time.monotonic() + wait >= deadline:
                return failure(exc)
            await asyncio.sleep(wait)
            delay = min(RETRY_CAP, delay * 2)
        except Exception as exc:
            return failure(exc)


async def _run_once(
    service: InferenceService, principal: Principal, endpoint: str, line: dict[str, Any]
) -> LineOutcome:
    if line.get("method", "POST") != "POST":
        raise InvalidRequest("The line's method must be POST.", param="method")
    if line.get("url") != endpoint:
        raise InvalidRequest(f"The line's url must be '{endpoint}'.", param="url")
    raw = line.get("body")
    if isinstance(raw, dict) and raw.get("stream"):
        raise InvalidRequest("Streaming is not supported in a batch.", param="body.stream")
    if endpoint == "/v1/embeddings":
        embed_body = parse_object(EmbeddingRequest, raw)
        embed = embedding_plan(embed_body)
        done = await service.embed(principal, embed)
        return LineOutcome(
            200, embedding_body(embed_body, done), embed.request_id, done.result.prompt_tokens
        )
    encode: Callable[[Result], dict[str, Any]]
    if endpoint == "/v1/chat/completions":
        chat = parse_object(ChatCompletionRequest, raw)
        plan = chat_plan(chat)
        encode = partial(chat_completion, logprobs=bool(chat.logprobs))
    else:
        text = parse_object(CompletionRequest, raw)
        plan = completion_plan(text)
        encode = partial(text_completion, logprobs=text.logprobs is not None)
    run = service.run(principal, plan, priority="batch")
    try:
        started = await anext(run)
        assert type(started) is Started
        result = await collect(run, started)
    finally:
        await run.aclose()
    f = result.finished
    return LineOutcome(
        200, encode(result), plan.request_id, f.prompt_tokens, f.completion_tokens, f.cached_tokens
    )


def _retry_after(exc: Exception) -> float:
    if isinstance(exc, BackendOverloaded | BackendUnavailable):
        return float(exc.retry_after)
    if isinstance(exc, GatewayError):
        try:
            return float(exc.headers.get("Retry-After", RETRY_FLOOR))
        except ValueError:
            return RETRY_FLOOR
    return RETRY_FLOOR


def failure(exc: Exception) -> LineOutcome:
    """A line's failure as its output: the error body the HTTP request would have had."""
    info = describe(exc)
    return LineOutcome(info.status, orjson.loads(error_body(info)), new_id("req"))
