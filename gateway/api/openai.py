"""``/v1/*``: the OpenAI-compatible endpoints.

Each handler parses its body with :func:`gateway.protocol.parse`, asks the
service for the work, and returns JSON or SSE. They are served by the plain
ASGI :class:`gateway.api.routing.Routes` (:data:`ROUTES`, each with its key
guard); errors are raised and rendered there.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import struct
import time
from collections.abc import Sequence

import orjson
from starlette.requests import Request
from starlette.responses import Response

from backends.base import GenerationRequest
from gateway.api.disconnect import ClientDisconnected, hangup_cancels
from gateway.api.routing import Route
from gateway.api.security import authenticated
from gateway.api.sse import EventStream
from gateway.errors import InvalidRequest, status_of
from gateway.protocol import (
    ChatCompletionRequest,
    ChunkEncoder,
    CompletionRequest,
    EmbeddingRequest,
    completion,
    embedding_list,
    model_card,
    new_id,
    parse,
)
from gateway.scheduler.base import Priority
from gateway.service import (
    CLIENT_CLOSED,
    Generation,
    InferenceService,
    Tracker,
    usage_of,
)
from gateway.tenancy.records import Principal

# Request bodies, at debug level, and only for tenants whose `log_requests` allows it.
body_log = logging.getLogger("lockgate.requests")

JSON = "application/json"
# A client may lower its own priority (a batch job on an interactive key), never raise it.
PRIORITY_HEADER = "x-lockgate-priority"
QUEUED_HEADER = "x-lockgate-queued-ms"  # time spent waiting for an engine slot


def _service(request: Request) -> InferenceService:
    service: InferenceService = request.app.state.service
    return service


def _json(payload: object, headers: dict[str, str] | None = None) -> Response:
    return Response(orjson.dumps(payload), media_type=JSON, headers=headers)


def _log_body(principal: Principal, body: bytes) -> None:
    if principal.tenant.log_requests and body_log.isEnabledFor(logging.DEBUG):
        body_log.debug("tenant %s: %s", principal.tenant.id, body.decode(errors="replace"))


def _priority(request: Request, principal: Principal) -> Priority:
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


def _failed(tracker: Tracker, exc: BaseException, generations: Sequence[Generation] = ()) -> None:
    """Record a request that ended in ``exc``, billing what it produced and freeing its
    slots; a cancellation (the server shutting down) counts as the client gone."""
    gone = isinstance(exc, ClientDisconnected | asyncio.CancelledError)
    status = CLIENT_CLOSED if gone else status_of(exc)
    tracker.finish(status, *usage_of(generations))


async def _generate(
    request: Request,
    principal: Principal,
    body: ChatCompletionRequest | CompletionRequest,
    generation_requests: list[GenerationRequest],
    *,
    endpoint: str,
    rid: str,
    tokens: int,
) -> Response | EventStream:
    service = _service(request)
    served = service.resolve(body.model, n=body.n, principal=principal)
    priority = _priority(request, principal)
    tracker = Tracker(service.metrics, served.name, endpoint, choices=len(generation_requests))
    chat = isinstance(body, ChatCompletionRequest)
    generations: list[Generation] = []
    try:
        async with hangup_cancels(request):
            tracker.ticket = await service.admit(principal, served, tokens=tokens, request_id=rid)
            generations = await service.open(
                served,
                generation_requests,
                n=body.n,
                tracker=tracker,
                request_id=rid,
                tenant=principal.tenant.id,
                weight=principal.tenant.weight,
                priority=priority,
            )
            outcomes = None if body.stream else await service.collect(generations)
    except BaseException as exc:
        _failed(tracker, exc, generations)
        raise
    assert tracker.ticket is not None and tracker.grant is not None
    headers = {
        **tracker.ticket.headers,
        QUEUED_HEADER: f"{tracker.grant.queued_seconds * 1000:.0f}",
    }
    if outcomes is None:
        encoder = ChunkEncoder(
            rid=rid, model=served.name, chat=chat, include_usage=body.include_usage
        )
        return EventStream(
            service.stream(
                generations, encoder, chat=chat, include_usage=body.include_usage, tracker=tracker
            ),
            headers=headers,
            abandon=lambda: service.abandon(generations, tracker),
        )
    prompt_tokens = sum(o.prompt_tokens for o in outcomes)
    completion_tokens = sum(o.completion_tokens for o in outcomes)
    tracker.finish(200, prompt_tokens, completion_tokens)
    return _json(
        completion(
            chat=chat,
            rid=rid,
            model=served.name,
            created=int(time.time()),
            choices=[("".join(o.text), o.finish_reason, tuple(o.tool_calls)) for o in outcomes],
            prompt_tokens=prompt_tokens,
            completion_tokens=completion_tokens,
        ),
        headers,
    )


async def chat_completions(request: Request, principal: Principal) -> Response | EventStream:
    raw = await request.body()
    _log_body(principal, raw)
    body = parse(ChatCompletionRequest, raw)
    rid = new_id("chatcmpl")
    messages = body.chat_messages()
    tools = body.tool_definitions()
    requests = [
        GenerationRequest(
            request_id=f"{rid}-{i}",
            model=body.model,
            sampling=body.sampling(choice=i),
            messages=messages,
            tools=tools,
            tool_choice=body.tool_choice,
            stream=body.stream,
        )
        for i in range(body.n)
    ]
    return await _generate(
        request,
        principal,
        body,
        requests,
        endpoint="chat",
        rid=rid,
        tokens=body.token_charge(messages),
    )


async def completions(request: Request, principal: Principal) -> Response | EventStream:
    raw = await request.body()
    _log_body(principal, raw)
    body = parse(CompletionRequest, raw)
    rid = new_id("cmpl")
    requests = [
        GenerationRequest(
            request_id=f"{rid}-{p}-{i}",
            model=body.model,
            sampling=body.sampling(choice=i),
            prompt=prompt,
            stream=body.stream,
        )
        for p, prompt in enumerate(body.prompts())
        for i in range(body.n)
    ]
    return await _generate(
        request,
        principal,
        body,
        requests,
        endpoint="completions",
        rid=rid,
        tokens=body.token_charge(),
    )


async def embeddings(request: Request, principal: Principal) -> Response:
    raw = await request.body()
    _log_body(principal, raw)
    body = parse(EmbeddingRequest, raw)
    service = _service(request)
    served = service.resolve(body.model, n=1, principal=principal)
    tracker = Tracker(service.metrics, served.name, "embeddings")
    try:
        async with hangup_cancels(request):
            tracker.ticket = await service.admit(
                principal, served, tokens=body.token_charge(), request_id=new_id("embd")
            )
            tracker.dispatched()
            result = await served.backend.embed(body.texts())
    except BaseException as exc:
        _failed(tracker, exc)
        raise
    tracker.finish(200, result.prompt_tokens)
    vectors: list[list[float]] | list[str] = result.vectors
    if body.encoding_format == "base64":
        # OpenAI's base64 format: little-endian float32 bytes.
        vectors = [
            base64.b64encode(struct.pack(f"<{len(v)}f", *v)).decode() for v in result.vectors
        ]
    return _json(
        embedding_list(model=served.name, vectors=vectors, prompt_tokens=result.prompt_tokens),
        tracker.ticket.headers,
    )


async def list_models(request: Request, principal: Principal) -> Response:
    models = [m for m in _service(request).registry.names() if principal.tenant.allows(m.name)]
    return _json({"object": "list", "data": [model_card(m.name, m.created) for m in models]})


async def get_model(request: Request, principal: Principal) -> Response:
    served = _service(request).resolve(request.path_params["model_id"], n=1, principal=principal)
    return _json(model_card(served.name, served.created))


ROUTES = (
    Route("POST", "/v1/chat/completions", chat_completions, authenticated),
    Route("POST", "/v1/completions", completions, authenticated),
    Route("POST", "/v1/embeddings", embeddings, authenticated),
    Route("GET", "/v1/models", list_models, authenticated),
    Route("GET", "/v1/models/", get_model, authenticated, param="model_id"),
)
