"""``/v1/*``: the OpenAI-compatible endpoints.

Each route parses its body with :func:`gateway.protocol.parse`, asks the
service for the work, and returns JSON or SSE. Errors are raised and turned
into responses by the handlers that :func:`gateway.app.create_app` installs.
"""

from __future__ import annotations

import base64
import struct
import time
from collections.abc import Awaitable
from typing import TypeVar

import orjson
from fastapi import APIRouter, Request
from fastapi.responses import Response, StreamingResponse

from backends.base import GenerationRequest
from gateway.api.disconnect import ClientDisconnected, unless_disconnected
from gateway.errors import status_of
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
from gateway.service import CLIENT_CLOSED, InferenceService, Tracker

T = TypeVar("T")

router = APIRouter(prefix="/v1")

JSON = "application/json"
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def _service(request: Request) -> InferenceService:
    service: InferenceService = request.app.state.service
    return service


def _json(payload: object) -> Response:
    return Response(orjson.dumps(payload), media_type=JSON)


async def _tracked(request: Request, tracker: Tracker, work: Awaitable[T]) -> T:
    """Await ``work`` unless the client leaves; record the outcome if it fails."""
    try:
        return await unless_disconnected(request, work)
    except ClientDisconnected:
        tracker.finish(CLIENT_CLOSED)
        raise
    except Exception as exc:
        tracker.finish(status_of(exc))
        raise


async def _generate(
    request: Request,
    body: ChatCompletionRequest | CompletionRequest,
    generation_requests: list[GenerationRequest],
    *,
    endpoint: str,
    rid: str,
) -> Response:
    service = _service(request)
    served = service.resolve(body.model, n=body.n)
    tracker = Tracker(service.metrics, served.name, endpoint, choices=len(generation_requests))
    chat = isinstance(body, ChatCompletionRequest)
    generations = await _tracked(
        request, tracker, service.open(served, generation_requests, n=body.n, tracker=tracker)
    )
    if body.stream:
        encoder = ChunkEncoder(
            rid=rid, model=served.name, chat=chat, include_usage=body.include_usage
        )
        return StreamingResponse(
            service.stream(
                generations, encoder, chat=chat, include_usage=body.include_usage, tracker=tracker
            ),
            media_type="text/event-stream",
            headers=SSE_HEADERS,
        )
    outcomes = await _tracked(request, tracker, service.collect(generations))
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
        )
    )


@router.post("/chat/completions")
async def chat_completions(request: Request) -> Response:
    body = parse(ChatCompletionRequest, await request.body())
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
        )
        for i in range(body.n)
    ]
    return await _generate(request, body, requests, endpoint="chat", rid=rid)


@router.post("/completions")
async def completions(request: Request) -> Response:
    body = parse(CompletionRequest, await request.body())
    rid = new_id("cmpl")
    requests = [
        GenerationRequest(
            request_id=f"{rid}-{p}-{i}",
            model=body.model,
            sampling=body.sampling(choice=i),
            prompt=prompt,
        )
        for p, prompt in enumerate(body.prompts())
        for i in range(body.n)
    ]
    return await _generate(request, body, requests, endpoint="completions", rid=rid)


@router.post("/embeddings")
async def embeddings(request: Request) -> Response:
    body = parse(EmbeddingRequest, await request.body())
    service = _service(request)
    served = service.resolve(body.model, n=1)
    tracker = Tracker(service.metrics, served.name, "embeddings")
    result = await _tracked(request, tracker, served.backend.embed(body.texts()))
    tracker.finish(200, result.prompt_tokens)
    vectors: list[list[float]] | list[str] = result.vectors
    if body.encoding_format == "base64":
        # OpenAI's base64 format: little-endian float32 bytes.
        vectors = [
            base64.b64encode(struct.pack(f"<{len(v)}f", *v)).decode() for v in result.vectors
        ]
    return _json(
        embedding_list(model=served.name, vectors=vectors, prompt_tokens=result.prompt_tokens)
    )


@router.get("/models")
async def list_models(request: Request) -> Response:
    models = _service(request).registry.names()
    return _json({"object": "list", "data": [model_card(m.name, m.created) for m in models]})


@router.get("/models/{model_id:path}")
async def get_model(request: Request, model_id: str) -> Response:
    served = _service(request).registry.get(model_id)
    return _json(model_card(served.name, served.created))
