"""The Ollama door in-process, driven by the official ``ollama`` client over the fake backend."""

from __future__ import annotations

from collections.abc import AsyncIterator

import httpx
import ollama
import pytest

from backends.base import ResponseFormat
from backends.fake import FakeBackend


@pytest.fixture
async def ol(client: httpx.AsyncClient) -> AsyncIterator[ollama.AsyncClient]:
    transport = client._transport  # the app's ASGI transport
    async with ollama.AsyncClient(host="http://test", transport=transport) as c:
        yield c


async def test_chat_whole_answer_with_measured_durations(ol: ollama.AsyncClient) -> None:
    r = await ol.chat(
        model="echo",
        messages=[{"role": "user", "content": "one two three"}],
        stream=False,
        options={"num_predict": 2},
    )
    assert r.message.role == "assistant"
    assert r.message.content == "one two"
    assert r.done and r.done_reason == "length"
    assert (r.prompt_eval_count, r.eval_count) == (3, 2)
    durations = (r.load_duration, r.prompt_eval_duration, r.eval_duration)
    assert all(isinstance(d, int) and d >= 0 for d in durations)
    assert r.total_duration is not None and r.total_duration >= sum(d or 0 for d in durations)


async def test_chat_streams_lines_then_the_done_line(ol: ollama.AsyncClient) -> None:
    parts = [
        p
        async for p in await ol.chat(
            model="echo", messages=[{"role": "user", "content": "a b c"}], stream=True
        )
    ]
    assert "".join(p.message.content or "" for p in parts) == "a b c"
    assert [p.done for p in parts] == [False, False, False, True]
    assert parts[-1].done_reason == "stop"
    assert parts[-1].eval_count == 3


async def test_generate_streamed_and_whole(ol: ollama.AsyncClient) -> None:
    whole = await ol.generate(model="echo", prompt="x y z", stream=False)
    assert whole.response == "x y z"
    assert whole.done
    parts = [p async for p in await ol.generate(model="echo", prompt="x y", raw=True, stream=True)]
    assert "".join(p.response for p in parts) == "x y"
    assert parts[-1].done


async def test_options_reach_the_backend(
    ol: ollama.AsyncClient, fakes: dict[str, FakeBackend]
) -> None:
    options = {
        "num_predict": 7,
        "temperature": 0.3,
        "top_p": 0.9,
        "top_k": 5,
        "min_p": 0.1,
        "seed": 42,
        "stop": ["zz"],
        "presence_penalty": 0.5,
        "frequency_penalty": 0.25,
        "repeat_penalty": 1.1,
        "num_ctx": 8192,  # the server's business: ignored
    }
    await ol.generate(model="echo", prompt="p", stream=False, options=options)
    s = fakes["echo"].seen[-1].sampling
    assert (s.max_tokens, s.temperature, s.top_p, s.top_k, s.min_p, s.seed) == (
        7,
        0.3,
        0.9,
        5,
        0.1,
        42,
    )
    assert (s.stop, s.presence_penalty, s.frequency_penalty, s.repeat_penalty) == (
        ("zz",),
        0.5,
        0.25,
        1.1,
    )
    await ol.generate(model="echo", prompt="p", stream=False, options={"num_predict": -1})
    assert fakes["echo"].seen[-1].sampling.max_tokens is None  # -1: until the context ends


async def test_tool_calls_come_back_as_ollama_sends_them(ol: ollama.AsyncClient) -> None:
    tool = {"type": "function", "function": {"name": "lookup", "parameters": {"type": "object"}}}
    r = await ol.chat(
        model="echo", messages=[{"role": "user", "content": "find"}], tools=[tool], stream=False
    )
    assert r.message.tool_calls is not None
    call = r.message.tool_calls[0]
    assert call.function.name == "lookup"
    assert call.function.arguments == {"echo": "find"}


async def test_a_tool_answer_is_paired_with_its_call(
    ol: ollama.AsyncClient, fakes: dict[str, FakeBackend]
) -> None:
    call = {"function": {"name": "lookup", "arguments": {"q": "x"}}}
    await ol.chat(
        model="echo",
        messages=[
            {"role": "user", "content": "find x"},
            {"role": "assistant", "content": "", "tool_calls": [call]},
            {"role": "tool", "content": "found", "tool_name": "lookup"},
        ],
        stream=False,
    )
    messages = fakes["echo"].seen[-1].messages
    assert messages is not None
    assert messages[1].tool_calls[0].arguments == '{"q": "x"}'
    assert messages[2].tool_call_id == messages[1].tool_calls[0].id


@pytest.mark.parametrize("tools", [[{"type": "function"}], [{}], [{"type": "web", "function": {}}]])
async def test_malformed_tools_are_400(client: httpx.AsyncClient, tools: object) -> None:
    body = {"model": "echo", "messages": [{"role": "user", "content": "x"}], "tools": tools}
    r = await client.post("/api/chat", json={**body, "stream": False})
    assert r.status_code == 400 and "tools" in r.json()["error"]


async def test_nulls_mean_unset_as_ollama_reads_them(client: httpx.AsyncClient) -> None:
    body = {"model": "echo", "messages": [{"role": "user", "content": None}], "options": None}
    r = await client.post("/api/chat", json={**body, "stream": False})
    assert r.status_code == 200, r.text


async def test_embed_and_the_legacy_embeddings(ol: ollama.AsyncClient) -> None:
    r = await ol.embed(model="echo", input=["a b", "c"])
    assert [list(v) for v in r.embeddings] == [[3.0, 2.0, 1.0], [1.0, 1.0, 1.0]]
    legacy = await ol.embeddings(model="echo", prompt="a b")
    assert list(legacy.embedding) == [3.0, 2.0, 1.0]


async def test_tags_ps_show_version(ol: ollama.AsyncClient, client: httpx.AsyncClient) -> None:
    names = {m.model for m in (await ol.list()).models}
    assert {"echo", "fail_mid_stream"} <= names
    assert "echo" in {m.model for m in (await ol.ps()).models}
    shown = await ol.show("echo")
    assert shown.details is not None and shown.details.family == "fake"
    assert shown.modelinfo == {"general.architecture": "fake", "fake.context_length": 32}
    assert (await client.get("/api/version")).json()["version"]


async def test_errors_are_ollama_shaped(ol: ollama.AsyncClient, client: httpx.AsyncClient) -> None:
    with pytest.raises(ollama.ResponseError) as unknown:
        await ol.chat(model="nope", messages=[{"role": "user", "content": "x"}], stream=False)
    assert unknown.value.status_code == 404
    assert "nope" in unknown.value.error
    for body in ({"messages": []}, {"model": "echo", "messages": [{"role": "x"}]}):
        r = await client.post("/api/chat", json=body)
        assert r.status_code == 400
        assert set(r.json()) == {"error"}
    r = await client.post("/api/chat", content=b"{not json")
    assert r.status_code == 400 and set(r.json()) == {"error"}
    r = await client.get("/api/chat")
    assert r.status_code == 405 and set(r.json()) == {"error"}


async def test_nothing_to_generate_is_ollamas_load_and_unload(
    ol: ollama.AsyncClient, client: httpx.AsyncClient
) -> None:
    loaded = await ol.generate(model="echo")
    assert loaded.done and loaded.done_reason == "load"
    r = await client.post("/api/chat", json={"model": "echo", "messages": [], "keep_alive": 0})
    assert r.json()["done_reason"] == "unload"
    r = await client.post("/api/generate", json={"model": "nope"})
    assert r.status_code == 404
    r = await client.post("/api/show", json={"name": "echo"})  # the older clients' field
    assert r.json()["details"]["family"] == "fake"


async def test_format_reaches_the_backend_and_other_strings_are_refused(
    ol: ollama.AsyncClient, client: httpx.AsyncClient, fakes: dict[str, FakeBackend]
) -> None:
    await ol.generate(model="echo", prompt="x", format="json", stream=False)
    assert fakes["echo"].seen[-1].response_format == ResponseFormat("json_object")
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}}
    await ol.chat(model="echo", messages=[{"role": "user", "content": "x"}], format=schema,
                  stream=False)  # fmt: skip
    assert fakes["echo"].seen[-1].response_format == ResponseFormat("json_schema", schema=schema)
    # (The ollama client refuses to send this; a raw client can.)
    r = await client.post("/api/generate", json={"model": "echo", "prompt": "x", "format": "yaml"})
    assert r.status_code == 400
    assert "format" in r.json()["error"]


async def test_an_error_after_streaming_began_is_an_error_line(ol: ollama.AsyncClient) -> None:
    stream = await ol.chat(
        model="fail_mid_stream", messages=[{"role": "user", "content": "a b c d"}], stream=True
    )
    seen = []

    async def read() -> None:
        async for part in stream:
            seen.append(part.message.content)

    with pytest.raises(ollama.ResponseError, match="mid-stream"):
        await read()
    assert seen == ["a", " b"]


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("POST", "/api/pull"),
        ("POST", "/api/push"),
        ("POST", "/api/create"),
        ("DELETE", "/api/delete"),
        ("POST", "/api/copy"),
        ("POST", "/api/blobs/sha256:abc"),
        ("HEAD", "/api/blobs/sha256:abc"),
    ],
)
async def test_ollama_cve_2024_37032_and_cve_2026_7482_no_model_management(
    client: httpx.AsyncClient, method: str, path: str
) -> None:
    """Nothing a client sends makes the gateway fetch, write or copy a model file."""
    body = {"model": "../../etc/passwd", "name": "x", "source": "echo", "destination": "y"}
    r = await client.request(method, path, json=body)
    assert r.status_code == 404
    if method != "HEAD":
        assert "does not pull, push, create, copy or delete models" in r.json()["error"]


async def test_the_door_is_labelled_in_metrics(
    ol: ollama.AsyncClient, client: httpx.AsyncClient
) -> None:
    await ol.chat(model="echo", messages=[{"role": "user", "content": "a"}], stream=False)
    await ol.generate(model="echo", prompt="a", stream=False)
    text = (await client.get("/metrics")).text
    assert 'lockgate_requests_total{endpoint="ollama_chat",model="echo",status="200"} 1.0' in text
    assert (
        'lockgate_requests_total{endpoint="ollama_generate",model="echo",status="200"} 1.0' in text
    )
