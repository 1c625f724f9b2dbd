"""``/v1/*``: the OpenAI-compatible endpoints — parse, plan, call the service, encode.

Each handler parses its body (:mod:`gateway.protocol.openai`), builds a
wire-neutral :class:`~gateway.service.Plan`, and lets :func:`~gateway.api.serving.serve`
answer with one body or an SSE stream. They are plain ASGI :class:`Endpoint` s on
the application's router (:data:`ROUTES`), each with its key guard.
"""

from __future__ import annotations

import base64
import struct
from functools import partial
from typing import Any

from pydantic import BaseModel
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from starlette.types import ASGIApp

from backends.base import GenerationRequest
from gateway.api.endpoint import ErrorFormat, Handler, route
from gateway.api.serving import embed, json_response, read_body, serve, service_of
from gateway.events import Embedded, EmbedPlan, Plan
from gateway.protocol.openai import (
    ChatCompletionRequest,
    ChatStream,
    CompletionRequest,
    EmbeddingRequest,
    TextStream,
    chat_completion,
    embedding_list,
    error_body,
    model_card,
    text_completion,
)
from gateway.protocol.wire import new_id, parse
from gateway.tenancy.records import Principal

OPENAI_ERRORS = ErrorFormat("openai", error_body)


def chat_plan(body: ChatCompletionRequest) -> Plan:
    """The plan of a chat completion (also a batch line's, :mod:`gateway.batch.lines`)."""
    rid = new_id("chatcmpl")
    messages = body.chat_messages()
    tools = body.tool_definitions()
    return Plan(
        model=body.model,
        endpoint="chat",
        request_id=rid,
        requests=tuple(
            [
                GenerationRequest(
                    request_id=f"{rid}-{i}",
                    sampling=body.sampling(choice=i),
                    messages=messages,
                    tools=tools,
                    tool_choice=body.choice_of_tool(),
                    parallel_tool_calls=body.parallel_tool_calls,
                    stream=body.stream,
                    response_format=body.output_format(),
                )
                for i in range(body.n)
            ]
        ),
        tokens=body.token_charge(messages),
        n=body.n,
        session=body.user,
    )


def completion_plan(body: CompletionRequest) -> Plan:
    """The plan of a text completion; ``prompt`` may be a list."""
    rid = new_id("cmpl")
    prompts = body.prompts()
    return Plan(
        model=body.model,
        endpoint="completions",
        request_id=rid,
        requests=tuple(
            GenerationRequest(
                request_id=f"{rid}-{p}-{i}",
                sampling=body.sampling(choice=i),
                prompt=prompt,
                stream=body.stream,
                response_format=body.output_format(),
            )
            for p, prompt in enumerate(prompts)
            for i in range(body.n)
        ),
        tokens=body.token_charge(),
        n=body.n,
        session=body.user,
    )


def embedding_plan(body: EmbeddingRequest) -> EmbedPlan:
    return EmbedPlan(
        model=body.model,
        endpoint="embeddings",
        request_id=new_id("embd"),
        texts=tuple(body.texts()),
        tokens=body.token_charge(),
    )


def embedding_body(body: EmbeddingRequest, done: Embedded) -> dict[str, Any]:
    """The answer to an embeddings request, in its ``encoding_format``."""
    vectors: list[list[float]] | list[str] = done.result.vectors
    if body.encoding_format == "base64":
        # OpenAI's base64 format: little-endian float32 bytes.
        vectors = [base64.b64encode(struct.pack(f"<{len(v)}f", *v)).decode() for v in vectors]
    return embedding_list(
        model=done.model, vectors=vectors, prompt_tokens=done.result.prompt_tokens
    )


async def chat_completions(request: Request, principal: Principal) -> ASGIApp:
    """Create a chat completion (streamed as SSE with ``stream: true``)."""
    body = parse(ChatCompletionRequest, await read_body(request, principal))
    plan = chat_plan(body)
    encoder = ChatStream(choices=body.n, include_usage=body.include_usage)
    answer = partial(chat_completion, logprobs=bool(body.logprobs))
    return await serve(request, principal, plan, body=answer, stream=encoder)


async def completions(request: Request, principal: Principal) -> ASGIApp:
    """Create a text completion (legacy); ``prompt`` may be a list."""
    body = parse(CompletionRequest, await read_body(request, principal))
    plan = completion_plan(body)
    encoder = TextStream(choices=len(plan.requests), include_usage=body.include_usage)
    answer = partial(text_completion, logprobs=body.logprobs is not None)
    return await serve(request, principal, plan, body=answer, stream=encoder)


async def embeddings(request: Request, principal: Principal) -> Response:
    """Create embeddings: mean-pooled, unit-length vectors."""
    body = parse(EmbeddingRequest, await read_body(request, principal))
    done = await embed(request, principal, embedding_plan(body))
    return json_response(embedding_body(body, done), done.headers)


async def list_models(request: Request, principal: Principal) -> Response:
    """List the models this key may use."""
    models = service_of(request).models(principal)
    return json_response(
        {"object": "list", "data": [model_card(m.name, m.created) for m in models]}
    )


async def get_model(request: Request, principal: Principal) -> Response:
    """Describe one model."""
    served = service_of(request).model(principal, request.path_params["model_id"])
    return json_response(model_card(served.name, served.created))


def _route(
    path: str, method: str, handler: Handler, name: str, body: type[BaseModel] | None = None
) -> Route:
    return route(path, method, handler, name=name, errors=OPENAI_ERRORS, body=body)


ROUTES = (
    _route("/v1/chat/completions", "POST", chat_completions, "chat", ChatCompletionRequest),
    _route("/v1/completions", "POST", completions, "completions", CompletionRequest),
    _route("/v1/embeddings", "POST", embeddings, "embeddings", EmbeddingRequest),
    _route("/v1/models", "GET", list_models, "models"),
    _route("/v1/models/{model_id:path}", "GET", get_model, "models"),
)
