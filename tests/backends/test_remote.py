"""Remote adapters against scripted upstreams: error translation, SSE/NDJSON parsing, timeouts.

Each test serves a few handlers from a real aiohttp server on a free loopback
port. The behaviour of real engines is covered in
tests/integration/test_remote_backends.py; these pin down the edge cases a real
server will not produce on demand (stalls, malformed streams, odd statuses).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest
from aiohttp import web

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
    Unsupported,
)
from backends.llamacpp import LlamaCppBackend, parse_llamacpp_metrics
from backends.ollama import OllamaBackend, OllamaOptions
from backends.openai_compat import OpenAICompatBackend, request_body
from backends.remote import RemoteConfig, upstream_error
from backends.vllm import VLLMBackend, parse_vllm_metrics

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@contextlib.asynccontextmanager
async def upstream(routes: dict[str, Handler]) -> AsyncIterator[str]:
    """Serve ``{"METHOD /path": handler}`` on a free port; yield the base URL."""
    app = web.Application()
    for key, handler in routes.items():
        method, path = key.split(" ", 1)
        app.router.add_route(method, path, handler)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        await runner.cleanup()


def config(base_url: str, **overrides: object) -> RemoteConfig:
    base = {"base_url": base_url, "upstream_model": "up", "health_interval": 3600.0}
    return RemoteConfig(**{**base, **overrides})  # type: ignore[arg-type]


def reply(status: int = 200, **kwargs: object) -> Handler:
    async def handler(request: web.Request) -> web.StreamResponse:
        return web.json_response(kwargs.get("json", {}), status=status)

    return handler


def chat(**sampling: object) -> GenerationRequest:
    return GenerationRequest(
        request_id="r",
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
        (  # llama-server started without --embeddings
            501,
            b'{"error": {"code": 501, "message": "This server does not support embeddings.",'
            b' "type": "not_supported_error"}}',
            Unsupported,
            "unsupported",
        ),
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
    seen: list[dict[str, object]] = []

    async def completions(request: web.Request) -> web.StreamResponse:
        seen.append({"auth": request.headers.get("Authorization"), **await request.json()})
        return web.Response(body=sse(*events), content_type="text/event-stream")

    routes = {"GET /v1/models": reply(json={"data": []}), "POST /v1/chat/completions": completions}
    async with upstream(routes) as url:
        backend = OpenAICompatBackend(config(url, api_key="sk-secret"))
        chunks = await collect(backend, chat())
    assert "".join(c.text for c in chunks) == "Hello"
    last = chunks[-1]
    assert (last.finish_reason, last.prompt_tokens, last.completion_tokens) == ("tool_calls", 9, 4)
    assert last.tool_calls == (ToolCall("call_1", "f", '{"a": 1}'),)
    assert seen[-1]["auth"] == "Bearer sk-secret"
    assert seen[-1]["stream_options"] == {"include_usage": True}


async def test_non_streamed_request_is_one_non_streamed_call() -> None:
    """No SSE for a caller that wants the whole answer: one chunk with text, calls and usage."""
    seen: list[dict[str, object]] = []
    answer = {
        "choices": [
            {
                "index": 0,
                "message": {
                    "role": "assistant",
                    "content": "Hi",
                    "tool_calls": [
                        {
                            "id": "c1",
                            "type": "function",
                            "function": {"name": "f", "arguments": "{}"},
                        }
                    ],
                },
                "finish_reason": "tool_calls",
            }
        ],
        "usage": {"prompt_tokens": 7, "completion_tokens": 3},
    }

    async def completions(request: web.Request) -> web.StreamResponse:
        seen.append(await request.json())
        return web.json_response(answer)

    async with upstream({"POST /v1/chat/completions": completions}) as url:
        backend = OpenAICompatBackend(config(url))
        whole = GenerationRequest(
            request_id="r", messages=(ChatMessage("user", "hi"),),
            sampling=SamplingParams(max_tokens=5), stream=False,
        )  # fmt: skip
        chunks = await collect(backend, whole)
    message = {"role": "user", "content": "hi"}
    assert seen == [{"model": "up", "stream": False, "messages": [message], "max_tokens": 5}]
    assert chunks == [GenerationChunk("Hi", 7, 3, "tool_calls", (ToolCall("c1", "f", "{}"),))]


@pytest.mark.parametrize(
    "body", [b"not json", b"[]", b'{"choices": []}', b'{"choices": ["x"]}'], ids=str
)
async def test_malformed_whole_answers_are_upstream_failures(body: bytes) -> None:
    async def completions(request: web.Request) -> web.StreamResponse:
        return web.Response(body=body, content_type="application/json")

    async with upstream({"POST /v1/chat/completions": completions}) as url:
        backend = OpenAICompatBackend(config(url))
        whole = GenerationRequest(
            request_id="r", messages=(ChatMessage("user", "hi"),),
            sampling=SamplingParams(), stream=False,
        )  # fmt: skip
        with pytest.raises(BackendUnavailable):
            await collect(backend, whole)


async def test_error_event_mid_stream_is_raised() -> None:
    content = (
        b'data: {"choices":[{"delta":{"content":"a"}}]}\n\ndata: {"error":{"message":"oom"}}\n\n'
    )

    async def completions(request: web.Request) -> web.StreamResponse:
        return web.Response(body=content, content_type="text/event-stream")

    async with upstream({"POST /v1/chat/completions": completions}) as url:
        backend = OpenAICompatBackend(config(url))
        with pytest.raises(BackendUnavailable, match="oom"):
            await collect(backend, chat())


async def test_upstream_status_errors_reach_the_caller_translated() -> None:
    async def completions(request: web.Request) -> web.StreamResponse:
        return web.json_response(
            {"error": {"message": "too long", "code": "context_length_exceeded"}}, status=400
        )

    async with upstream({"POST /v1/chat/completions": completions}) as url:
        backend = OpenAICompatBackend(config(url))
        with pytest.raises(InvalidRequestError) as info:
            await collect(backend, chat())
    assert info.value.code == "context_length_exceeded"


async def test_upstream_cookies_are_never_sent_back() -> None:
    """One session serves every tenant: a cookie the upstream sets must not ride along."""
    seen: list[str | None] = []

    async def completions(request: web.Request) -> web.StreamResponse:
        seen.append(request.headers.get("Cookie"))
        response = web.json_response({"choices": [{"message": {"content": "x"}}]})
        response.set_cookie("session", "tenant-a")
        return response

    async with upstream({"POST /v1/chat/completions": completions}) as url:
        # By name: aiohttp's default jar ignores cookies from IP addresses anyway.
        backend = OpenAICompatBackend(config(url.replace("127.0.0.1", "localhost")))
        await backend.start()
        try:
            for _ in range(2):
                whole = GenerationRequest(
                    request_id="r", messages=(ChatMessage("user", "hi"),),
                    sampling=SamplingParams(), stream=False,
                )  # fmt: skip
                assert [c.text async for c in backend.generate(whole)] == ["x"]
        finally:
            await backend.close()
    assert seen == [None, None]


async def test_a_stalled_error_body_is_not_waited_for() -> None:
    async def completions(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(status=500)
        await response.prepare(request)
        await response.write(b'{"error": {"message": "bro')
        await asyncio.sleep(2)  # the rest never comes (the client gives up after 0.2 s)
        return response

    async with upstream({"POST /v1/chat/completions": completions}) as url:
        backend = OpenAICompatBackend(config(url, chunk_timeout=0.2))
        with pytest.raises(BackendUnavailable, match="upstream error 500"):
            await asyncio.wait_for(collect(backend, chat()), 1)


async def test_a_finished_stream_leaves_its_connection_for_the_next() -> None:
    peers: list[object] = []

    async def completions(request: web.Request) -> web.StreamResponse:
        peers.append(request.transport.get_extra_info("peername"))  # type: ignore[union-attr]
        events = [
            {"choices": [{"index": 0, "delta": {"content": "a"}}]},
            {"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]},
        ]
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        await response.write(sse(*events))
        await asyncio.sleep(0.01)  # the answer's terminator comes after [DONE], apart
        await response.write_eof()
        return response

    async with upstream({"POST /v1/chat/completions": completions}) as url:
        backend = OpenAICompatBackend(config(url))
        await backend.start()
        try:
            for _ in range(3):
                assert "".join([c.text async for c in backend.generate(chat())]) == "a"
        finally:
            await backend.close()
    assert len(peers) == 3 and len(set(peers)) == 1


@pytest.mark.parametrize("stall_after_first", [False, True])
async def test_first_token_and_chunk_gap_timeouts(stall_after_first: bool) -> None:
    async def completions(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        if stall_after_first:
            await response.write(b'data: {"choices":[{"delta":{"content":"a"}}]}\n\n')
        with contextlib.suppress(asyncio.CancelledError):
            await release.wait()  # stalls until the client has given up
        return response

    release = asyncio.Event()
    async with upstream({"POST /v1/chat/completions": completions}) as url:
        backend = OpenAICompatBackend(config(url, first_token_timeout=0.3, chunk_timeout=0.3))
        with pytest.raises(BackendTimeout):
            await asyncio.wait_for(collect(backend, chat()), timeout=3)
        release.set()


async def test_connection_refused_is_unavailable_with_a_retry_after() -> None:
    async with upstream({}) as url:
        pass  # the port is closed again
    backend = OpenAICompatBackend(config(url, connect_timeout=0.5, health_interval=7.0))
    await backend.start()
    assert not backend.ready
    with pytest.raises(BackendUnavailable) as refused:
        _ = [c async for c in backend.generate(chat())]
    await backend.close()
    assert refused.value.message == (
        "the upstream refused the connection (it is not running, or not yet)"
    )
    assert refused.value.retry_after == 7.0  # its next health probe


async def test_a_stream_cut_by_the_upstream_says_so() -> None:
    async def completions(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        await response.write(b'data: {"choices":[{"delta":{"content":"a"}}]}\n\n')
        assert request.transport is not None
        request.transport.close()  # mid-answer: the chunked body never ends
        return response

    async with upstream({"POST /v1/chat/completions": completions}) as url:
        backend = OpenAICompatBackend(config(url))
        with pytest.raises(BackendUnavailable) as cut:
            await collect(backend, chat())
    assert cut.value.message == "the upstream closed the connection in the middle of its answer"


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

    async def prometheus(request: web.Request) -> web.StreamResponse:
        return web.Response(text=metrics)

    async with upstream({"GET /health": reply(), "GET /metrics": prometheus}) as url:
        backend = VLLMBackend(config(url, concurrency=16))
        await backend.start()
        load = backend.load()
        await backend.close()
    assert (load.running, load.waiting, load.capacity, load.kv_cache_usage) == (5, 1, 16, 0.5)


def test_llamacpp_metrics() -> None:
    text = "llamacpp:requests_processing 2\nllamacpp:requests_deferred 3\n"
    assert parse_llamacpp_metrics(text) == (2, 3)


async def test_llamacpp_loading_server_is_not_ready() -> None:
    loading = reply(503, json={"error": {"code": 503, "message": "Loading model"}})
    async with upstream({"GET /health": loading}) as url:
        backend = LlamaCppBackend(config(url))
        await backend.start()
        assert not backend.ready
        await backend.close()


async def test_ollama_stream_without_done_is_an_error() -> None:
    line = json.dumps(
        {"model": "up", "message": {"role": "assistant", "content": "a"}, "done": False}
    )

    async def chat_handler(request: web.Request) -> web.StreamResponse:
        return web.Response(body=(line + "\n").encode(), content_type="application/x-ndjson")

    routes = {"GET /api/version": reply(json={"version": "0.33.0"}), "POST /api/chat": chat_handler}
    async with upstream(routes) as url:
        backend = OllamaBackend(config(url), OllamaOptions())
        with pytest.raises(BackendUnavailable, match="before it was done"):
            await collect(backend, chat())


@pytest.mark.parametrize(
    "content",
    [
        b'data: {"choices":[{"delta":{"content":"a"}}]}\n\n',  # cut before any finish
        b'data: {"choices":[{"delta":{"content":"a"}}]}\n\ndata: {not json\n\n',
    ],
)
async def test_truncated_or_malformed_streams_are_upstream_failures(content: bytes) -> None:
    async def completions(request: web.Request) -> web.StreamResponse:
        return web.Response(body=content, content_type="text/event-stream")

    async with upstream({"POST /v1/chat/completions": completions}) as url:
        backend = OpenAICompatBackend(config(url))
        with pytest.raises(BackendUnavailable):
            await collect(backend, chat())
