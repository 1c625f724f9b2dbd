"""Every /v1 body and streamed event validates against OpenAI's published schema.

The fake backend answers in-process; the schemas are the pinned extract in tests/spec.
"""

from __future__ import annotations

from typing import Any

import httpx
import orjson
import pytest

from tests.gateway.test_api import chat, sse_events
from tests.spec.openai import validate

TOOLS = [{"type": "function", "function": {"name": "lookup", "parameters": {"type": "object"}}}]


def response_events(body: str) -> list[dict[str, Any]]:
    """The ``data`` of each typed SSE event; each ``event:`` line names its data's type."""
    events = []
    for block in body.strip().split("\n\n"):
        kind, data = block.split("\n", 1)
        payload = orjson.loads(data.removeprefix("data: "))
        assert kind == f"event: {payload['type']}"
        events.append(payload)
    return events


@pytest.mark.parametrize(
    "extra",
    [{}, {"max_tokens": 2}, {"tools": TOOLS}, {"n": 3, "model": "echo-n"}],
    ids=["stop", "length", "tool_calls", "n=3"],
)
async def test_chat_completion_bodies(client: httpx.AsyncClient, extra: dict[str, Any]) -> None:
    r = await client.post("/v1/chat/completions", json=chat(**extra))
    assert r.status_code == 200, r.text
    validate("CreateChatCompletionResponse", r.json())


@pytest.mark.parametrize(
    "extra",
    [
        {"stream_options": {"include_usage": True}},
        {"tools": TOOLS},
        {"n": 2, "model": "echo-n"},
        {"model": "fail_mid_stream"},
    ],
    ids=["usage", "tool_calls", "n=2", "failed"],
)
async def test_chat_completion_chunks(client: httpx.AsyncClient, extra: dict[str, Any]) -> None:
    r = await client.post("/v1/chat/completions", json=chat(stream=True, **extra))
    events = sse_events(r.text)
    for event in events:
        if "error" in event:
            validate("ErrorResponse", event)
        else:
            validate("CreateChatCompletionStreamResponse", event)
    assert events


async def test_completion_bodies_and_chunks(client: httpx.AsyncClient) -> None:
    body = {"model": "echo", "prompt": ["a b", "c d e"], "max_tokens": 2}
    r = await client.post("/v1/completions", json=body)
    validate("CreateCompletionResponse", r.json())
    r = await client.post("/v1/completions", json={**body, "stream": True})
    events = sse_events(r.text)
    # OpenAI publishes no stream schema for legacy completions: its chunks are this body,
    # but with finish_reason null until a choice ends, as OpenAI itself sends them.
    for event in events:
        for choice in event["choices"]:
            if choice["finish_reason"] is None:
                choice["finish_reason"] = "stop"
        validate("CreateCompletionResponse", event)
    reasons = [c["finish_reason"] for e in events for c in e["choices"] if c["text"] == ""]
    assert sorted(reasons) == ["length", "stop"]


async def test_embeddings_models_and_errors(client: httpx.AsyncClient) -> None:
    r = await client.post("/v1/embeddings", json={"model": "echo", "input": ["a", "b c"]})
    validate("CreateEmbeddingResponse", r.json())
    validate("ListModelsResponse", (await client.get("/v1/models")).json())
    validate("Model", (await client.get("/v1/models/echo")).json())
    for bad in (
        await client.post("/v1/chat/completions", json={"model": "echo"}),
        await client.post("/v1/chat/completions", json=chat(model="nope")),
        await client.get("/v1/nothing"),
        await client.get("/v1/chat/completions"),
    ):
        assert bad.status_code >= 400
        validate("ErrorResponse", bad.json())


async def test_response_objects(client: httpx.AsyncClient) -> None:
    for extra in ({}, {"max_output_tokens": 2, "instructions": "be brief"}):
        r = await client.post("/v1/responses", json={"model": "echo", "input": "a b c", **extra})
        assert r.status_code == 200, r.text
        validate("Response", r.json())


@pytest.mark.parametrize(
    ("model", "extra", "last"),
    [
        ("echo", {}, "response.completed"),
        ("echo", {"max_output_tokens": 2}, "response.incomplete"),
        ("fail_mid_stream", {}, "response.failed"),
    ],
)
async def test_response_stream_events(
    client: httpx.AsyncClient, model: str, extra: dict[str, Any], last: str
) -> None:
    body = {"model": model, "input": "a b c d e", "stream": True, **extra}
    r = await client.post("/v1/responses", json=body)
    events = response_events(r.text)
    for event in events:
        validate("ResponseStreamEvent", event)
    assert [e["sequence_number"] for e in events] == list(range(len(events)))
    assert events[0]["type"] == "response.created"
    assert events[-1]["type"] == last
