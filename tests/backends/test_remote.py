"""Remote adapters against httpx.MockTransport: error translation, SSE/NDJSON parsing, timeouts.

The real-server behaviour is covered in tests/integration/test_remote_backends.py;
these pin down the edge cases a real server will not produce on demand.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable

import httpx
import pytest

from backends.base import (
    BackendOverloaded,
    BackendTimeout,
    BackendUnavailable,
    ChatMessage,
    GenerationChunk,
    GenerationRequest,
    InvalidRequestError,
    SamplingParams,
    ToolCall,
)
from backends.llamacpp import LlamaCppBackend, parse_llamacpp_metrics
from backends.ollama import OllamaBackend, OllamaOptions
from backends.openai_compat import OpenAICompatBackend, request_body
from backends.remote import RemoteConfig, upstream_error
from backends.vllm import VLLMBackend, parse_vllm_metrics

Handler = Callable[[httpx.Request], httpx.Response]


def config(**overrides: object) -> RemoteConfig:
    base = {"base_url": "http://upstream", "upstream_model": "up", "health_interval": 3600.0}
    return RemoteConfig(**{**base, **overrides})  # type: ignore[arg-type]


def chat(**sampling: object) -> GenerationRequest:
    return GenerationRequest(
        request_id="r",
        model="m",
        messages=(ChatMessage("user", "hi"),),
        sampling=SamplingParams(**sampling),  # type: ignore[arg-type]
    )


def sse(*events: object) -> bytes:
    lines = [f"data: {json.dumps(e)}\n\n" for e in events]
    return ("".join(lines) + "data: [DONE]\n\n").encode()


async def collect(
    backend: OpenAICompatBackend | OllamaBackend, request: GenerationRequest
) -> list[GenerationChunk]:
    await backend.start()
    try:
        return [c async for c in backend.generate(request)]
    finally:
        await backend.close()


@pytest.mark.parametrize(
    ("status", "body", "kind", "code"),
    [
        (
            400,
            b'{"error": {"message": "bad", "code": "context_length_exceeded"}}',
            InvalidRequestError,
            "context_length_exceeded",
        ),
        (422, b'{"detail": "nope"}', InvalidRequestError, None),
        (400, b'{"error": "model is required"}', InvalidRequestError, None),  # Ollama's shape
        (401, b"{}", BackendUnavailable, None),
        (404, b'{"error": "model \'x\' not found"}', BackendUnavailable, None),
        (408, b"", BackendTimeout, None),
        (429, b'{"error": {"message": "slow down"}}', BackendOverloaded, None),
        (503, b'{"error": "server busy"}', BackendOverloaded, None),
        (500, b"<html>oops</html>", BackendUnavailable, None),
    ],
)
def test_upstream_errors_map_once(status: int, body: bytes, kind: type, code: str | None) -> None:
    error = upstream_error(status, body, {"retry-after": "7"})
    assert type(error) is kind
    assert error.code == code
    if isinstance(error, BackendOverloaded):
        assert error.retry_after == 7


def test_request_body_sends_only_what_the_client_set() -> None:
    body = request_body(chat(temperature=0.5, logit_bias={7: -1.0}, stop=("x",)), "up")
    assert body == {
        "model": "up",
        "stream": True,
        "stream_options": {"include_usage": True},
        "messages": [{"role": "user", "content": "hi"}],
        "temperature": 0.5,
        "stop": ["x"],
        "logit_bias": {"7": -1.0},
    }


async def test_sse_stream_with_split_tool_calls_and_trailing_usage() -> None:
    events = [
        {"choices": [{"index": 0, "delta": {"role": "assistant", "content": "He"}}]},
        {"choices": [{"index": 0, "delta": {"content": "llo"}}]},
        {
            "choices": [
                {
                    "index": 0,
                    "delta": {
                        "tool_calls": [
                            {
                                "index": 0,
                                "id": "call_1",
                                "function": {"name": "f", "arguments": '{"a"'},
                            }
                        ]
                    },
                }
            ]
        },
        {
            "choices": [
                {
                    "index": 0,
                    "delta": {"tool_calls": [{"index": 0, "function": {"arguments": ": 1}"}}]},
                }
            ]
        },
        {"choices": [{"index": 0, "delta": {}, "finish_reason": "tool_calls"}]},
        {"choices": [], "usage": {"prompt_tokens": 9, "completion_tokens": 4}},
    ]
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        if request.url.path == "/v1/models":
            return httpx.Response(200, json={"data": []})
        return httpx.Response(
            200, content=sse(*events), headers={"content-type": "text/event-stream"}
        )

    backend = OpenAICompatBackend(
        config(api_key="sk-secret"), transport=httpx.MockTransport(handler)
    )
    chunks = await collect(backend, chat())
    assert "".join(c.text for c in chunks) == "Hello"
    last = chunks[-1]
    assert (last.finish_reason, last.prompt_tokens, last.completion_tokens) == ("tool_calls", 9, 4)
    assert last.tool_calls == (ToolCall("call_1", "f", '{"a": 1}'),)
    assert seen[-1].headers["authorization"] == "Bearer sk-secret"


async def test_error_event_mid_stream_is_raised() -> None:
    content = (
        b'data: {"choices":[{"delta":{"content":"a"}}]}\n\ndata: {"error":{"message":"oom"}}\n\n'
    )

    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, content=content)

    backend = OpenAICompatBackend(config(), transport=httpx.MockTransport(handler))
    with pytest.raises(BackendUnavailable, match="oom"):
        await collect(backend, chat())


async def test_first_token_timeout_is_a_504_kind_of_error() -> None:
    async def stall() -> AsyncIterator[bytes]:
        await asyncio.sleep(5)
        yield b""

    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/v1/models":
            return httpx.Response(200, json={"data": []})
        return httpx.Response(200, content=stall())

    backend = OpenAICompatBackend(
        config(first_token_timeout=0.2), transport=httpx.MockTransport(handler)
    )
    with pytest.raises(BackendTimeout):
        await collect(backend, chat())


async def test_connection_refused_is_unavailable() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("refused", request=request)

    backend = OpenAICompatBackend(config(), transport=httpx.MockTransport(handler))
    await backend.start()
    assert not backend.ready
    with pytest.raises(BackendUnavailable):
        _ = [c async for c in backend.generate(chat())]
    await backend.close()


def test_vllm_metrics_are_summed_for_the_served_model() -> None:
    # Shape of vLLM's /metrics (v0.10+): gauges labelled by model_name. A real vLLM is
    # not run by these unit tests; the text mirrors its exposition format.
    text = (
        "# HELP vllm:num_requests_running Number of requests in model execution batches.\n"
        "# TYPE vllm:num_requests_running gauge\n"
        'vllm:num_requests_running{engine="0",model_name="up"} 3.0\n'
        'vllm:num_requests_running{engine="0",model_name="other"} 9.0\n'
        "# TYPE vllm:num_requests_waiting gauge\n"
        'vllm:num_requests_waiting{engine="0",model_name="up"} 2.0\n'
        "# TYPE vllm:kv_cache_usage_perc gauge\n"
        'vllm:kv_cache_usage_perc{engine="0",model_name="up"} 0.25\n'
    )
    assert parse_vllm_metrics(text, "up") == {
        "vllm:num_requests_running": 3.0,
        "vllm:num_requests_waiting": 2.0,
        "vllm:kv_cache_usage_perc": 0.25,
    }


async def test_vllm_probe_reads_load() -> None:
    metrics = (
        'vllm:num_requests_running{model_name="up"} 5\n'
        'vllm:num_requests_waiting{model_name="up"} 1\n'
        'vllm:gpu_cache_usage_perc{model_name="up"} 0.5\n'
    )

    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/metrics":
            return httpx.Response(200, text=metrics)
        return httpx.Response(200, json={})

    backend = VLLMBackend(config(concurrency=16), transport=httpx.MockTransport(handler))
    await backend.start()
    load = backend.load()
    await backend.close()
    assert (load.running, load.waiting, load.capacity, load.kv_cache_usage) == (5, 1, 16, 0.5)


def test_llamacpp_metrics() -> None:
    text = "llamacpp:requests_processing 2\nllamacpp:requests_deferred 3\n"
    assert parse_llamacpp_metrics(text) == (2, 3)


async def test_llamacpp_loading_server_is_not_ready() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(503, json={"error": {"code": 503, "message": "Loading model"}})

    backend = LlamaCppBackend(config(), transport=httpx.MockTransport(handler))
    await backend.start()
    assert not backend.ready
    await backend.close()


async def test_ollama_stream_without_done_is_an_error() -> None:
    line = json.dumps(
        {"model": "up", "message": {"role": "assistant", "content": "a"}, "done": False}
    )

    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/api/version":
            return httpx.Response(200, json={"version": "0.33.0"})
        return httpx.Response(200, content=(line + "\n").encode())

    backend = OllamaBackend(config(), OllamaOptions(), transport=httpx.MockTransport(handler))
    with pytest.raises(BackendUnavailable, match="before it was done"):
        await collect(backend, chat())
