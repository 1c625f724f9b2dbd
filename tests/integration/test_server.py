"""End to end: the OpenAI SDK against ``lockgate serve`` running the real model."""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx
import openai
import pytest
from openai.types import Completion

from tests.integration.conftest import NO_EOG, Server, streamed_chat, streaming

pytestmark = pytest.mark.integration

MESSAGES = [{"role": "user", "content": "Write a short story about a lighthouse keeper."}]


@pytest.fixture
def client(server: Server) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=f"{server.base_url}/v1", api_key="any", max_retries=0) as c:
        yield c


@pytest.fixture
async def aclient(server: Server) -> AsyncIterator[openai.AsyncOpenAI]:
    async with openai.AsyncOpenAI(
        base_url=f"{server.base_url}/v1", api_key="any", max_retries=0
    ) as c:
        yield c


def long_stream(model: str) -> dict[str, Any]:
    """A streamed chat request that runs for seconds unless it is cancelled."""
    return {
        "model": model,
        "messages": MESSAGES,
        "max_tokens": 400,
        "stream": True,
        "logit_bias": NO_EOG,
    }


def wait_for_idle(server: Server, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while server.metric("lockgate_engine_running_sequences") > 0:
        assert time.monotonic() < deadline, "engine still running sequences"
        time.sleep(0.05)


def test_chat_non_stream(client: openai.OpenAI) -> None:
    r = client.chat.completions.create(model="gemma", messages=MESSAGES, max_tokens=16)
    choice = r.choices[0]
    assert choice.message.role == "assistant"
    assert isinstance(choice.message.content, str)
    assert choice.finish_reason in ("stop", "length")
    assert r.usage is not None
    assert r.usage.prompt_tokens > 5
    assert 0 < r.usage.completion_tokens <= 16
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


def test_chat_stream_with_usage(client: openai.OpenAI) -> None:
    chunks = streamed_chat(client, "gemma", MESSAGES, 12)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text
    assert chunks[-2].choices[0].finish_reason == "length"
    usage = chunks[-1].usage
    assert usage is not None and usage.completion_tokens == 12


def test_a_repeated_system_prompt_is_computed_once_and_reported_cached(
    server: Server, client: openai.OpenAI
) -> None:
    system = {"role": "system", "content": "You answer questions about tides. " * 20}
    hits = server.metric("lockgate_prefix_cache_hit_tokens_total")
    queried = server.metric("lockgate_prefix_cache_queried_tokens_total")
    first = client.chat.completions.create(
        model="gemma", messages=[system, {"role": "user", "content": "Why?"}], max_tokens=4
    )
    again = client.chat.completions.create(
        model="gemma", messages=[system, {"role": "user", "content": "When?"}], max_tokens=4
    )
    assert first.usage is not None and again.usage is not None
    details = again.usage.prompt_tokens_details
    assert details is not None and details.cached_tokens is not None
    assert again.usage.prompt_tokens - 12 < details.cached_tokens < again.usage.prompt_tokens
    response = client.responses.create(
        model="gemma", instructions=system["content"], input="Where?", max_output_tokens=4
    )
    assert response.usage is not None
    assert response.usage.input_tokens_details.cached_tokens > 100
    assert server.metric("lockgate_prefix_cache_hit_tokens_total") - hits >= (
        details.cached_tokens + response.usage.input_tokens_details.cached_tokens
    )
    assert server.metric("lockgate_prefix_cache_queried_tokens_total") - queried >= (
        first.usage.prompt_tokens + again.usage.prompt_tokens
    )
    assert server.metric("lockgate_prefix_cache_cells") > 100


def test_completions_with_several_prompts(client: openai.OpenAI) -> None:
    r = client.completions.create(
        model="gemma",
        prompt=["The capital of France is", "1, 2, 3,"],
        max_tokens=5,
        temperature=0,
        logit_bias=NO_EOG,
    )
    assert [c.index for c in r.choices] == [0, 1]
    assert all(c.text and c.finish_reason == "length" for c in r.choices)
    assert r.usage is not None and r.usage.completion_tokens == 10


def test_embeddings(client: openai.OpenAI) -> None:
    r = client.embeddings.create(model="gemma", input=["hello world", "good night"])
    assert len(r.data) == 2
    assert len(r.data[0].embedding) == 640  # Gemma 3 270M hidden size
    assert r.usage.prompt_tokens > 0
    # The SDK asks for base64 by default and decodes it; check the float path too.
    raw = httpx.post(
        f"{client.base_url}embeddings",
        json={"model": "gemma", "input": "hello world", "encoding_format": "float"},
    ).json()
    assert raw["data"][0]["embedding"] == pytest.approx(r.data[0].embedding, abs=1e-6)


def test_models(client: openai.OpenAI) -> None:
    assert {m.id for m in client.models.list()} == {"gemma", "gemma-single"}


def test_seed_reproducibility(client: openai.OpenAI) -> None:
    def sample(seed: int) -> str | None:
        r = client.chat.completions.create(
            model="gemma", messages=MESSAGES, max_tokens=16, temperature=1.0, seed=seed
        )
        return r.choices[0].message.content

    # Once the prompt is cached (the first request computes it whole; later ones share its
    # cells and compute only its last token, whose logits may differ in their last bits),
    # a seed gives the same text every time (README: Prefix caching).
    sample(42)
    assert sample(42) == sample(42)
    assert sample(42) != sample(43)


def test_stop_string_across_token_boundaries(server: Server, client: openai.OpenAI) -> None:
    def greedy(stop: list[str] | None) -> list[Completion]:
        stream = client.completions.create(
            model="gemma",
            prompt="Once upon a time",
            max_tokens=24,
            temperature=0,
            stream=True,
            logit_bias=NO_EOG,
            stop=stop,
        )
        return [c for c in stream if c.choices]

    pieces = [c.choices[0].text for c in greedy(None) if c.choices[0].text]
    full = "".join(pieces)
    k = next(
        i for i in range(1, len(pieces) - 1) if len(pieces[i]) >= 3 and len(pieces[i + 1]) >= 2
    )
    stop = pieces[k][-2:] + pieces[k + 1][:2]  # straddles two tokens
    chunks = greedy([stop])
    streamed = "".join(c.choices[0].text for c in chunks)
    assert streamed == full[: full.index(stop)]
    assert chunks[-1].choices[0].finish_reason == "stop"


async def test_concurrent_streams_are_batched(server: Server, aclient: openai.AsyncOpenAI) -> None:
    peak = 0.0
    done = threading.Event()

    def watch() -> None:
        nonlocal peak
        while not done.is_set():
            peak = max(peak, server.metric("lockgate_engine_batch_size"))
            time.sleep(0.02)

    async def one() -> tuple[int, int]:
        stream = await aclient.chat.completions.create(
            model="gemma",
            messages=MESSAGES,
            max_tokens=32,
            stream=True,
            stream_options={"include_usage": True},
            logit_bias=NO_EOG,
        )
        usage = None
        async for chunk in stream:
            usage = chunk.usage or usage
        assert usage is not None
        return usage.prompt_tokens, usage.completion_tokens

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        results = await asyncio.gather(*(one() for _ in range(8)))
    finally:
        done.set()
        watcher.join()
    reference = await aclient.chat.completions.create(
        model="gemma", messages=MESSAGES, max_tokens=1
    )
    assert reference.usage is not None
    assert results == [(reference.usage.prompt_tokens, 32)] * 8
    assert peak > 1


def test_disconnect_mid_stream_frees_the_sequence(server: Server) -> None:
    body = long_stream("gemma")
    with streaming(f"{server.base_url}/v1/chat/completions", body, lines=6):
        assert server.metric("lockgate_engine_running_sequences") == 1
    wait_for_idle(server)


def test_disconnect_while_waiting_non_stream_frees_the_sequence(server: Server) -> None:
    body = {"model": "gemma", "messages": MESSAGES, "max_tokens": 400, "logit_bias": NO_EOG}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{server.base_url}/v1/chat/completions", json=body, timeout=1.0)
    wait_for_idle(server)


def test_error_statuses_and_shapes(server: Server, client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as bad:
        client.chat.completions.create(model="gemma", messages=MESSAGES, temperature=5)
    assert bad.value.status_code == 400
    with pytest.raises(openai.NotFoundError) as missing:
        client.chat.completions.create(model="nope", messages=MESSAGES)
    assert missing.value.code == "model_not_found"
    with pytest.raises(openai.BadRequestError) as too_long:
        client.chat.completions.create(model="gemma", messages=MESSAGES, max_tokens=600)
    assert too_long.value.code == "context_length_exceeded"
    r = httpx.post(
        f"{server.base_url}/v1/chat/completions",
        content=b"{oops",
        headers={"content-type": "application/json"},
    )
    assert r.status_code == 400
    assert set(r.json()["error"]) == {"message", "type", "param", "code"}


def test_a_request_queued_past_max_wait_answers_503_with_retry_after(server: Server) -> None:
    body = long_stream("gemma-single")
    with streaming(f"{server.base_url}/v1/chat/completions", body, lines=1):
        r = httpx.post(
            f"{server.base_url}/v1/chat/completions",
            json={"model": "gemma-single", "messages": MESSAGES, "max_tokens": 4},
        )
    assert r.status_code == 503
    assert r.json()["error"]["code"] == "queue_timeout"
    assert int(r.headers["retry-after"]) >= 1
    wait_for_idle(server)


def test_a_client_leaving_mid_upload_is_not_a_server_error(server: Server) -> None:
    host, port = server.base_url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port))) as sock:
        sock.sendall(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n"
            b'Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n{"model":'
        )
    time.sleep(0.3)
    assert "Traceback" not in server.log.read_text()


def test_server_log_has_no_tracebacks(server: Server) -> None:
    assert "Traceback" not in server.log.read_text()


def test_a_prompt_far_beyond_the_context_is_refused_without_tokenizing(server: Server) -> None:
    """10 MB of text: refused by its size (no token is longer than the longest token), so in
    milliseconds, not after tokenizing 950k tokens on the event loop (loadtests/bench_stall.py)."""
    body = {"model": "gemma", "messages": [{"role": "user", "content": "lighthouse " * 950_000}]}
    r = httpx.post(f"{server.base_url}/v1/chat/completions", json=body, timeout=60)
    assert r.status_code == 400
    error = r.json()["error"]
    assert error["code"] == "context_length_exceeded"
    assert "at least" in error["message"]
    assert httpx.get(f"{server.base_url}/health/live").status_code == 200
