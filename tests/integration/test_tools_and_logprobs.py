"""Tool calls and log probabilities on the real model, through the OpenAI SDK.

A 270M base model was never taught to call tools, so ``auto`` rarely calls one; with
``tool_choice: "required"`` or a named function the grammar makes every answer a valid
call of a declared function whose arguments match its JSON Schema.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from typing import Any

import jsonschema
import openai
import pytest

from tests.integration.conftest import NO_EOG, Server

pytestmark = pytest.mark.integration

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather of a city",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "maxLength": 20},
                "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
            },
            "required": ["city", "unit"],
            "additionalProperties": False,
        },
    },
}
CLOCK = {
    "type": "function",
    "function": {
        "name": "get_time",
        "description": "Local time in a time zone",
        "parameters": {
            "type": "object",
            "properties": {"zone": {"type": "string", "enum": ["UTC", "CET", "PST"]}},
            "required": ["zone"],
            "additionalProperties": False,
        },
    },
}
TOOLS = [WEATHER, CLOCK]
SCHEMAS = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
ASK = [{"role": "user", "content": "What is the weather in Paris right now?"}]


@pytest.fixture
def client(server: Server) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=f"{server.base_url}/v1", api_key="none", max_retries=0) as c:
        yield c


def assert_valid_call(call: Any) -> None:
    assert call.type == "function" and call.id.startswith("call_")
    assert call.function.name in SCHEMAS
    jsonschema.validate(json.loads(call.function.arguments), SCHEMAS[call.function.name])


@pytest.mark.parametrize("temperature", [0.0, 1.0])
@pytest.mark.parametrize("seed", [1, 2])
def test_a_required_call_always_matches_its_schema(
    client: openai.OpenAI, temperature: float, seed: int
) -> None:
    r = client.chat.completions.create(
        model="gemma", messages=ASK, tools=TOOLS, tool_choice="required",  # type: ignore[arg-type]
        parallel_tool_calls=False, temperature=temperature, seed=seed, n=2, max_tokens=96,
    )  # fmt: skip
    for choice in r.choices:
        assert choice.finish_reason == "tool_calls"
        calls = choice.message.tool_calls or []
        assert len(calls) == 1
        assert_valid_call(calls[0])


def test_a_named_function_is_the_one_called(client: openai.OpenAI) -> None:
    r = client.chat.completions.create(
        model="gemma", messages=ASK, tools=TOOLS, temperature=0.8, seed=5, max_tokens=64,  # type: ignore[arg-type]
        tool_choice={"type": "function", "function": {"name": "get_time"}},
    )  # fmt: skip
    calls = r.choices[0].message.tool_calls or []
    assert [c.function.name for c in calls] == ["get_time"]
    assert_valid_call(calls[0])
    assert r.choices[0].message.content is None  # only calls: content null, as OpenAI sends


def test_parallel_required_calls_are_each_valid(client: openai.OpenAI) -> None:
    r = client.chat.completions.create(
        model="gemma", messages=ASK, tools=TOOLS, tool_choice="required",  # type: ignore[arg-type]
        temperature=1.0, seed=3, max_tokens=200,
    )  # fmt: skip
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls"
    calls = choice.message.tool_calls or []
    assert 1 <= len(calls) <= 4  # backends/llama/tools.py MAX_PARALLEL_CALLS
    for call in calls:
        assert_valid_call(call)
    assert len({c.id for c in calls}) == len(calls)


def test_streamed_calls_come_as_openai_deltas(client: openai.OpenAI) -> None:
    ask: dict[str, Any] = dict(
        model="gemma", messages=ASK, tools=TOOLS, temperature=0, max_tokens=64,
        tool_choice={"type": "function", "function": {"name": "get_weather"}},
    )  # fmt: skip
    whole = client.chat.completions.create(**ask).choices[0].message.tool_calls
    assert whole is not None
    deltas, reasons = [], []
    for chunk in client.chat.completions.create(**ask, stream=True):
        for choice in chunk.choices:
            deltas += choice.delta.tool_calls or []
            reasons.append(choice.finish_reason)
            assert not choice.delta.content
    first, rest = deltas[0], deltas[1:]
    # id, type and name first, with empty arguments; then argument pieces only.
    assert (first.index, first.type, first.function.name, first.function.arguments) == (
        0, "function", "get_weather", "")  # fmt: skip
    assert first.id is not None and first.id.startswith("call_")
    assert len(rest) > 2, "the arguments came in one piece, not as they were produced"
    assert all(d.id is None and d.function.name is None and d.index == 0 for d in rest)
    arguments = "".join(d.function.arguments or "" for d in rest)
    assert arguments == whole[0].function.arguments  # greedy: the same call both ways
    assert reasons[-1] == "tool_calls"


def test_tool_history_is_rendered_and_none_hides_the_tools(client: openai.OpenAI) -> None:
    arguments = '{"city": "Paris", "unit": "celsius"}'
    call = {"id": "call_1", "type": "function",
            "function": {"name": "get_weather", "arguments": arguments}}  # fmt: skip
    history: list[dict[str, Any]] = [
        *ASK,
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "call_1", "content": "18 degrees, sunny"},
    ]

    def prompt_tokens(messages: list[dict[str, Any]], **extra: Any) -> int:
        r = client.chat.completions.create(
            model="gemma",
            messages=messages,
            max_tokens=1,
            **extra,  # type: ignore[arg-type]
        )
        assert r.usage is not None
        return r.usage.prompt_tokens

    alone = prompt_tokens(ASK)
    answered = prompt_tokens(history)
    assert answered > alone + 15  # the call and its answer are in the prompt
    declared = prompt_tokens(ASK, tools=TOOLS)
    assert declared > alone + 100  # the signatures are in the system turn
    assert prompt_tokens(ASK, tools=TOOLS, tool_choice="none") == alone
    r = client.chat.completions.create(
        model="gemma",
        messages=history,
        tools=TOOLS,
        tool_choice="none",
        max_tokens=8,  # type: ignore[arg-type]
    )
    assert r.choices[0].message.tool_calls is None


def test_tool_choice_mistakes_are_400(client: openai.OpenAI) -> None:
    for bad in (
        {"tool_choice": "required"},  # no tools
        {"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}},
        {"tools": [{"type": "function", "function": {"name": "f", "strict": True,
                    "parameters": {"type": "object", "not": {"required": ["x"]}}}}],
         "tool_choice": "required"},  # strict, with a keyword the grammar cannot enforce
    ):  # fmt: skip
        with pytest.raises(openai.BadRequestError) as caught:
            client.chat.completions.create(model="gemma", messages=ASK, max_tokens=4, **bad)  # type: ignore[arg-type]
        assert caught.value.status_code == 400


# -- logprobs ------------------------------------------------------------------------


def check_entry(token: str, logprob: float, top: list[Any], *, greedy: bool) -> None:
    assert logprob <= 0.0
    values = [t.logprob for t in top]
    assert values == sorted(values, reverse=True)
    assert sum(math.exp(v) for v in values) <= 1.0 + 1e-4  # a share of one distribution
    if greedy:  # the sampled token is the likeliest
        assert (top[0].token, top[0].logprob) == pytest.approx((token, logprob))
    for t in top:  # the sampled token, where it is among the top ones, has its value
        if t.token == token:
            assert t.logprob == pytest.approx(logprob, abs=1e-5)


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_chat_logprobs_match_the_sampled_tokens(client: openai.OpenAI, temperature: float) -> None:
    r = client.chat.completions.create(
        model="gemma", messages=ASK, max_tokens=8, temperature=temperature, seed=11,
        logprobs=True, top_logprobs=5, logit_bias=NO_EOG,
    )  # fmt: skip
    choice = r.choices[0]
    assert choice.logprobs is not None and choice.logprobs.content is not None
    entries = choice.logprobs.content
    assert r.usage is not None and len(entries) == r.usage.completion_tokens == 8
    assert "".join(e.token for e in entries) == choice.message.content
    for e in entries:
        assert len(e.top_logprobs) == 5
        assert bytes(e.bytes or []) == e.token.encode()
        check_entry(e.token, e.logprob, e.top_logprobs, greedy=temperature == 0)


def test_streamed_logprobs_equal_the_whole_ones(client: openai.OpenAI) -> None:
    ask: dict[str, Any] = dict(
        model="gemma", messages=ASK, max_tokens=8, temperature=0, logprobs=True,
        top_logprobs=2, logit_bias=NO_EOG,
    )  # fmt: skip
    whole = client.chat.completions.create(**ask).choices[0].logprobs
    assert whole is not None and whole.content is not None
    streamed = []
    for chunk in client.chat.completions.create(**ask, stream=True):
        for choice in chunk.choices:
            if choice.logprobs is not None:
                streamed += choice.logprobs.content or []
    assert [e.token for e in streamed] == [e.token for e in whole.content]
    assert [e.logprob for e in streamed] == pytest.approx([e.logprob for e in whole.content])


def test_no_logprobs_unless_asked(client: openai.OpenAI) -> None:
    r = client.chat.completions.create(model="gemma", messages=ASK, max_tokens=2)
    assert r.choices[0].logprobs is None
    c = client.completions.create(model="gemma", prompt="Hello", max_tokens=2)
    assert c.choices[0].logprobs is None


def test_completion_logprobs_in_the_legacy_shape(client: openai.OpenAI) -> None:
    r = client.completions.create(
        model="gemma", prompt="The capital of France is", max_tokens=6, temperature=0,
        logprobs=3, logit_bias=NO_EOG,
    )  # fmt: skip
    lp = r.choices[0].logprobs
    assert lp is not None and lp.tokens is not None and lp.token_logprobs is not None
    assert lp.top_logprobs is not None and lp.text_offset is not None
    assert len(lp.tokens) == 6 and "".join(lp.tokens) == r.choices[0].text
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(6)]
    for token, value, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs, strict=True):
        assert 1 <= len(top) <= 3
        assert max(top.values()) == pytest.approx(value) and top[token] == pytest.approx(value)
