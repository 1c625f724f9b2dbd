"""``/api/*``: the Ollama-compatible front door, for ollama-python, Open WebUI and friends.

Parse (:mod:`gateway.protocol.ollama`), plan, call the service, encode NDJSON —
the same tenants, keys (``Authorization: Bearer``), limits, scheduling and
metrics (``endpoint`` ``ollama_chat``, ``ollama_generate``, ``ollama_embed``) as ``/v1``.
Ollama's model-management routes (pull, push, create, delete, copy, blobs) do not
exist here: they answer 404 (see :data:`MODEL_MANAGEMENT`), never proxied — they
are where Ollama's own CVE-2024-37032 and CVE-2026-7482 came from.
"""

from __future__ import annotations

from pydantic import BaseModel
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from starlette.types import ASGIApp

from backends.base import GenerationRequest
from gateway.api.endpoint import ErrorFormat, Handler, route
from gateway.api.serving import embed as embed_plan
from gateway.api.serving import json_response, read_body, serve, service_of
from gateway.events import Embedded, EmbedPlan, Plan
from gateway.protocol.ollama import (
    VERSION,
    ChatLines,
    ChatRequest,
    EmbeddingsRequest,
    EmbedRequest,
    GenerateLines,
    GenerateRequest,
    ShowRequest,
    chat_response,
    error_body,
    generate_response,
    loaded,
    model_entry,
    running_entry,
    show_response,
)
from gateway.protocol.wire import estimate_tokens, new_id, parse
from gateway.tenancy.records import Principal

OLLAMA_ERRORS = ErrorFormat("ollama", error_body)
MODEL_MANAGEMENT = (
    "/api/pull",
    "/api/push",
    "/api/create",
    "/api/delete",
    "/api/copy",
    "/api/blobs",
)


async def chat(request: Request, principal: Principal) -> ASGIApp:
    """Chat with a model (NDJSON stream unless ``stream: false``)."""
    body = parse(ChatRequest, await read_body(request, principal))
    if not body.messages:
        served = service_of(request).model(principal, body.model)
        return json_response(loaded(served.name, chat=True, keep_alive=body.keep_alive))
    messages = body.chat_messages()
    generation = GenerationRequest(
        request_id=new_id("ollama-chat"),
        sampling=body.sampling(),
        messages=messages,
        tools=body.tool_definitions(),
        stream=body.stream,
        response_format=body.output_format(),
    )
    plan = Plan.single(body.model, "ollama_chat", generation, tokens=body.token_charge(messages))
    return await serve(request, principal, plan, body=chat_response, stream=ChatLines())


async def generate(request: Request, principal: Principal) -> ASGIApp:
    """Generate a completion of a prompt (NDJSON stream unless ``stream: false``)."""
    body = parse(GenerateRequest, await read_body(request, principal))
    if not body.prompt and not body.system:
        served = service_of(request).model(principal, body.model)
        return json_response(loaded(served.name, chat=False, keep_alive=body.keep_alive))
    messages = body.chat_messages()
    generation = GenerationRequest(
        request_id=new_id("ollama-gen"),
        sampling=body.sampling(),
        prompt=body.prompt if messages is None else None,
        messages=messages,
        stream=body.stream,
        response_format=body.output_format(),
    )
    plan = Plan.single(body.model, "ollama_generate", generation, tokens=body.token_charge())
    return await serve(request, principal, plan, body=generate_response, stream=GenerateLines())


async def _embed(request: Request, principal: Principal, model: str, texts: list[str]) -> Embedded:
    plan = EmbedPlan(
        model=model,
        endpoint="ollama_embed",
        request_id=new_id("ollama-embd"),
        texts=tuple(texts),
        tokens=sum(estimate_tokens(t) for t in texts),
    )
    return await embed_plan(request, principal, plan)


async def embed(request: Request, principal: Principal) -> Response:
    """Embed one text or a list of texts."""
    body = parse(EmbedRequest, await read_body(request, principal))
    done = await _embed(request, principal, body.model, body.texts())
    return json_response(
        {
            "model": done.model,
            "embeddings": done.result.vectors,
            "prompt_eval_count": done.result.prompt_tokens,
        },
        done.headers,
    )


async def embeddings(request: Request, principal: Principal) -> Response:
    """Embed one prompt (the legacy endpoint)."""
    body = parse(EmbeddingsRequest, await read_body(request, principal))
    done = await _embed(request, principal, body.model, [body.prompt])
    return json_response({"embedding": done.result.vectors[0]}, done.headers)


async def tags(request: Request, principal: Principal) -> Response:
    """List the models this key may use."""
    models = service_of(request).models(principal)
    return json_response(
        {"models": [model_entry(m.name, m.created, m.backend.describe()) for m in models]}
    )


async def ps(request: Request, principal: Principal) -> Response:
    """List the loaded models (every configured model that is ready)."""
    models = [m for m in service_of(request).models(principal) if m.backend.ready]
    return json_response({"models": [running_entry(m.name, m.backend.describe()) for m in models]})


async def show(request: Request, principal: Principal) -> Response:
    """Describe one model: family, size, quantization, context."""
    body = parse(ShowRequest, await read_body(request, principal))
    served = service_of(request).model(principal, body.model_name)
    return json_response(show_response(served.created, served.backend.describe()))


async def version(request: Request, principal: Principal) -> Response:
    """The Ollama API version this door follows."""
    return json_response({"version": VERSION})


def _route(
    path: str, method: str, handler: Handler, name: str, body: type[BaseModel] | None = None
) -> Route:
    return route(path, method, handler, name=name, errors=OLLAMA_ERRORS, body=body)


ROUTES = (
    _route("/api/chat", "POST", chat, "ollama_chat", ChatRequest),
    _route("/api/generate", "POST", generate, "ollama_generate", GenerateRequest),
    _route("/api/embed", "POST", embed, "ollama_embed", EmbedRequest),
    _route("/api/embeddings", "POST", embeddings, "ollama_embed", EmbeddingsRequest),
    _route("/api/tags", "GET", tags, "ollama_models"),
    _route("/api/show", "POST", show, "ollama_models", ShowRequest),
    _route("/api/ps", "GET", ps, "ollama_models"),
    _route("/api/version", "GET", version, "ollama_version"),
)
