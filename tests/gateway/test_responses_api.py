"""The Responses door in-process, driven by the official OpenAI SDK over the fake backend."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import httpx
import openai
import pytest

from backends.fake import FakeBackend


@pytest.fixture
async def sdk(client: httpx.AsyncClient) -> AsyncIterator[openai.AsyncOpenAI]:
    async with openai.AsyncOpenAI(
        base_url="http://test/v1", api_key="any", http_client=client, max_retries=0
    ) as c:
        yield c


async def test_create_returns_the_text_and_usage(
    sdk: openai.AsyncOpenAI, fakes: dict[str, FakeBackend]
) -> None:
    r = await sdk.responses.create(model="echo", input="one two three", instructions="be kind")
    assert r.output_text == "one two three"
    assert r.status == "completed"
    assert r.usage is not None
    assert (r.usage.input_tokens, r.usage.output_tokens) == (3, 3)
    messages = fakes["echo"].seen[-1].messages
    assert messages is not None
    assert [(m.role, m.content) for m in messages] == [
        ("system", "be kind"),
        ("user", "one two three"),
    ]


async def test_a_message_list_and_max_output_tokens(sdk: openai.AsyncOpenAI) -> None:
    r = await sdk.responses.create(
        model="echo",
        input=[
            {"role": "developer", "content": "short"},
            {"role": "user", "content": [{"type": "input_text", "text": "a b c d"}]},
        ],
        max_output_tokens=2,
    )
    assert r.output_text == "a b"
    assert r.status == "incomplete"
    assert r.incomplete_details is not None and r.incomplete_details.reason == "max_output_tokens"


async def test_an_earlier_output_fed_back_as_input_continues_the_chat(
    sdk: openai.AsyncOpenAI, fakes: dict[str, FakeBackend]
) -> None:
    first = await sdk.responses.create(model="echo", input="one two")
    r = await sdk.responses.create(
        model="echo",
        input=[*first.output, {"role": "user", "content": "three four"}],  # type: ignore[list-item]
    )
    assert r.output_text == "three four"
    messages = fakes["echo"].seen[-1].messages
    assert messages is not None
    assert [(m.role, m.content) for m in messages] == [
        ("assistant", "one two"),
        ("user", "three four"),
    ]


async def test_streamed_events_in_order(sdk: openai.AsyncOpenAI) -> None:
    stream = await sdk.responses.create(model="echo", input="a b c", stream=True)
    kinds, deltas = [], []
    async for event in stream:
        kinds.append(event.type)
        if event.type == "response.output_text.delta":
            deltas.append(event.delta)
    assert kinds[:4] == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
    ]
    assert kinds[-4:] == [
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.completed",
    ]
    assert "".join(deltas) == "a b c"


async def test_the_sdk_stream_helper_assembles_the_response(sdk: openai.AsyncOpenAI) -> None:
    async with sdk.responses.stream(model="echo", input="x y") as stream:
        async for _ in stream:
            pass
        final = await stream.get_final_response()
    assert final.output_text == "x y"


async def test_a_failure_mid_stream_is_a_failed_response(sdk: openai.AsyncOpenAI) -> None:
    stream = await sdk.responses.create(model="fail_mid_stream", input="a b c d", stream=True)
    last = None
    async for event in stream:
        last = event
    assert last is not None and last.type == "response.failed"
    assert last.response.error is not None and last.response.error.code == "server_error"


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        ({"tools": [{"type": "web_search"}]}, "tools"),
        ({"previous_response_id": "resp_123"}, "previous_response_id"),
        ({"reasoning": {"effort": "low"}}, "reasoning"),
        ({"text": {"format": {"type": "json_schema", "name": "x"}}}, "text.format"),
        ({"text": {"format": {"type": "xml"}}}, "text.format.type"),
        ({"made_up": 1}, "made_up"),
        ({"input": [{"type": "function_call_output", "call_id": "c", "output": "x"}]}, "input"),
    ],
)
async def test_what_the_subset_does_not_do_is_refused_by_name(
    client: httpx.AsyncClient, extra: dict[str, Any], param: str
) -> None:
    r = await client.post("/v1/responses", json={"model": "echo", "input": "x", **extra})
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"].startswith(param), error


async def test_a_json_format_reaches_the_engine_and_is_echoed(
    sdk: openai.AsyncOpenAI, fakes: dict[str, FakeBackend]
) -> None:
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}}
    text: Any = {"format": {"type": "json_schema", "name": "thing", "schema": schema}}
    r = await sdk.responses.create(model="echo", input="x", text=text)
    fmt = fakes["echo"].seen[-1].response_format
    assert fmt is not None and (fmt.kind, fmt.name, fmt.schema) == ("json_schema", "thing", schema)
    assert r.text is not None and r.text.format is not None
    assert r.text.format.model_dump(exclude_none=True, by_alias=True) == {
        "type": "json_schema", "name": "thing", "schema": schema}  # fmt: skip
    await sdk.responses.create(model="echo", input="x", text={"format": {"type": "json_object"}})
    last = fakes["echo"].seen[-1].response_format
    assert last is not None and last.kind == "json_object"


async def test_the_door_is_labelled_in_metrics(
    sdk: openai.AsyncOpenAI, client: httpx.AsyncClient
) -> None:
    await sdk.responses.create(model="echo", input="a")
    text = (await client.get("/metrics")).text
    assert 'lockgate_requests_total{endpoint="responses",model="echo",status="200"} 1.0' in text
