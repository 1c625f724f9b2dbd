"""``/v1/responses``: OpenAI's Responses API, text subset — parse, plan, serve, encode.

See :mod:`gateway.protocol.responses` for what is served and what is refused.
Errors before a response starts are OpenAI's error shape; after, a
``response.failed`` event.
"""

from __future__ import annotations

from starlette.requests import Request
from starlette.types import ASGIApp

from backends.base import GenerationRequest
from gateway.api.endpoint import route
from gateway.api.openai import OPENAI_ERRORS
from gateway.api.serving import read_body, serve
from gateway.events import Plan
from gateway.protocol.responses import (
    ResponseEvents,
    ResponseShape,
    ResponsesRequest,
    response_body,
)
from gateway.protocol.wire import new_id, parse
from gateway.tenancy.records import Principal


async def create_response(request: Request, principal: Principal) -> ASGIApp:
    """Create a model response (typed SSE events with ``stream: true``)."""
    body = parse(ResponsesRequest, await read_body(request, principal))
    messages = body.chat_messages()
    generation = GenerationRequest(
        request_id=new_id("resp", "_"),
        sampling=body.sampling(),
        messages=messages,
        stream=body.stream,
        response_format=body.output_format(),
    )
    plan = Plan.single(body.model, "responses", generation, tokens=body.token_charge(messages))
    shape = ResponseShape(body)
    return await serve(
        request,
        principal,
        plan,
        body=lambda result: response_body(shape, result),
        stream=ResponseEvents(shape),
    )


ROUTES = (
    route(
        "/v1/responses",
        "POST",
        create_response,
        name="responses",
        errors=OPENAI_ERRORS,
        body=ResponsesRequest,
    ),
)
