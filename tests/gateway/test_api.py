"""The HTTP surface in-process, over the fake backend (no model needed)."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from typing import Any

import httpx
import orjson
import pytest

from backends.fake import FakeBackend
from gateway.app import create_app
from gateway.settings import ServerSettings, Settings


def chat(content: str = "one two three four", **extra: Any) -> dict[str, Any]:
    return {"model": "echo", "messages": [{"role": "user", "content": content}], **extra}


def sse_events(body: str) -> list[Any]:
    assert body.endswith("data: [DONE]\n\n")
    events = []
    for block in body.split("\n\n")[:-1]:
        assert block.startswith("data: "), block
        payload = block.removeprefix("data: ")
        events.append(payload if payload == "[DONE]" else orjson.loads(payload))
    assert events[-1] == "[DONE]"
    return events[:-1]


def assert_error(response: httpx.Response, status: int, code: str | None = None) -> dict[str, Any]:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["message"]
    if code is not None:
        assert error["code"] == code
    assert "Traceback" not in response.text
    return dict(error)


async def test_chat_completion_shape_and_usage(client: httpx.AsyncClient) -> None:
    r = await client.post("/v1/chat/completions", json=chat(max_tokens=3))
    assert r.status_code == 200
    body = r.json()
    assert body["object"] == "chat.completion"
    assert body["id"].startswith("chatcmpl-")
    assert body["choices"] == [
        {
            "index": 0,
            "message": {"role": "assistant", "content": "one two three", "refusal": None},
            "logprobs": None,
            "finish_reason": "length",
        }
    ]
    assert body["usage"] == {
        "prompt_tokens": 4,
        "completion_tokens": 3,
        "total_tokens": 7,
        "prompt_tokens_details": {"cached_tokens": 0},
    }


async def test_max_completion_tokens_wins_over_max_tokens(client: httpx.AsyncClient) -> None:
    r = await client.post("/v1/chat/completions", json=chat(max_tokens=3, max_completion_tokens=1))
    assert r.json()["choices"][0]["message"]["content"] == "one"


async def test_chat_stream_is_openai_sse_with_usage(client: httpx.AsyncClient) -> None:
    r = await client.post(
        "/v1/chat/completions",
        json=chat("a b c", stream=True, stream_options={"include_usage": True}),
    )
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/event-stream")
    events = sse_events(r.text)
    assert events[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert all(e["object"] == "chat.completion.chunk" for e in events)
    assert len({e["id"] for e in events}) == 1
    text = "".join(e["choices"][0]["delta"].get("content", "") for e in events if e["choices"])
    assert text == "a b c"
    assert events[-2]["choices"][0]["finish_reason"] == "stop"
    assert events[-1]["choices"] == []
    assert events[-1]["usage"] == {
        "prompt_tokens": 3,
        "completion_tokens": 3,
        "total_tokens": 6,
        "prompt_tokens_details": {"cached_tokens": 0},
    }
    assert all("usage" not in e for e in events[:-1])  # OpenAI's schema: an object or absent


async def test_stream_without_usage_has_no_usage_field(client: httpx.AsyncClient) -> None:
    r = await client.post("/v1/chat/completions", json=chat("a b", stream=True))
    events = sse_events(r.text)
    assert all("usage" not in e for e in events)


async def test_completions_with_a_list_of_prompts(client: httpx.AsyncClient) -> None:
    r = await client.post(
        "/v1/completions", json={"model": "echo", "prompt": ["x y", "p q r"], "max_tokens": 5}
    )
    body = r.json()
    assert body["object"] == "text_completion"
    assert [c["text"] for c in body["choices"]] == ["x y", "p q r"]
    assert [c["index"] for c in body["choices"]] == [0, 1]
    assert body["usage"] == {
        "prompt_tokens": 5,
        "completion_tokens": 5,
        "total_tokens": 10,
        "prompt_tokens_details": {"cached_tokens": 0},
    }


async def test_streamed_completions_interleave_choices(client: httpx.AsyncClient) -> None:
    r = await client.post(
        "/v1/completions",
        json={
            "model": "echo",
            "prompt": ["x y", "p q r"],
            "stream": True,
            "stream_options": {"include_usage": True},
        },
    )
    events = sse_events(r.text)
    texts: dict[int, str] = {0: "", 1: ""}
    for e in events[:-1]:
        choice = e["choices"][0]
        texts[choice["index"]] += choice["text"]
    assert texts == {0: "x y", 1: "p q r"}
    assert events[-1]["usage"]["completion_tokens"] == 5


async def test_n_choices_count_the_prompt_once(client: httpx.AsyncClient) -> None:
    r = await client.post(
        "/v1/chat/completions",
        json={"model": "echo-n", "n": 3, "messages": [{"role": "user", "content": "a b"}]},
    )
    body = r.json()
    assert len(body["choices"]) == 3
    assert body["usage"] == {
        "prompt_tokens": 2,
        "completion_tokens": 6,
        "total_tokens": 8,
        "prompt_tokens_details": {"cached_tokens": 0},
    }


async def test_n_above_the_configured_limit_is_rejected(client: httpx.AsyncClient) -> None:
    r = await client.post("/v1/chat/completions", json=chat(n=2))
    assert assert_error(r, 400)["param"] == "n"


async def test_text_content_parts_are_joined(client: httpx.AsyncClient) -> None:
    content = [{"type": "text", "text": "alpha "}, {"type": "text", "text": "beta"}]
    r = await client.post(
        "/v1/chat/completions",
        json={"model": "echo", "messages": [{"role": "user", "content": content}]},
    )
    assert r.json()["choices"][0]["message"]["content"] == "alpha beta"


async def test_unknown_fields_are_ignored_not_forwarded(
    client: httpx.AsyncClient, fakes: dict[str, FakeBackend]
) -> None:
    r = await client.post("/v1/chat/completions", json=chat(frobnicate=True, tools=[]))
    assert r.status_code == 200
    sampling = fakes["echo"].seen[-1].sampling
    assert not hasattr(sampling, "frobnicate")


async def test_sampling_parameters_reach_the_backend(
    client: httpx.AsyncClient, fakes: dict[str, FakeBackend]
) -> None:
    r = await client.post(
        "/v1/chat/completions",
        json=chat(
            temperature=0.3,
            top_p=0.9,
            top_k=20,
            min_p=0.05,
            seed=7,
            stop=["x", "y"],
            presence_penalty=0.5,
            frequency_penalty=-0.5,
            logit_bias={"42": -100},
            user="u1",
        ),
    )
    assert r.status_code == 200
    s = fakes["echo"].seen[-1].sampling
    assert (s.temperature, s.top_p, s.top_k, s.min_p, s.seed) == (0.3, 0.9, 20, 0.05, 7)
    assert s.stop == ("x", "y")
    assert (s.presence_penalty, s.frequency_penalty) == (0.5, -0.5)
    assert dict(s.logit_bias) == {42: -100.0}


@pytest.mark.parametrize(
    ("payload", "param"),
    [
        ({"model": "echo"}, "messages"),
        ({"model": "echo", "messages": []}, "messages"),
        ({"messages": [{"role": "user", "content": "x"}]}, "model"),
        (chat(temperature=5), "temperature"),
        (chat(max_tokens=0), "max_tokens"),
        (chat(top_p="high"), "top_p"),
        (chat(stream_options={"include_usage": True}), None),
        (chat(top_logprobs=3), None),  # without logprobs: true
        (chat(logprobs=True, top_logprobs=21), "top_logprobs"),
        (chat(tool_choice="required"), None),  # no tools to choose from
        (chat(logit_bias={"not-a-token": 1}), "logit_bias"),
        ({"model": "echo", "messages": [{"role": "wizard", "content": "x"}]}, "messages.0.role"),
        (
            {"model": "echo", "messages": [{"role": "user", "content": [{"type": "image_url"}]}]},
            None,
        ),
    ],
)
async def test_validation_errors_are_400_in_openai_shape(
    client: httpx.AsyncClient, payload: dict[str, Any], param: str | None
) -> None:
    error = assert_error(await client.post("/v1/chat/completions", json=payload), 400)
    assert error["type"] == "invalid_request_error"
    if param is not None:
        assert error["param"] == param


@pytest.mark.parametrize("body", [b"{not json", b"[1, 2]", b"", b"\xff\xfe"])
async def test_malformed_bodies_are_400(client: httpx.AsyncClient, body: bytes) -> None:
    r = await client.post(
        "/v1/chat/completions", content=body, headers={"content-type": "application/json"}
    )
    assert_error(r, 400)


async def test_unknown_model_is_404(client: httpx.AsyncClient) -> None:
    r = await client.post("/v1/chat/completions", json={**chat(), "model": "nope"})
    assert assert_error(r, 404, "model_not_found")["param"] == "model"


async def test_context_length_exceeded_is_400(client: httpx.AsyncClient) -> None:
    r = await client.post("/v1/chat/completions", json=chat("word " * 40))
    assert_error(r, 400, "context_length_exceeded")


async def test_overload_is_503_with_retry_after(client: httpx.AsyncClient) -> None:
    r = await client.post("/v1/chat/completions", json={**chat(), "model": "overloaded"})
    assert_error(r, 503, "overloaded")
    assert r.headers["retry-after"] == "3"


async def test_every_unavailable_backend_503_says_when_to_retry(client: httpx.AsyncClient) -> None:
    r = await client.post("/v1/chat/completions", json={**chat(), "model": "fail_before_first"})
    assert_error(r, 503, "service_unavailable")
    assert r.headers["retry-after"] == "1"


async def test_failure_after_stream_start_is_an_sse_error_event(client: httpx.AsyncClient) -> None:
    r = await client.post(
        "/v1/chat/completions",
        json={**chat("a b c d e"), "model": "fail_mid_stream", "stream": True},
    )
    assert r.status_code == 200
    events = sse_events(r.text)
    assert events[-1]["error"]["code"] == "service_unavailable"
    assert set(events[-1]["error"]) == {"message", "type", "param", "code"}


async def test_unknown_route_and_method_are_openai_shaped(client: httpx.AsyncClient) -> None:
    assert_error(await client.get("/v1/nothing-here"), 404)
    assert_error(await client.get("/v1/chat/completions"), 405)


async def test_models_endpoint_lists_every_model(client: httpx.AsyncClient) -> None:
    body = (await client.get("/v1/models")).json()
    assert body["object"] == "list"
    assert {m["id"] for m in body["data"]} >= {"echo", "echo-n"}
    assert all(m["object"] == "model" for m in body["data"])
    assert (await client.get("/v1/models/echo")).json()["id"] == "echo"
    assert_error(await client.get("/v1/models/missing"), 404, "model_not_found")


async def test_embeddings_float_and_base64(client: httpx.AsyncClient) -> None:
    r = await client.post("/v1/embeddings", json={"model": "echo", "input": ["ab c", "d"]})
    body = r.json()
    assert [d["index"] for d in body["data"]] == [0, 1]
    assert body["data"][0]["embedding"] == [4.0, 2.0, 1.0]
    assert body["usage"] == {"prompt_tokens": 3, "total_tokens": 3}
    r = await client.post(
        "/v1/embeddings", json={"model": "echo", "input": "x", "encoding_format": "base64"}
    )
    assert isinstance(r.json()["data"][0]["embedding"], str)


async def test_health_and_readiness(
    client: httpx.AsyncClient, fakes: dict[str, FakeBackend]
) -> None:
    assert (await client.get("/health/live")).status_code == 200
    assert (await client.get("/health/ready")).status_code == 200
    await fakes["echo"].close()
    r = await client.get("/health/ready")
    assert r.status_code == 503  # a model of this process is down: the gateway is
    assert r.json()["models"]["echo"] == {"ready": False, "backends": {"injected": "failed"}}
    assert r.json()["redis"] == "off"


async def test_metrics_count_requests_and_tokens(client: httpx.AsyncClient) -> None:
    await client.post("/v1/chat/completions", json=chat("a b c"))
    await client.post("/v1/chat/completions", json={**chat(), "model": "overloaded"})
    text = (await client.get("/metrics")).text
    assert 'lockgate_requests_total{endpoint="chat",model="echo",status="200"} 1.0' in text
    assert 'lockgate_requests_total{endpoint="chat",model="overloaded",status="503"} 1.0' in text
    assert 'lockgate_completion_tokens_total{model="echo"} 3.0' in text
    assert 'lockgate_prompt_tokens_total{model="echo"} 3.0' in text
    assert "lockgate_time_to_first_token_seconds_bucket" in text
    assert 'lockgate_engine_capacity_sequences{backend_id="injected",model="echo"} 8.0' in text


async def test_backend_series_are_only_what_each_backend_reports(
    client: httpx.AsyncClient, fakes: dict[str, FakeBackend]
) -> None:
    text = (await client.get("/metrics")).text
    assert 'lockgate_backend_up{backend_id="injected",model="echo"} 1.0' in text
    assert "instance=" not in text  # Prometheus' own target label: never ours
    # The fake backend has no decode loop and no queue of its own: no series, not zeros.
    for absent in ("decode_steps", "decoded_sequences", "batch_size", "waiting", "kv_cache"):
        assert not re.search(rf"^lockgate_engine_{absent}\S*\{{", text, re.M), absent
    await fakes["echo"].close()
    text = (await client.get("/metrics")).text
    assert 'lockgate_backend_up{backend_id="injected",model="echo"} 0.0' in text


TOOLS = [
    {
        "type": "function",
        "function": {"name": "lookup", "parameters": {"type": "object", "properties": {}}},
    }
]


async def test_tool_calls_non_stream(
    client: httpx.AsyncClient, fakes: dict[str, FakeBackend]
) -> None:
    r = await client.post("/v1/chat/completions", json=chat("find it", tools=TOOLS))
    choice = r.json()["choices"][0]
    assert choice["finish_reason"] == "tool_calls"
    assert choice["message"] == {
        "role": "assistant",
        "content": None,
        "refusal": None,
        "tool_calls": [
            {
                "id": "call_0",
                "type": "function",
                "function": {"name": "lookup", "arguments": '{"echo": "find it"}'},
            }
        ],
    }
    assert fakes["echo"].seen[-1].tools[0]["function"]["name"] == "lookup"


async def test_tool_calls_stream_and_tool_results_are_accepted(client: httpx.AsyncClient) -> None:
    messages = [
        {"role": "user", "content": "find it"},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "call_0",
                    "type": "function",
                    "function": {"name": "lookup", "arguments": "{}"},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "call_0", "content": "found"},
    ]
    r = await client.post(
        "/v1/chat/completions",
        json={"model": "echo", "messages": messages, "tools": TOOLS, "stream": True},
    )
    events = sse_events(r.text)
    delta = events[1]["choices"][0]["delta"]
    assert delta["tool_calls"][0]["index"] == 0
    assert delta["tool_calls"][0]["function"] == {
        "name": "lookup",
        "arguments": '{"echo": "found"}',
    }
    assert events[-1]["choices"][0]["finish_reason"] == "tool_calls"


async def test_malformed_tools_are_400(client: httpx.AsyncClient) -> None:
    r = await client.post("/v1/chat/completions", json=chat(tools=[{"type": "function"}]))
    assert assert_error(r, 400)["param"] == "tools.0.function"


async def test_completions_default_to_16_tokens(
    client: httpx.AsyncClient, fakes: dict[str, FakeBackend]
) -> None:
    await client.post("/v1/completions", json={"model": "echo", "prompt": "a"})
    assert fakes["echo"].seen[-1].sampling.max_tokens == 16
    await client.post("/v1/chat/completions", json=chat())
    assert fakes["echo"].seen[-1].sampling.max_tokens is None  # chat: until the model stops


async def test_prompt_batches_are_capped(client: httpx.AsyncClient) -> None:
    r = await client.post("/v1/completions", json={"model": "echo", "prompt": ["a"] * 17})
    assert assert_error(r, 400)["param"] == "prompt"


async def test_oversized_bodies_are_413_in_openai_shape(fakes: dict[str, FakeBackend]) -> None:
    settings = Settings(server=ServerSettings(max_body_bytes=2048))
    app = create_app(settings, backends=fakes)
    transport = httpx.ASGITransport(app=app)
    big = orjson.dumps(chat("word " * 1000))
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(transport=transport, base_url="http://test") as c,
    ):
        declared = await c.post(
            "/v1/chat/completions", content=big, headers={"content-type": "application/json"}
        )
        assert_error(declared, 413, "request_too_large")

        async def chunks() -> AsyncIterator[bytes]:
            for i in range(0, len(big), 512):
                yield big[i : i + 512]

        streamed = await c.post("/v1/chat/completions", content=chunks())
        assert_error(streamed, 413, "request_too_large")
        small = await c.post("/v1/chat/completions", json=chat("fits"))
        assert small.status_code == 200
